"""The auth matrix: every rpc of the engine called by every kind of caller.

``python -m bench.auth_matrix`` starts a real engine (port 0, manual clock, the
development credentials of gateways 1 and 2), calls each of the 10 tuanyuan rpcs, the
health check and reflection once per caller (issuer, operator, reporter-1, gateway-1,
no token, an unknown token), then the cross-gateway cases (a reporter or gateway of
gateway 1 acting for gateway 2). It writes ``bench/results/auth_matrix.json`` and
``auth_matrix.md`` (rows: rpc; columns: caller; cells: status code) and exits with 1
when a cell differs from :data:`RPCS`' expectation or a refused call changed anything.

``tests/test_auth_matrix.py`` runs the same table (:data:`RPCS`, :data:`CALLERS`,
:data:`CROSS_GATEWAY`) against the same :class:`World`.

What a cell must be: no token or an unknown one is UNAUTHENTICATED, a role the rpc does
not admit is PERMISSION_DENIED, and an admitted call ends however its request makes it
end (OK, NOT_FOUND...), never with either of those two. Health and reflection are open
to everyone. A refused call changes nothing: the alerts as ListAlerts shows them, the
live device count and every gateway's queue are the same before and after it.
"""

from __future__ import annotations

import argparse
import json
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from engine import auth, client
from engine.api import (
    alert_pb2,
    alert_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    location_pb2,
    location_pb2_grpc,
)
from engine.clock import ManualClock
from engine.server import ServerOptions, ServerThread

#: Where the engine's manual clock stands (January 2027); it never moves here.
START = 1_800_000_000.0
#: Real seconds any one call may take before it counts as a hang.
TIMEOUT_S = 10.0
#: Where the devices of gateways 1 and 2 are, and the alerts' centre.
BEIJING = (39.9042, 116.4074)
#: Far from every alert: where refused batches would have put their devices.
SHANGHAI = (31.2304, 121.4737)
DEVICES_PER_GATEWAY = 200

ADMITTED = "admitted"
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED.name
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED.name

#: Columns: each caller and the credential whose token it sends (None: no token;
#: "wrong": a well-formed token the engine does not know).
CALLERS: dict[str, str | None] = {
    "issuer": "dev-issuer",
    "operator": "dev-operator",
    "reporter-1": "dev-reporter-1",
    "gateway-1": "dev-gateway-1",
    "no token": None,
    "wrong token": "wrong",
}
#: The role of each caller that has a credential.
ROLE_OF = {
    "issuer": auth.ISSUER,
    "operator": auth.OPERATOR,
    "reporter-1": auth.REPORTER,
    "gateway-1": auth.GATEWAY,
}


# The engine the matrix runs against.


def _batch(gateway: int, first_id: int, n: int, place: tuple[float, float]) -> bytes:
    """``n`` devices of ``gateway`` from id ``first_id``, spread over a few hundred
    metres around ``place``."""
    rng = np.random.default_rng(first_id + gateway)
    ids = np.arange(first_id, first_id + n, dtype=np.uint64)
    lat = place[0] + rng.uniform(-0.003, 0.003, n)
    lng = place[1] + rng.uniform(-0.003, 0.003, n)
    return client.encode_batch(gateway, ids, lat, lng)


def _stages(*pairs: tuple[float, int]) -> alert_pb2.Stages:
    return alert_pb2.Stages(stages=[alert_pb2.Stage(radius_m=r, duration_s=d) for r, d in pairs])


def create_request(alert_id: str, place: tuple[float, float] = BEIJING):
    """A valid CreateAlert: one centre, a 2 km ring for an hour."""
    return alert_pb2.CreateAlertRequest(
        alert_id=alert_id,
        centres=[alert_pb2.Centre(latitude=place[0], longitude=place[1], label="station")],
        stages=_stages((2_000.0, 3_600)),
        payload=alert_pb2.AlertPayload(
            texts=[alert_pb2.LocalizedText(language="en", name="Li Xiaoming", contact="110")],
            age_years=6,
            sex=alert_pb2.SEX_MALE,
        ),
    )


def _hello(gateway: int) -> gateway_pb2.GatewayUpstream:
    return gateway_pb2.GatewayUpstream(hello=gateway_pb2.Hello(gateway_id=gateway))


class World:
    """An engine with credentials, devices of gateways 1 and 2 around Beijing, an
    active alert ``open`` whose first stage queued devices of both gateways (no gateway
    is connected, so they wait) and a resolved alert ``done``; a channel per caller."""

    def __init__(self) -> None:
        credentials, self.tokens = auth.dev_credentials((1, 2))
        self.tokens["wrong"] = auth.new_token()
        self.clock = ManualClock(START)
        self.thread = ServerThread(
            ServerOptions(clock=self.clock, ttl_s=30 * 86_400, credentials=credentials)
        )
        self.port = self.thread.start()
        target = f"127.0.0.1:{self.port}"
        self.channels: dict[str, grpc.Channel] = {}
        for name, token in self.tokens.items():
            self.channels[name] = client.connect(target, token=token)
        self.channels["none"] = client.connect(target)
        try:
            self._populate()
        except BaseException:
            self.close()
            raise

    def channel(self, caller: str) -> grpc.Channel:
        """The channel of a column of :data:`CALLERS` or of a credential's name."""
        token_name = CALLERS.get(caller, caller)
        return self.channels["none" if token_name is None else token_name]

    def _populate(self) -> None:
        for gateway in (1, 2):
            summary = client.report(
                self.channel(f"dev-reporter-{gateway}"),
                [_batch(gateway, 1, DEVICES_PER_GATEWAY, BEIJING)],
                timeout=TIMEOUT_S,
            )
            assert summary.added == DEVICES_PER_GATEWAY, summary
        issuer = self.alerts("issuer")
        self.open_request = create_request("open")
        issuer.CreateAlert(self.open_request, timeout=TIMEOUT_S)
        issuer.CreateAlert(create_request("done"), timeout=TIMEOUT_S)
        self.wait(lambda: self._swept("open") and self._swept("done"), "the first sweeps")
        issuer.ResolveAlert(
            alert_pb2.ResolveAlertRequest(
                alert_id="done", resolution=alert_pb2.RESOLUTION_FALSE_REPORT
            ),
            timeout=TIMEOUT_S,
        )

    def _swept(self, alert_id: str) -> bool:
        alert = self.alerts("operator").GetAlert(
            alert_pb2.GetAlertRequest(alert_id=alert_id), timeout=TIMEOUT_S
        )
        gateways = {g.gateway_id for s in alert.stages for g in s.gateways if g.recipients}
        return gateways == {1, 2}

    @staticmethod
    def wait(predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            time.sleep(0.01)

    def alerts(self, caller: str) -> alert_pb2_grpc.AlertServiceStub:
        return alert_pb2_grpc.AlertServiceStub(self.channel(caller))

    def devices_near(self, place: tuple[float, float], radius_m: float = 1_000.0) -> dict:
        """Live devices within ``radius_m`` of ``place``, by gateway (PreviewAlert)."""
        request = alert_pb2.PreviewAlertRequest(
            centres=[alert_pb2.Centre(latitude=place[0], longitude=place[1])],
            stages=_stages((radius_m, 60)),
        )
        stage = self.alerts("operator").PreviewAlert(request, timeout=TIMEOUT_S).stages[0]
        return {count.gateway_id: count.devices for count in stage.new_by_gateway}

    def state(self) -> tuple:
        """What a refused call must leave as it was: the alerts (ListAlerts), the live
        devices and each gateway's queue (last ack, next sequence, queued, unacked,
        whether a stream is attached)."""
        alerts = self.alerts("issuer").ListAlerts(alert_pb2.ListAlertsRequest(), timeout=TIMEOUT_S)
        preview = alert_pb2.PreviewAlertRequest(
            centres=[alert_pb2.Centre()], stages=_stages((1.0, 1))
        )
        live = self.alerts("operator").PreviewAlert(preview, timeout=TIMEOUT_S).live_devices

        async def queues():
            return {
                gateway: (
                    box.acked,
                    box.next_sequence,
                    len(box.queued),
                    len(box.unacked),
                    box.connection is not None,
                )
                for gateway, box in sorted(self.thread.engine.dispatcher.outboxes.items())
            }

        return alerts.SerializeToString(deterministic=True), live, self.thread.call(queues)

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()
        self.thread.stop()

    def __enter__(self) -> World:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# The rows: one call of each rpc, the same request whoever makes it.


def _create(world: World, channel: grpc.Channel) -> None:
    # The content of "open" again: an admitted call is an idempotent repeat.
    alert_pb2_grpc.AlertServiceStub(channel).CreateAlert(world.open_request, timeout=TIMEOUT_S)


def _update(world: World, channel: grpc.Channel) -> None:
    request = alert_pb2.UpdateAlertRequest(
        alert_id="nobody", payload=world.open_request.payload
    )  # admitted: NOT_FOUND, so the matrix changes no alert
    alert_pb2_grpc.AlertServiceStub(channel).UpdateAlert(request, timeout=TIMEOUT_S)


def _resolve(world: World, channel: grpc.Channel) -> None:
    request = alert_pb2.ResolveAlertRequest(
        alert_id="nobody", resolution=alert_pb2.RESOLUTION_FOUND
    )  # admitted: NOT_FOUND
    alert_pb2_grpc.AlertServiceStub(channel).ResolveAlert(request, timeout=TIMEOUT_S)


def _get(world: World, channel: grpc.Channel) -> None:
    request = alert_pb2.GetAlertRequest(alert_id="open")
    alert_pb2_grpc.AlertServiceStub(channel).GetAlert(request, timeout=TIMEOUT_S)


def _list(world: World, channel: grpc.Channel) -> None:
    alert_pb2_grpc.AlertServiceStub(channel).ListAlerts(
        alert_pb2.ListAlertsRequest(), timeout=TIMEOUT_S
    )


def _watch(world: World, channel: grpc.Channel) -> None:
    # A closed alert: the stream sends its snapshot and ends.
    request = alert_pb2.WatchAlertRequest(alert_id="done")
    events = list(alert_pb2_grpc.AlertServiceStub(channel).WatchAlert(request, timeout=TIMEOUT_S))
    assert [e.kind for e in events] == [alert_pb2.ALERT_EVENT_KIND_SNAPSHOT], events


def _preview(world: World, channel: grpc.Channel) -> None:
    request = alert_pb2.PreviewAlertRequest(
        centres=world.open_request.centres, schedule_name="local"
    )
    alert_pb2_grpc.AlertServiceStub(channel).PreviewAlert(request, timeout=TIMEOUT_S)


def _report(world: World, channel: grpc.Channel) -> None:
    # The devices gateway 1 already has, where they are: nothing moves when admitted.
    batch = _batch(1, 1, DEVICES_PER_GATEWAY, BEIJING)
    client.report(channel, [batch], timeout=TIMEOUT_S)


def _forget(world: World, channel: grpc.Channel) -> None:
    # An id gateway 1 never reported: an admitted call forgets nobody.
    stub = location_pb2_grpc.LocationServiceStub(channel)
    stub.ForgetDevices(
        location_pb2.ForgetDevicesRequest(gateway_id=1, device_ids=[10**12]), timeout=TIMEOUT_S
    )


def _subscribe(world: World, channel: grpc.Channel) -> None:
    # The hello, then the gateway closes its side: an admitted stream ends with OK.
    stub = gateway_pb2_grpc.GatewayServiceStub(channel)
    for _ in stub.Subscribe(iter([_hello(1)]), timeout=TIMEOUT_S):
        pass


def _health(world: World, channel: grpc.Channel) -> None:
    response = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT_S
    )
    assert response.status == health_pb2.HealthCheckResponse.SERVING, response


def _reflection(world: World, channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (response,) = stub.ServerReflectionInfo(iter([request]), timeout=TIMEOUT_S)
    names = {s.name for s in response.list_services_response.service}
    assert "tuanyuan.v1.AlertService" in names, names


@dataclass(frozen=True)
class Rpc:
    """One row of the matrix."""

    #: The full method name, as gRPC and auth.METHOD_ROLES spell it.
    method: str
    #: Roles admitted; None for a service open to everyone.
    roles: frozenset[str] | None
    #: One call through a channel; raises grpc.RpcError when it fails.
    call: Callable[[World, grpc.Channel], None]
    #: Whether the call streams (requests, responses or both).
    stream: str = ""

    @property
    def name(self) -> str:
        """``AlertService.CreateAlert``, for tables and test ids."""
        service, _, method = self.method.lstrip("/").partition("/")
        return f"{service.rpartition('.')[2]}.{method}"


_A = "/tuanyuan.v1.AlertService/"
_L = "/tuanyuan.v1.LocationService/"
_ISSUER = frozenset({auth.ISSUER})
_READERS = frozenset({auth.ISSUER, auth.OPERATOR})

#: Who may call what, written out independently of auth.METHOD_ROLES (the test checks
#: that the two agree, so a change to either shows up).
RPCS: tuple[Rpc, ...] = (
    Rpc(_A + "CreateAlert", _ISSUER, _create),
    Rpc(_A + "UpdateAlert", _ISSUER, _update),
    Rpc(_A + "ResolveAlert", _ISSUER, _resolve),
    Rpc(_A + "GetAlert", _READERS, _get),
    Rpc(_A + "ListAlerts", _READERS, _list),
    Rpc(_A + "WatchAlert", _READERS, _watch, "server"),
    Rpc(_A + "PreviewAlert", _READERS, _preview),
    Rpc(_L + "ReportLocations", frozenset({auth.REPORTER}), _report, "client"),
    Rpc(_L + "ForgetDevices", frozenset({auth.REPORTER}), _forget),
    Rpc("/tuanyuan.v1.GatewayService/Subscribe", frozenset({auth.GATEWAY}), _subscribe, "bidi"),
    Rpc("/grpc.health.v1.Health/Check", None, _health),
    Rpc(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", None, _reflection, "bidi"
    ),
)


def expected(rpc: Rpc, caller: str) -> str:
    """:data:`ADMITTED`, or the status code that must refuse the call."""
    if rpc.roles is None:
        return ADMITTED
    if caller not in ROLE_OF:
        return UNAUTHENTICATED
    return ADMITTED if ROLE_OF[caller] in rpc.roles else PERMISSION_DENIED


def status_of(call: Callable[[], object]) -> tuple[str, str]:
    """Runs a call; its status code's name and details ("OK" and "" on success)."""
    try:
        call()
    except grpc.RpcError as error:
        return error.code().name, error.details() or ""
    return grpc.StatusCode.OK.name, ""


@dataclass(frozen=True)
class Cell:
    code: str
    details: str
    expected: str
    #: Whether the engine's state (World.state) was the same after the call; checked
    #: for refusals only (an admitted Subscribe hands messages over, for one).
    unchanged: bool | None

    @property
    def ok(self) -> bool:
        if self.expected == ADMITTED:
            return self.code not in (UNAUTHENTICATED, PERMISSION_DENIED)
        return self.code == self.expected and self.unchanged is True


def run_cell(world: World, rpc: Rpc, caller: str) -> Cell:
    want = expected(rpc, caller)
    before = world.state() if want != ADMITTED else None
    code, details = status_of(lambda: rpc.call(world, world.channel(caller)))
    unchanged = None if before is None else world.state() == before
    return Cell(code, details, want, unchanged)


# Cross-gateway: credentials of gateway 1 acting for gateway 2.


@dataclass(frozen=True)
class CrossResult:
    code: str
    details: str
    #: The checks the case makes beyond the status code, by name.
    checks: dict[str, bool]

    @property
    def ok(self) -> bool:
        return self.code == PERMISSION_DENIED and all(self.checks.values())


def _report_for_gateway_2(world: World) -> CrossResult:
    """reporter-1 reports devices of gateway 2 (in Shanghai, where nobody is)."""
    before = world.state()
    code, details = status_of(
        lambda: client.report(
            world.channel("reporter-1"), [_batch(2, 5_000, 50, SHANGHAI)], timeout=TIMEOUT_S
        )
    )
    return CrossResult(
        code,
        details,
        {
            "nothing applied": 2 not in world.devices_near(SHANGHAI),
            "state unchanged": world.state() == before,
        },
    )


def _report_then_gateway_2(world: World) -> CrossResult:
    """reporter-1 sends a batch of its own, then one of gateway 2: the first stays
    applied (batches apply as they arrive), the second applies nothing."""
    code, details = status_of(
        lambda: client.report(
            world.channel("reporter-1"),
            [_batch(1, 6_000, 30, SHANGHAI), _batch(2, 7_000, 40, SHANGHAI)],
            timeout=TIMEOUT_S,
        )
    )
    near = world.devices_near(SHANGHAI)
    return CrossResult(
        code,
        details,
        {
            "names batch 1": "batch 1" in details,
            "gateway 1's batch applied": near.get(1) == 30,
            "gateway 2's batch not applied": 2 not in near,
        },
    )


def _forget_for_gateway_2(world: World) -> CrossResult:
    """reporter-1 asks to forget gateway 2's devices (ids it also uses on gateway 1)."""
    before = world.state()
    ids = list(range(1, DEVICES_PER_GATEWAY + 1))
    request = location_pb2.ForgetDevicesRequest(gateway_id=2, device_ids=ids)
    stub = location_pb2_grpc.LocationServiceStub(world.channel("reporter-1"))
    code, details = status_of(lambda: stub.ForgetDevices(request, timeout=TIMEOUT_S))
    return CrossResult(
        code,
        details,
        {
            "gateway 2's devices kept": world.devices_near(BEIJING).get(2) == DEVICES_PER_GATEWAY,
            "state unchanged": world.state() == before,
        },
    )


class _Stream:
    """A Subscribe stream whose upstream the caller feeds (acks) by hand."""

    def __init__(self, channel: grpc.Channel, first: gateway_pb2.GatewayUpstream) -> None:
        self._up: queue.Queue = queue.Queue()
        self._up.put(first)
        self.down: queue.Queue = queue.Queue()
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        self.call = stub.Subscribe(iter(self._up.get, None), timeout=60)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for message in self.call:
                self.down.put(message)
        except grpc.RpcError as error:
            self.down.put(error)

    def next(self, timeout: float = TIMEOUT_S) -> gateway_pb2.GatewayMessage:
        item = self.down.get(timeout=timeout)
        if not isinstance(item, gateway_pb2.GatewayMessage):
            raise AssertionError(f"the stream ended: {item!r}")
        return item

    def drain(self) -> list[gateway_pb2.GatewayMessage]:
        """Messages received until none comes for 0.2 s."""
        out = []
        while True:
            try:
                out.append(self.next(timeout=0.2))
            except queue.Empty:
                return out

    def ack(self, sequence: int) -> None:
        self._up.put(gateway_pb2.GatewayUpstream(ack=gateway_pb2.Ack(sequence=sequence)))

    def close(self) -> None:
        self.call.cancel()
        self._up.put(None)
        self._reader.join(5)


def _subscribe_as_gateway_2(world: World) -> CrossResult:
    """gateway-1 subscribes with hello.gateway_id 2, before and while gateway 2's real
    subscriber is connected: refused both times, and the real subscriber goes on
    receiving every message of gateway 2's queue, in order, from sequence 1."""
    impostor = gateway_pb2_grpc.GatewayServiceStub(world.channel("gateway-1"))

    def impose():
        for _ in impostor.Subscribe(iter([_hello(2)]), timeout=TIMEOUT_S):
            pass

    before = world.state()
    code, details = status_of(impose)
    checks = {"queue untouched before the real subscriber": world.state() == before}

    real = _Stream(world.channel("dev-gateway-2"), _hello(2))
    try:
        first = real.next()
        second_code, _ = status_of(impose)
        checks["refused again while it is connected"] = second_code == PERMISSION_DENIED
        # New messages for gateway 2 while the impostor's attempt is over: a new alert
        # around its devices queues its payload and recipients.
        world.alerts("issuer").CreateAlert(create_request("cross-gateway"), timeout=TIMEOUT_S)
        messages = [first]
        world.wait(
            lambda: (
                messages.extend(real.drain())
                or any(m.alert_id == "cross-gateway" and m.device_ids for m in messages)
            ),
            "gateway 2's messages of the new alert",
        )
        sequences = [m.sequence for m in messages]
        checks["real subscriber receives in order from 1"] = sequences == list(
            range(1, len(messages) + 1)
        )
        reached = {i for m in messages if m.alert_id == "cross-gateway" for i in m.device_ids}
        checks["real subscriber gets the new alert's devices"] = reached == set(
            range(1, DEVICES_PER_GATEWAY + 1)
        )
        real.ack(sequences[-1])
        world.wait(
            lambda: world.thread.call(_acked_of(world, 2)) == sequences[-1], "gateway 2's ack"
        )
    finally:
        real.close()
    return CrossResult(code, details, checks)


def _acked_of(world: World, gateway: int):
    async def read() -> int:
        return world.thread.engine.dispatcher.outbox(gateway).acked

    return read


@dataclass(frozen=True)
class CrossCase:
    name: str
    rpc: str
    caller: str
    run: Callable[[World], CrossResult]


#: Credentials of gateway 1 acting for gateway 2; each must be PERMISSION_DENIED.
CROSS_GATEWAY: tuple[CrossCase, ...] = (
    CrossCase(
        "reporter-1 reports gateway 2's devices",
        "LocationService.ReportLocations",
        "reporter-1",
        _report_for_gateway_2,
    ),
    CrossCase(
        "reporter-1 reports its own batch, then gateway 2's",
        "LocationService.ReportLocations",
        "reporter-1",
        _report_then_gateway_2,
    ),
    CrossCase(
        "reporter-1 forgets gateway 2's devices",
        "LocationService.ForgetDevices",
        "reporter-1",
        _forget_for_gateway_2,
    ),
    CrossCase(
        "gateway-1 subscribes with hello.gateway_id 2",
        "GatewayService.Subscribe",
        "gateway-1",
        _subscribe_as_gateway_2,
    ),
)


# The script.


def run(world: World) -> dict:
    """Runs the matrix and the cross-gateway cases; returns the JSON document."""
    matrix: dict[str, dict[str, dict]] = {}
    for rpc in RPCS:
        row = matrix.setdefault(rpc.name, {})
        for caller in CALLERS:
            cell = run_cell(world, rpc, caller)
            row[caller] = {
                "code": cell.code,
                "expected": cell.expected,
                "unchanged": cell.unchanged,
                "ok": cell.ok,
                "details": cell.details,
            }
    cross = []
    for case in CROSS_GATEWAY:
        result = case.run(world)
        cross.append(
            {
                "case": case.name,
                "rpc": case.rpc,
                "caller": case.caller,
                "code": result.code,
                "checks": result.checks,
                "ok": result.ok,
                "details": result.details,
            }
        )
    failures = [
        f"{rpc} / {caller}: got {c['code']}, expected {c['expected']}"
        + ("" if c["unchanged"] in (None, True) else " (and it changed the state)")
        for rpc, row in matrix.items()
        for caller, c in row.items()
        if not c["ok"]
    ]
    failures += [f"{c['case']}: {c['code']} {c['checks']}" for c in cross if not c["ok"]]
    return {
        "engine": "ServerThread on 127.0.0.1, port 0, ManualClock, dev_credentials((1, 2))",
        "callers": {name: token for name, token in CALLERS.items()},
        "rpcs": [rpc.name for rpc in RPCS],
        "matrix": matrix,
        "cross_gateway": cross,
        "failures": failures,
    }


def render_markdown(document: dict) -> str:
    callers = list(document["callers"])
    lines = [
        "# Auth matrix",
        "",
        "Every rpc called once by every caller against a real engine (`python -m "
        "bench.auth_matrix`). Cells: the call's status code. A code in bold was admitted "
        "(its status is whatever its request yields); the others were refused, and each "
        "refusal left the alerts (ListAlerts), the live devices and the gateway queues "
        "as they were.",
        "",
        "| rpc | " + " | ".join(callers) + " |",
        "|---|" + "---|" * len(callers),
    ]
    for rpc, row in document["matrix"].items():
        cells = []
        for caller in callers:
            cell = row[caller]
            text = f"**{cell['code']}**" if cell["expected"] == ADMITTED else cell["code"]
            cells.append(text if cell["ok"] else f"{text} (expected {cell['expected']})")
        lines.append(f"| {rpc} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Cross-gateway",
        "",
        "Credentials of gateway 1 acting for gateway 2; every case must be "
        "PERMISSION_DENIED and pass its checks.",
        "",
        "| case | status | checks |",
        "|---|---|---|",
    ]
    for case in document["cross_gateway"]:
        checks = ", ".join(
            f"{name}: {'yes' if ok else 'NO'}" for name, ok in case["checks"].items()
        )
        lines.append(f"| {case['case']} | {case['code']} | {checks} |")
    lines += ["", f"Failures: {len(document['failures'])}."]
    lines += [f"- {failure}" for failure in document["failures"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    # Refusals are logged as warnings by design; only errors matter here.
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")

    started = time.perf_counter()
    with World() as world:
        document = run(world)
    document["seconds"] = round(time.perf_counter() - started, 2)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "auth_matrix.json").write_text(json.dumps(document, indent=1) + "\n")
    (args.out / "auth_matrix.md").write_text(render_markdown(document))
    print(render_markdown(document))
    return 1 if document["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
