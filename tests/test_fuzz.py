"""Fuzzing every rpc over a real engine: no call may crash a handler.

The strategies and the property are ``bench.fuzz``'s (``python -m bench.fuzz`` runs
thousands of calls per rpc); here each rpc gets a modest number of examples per mode
("typed": well-typed random or perturbed requests; "bytes": mutated encodings). Every
call must end with OK or a clean status (INVALID_ARGUMENT, NOT_FOUND...), never UNKNOWN
or INTERNAL; the engine logs no error, stays healthy, and a failed call changes nothing.

The profile follows ``HYPOTHESIS_PROFILE``: "fuzz-ci" by default, "fuzz-thorough"
when the suite runs with "thorough". After the property tests, one test per bug the
fuzzer found, with the input that reproduced it.
"""

from __future__ import annotations

import os

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.fuzz import MODES, TARGETS, FuzzWorld, cases, valid_create
from engine.api import alert_pb2, gateway_pb2

settings.register_profile(
    "fuzz-ci",
    max_examples=30,
    deadline=None,
    print_blob=True,
    suppress_health_check=list(HealthCheck),
)
settings.register_profile(
    "fuzz-thorough",
    max_examples=500,
    deadline=None,
    print_blob=True,
    suppress_health_check=list(HealthCheck),
)
PROFILE = "fuzz-thorough" if os.environ.get("HYPOTHESIS_PROFILE") == "thorough" else "fuzz-ci"

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def world():
    with FuzzWorld() as world:
        yield world


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("target", TARGETS, ids=[t.name for t in TARGETS])
@settings(settings.get_profile(PROFILE))
@given(data=st.data())
def test_every_call_ends_cleanly(world, target, mode, data):
    case = data.draw(cases(target, mode), label="case")
    outcome = world.exercise(target, case)
    assert not outcome.problems, (outcome.code, outcome.details, outcome.problems)


# The fuzzer's findings, each with the input that reproduced it.


def _raw(world: FuzzWorld, method: str, data: bytes, caller: str = "fuzz-issuer"):
    return world.channels[caller].unary_unary(method)(data, timeout=10)


def _refused(call, code=INVALID) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == code, caught.value.details()
    return caught.value.details()


#: Field 1, length-delimited, claiming 5 bytes of which 2 follow: corrupt in every
#: message type (as an unknown field where field 1 is not length-delimited).
TRUNCATED = b"\x0a\x05ab"

UNARY = [
    ("/tuanyuan.v1.AlertService/" + name, "fuzz-issuer")
    for name in (
        "CreateAlert",
        "UpdateAlert",
        "ResolveAlert",
        "GetAlert",
        "ListAlerts",
        "PreviewAlert",
    )
] + [("/tuanyuan.v1.LocationService/ForgetDevices", "reporter-1")]


@pytest.mark.parametrize(("method", "caller"), UNARY, ids=[m.rpartition("/")[2] for m, _ in UNARY])
def test_bytes_that_do_not_parse_are_invalid_argument(world, method, caller):
    # Found: grpc's own deserialization failed, so the call ended UNKNOWN with a
    # traceback in the log, as if the handler had crashed.
    details = _refused(lambda: _raw(world, method, TRUNCATED, caller))
    assert "does not parse as" in details
    # A proto3 string that is not UTF-8 (GetAlertRequest.alert_id).
    if method.endswith("GetAlert"):
        _refused(lambda: _raw(world, method, b"\x0a\x02\xff\xfe"))


def test_a_watch_request_that_does_not_parse_is_invalid_argument(world):
    call = world.channels["fuzz-issuer"].unary_stream("/tuanyuan.v1.AlertService/WatchAlert")
    _refused(lambda: list(call(TRUNCATED, timeout=10)))


def _subscribe(world: FuzzWorld, upstream: list[bytes]):
    call = world.channels["gateway-1"].stream_stream("/tuanyuan.v1.GatewayService/Subscribe")
    return list(call(iter(upstream), timeout=10))


def test_upstream_messages_that_do_not_parse_end_the_subscription(world):
    hello = gateway_pb2.GatewayUpstream(hello=gateway_pb2.Hello(gateway_id=1))
    # Found: a first message that does not parse ended the stream UNKNOWN ...
    assert "message 0" in _refused(lambda: _subscribe(world, [TRUNCATED]))
    # ... and one after the hello ended it with OK, the reader's exception unseen.
    details = _refused(lambda: _subscribe(world, [hello.SerializeToString(), TRUNCATED]))
    assert "message 1" in details


@pytest.mark.parametrize(
    ("field", "stamp"),
    [
        ("start_time", Timestamp(seconds=-(2**63))),
        ("start_time", Timestamp(seconds=253_402_300_800)),
        ("payload.last_seen_at", Timestamp(seconds=1, nanos=-1)),
        ("payload.last_seen_at", Timestamp(seconds=-62_135_596_801)),
    ],
    ids=["start_time-min-int64", "start_time-year-10000", "last_seen-nanos-1", "last_seen-year-0"],
)
def test_a_timestamp_out_of_range_is_invalid_argument(world, field, stamp):
    # Found: Timestamp.ToNanoseconds raised ValueError, so the call ended UNKNOWN.
    request = valid_create("bad-time")
    target = request.payload.last_seen_at if field.startswith("payload") else request.start_time
    target.CopyFrom(stamp)
    before = world.state()
    details = _refused(lambda: world.alerts.CreateAlert(request, timeout=10))
    assert field in details
    assert world.state() == before

    if field.startswith("payload"):
        update = alert_pb2.UpdateAlertRequest(alert_id="later", payload=request.payload)
        assert field in _refused(lambda: world.alerts.UpdateAlert(update, timeout=10))


LONG = "x" * 70_000


@pytest.mark.parametrize(
    "call",
    [
        lambda a: a.GetAlert(alert_pb2.GetAlertRequest(alert_id=LONG), timeout=10),
        lambda a: list(a.WatchAlert(alert_pb2.WatchAlertRequest(alert_id=LONG), timeout=10)),
        lambda a: a.UpdateAlert(
            alert_pb2.UpdateAlertRequest(alert_id=LONG, schedule_name="local"), timeout=10
        ),
        lambda a: a.ResolveAlert(
            alert_pb2.ResolveAlertRequest(alert_id=LONG, resolution=1), timeout=10
        ),
        lambda a: a.PreviewAlert(
            alert_pb2.PreviewAlertRequest(
                centres=[alert_pb2.Centre(latitude=1.0, longitude=1.0)], schedule_name=LONG
            ),
            timeout=10,
        ),
    ],
    ids=["GetAlert", "WatchAlert", "UpdateAlert", "ResolveAlert", "PreviewAlert-schedule_name"],
)
def test_a_long_value_is_not_echoed_whole(world, call):
    # Found: the message quoted the whole value; past 8 KiB the client cannot read the
    # trailer and sees RESOURCE_EXHAUSTED "received metadata size exceeds ..." instead.
    details = _refused(lambda: call(world.alerts))
    assert "70000 characters" in details and len(details) < 1_000


def test_a_rate_below_one_device_a_second_is_refused(world):
    # Found while reading what the fuzzer's hellos could do once held open (its streams
    # close at once, so it cannot see this itself): while a gateway that declared 1e-300
    # devices a second was connected, every GetAlert and ListAlerts of an alert with
    # devices queued for it failed UNKNOWN, the hand-over time (now + devices / rate)
    # overflowing the Timestamp. At 1e-9, a thousand devices already pass the year 9999.
    for rate in (1e-300, 0.5):
        hello = gateway_pb2.GatewayUpstream(
            hello=gateway_pb2.Hello(gateway_id=1, max_devices_per_second=rate)
        )
        details = _refused(lambda hello=hello: _subscribe(world, [hello.SerializeToString()]))
        assert "hello.max_devices_per_second" in details
