"""An issuer's ``alerts_per_minute`` counts the alerts it creates, not its calls: over real
gRPC, repeats of an alert already created and rejected calls never count, and the next new
alert past the limit is refused with RESOURCE_EXHAUSTED before anything is created."""

from __future__ import annotations

import grpc
import pytest
from grpc_support import BEIJING, create_request, payload

from engine import auth, client
from engine.api import alert_pb2
from engine.auth import Credentials, RateLimits
from engine.clock import ManualClock
from engine.server import ServerOptions, ServerThread

LIMIT = 3
ISSUERS = ("repeats", "invalid", "refused", "concurrent", "other")


@pytest.fixture(scope="module")
def engine():
    made = {name: auth.new_credential(name, "issuer", alerts_per_minute=LIMIT) for name in ISSUERS}
    made["reader"] = auth.new_credential("reader", "operator")
    options = ServerOptions(
        clock=ManualClock(1_800_000_000.0),
        credentials=Credentials(credential for credential, _ in made.values()),
    )
    with ServerThread(options) as server:
        target = f"127.0.0.1:{server.port}"
        server.stubs = {
            name: client.alert_stub(client.connect(target, token=token))
            for name, (_, token) in made.items()
        }
        yield server


def new(stub, alert_id: str) -> alert_pb2.Alert:
    return stub.CreateAlert(create_request(alert_id, [BEIJING]), timeout=10)


def refused(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value.code(), raised.value.details()


def exists(engine, alert_id: str) -> bool:
    get = engine.stubs["reader"].GetAlert
    try:
        get(alert_pb2.GetAlertRequest(alert_id=alert_id), timeout=10)
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.NOT_FOUND
        return False
    return True


def assert_at_limit(engine, name: str, alert_id: str) -> None:
    """The next new alert of issuer ``name`` is refused and creates nothing."""
    code, details = refused(lambda: new(engine.stubs[name], alert_id))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details.startswith(
        f"credential {name} may create at most {LIMIT} new alerts a minute; retry in "
    )
    wait_s = int(details.split("retry in ")[1].split(" s")[0])
    assert 1 <= wait_s <= 60
    assert not exists(engine, alert_id)


def test_repeats_of_a_created_alert_do_not_count(engine):
    stub = engine.stubs["repeats"]
    first = new(stub, "rep-1")
    for _ in range(4 * LIMIT):  # a client retrying after UNAVAILABLE, say
        again = new(stub, "rep-1")
        assert (again.alert_id, again.version) == ("rep-1", first.version)
    for number in range(2, LIMIT + 1):
        new(stub, f"rep-{number}")
    assert_at_limit(engine, "repeats", "rep-next")
    # At the limit, a repeat is still answered with the alert it created.
    assert new(stub, "rep-1").alert_id == "rep-1"


def test_rejected_calls_do_not_count(engine):
    stub = engine.stubs["invalid"]
    no_payload = create_request("inv-x", [BEIJING])
    no_payload.ClearField("payload")
    unknown_schedule = create_request("inv-y", [BEIJING], "nowhere")
    for _ in range(2 * LIMIT):
        for request in (no_payload, unknown_schedule):
            code, _ = refused(lambda r=request: stub.CreateAlert(r, timeout=10))
            assert code == grpc.StatusCode.INVALID_ARGUMENT
    new(stub, "inv-1")
    other_content = create_request("inv-1", [BEIJING], payload=payload(name="someone else"))
    for _ in range(2 * LIMIT):
        code, _ = refused(lambda: stub.CreateAlert(other_content, timeout=10))
        assert code == grpc.StatusCode.ALREADY_EXISTS
    for number in range(2, LIMIT + 1):
        new(stub, f"inv-{number}")
    assert_at_limit(engine, "invalid", "inv-next")


def test_the_limit_refuses_new_alerts_and_refusals_do_not_count(engine):
    stub = engine.stubs["refused"]
    for number in range(1, LIMIT + 1):
        new(stub, f"ref-{number}")
    for attempt in range(3):
        assert_at_limit(engine, "refused", f"ref-next-{attempt}")
    listed = engine.stubs["reader"].ListAlerts(alert_pb2.ListAlertsRequest(), timeout=10)
    assert not [a.alert_id for a in listed.alerts if a.alert_id.startswith("ref-next")]
    # Each issuer has its own minute.
    assert new(engine.stubs["other"], "oth-1").alert_id == "oth-1"


def test_concurrent_new_alerts_never_exceed_the_limit(engine):
    stub = engine.stubs["concurrent"]
    calls = [
        stub.CreateAlert.future(create_request(f"con-{n}", [BEIJING]), timeout=10)
        for n in range(3 * LIMIT)
    ]
    created, codes = [], []
    for number, call in enumerate(calls):
        try:
            created.append(call.result().alert_id)
        except grpc.RpcError as error:
            codes.append(error.code())
            assert not exists(engine, f"con-{number}")
    assert len(created) == LIMIT
    assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * (2 * LIMIT)
    assert all(exists(engine, alert_id) for alert_id in created)


def test_the_window_slides_and_given_back_counts_free_a_place():
    now = [1000.0]
    issuer, _ = auth.new_credential("hq", "issuer", alerts_per_minute=2)
    limits = RateLimits(clock=lambda: now[0])
    first, wait_s = limits.take(issuer)
    assert (first, wait_s) == (1000.0, 0.0)
    now[0] += 20
    second, _ = limits.take(issuer)
    assert second == 1020.0
    now[0] += 10
    assert limits.take(issuer) == (None, 30.0)  # the first leaves the window at 1060
    limits.give_back(issuer, second)  # the second created nothing after all
    again, _ = limits.take(issuer)
    assert again == 1030.0
    assert limits.take(issuer) == (None, 30.0)
    now[0] += 30  # 1060: the first has left the window
    assert limits.take(issuer) == (1060.0, 0.0)
    operator, _ = auth.new_credential("desk", "operator")
    assert limits.take(operator) == (None, 0.0)  # no limit, never counted
