"""The hand-written packed encoding against the protobuf runtime's own.

``engine.wire.packed`` and ``engine.client.encode_batch`` write numpy buffers straight
to the wire; every message they build must parse to what the runtime would have built
from the same values, byte for byte. NaN and infinities are allowed in the doubles here:
the wire carries any bit pattern, and refusing them is the server's job.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine import client, wire
from engine.api import gateway_pb2, location_pb2
from engine.delivery import KIND_FOLLOW_UP, KIND_RECIPIENTS, Entry, timestamp

U64_MAX = 2**64 - 1

u64s = st.one_of(
    st.integers(0, U64_MAX),
    st.integers(U64_MAX - 1_000, U64_MAX),
    st.sampled_from([0, 1, 127, 128, 2**32, 2**63 - 1, 2**63, U64_MAX]),
)
doubles = st.floats(allow_nan=True, allow_infinity=True)
#: Array lengths around the varint steps of the length prefix (1 and 2 bytes).
sizes = st.one_of(st.integers(0, 3), st.integers(0, 40), st.sampled_from([15, 16, 2047, 2048]))


@st.composite
def id_arrays(draw) -> np.ndarray:
    n = draw(sizes)
    values = draw(st.lists(u64s, min_size=min(n, 40), max_size=min(n, 40)))
    # Long arrays repeat the drawn values: the point is the length, not the values.
    values = (values * (n // max(len(values), 1) + 1))[:n] if values else []
    return np.array(values, dtype=np.uint64)


@st.composite
def double_arrays(draw) -> np.ndarray:
    n = draw(sizes)
    values = draw(st.lists(doubles, min_size=min(n, 40), max_size=min(n, 40)))
    values = (values * (n // max(len(values), 1) + 1))[:n] if values else []
    return np.array(values, dtype=np.float64)


def same_doubles(got, want: np.ndarray) -> bool:
    """Equal bit for bit (NaN payloads and the sign of zero included)."""
    got = np.array(got, dtype=np.float64)
    return got.shape == want.shape and np.array_equal(got.view(np.uint64), want.view(np.uint64))


@given(
    gateway=st.one_of(st.integers(0, 65535), st.integers(0, 2**32 - 1)),
    ids=id_arrays(),
    lat=double_arrays(),
    lng=double_arrays(),
    observed=st.one_of(st.none(), double_arrays()),
    strided=st.booleans(),
)
def test_encode_batch_is_what_the_runtime_writes(gateway, ids, lat, lng, observed, strided):
    if strided:  # views that are not contiguous
        ids, lat = np.repeat(ids, 2)[::2], np.repeat(lat, 2)[::2]
    ours = client.encode_batch(gateway, ids, lat, lng, observed)
    theirs = location_pb2.LocationBatch(
        gateway_id=gateway,
        device_ids=ids.tolist(),
        latitudes=lat.tolist(),
        longitudes=lng.tolist(),
        observed_at=[] if observed is None else observed.tolist(),
    )
    assert ours == theirs.SerializeToString()

    back = location_pb2.LocationBatch.FromString(ours)
    assert back.gateway_id == gateway
    assert list(back.device_ids) == ids.tolist()
    assert same_doubles(back.latitudes, lat) and same_doubles(back.longitudes, lng)
    assert same_doubles(back.observed_at, np.array([] if observed is None else observed))


@given(ids=id_arrays(), field=st.sampled_from([2, 15]))
def test_packed_ids_parse_as_the_repeated_fixed64_field(ids, field):
    message = location_pb2.LocationBatch if field == 2 else gateway_pb2.GatewayMessage
    data = wire.packed(field, ids)
    assert (data == b"") == (ids.size == 0), "protobuf writes nothing for an empty field"
    assert list(message.FromString(data).device_ids) == ids.tolist()


def test_a_large_array_gets_a_three_byte_length():
    ids = np.arange(300_000, dtype=np.uint64) * np.uint64(2**40)
    data = wire.packed(2, ids)
    assert data == location_pb2.LocationBatch(device_ids=ids.tolist()).SerializeToString()


@pytest.mark.parametrize(
    "values",
    [np.zeros(3, np.int64), np.zeros(3, np.float32), np.zeros(3, np.uint32), np.array(["x"])],
)
def test_packed_refuses_other_dtypes(values):
    with pytest.raises(ValueError, match="uint64 or float64"):
        wire.packed(2, values)


@given(
    sequence=st.integers(1, U64_MAX),
    ids=st.one_of(st.none(), id_arrays()),
    stage=st.integers(0, 16),
    alert_id=st.text(st.sampled_from("abc-_.:019"), min_size=1, max_size=128),
)
def test_an_entry_encodes_to_the_message_it_describes(sequence, ids, stage, alert_id):
    kind = KIND_RECIPIENTS if stage else KIND_FOLLOW_UP
    header = gateway_pb2.GatewayMessage(
        kind=kind, alert_id=alert_id, payload_version=3, stage_number=stage
    )
    header.queued_at.CopyFrom(timestamp(1_800_000_001.0))
    entry = Entry(kind, alert_id, header, stage, ids)
    data = entry.encode(sequence)
    assert entry.data == data and entry.sequence == sequence

    back = gateway_pb2.GatewayMessage.FromString(data)
    assert (back.sequence, back.kind, back.alert_id) == (sequence, kind, alert_id)
    assert (back.stage_number, back.payload_version) == (stage, 3)
    assert back.queued_at.ToNanoseconds() == 1_800_000_001_000_000_000
    assert list(back.device_ids) == ([] if ids is None else ids.tolist())
    assert entry.devices == (0 if ids is None else ids.size)

    expected = gateway_pb2.GatewayMessage()
    expected.CopyFrom(header)
    expected.device_ids.extend([] if ids is None else ids.tolist())
    assert data == expected.SerializeToString()
