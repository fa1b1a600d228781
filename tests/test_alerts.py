"""new_recipients: each device is notified at most once per alert, and after every
call every live device inside the alert's rings has been notified."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, note
from hypothesis import strategies as st
from oracle import Key, Model, Ring, union
from support import T0, FakeClock, destination, places, populations

import engine

BEIJING = (39.9042, 116.4074)


def as_keys(by_gateway: dict) -> list[Key]:
    """Flattens ``{gateway: ids}`` after checking its types."""
    keys = []
    for gateway, ids in by_gateway.items():
        assert isinstance(gateway, int) and 0 <= gateway <= 65535
        assert isinstance(ids, np.ndarray) and ids.dtype == np.uint64 and ids.ndim == 1
        keys.extend((gateway, int(i)) for i in ids.tolist())
    return keys


def recorded(record: engine.AlertRecord) -> set[Key]:
    """Everything a record holds, read through its public accessors."""
    keys = set()
    gateways = record.gateways()
    assert list(gateways) == sorted(gateways)
    for gateway in gateways:
        ids = record.ids(gateway)
        assert ids.dtype == np.uint64 and list(ids) == sorted(ids)
        keys.update((int(gateway), int(i)) for i in ids.tolist())
    assert len(record) == len(keys)
    return keys


def u64(values) -> np.ndarray:
    return np.array(values, dtype=np.uint64)


# --- unit tests -----------------------------------------------------------------------


def test_recipients_come_by_gateway_and_are_recorded(index):
    index.upsert([1, 2], [10.0, 10.0], [20.0, 20.0], gateway=0)
    index.upsert([1, 9], [10.0, 10.0], [20.0, 20.0], gateway=65535)
    index.upsert([3], [10.0], [20.0], gateway=7)
    index.upsert([4], [-10.0], [20.0], gateway=7)  # far away
    record = engine.AlertRecord()
    assert len(record) == 0 and record.gateways() == []
    out = index.new_recipients(record, 10.0, 20.0, 100.0)
    assert sorted(out) == [0, 7, 65535]
    assert {g: sorted(ids.tolist()) for g, ids in out.items()} == {0: [1, 2], 7: [3], 65535: [1, 9]}
    assert recorded(record) == {(0, 1), (0, 2), (7, 3), (65535, 1), (65535, 9)}
    assert record.contains(65535, 9) and not record.contains(0, 9) and not record.contains(7, 4)
    # Nobody twice: the same ring again returns nobody.
    assert as_keys(index.new_recipients(record, 10.0, 20.0, 100.0)) == []
    assert len(record) == 5


def test_a_growing_ring_returns_only_the_new_band(index):
    distances = np.array([0.0, 50.0, 150.0, 450.0, 1_350.0, 4_050.0])
    lat, lng = destination(*BEIJING, distances, np.linspace(0, 300, distances.size))
    index.upsert(np.arange(distances.size), lat, lng)
    record = engine.AlertRecord()
    bands = [
        sorted(as_keys(index.new_recipients(record, *BEIJING, r)))
        for r in (0.0, 100.0, 1_000.0, 1_000.0, 5_000.0)
    ]
    assert bands == [[(0, 0)], [(0, 1)], [(0, 2), (0, 3)], [], [(0, 4), (0, 5)]]


def test_overlapping_centres_return_a_device_once(index):
    index.upsert(np.arange(100), np.full(100, 0.0), np.full(100, 180.0))
    record = engine.AlertRecord()
    out = index.new_recipients(record, [0.0, 0.0, 0.0], [180.0, -180.0, 179.99999], 10.0)
    keys = as_keys(out)
    assert sorted(keys) == [(0, i) for i in range(100)]


def test_one_centre_as_scalars_or_arrays(index):
    index.upsert([1, 2], [5.0, 5.0], [5.0, 5.001])
    by_scalar = index.new_recipients(engine.AlertRecord(), 5.0, 5.0, 20.0)
    by_array = index.new_recipients(engine.AlertRecord(), np.array([5.0]), [5.0], 20.0)
    assert as_keys(by_scalar) == as_keys(by_array) == [(0, 1)]


def test_no_centres_return_nobody(index):
    index.upsert([1], [5.0], [5.0])
    record = engine.AlertRecord()
    assert as_keys(index.new_recipients(record, np.array([]), np.array([]), 1e9)) == []
    assert len(record) == 0


def test_a_restored_record_is_respected(index):
    """Devices notified by another node (record.add) are not notified again here."""
    index.upsert([1, 2, 3], [5.0] * 3, [5.0] * 3, gateway=[0, 0, 4])
    record = engine.AlertRecord()
    assert record.add(0, u64([2, 99])) == 2
    assert record.add(0, u64([2])) == 0
    assert sorted(as_keys(index.new_recipients(record, 5.0, 5.0, 1.0))) == [(0, 1), (4, 3)]
    assert recorded(record) == {(0, 1), (0, 2), (0, 99), (4, 3)}


def test_alerts_keep_separate_records(index):
    index.upsert([1, 2], [5.0, 5.0], [5.0, 5.0])
    first, second = engine.AlertRecord(), engine.AlertRecord()
    assert len(as_keys(index.new_recipients(first, 5.0, 5.0, 1.0))) == 2
    assert len(as_keys(index.new_recipients(second, 5.0, 5.0, 1.0))) == 2


def test_moving_out_and_back_or_reinstalling_does_not_renotify(index, clock):
    index.upsert([1, 2, 3], [5.0] * 3, [5.0] * 3)
    record = engine.AlertRecord()
    assert len(as_keys(index.new_recipients(record, 5.0, 5.0, 10.0))) == 3
    clock.advance(1)
    index.upsert([1], [6.0], [6.0])  # out of the ring
    index.remove([2])
    assert as_keys(index.new_recipients(record, 5.0, 5.0, 10.0)) == []
    clock.advance(1)
    index.upsert([1, 2, 4], [5.0] * 3, [5.0] * 3)  # back, reinstalled, and a newcomer
    index.compact()
    assert as_keys(index.new_recipients(record, 5.0, 5.0, 10.0)) == [(0, 4)]


def test_expired_devices_are_not_notified_until_they_report_again(clock):
    index = engine.LocationIndex(ttl_s=60, clock=clock)
    index.upsert([1, 2], [5.0, 5.0], [5.0, 5.0], seen_at=[T0 - 61, T0])
    record = engine.AlertRecord()
    assert as_keys(index.new_recipients(record, 5.0, 5.0, 10.0)) == [(0, 2)]
    assert as_keys(index.new_recipients(record, 5.0, 5.0, 10.0, now=T0 + 61)) == []
    index.upsert([1], [5.0], [5.0])
    assert as_keys(index.new_recipients(record, 5.0, 5.0, 10.0)) == [(0, 1)]


# --- bad input ------------------------------------------------------------------------


@pytest.fixture
def guarded(index):
    """An index with devices, a record holding one, and a check that bad calls changed
    neither."""
    index.upsert([1, 2], [5.0, 5.0], [5.0, 5.0])
    record = engine.AlertRecord()
    record.add(0, u64([1]))
    yield index, record
    assert recorded(record) == {(0, 1)}, "a refused call changed the record"
    assert len(index) == 2


@pytest.mark.parametrize("bad", [None, {}, object(), "record", engine.LocationIndex])
def test_only_an_alert_record_is_accepted(guarded, bad):
    index, _ = guarded
    with pytest.raises(ValueError, match=r"^record"):
        index.new_recipients(bad, 5.0, 5.0, 10.0)


@pytest.mark.parametrize(
    ("lat", "lng", "radius", "name"),
    [
        (5.0, 5.0, -1.0, "radius_m"),
        (5.0, 5.0, math.nan, "radius_m"),
        (5.0, 5.0, "10", "radius_m"),
        ([5.0, 5.0], [5.0], 10.0, "lng"),
        (["5"], [5.0], 10.0, "lat"),
        ([5.0], [5j], 10.0, "lng"),
        ([[5.0]], [[5.0]], 10.0, "lat"),
        (math.nan, 5.0, 10.0, "lat"),
        (5.0, 200.0, 10.0, "lng"),
    ],
)
def test_bad_rings_are_refused_and_named(guarded, lat, lng, radius, name):
    index, record = guarded
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        index.new_recipients(record, lat, lng, radius)


@pytest.mark.parametrize(
    ("lat", "lng", "name", "count", "first"),
    [
        ([5.0, 95.0, 5.0, -99.0], [5.0] * 4, "lat", 2, 1),
        ([5.0, 5.0, 5.0], [5.0, 5.0, math.inf], "lng", 1, 2),
        ([5.0, math.nan], [5.0, math.nan], "lat", 1, 1),
    ],
)
def test_bad_centres_are_named_with_count_and_position(guarded, lat, lng, name, count, first):
    """Among many centres, the message points at the culprit as for upsert: the
    argument, how many values are wrong and the first position."""
    index, record = guarded
    with pytest.raises(ValueError) as error:
        index.new_recipients(record, lat, lng, 10.0)
    message = str(error.value)
    assert message.startswith(name), message
    assert f"{count} value" in message, message
    assert f"position {first}" in message, message


# --- properties -----------------------------------------------------------------------

TTL = 600


@given(population=populations(max_clusters=3, max_per_cluster=120), data=st.data())
def test_an_alert_notifies_everyone_inside_once(population, data):
    """An alert's rings grow, gain centres, move; between calls devices move, leave,
    arrive and expire. Each call returns exactly the live devices inside the rings that
    the record does not hold yet (up to the 1 m band), and records them."""
    clock = FakeClock(T0)
    index = engine.LocationIndex(ttl_s=TTL, clock=clock)
    model = Model(TTL)
    ages = data.draw(
        st.lists(
            st.sampled_from([0, 0, 100, 550]), min_size=len(population), max_size=len(population)
        ),
        label="ages",
    )
    seen = T0 - np.array(ages, dtype=np.float64)
    index.upsert(
        population.ids, population.lat, population.lng, gateway=population.gateways, seen_at=seen
    )
    model.upsert(
        zip(
            population.gateways.tolist(),
            population.ids.tolist(),
            population.lat.tolist(),
            population.lng.tolist(),
            seen.tolist(),
            strict=True,
        ),
        T0,
    )

    record = engine.AlertRecord()
    notified: set[Key] = set()
    if data.draw(st.booleans(), label="restore part of the record"):
        # Devices another node notified already.
        for gateway, device_id in data.draw(
            st.lists(st.sampled_from(population.keys()), max_size=10), label="restored"
        ):
            record.add(gateway, u64([device_id]))
            notified.add((gateway, device_id))

    centres = [data.draw(st.one_of(st.sampled_from(population.anchors), places()), label="centre")]
    radius = data.draw(st.sampled_from([0.0, 1.0, 30.0, 400.0]), label="first radius")
    next_id = 2**40
    for step in range(data.draw(st.integers(1, 6), label="steps")):
        lats = [c[0] for c in centres]
        lngs = [c[1] for c in centres]
        out = index.new_recipients(record, lats, lngs, radius)
        got = as_keys(out)
        expected: Ring = union(model.ring(lat, lng, radius, clock.t) for lat, lng in centres)
        note(f"step {step}: {len(centres)} centre(s), radius {radius}, returned {len(got)}")
        assert len(got) == len(set(got)), "a device returned twice in one call"
        assert not set(got) & notified, f"notified again: {sorted(set(got) & notified)[:5]}"
        missing = (expected.must - notified) - set(got)
        assert not missing, f"missing {sorted(missing)[:5]}"
        extra = set(got) - expected.may
        assert not extra, f"outside the rings: {sorted(extra)[:5]}"
        notified |= set(got)
        assert recorded(record) == notified

        # The alert widens, or gains a centre (a sighting elsewhere).
        radius = radius * data.draw(st.sampled_from([1.0, 2.0, 5.0]), label="growth") + 10.0
        if data.draw(st.booleans(), label="new centre"):
            centres.append(data.draw(st.one_of(st.sampled_from(population.anchors), places())))
        # Meanwhile devices move, disappear, arrive, and time passes.
        clock.advance(data.draw(st.sampled_from([0, 1, 60, 200]), label="seconds"))
        keys = sorted(model.held)
        movers = (
            data.draw(st.lists(st.sampled_from(keys), max_size=8), label="movers") if keys else []
        )
        rows = []
        for gateway, device_id in movers:
            alat, alng = data.draw(st.sampled_from(centres), label="towards")
            dist = data.draw(st.sampled_from([0.0, 0.5, 20.0, 300.0, 5_000.0]), label="off")
            mlat, mlng = destination(alat, alng, np.array([dist]), np.array([37.0 * step]))
            rows.append((gateway, device_id, float(mlat[0]), float(mlng[0]), clock.t))
        for _ in range(data.draw(st.integers(0, 3), label="arrivals")):
            alat, alng = data.draw(st.sampled_from(centres), label="arrival place")
            rows.append((data.draw(st.sampled_from([0, 65535])), next_id, alat, alng, clock.t))
            next_id += 1
        if rows:
            gateways, ids, rlat, rlng, rseen = zip(*rows, strict=True)
            index.upsert(
                u64(ids), rlat, rlng, gateway=np.array(gateways, dtype=np.uint16), seen_at=rseen
            )
            model.upsert(rows, clock.t)
        if data.draw(st.booleans(), label="compact"):
            index.compact()
        gone = (
            data.draw(st.lists(st.sampled_from(keys), max_size=3), label="removed") if keys else []
        )
        for gateway, device_id in gone:
            assert index.remove([device_id], gateway=gateway) == model.remove([device_id], gateway)
