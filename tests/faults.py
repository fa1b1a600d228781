"""Real faults for the reliability tests and ``bench/reliability.py``: a redis-server and
the engine as child processes, gateways that outlive their connections, and the
scenarios that kill one of them in the middle of an alert.

Everything runs as in production: ``python -m engine.cli serve --dev`` in its own
process, durable state in a ``redis-server`` of its own, one gRPC channel per dev
credential (issuer, operator, each gateway's reporter and gateway). Faults are real
signals (SIGKILL, SIGTERM), a Redis ``CLIENT KILL``, or a TCP proxy that cuts the
engine's Redis connection at the worst moment.

Each scenario returns a :class:`Result`: per fault, the devices the oracle expects
(``tests/oracle.py``'s haversine over the seeded population), what the gateways
received device by device, and every check that failed. The tests assert that none
failed; the benchmark prints the same results at a larger scale.

The Redis configuration the engine's guarantee needs is :data:`REDIS_DURABLE`:
``appendonly yes`` with ``appendfsync always`` makes Redis write and fsync each
transaction to its append-only file before it answers ``EXEC``, so a transaction the
engine saw succeed (an alert it accepted, a recipient batch it then sent) survives a
``kill -9`` of Redis or a power cut. With ``appendfsync everysec`` (Redis's default for
AOF) up to a second of acknowledged transactions can vanish; with RDB snapshots only,
minutes. Then an accepted alert can be lost, and nothing in the engine can help.
"""

from __future__ import annotations

import contextlib
import json
import queue
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc_support
import numpy as np
import pyarrow as pa
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from oracle import SLACK_M, haversine_m

from engine import audit, auth, client, population, server
from engine.api import alert_pb2, gateway_pb2, gateway_pb2_grpc
from engine.persist import ids_from_bytes
from engine.server import SERVICES

#: Redis flags the engine's durability promise rests on (see the module docstring).
REDIS_DURABLE = ("--appendonly", "yes", "--appendfsync", "always", "--save", "")
#: Key prefix of the engines started here (the engine's default).
PREFIX = "tuanyuan:"
#: Time-to-live of reports: a day, so no device expires during a scenario.
TTL_S = 86_400
#: Gateways of the generated populations.
GATEWAYS = population.GATEWAYS
#: Where every alert is centred.
CENTRE = population.city_centre("Beijing")

RECIPIENTS = gateway_pb2.MESSAGE_KIND_RECIPIENTS
ALERT = gateway_pb2.MESSAGE_KIND_ALERT
FOLLOW_UP = gateway_pb2.MESSAGE_KIND_FOLLOW_UP
CLOSED = gateway_pb2.MESSAGE_KIND_CLOSED
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
ALERT_SERVICE = SERVICES[0]
#: Seconds a stage may start late: the engine's scheduler ticks every 20 ms, and a busy
#: machine delays a tick.
SCHEDULER_SLACK_S = 0.25


def wait_until(
    predicate: Callable[[], object], timeout: float = 30.0, what: str = "condition"
) -> object:
    """:func:`grpc_support.wait_until` with the longer default bound restarts need."""
    return grpc_support.wait_until(predicate, timeout, what)


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Processes.


class RedisServer:
    """A ``redis-server`` child on a free loopback port, its files in ``folder``, run
    with :data:`REDIS_DURABLE`. :meth:`kill` and :meth:`start` again keep the port and
    the folder, so the engine finds the same server and the same data."""

    def __init__(self, folder: Path) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self._client: redis.Redis | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Starts the server (again) and waits until it answers PING with its data
        loaded."""
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--dir", str(self.folder),
                "--logfile", str(self.folder / "redis.log"),
                *REDIS_DURABLE,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        probe = redis.Redis(port=self.port, socket_timeout=1.0, socket_connect_timeout=1.0)
        try:
            wait_until(self._answers(probe), 20.0, f"redis-server on port {self.port}")
        finally:
            probe.close()

    def _answers(self, probe: redis.Redis) -> Callable[[], bool]:
        def ping() -> bool:
            if self.process.poll() is not None:
                log = (self.folder / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server exited: {log}")
            try:
                return bool(probe.ping())
            except redis.exceptions.BusyLoadingError:
                return False
            except redis.ConnectionError:
                return False

        return ping

    def kill(self) -> None:
        """SIGKILL: what Redis acknowledged is in its append-only file, the rest is
        gone."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    @property
    def client(self) -> redis.Redis:
        """The test's own connection (reconnects by itself after a restart)."""
        if self._client is None:
            self._client = redis.Redis(port=self.port, socket_timeout=10.0)
        return self._client

    def cut_clients(self) -> int:
        """``CLIENT KILL TYPE normal``: drops every ordinary connection but this one
        (the engine's); returns how many."""
        return int(self.client.client_kill_filter(_type="normal", skipme=True))


class Engine:
    """``tuanyuan serve --dev`` in a child process, against ``redis``.

    Each start makes new dev tokens; :meth:`channel` opens one channel per credential
    and is reset by every restart. ``started_at`` and ``serving_at`` are monotonic
    times of the last start: the process spawned, and its port written (it serves).
    """

    def __init__(
        self,
        folder: Path,
        redis_url: str,
        *,
        batch_devices: int,
        snapshot: Path | None = None,
        snapshot_interval_s: float = 60.0,
    ) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.redis_url = redis_url
        self.port_file = folder / "engine.port"
        self.tokens_file = folder / "dev-tokens.json"
        self.log = folder / "engine.log"
        self.flags = [
            "--dev", "--dev-tokens", str(self.tokens_file),
            "--redis", redis_url,
            "--listen", "127.0.0.1:0",
            "--ttl", str(TTL_S),
            "--batch-devices", str(batch_devices),
        ]  # fmt: skip
        if snapshot is not None:
            self.flags += ["--snapshot", str(snapshot)]
            self.flags += ["--snapshot-interval", str(snapshot_interval_s)]
        self.process: subprocess.Popen | None = None
        self.port = 0
        self.started_at = self.serving_at = 0.0
        self._channels: dict[str, grpc.Channel] = {}
        self._tokens: dict[str, str] = {}

    def start(self) -> float:
        """Starts the engine; returns the seconds until it served."""
        self._close_channels()
        self.started_at = time.monotonic()
        with self.log.open("a") as log:
            log.write(f"--- start {time.strftime('%H:%M:%S')}\n")
        self.process, self.port = server.spawn(self.flags, self.port_file, self.log)
        self.serving_at = time.monotonic()
        self._tokens = auth.read_dev_tokens(self.tokens_file)
        return self.serving_at - self.started_at

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def token(self, name: str) -> str:
        return self._tokens[name]

    def channel(self, name: str) -> grpc.Channel:
        """The channel of dev credential ``name`` (``dev-issuer``, ``dev-operator``,
        ``dev-reporter-G``, ``dev-gateway-G``)."""
        if name not in self._channels:
            self._channels[name] = client.connect(self.target, token=self._tokens[name])
        return self._channels[name]

    @property
    def issuer(self):
        return client.alert_stub(self.channel("dev-issuer"))

    @property
    def operator(self):
        return client.alert_stub(self.channel("dev-operator"))

    def get(self, alert_id: str) -> alert_pb2.Alert:
        return self.operator.GetAlert(alert_pb2.GetAlertRequest(alert_id=alert_id), timeout=10)

    def health(self, service: str = ALERT_SERVICE) -> int:
        stub = health_pb2_grpc.HealthStub(self.channel("dev-operator"))
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    def report(self, devices: Devices, rows: np.ndarray | None = None) -> int:
        """Reports devices, each gateway's through its own reporter; returns how many
        the engine counted as added or updated."""
        counted = 0
        for gateway, batch in devices.batches(rows):
            summary = client.report(self.channel(f"dev-reporter-{gateway}"), [batch], timeout=60)
            counted += summary.added + summary.updated
        return counted

    def outages(self) -> int:
        """Times the engine found Redis unreachable (a write failed), from its log."""
        return sum(
            1
            for line in self.log.read_text(errors="replace").splitlines()
            if "engine.journal" in line and " is unreachable (" in line
        )

    def kill(self) -> None:
        """SIGKILL: nothing is flushed, nothing is said goodbye to."""
        self._close_channels()
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def terminate(self) -> int:
        """SIGTERM, a graceful stop; returns the exit status."""
        self._close_channels()
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)

    def close(self) -> None:
        self.kill()

    def _close_channels(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()


# Devices and the oracle.


class Devices:
    """A seeded metro population (``engine.population.metro``) at fixed positions."""

    def __init__(self, n: int, seed: int) -> None:
        columns = population.metro(n, seed=seed)
        self.ids = columns["device_id"]
        self.lat = columns["lat"]
        self.lng = columns["lng"]
        self.gateway = columns["gateway"].astype(np.int64)
        self.distance = haversine_m(CENTRE[0], CENTRE[1], self.lat, self.lng)
        self._rings: dict[tuple[float, int], tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return int(self.ids.size)

    def batches(self, rows: np.ndarray | None = None) -> Iterable[tuple[int, bytes]]:
        rows = np.arange(len(self)) if rows is None else np.asarray(rows)
        for gateway in np.unique(self.gateway[rows]).tolist():
            mine = rows[self.gateway[rows] == gateway]
            yield (
                gateway,
                client.encode_batch(gateway, self.ids[mine], self.lat[mine], self.lng[mine]),
            )

    def within(self, radius_m: float, gateway: int) -> tuple[np.ndarray, np.ndarray]:
        """Ids of one gateway the oracle says a ring around :data:`CENTRE` must hold,
        and those it may hold (within :data:`~oracle.SLACK_M` of the edge)."""
        if (radius_m, gateway) not in self._rings:
            mine = self.gateway == gateway
            must = self.ids[mine & (self.distance <= radius_m - SLACK_M)]
            may = self.ids[mine & (self.distance <= radius_m + SLACK_M)]
            self._rings[radius_m, gateway] = (np.sort(must), np.sort(may))
        return self._rings[radius_m, gateway]


# Gateways.


@dataclass(frozen=True)
class Delivery:
    """One message a gateway handled."""

    at: float  # monotonic seconds
    connection: int  # which subscription of the gateway (1, 2, ...)
    message: gateway_pb2.GatewayMessage
    ids: np.ndarray


class Gateway:
    """A push gateway that outlives its connections: it records every message it
    handles, on every subscription, in order, repeats included. ``ack_delay_s`` makes it
    slow: each message stays handled but unacked that long."""

    def __init__(self, gateway_id: int, *, ack_delay_s: float = 0.0) -> None:
        self.gateway_id = gateway_id
        self.ack_delay_s = ack_delay_s
        self.deliveries: list[Delivery] = []
        self.connections = 0
        self._lock = threading.Lock()
        self._subscription: client.GatewaySubscription | None = None

    def connect(self, engine: Engine, *, window: int = 0) -> None:
        """Subscribes (again), acking each message once handled and ``ack_delay_s``
        later."""
        self.disconnect()
        self.connections += 1
        number = self.connections

        def handle(message: gateway_pb2.GatewayMessage, ids: np.ndarray) -> None:
            self.record(message, number, ids)

        self._subscription = client.GatewaySubscription(
            engine.channel(f"dev-gateway-{self.gateway_id}"),
            self.gateway_id,
            handle,
            ack_delay_s=self.ack_delay_s,
            max_unacked_messages=window,
        )

    def record(
        self, message: gateway_pb2.GatewayMessage, connection: int, ids: np.ndarray | None = None
    ) -> None:
        """Notes a message handled on subscription number ``connection``."""
        if ids is None:
            ids = np.array(message.device_ids, dtype=np.uint64)
        with self._lock:
            self.deliveries.append(Delivery(time.monotonic(), connection, message, ids))

    def disconnect(self) -> None:
        if self._subscription is not None:
            self._subscription.close()
            self._subscription = None

    def handled(
        self, alert_id: str, kind: int = RECIPIENTS, connection: int | None = None
    ) -> list[Delivery]:
        with self._lock:
            items = list(self.deliveries)
        return [
            d
            for d in items
            if d.message.alert_id == alert_id
            and d.message.kind == kind
            and connection in (None, d.connection)
        ]

    def ids(self, alert_id: str, connection: int | None = None) -> np.ndarray:
        """Every recipient id handled for an alert, repeats included."""
        parts = [d.ids for d in self.handled(alert_id, connection=connection)]
        return np.concatenate(parts) if parts else np.empty(0, np.uint64)


def gateways(ack_delay_s: float = 0.0) -> dict[int, Gateway]:
    return {g: Gateway(g, ack_delay_s=ack_delay_s) for g in GATEWAYS}


def connect_all(gateways: dict[int, Gateway], engine: Engine, **options) -> None:
    for gateway in gateways.values():
        gateway.connect(engine, **options)


def disconnect_all(gateways: dict[int, Gateway]) -> None:
    for gateway in gateways.values():
        gateway.disconnect()


# Requests.


def create_request(
    alert_id: str, stages: Iterable[tuple[float, int]], centre: tuple[float, float] = CENTRE
) -> alert_pb2.CreateAlertRequest:
    """An alert around ``centre`` with inline ``(radius_m, duration_s)`` stages."""
    return alert_pb2.CreateAlertRequest(
        alert_id=alert_id,
        centres=[alert_pb2.Centre(latitude=centre[0], longitude=centre[1])],
        stages=alert_pb2.Stages(
            stages=[alert_pb2.Stage(radius_m=r, duration_s=d) for r, d in stages]
        ),
        payload=alert_pb2.AlertPayload(
            texts=[alert_pb2.LocalizedText(language="en", name="Li Xiaoming")], age_years=6
        ),
    )


def preview_request(radii_m: Iterable[float]) -> alert_pb2.PreviewAlertRequest:
    return alert_pb2.PreviewAlertRequest(
        centres=[alert_pb2.Centre(latitude=CENTRE[0], longitude=CENTRE[1])],
        stages=alert_pb2.Stages(
            stages=[alert_pb2.Stage(radius_m=r, duration_s=60) for r in radii_m]
        ),
    )


def seconds(stamp) -> float:
    return stamp.ToNanoseconds() / 1e9


def all_acked(alert: alert_pb2.Alert) -> bool:
    """Whether GetAlert says everything queued was handed over and acked."""
    swept = all(stage.swept or not stage.HasField("started_at") for stage in alert.stages)
    return swept and all(
        g.acked == g.handed_over == g.recipients - g.withdrawn
        for stage in alert.stages
        for g in stage.gateways
    )


def stage_due(alert: alert_pb2.Alert, at: float) -> int:
    """The stage (1-based) the alert's own timeline puts at Unix time ``at``."""
    elapsed = at - seconds(alert.start_time)
    end = 0.0
    for stage in alert.stages:
        end += stage.duration_s
        if elapsed < end:
            return stage.stage_number
    return len(alert.stages)


# Results.


@dataclass
class Result:
    """One fault and what came of it; ``failures`` lists every check that did not hold."""

    fault: str
    devices: int
    expected: int = 0
    delivered: int = 0
    duplicated: int = 0
    duplicates_allowed: int = 0
    lost: int = 0
    unexpected: int = 0
    #: Seconds from the process start to serving, and to the last recipient that was
    #: due at that moment delivered (None when the fault restarts nothing).
    serving_s: float | None = None
    caught_up_s: float | None = None
    details: dict[str, object] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def check(self, ok: object, message: str) -> bool:
        if not ok:
            self.failures.append(message)
        return bool(ok)

    def record(self) -> dict[str, object]:
        return {
            name: getattr(self, name)
            for name in (
                "fault",
                "devices",
                "expected",
                "delivered",
                "duplicated",
                "duplicates_allowed",
                "lost",
                "unexpected",
                "serving_s",
                "caught_up_s",
                "details",
                "failures",
            )
        }


def _sample(ids: np.ndarray, devices: Devices) -> str:
    shown = []
    for device in ids[:5].tolist():
        row = int(np.flatnonzero(devices.ids == device)[0])
        shown.append(f"{device} at {devices.distance[row]:.1f} m")
    return ", ".join(shown)


def score(
    result: Result,
    devices: Devices,
    gateways: dict[int, Gateway],
    alert_id: str,
    radius_m: float,
    allowed: dict[int, np.ndarray] | None = None,
) -> None:
    """Compares what the gateways handled for ``alert_id`` with the oracle's ring of
    ``radius_m``, gateway by gateway: nothing the ring must hold is missing, nothing
    outside what it may hold came, and every device handled twice is in ``allowed``
    (the devices of messages unacked when the fault struck; nobody when None)."""
    for gateway_id, gateway in gateways.items():
        must, may = devices.within(radius_m, gateway_id)
        got = gateway.ids(alert_id)
        unique, counts = np.unique(got, return_counts=True)
        lost = np.setdiff1d(must, unique)
        extra = np.setdiff1d(unique, may)
        twice = unique[counts > 1]
        permitted = allowed.get(gateway_id) if allowed else None
        bad_twice = twice if permitted is None else np.setdiff1d(twice, permitted)
        result.expected += int(must.size)
        result.delivered += int(unique.size)
        result.duplicated += int(twice.size)
        result.duplicates_allowed += 0 if permitted is None else int(np.unique(permitted).size)
        result.lost += int(lost.size)
        result.unexpected += int(extra.size)
        where = f"{alert_id}, gateway {gateway_id}"
        result.check(not lost.size, f"{where}: {lost.size} devices lost: {_sample(lost, devices)}")
        result.check(not extra.size, f"{where}: {extra.size} devices outside the ring: {extra[:5]}")
        result.check(
            not bad_twice.size,
            f"{where}: {bad_twice.size} devices notified twice outside the batches unacked "
            f"at the fault: {bad_twice[:5]}",
        )
        seen: set[int] = set()  # payload versions the gateway holds, in handling order
        for delivery in list(gateway.deliveries):
            message = delivery.message
            if message.alert_id != alert_id:
                continue
            if message.kind == ALERT:
                seen.add(message.payload_version)
            elif message.kind == RECIPIENTS and message.payload_version not in seen:
                result.check(False, f"{where}: recipients came before their payload")
                break


def caught_up(
    devices: Devices, gateways: dict[int, Gateway], alert_id: str, radius_m: float, since: float
) -> float | None:
    """Monotonic time at which the last device of the ring of ``radius_m`` was first
    handled after ``since``; None when none was."""
    last = None
    for gateway_id, gateway in gateways.items():
        must, _ = devices.within(radius_m, gateway_id)
        handled = gateway.handled(alert_id)
        earlier = [d.ids for d in handled if d.at < since]
        pending = set(np.setdiff1d(must, np.concatenate([must[:0], *earlier])).tolist())
        for delivery in handled:
            if delivery.at >= since and pending:
                before = len(pending)
                pending.difference_update(delivery.ids.tolist())
                if len(pending) < before:
                    last = delivery.at if last is None else max(last, delivery.at)
    return last


def wait_delivered(
    engine: Engine,
    devices: Devices,
    gateways: dict[int, Gateway],
    alert_id: str,
    radius_m: float,
    timeout: float = 60.0,
) -> alert_pb2.Alert:
    """Waits until every gateway handled every device of the ring and GetAlert says
    everything queued is acked."""

    def done():
        for gateway_id, gateway in gateways.items():
            must, _ = devices.within(radius_m, gateway_id)
            if np.setdiff1d(must, gateway.ids(alert_id)).size:
                return None
        alert = engine.get(alert_id)
        return alert if all_acked(alert) else None

    return wait_until(done, timeout, f"every recipient of {alert_id} delivered and acked")


def durable_acks(store: redis.Redis) -> dict[int, int]:
    """Each gateway's acked sequence number as Redis holds it."""
    return {g: int(store.get(f"{PREFIX}gateway:{g}:acked") or 0) for g in GATEWAYS}


def unacked_ids(gateway: Gateway, alert_id: str, acked: int, connection: int) -> np.ndarray:
    """Devices of the messages one connection handled beyond sequence ``acked``: the
    ones the engine may send again."""
    parts = [
        d.ids
        for d in gateway.handled(alert_id, connection=connection)
        if d.message.sequence > acked
    ]
    return np.unique(np.concatenate(parts)) if parts else np.empty(0, np.uint64)


def check_journal(result: Result, store: redis.Redis, alert_ids: Iterable[str]) -> None:
    """What Redis holds was written once: the notified and acked ids of each alert
    appear once each and agree with the alert's tallies, each alert was created once,
    and the audit trail is one unbroken chain."""
    for alert_id in alert_ids:
        log = store.lrange(f"{PREFIX}alert:{alert_id}:log", 0, -1)
        creates = sum(1 for entry in log if json.loads(entry)["action"] == "create")
        result.check(creates == 1, f"{alert_id}: {creates} create records in its log")
        state = {
            k.decode(): int(float(v))
            for k, v in store.hgetall(f"{PREFIX}alert:{alert_id}:state").items()
        }
        for kind in ("notified", "acked"):
            for gateway in GATEWAYS:
                ids = ids_from_bytes(store.get(f"{PREFIX}alert:{alert_id}:{kind}:{gateway}") or b"")
                repeated = ids.size - np.unique(ids).size
                result.check(
                    repeated == 0,
                    f"{alert_id}: {repeated} ids twice in {kind}:{gateway} (a transaction "
                    "applied twice)",
                )
                tally = "recipients" if kind == "notified" else "acked"
                counted = sum(
                    value for name, value in state.items() if name.endswith(f":g{gateway}:{tally}")
                )
                result.check(
                    counted == ids.size,
                    f"{alert_id}: the {tally} tallies of gateway {gateway} say {counted}, "
                    f"Redis holds {ids.size} {kind} ids",
                )
    report = audit.verify(audit.read_redis(store, f"{PREFIX}audit"))
    result.check(report.ok, f"audit trail: {report.message()}")


# A connection cut at the worst moment.


class CuttingProxy:
    """A TCP proxy in front of Redis, for the engine only.

    Once :meth:`arm` ed, it lets the next transaction (``EXEC``) through to Redis, and
    when Redis's answer comes back it drops it and cuts the connection, then refuses
    connections for ``hold_s`` seconds: the engine cannot know whether that transaction
    was applied (it was) until Redis is reachable again.
    """

    _EXEC = b"$4\r\nEXEC\r\n"

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.cuts = 0
        self._armed = threading.Event()
        self._hold_s = 0.0
        self._refuse_until = 0.0
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        threading.Thread(target=self._accept, name="proxy", daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def arm(self, hold_s: float) -> None:
        self._hold_s = hold_s
        self._armed.set()

    @property
    def armed(self) -> bool:
        return self._armed.is_set()

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            for s in list(self._sockets):
                _shut(s)

    def _accept(self) -> None:
        while True:
            try:
                engine_side, _ = self._listener.accept()
            except OSError:
                return
            if time.monotonic() < self._refuse_until:
                _shut(engine_side)
                continue
            try:
                redis_side = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                _shut(engine_side)
                continue
            with self._lock:
                self._sockets |= {engine_side, redis_side}
            pending = threading.Event()  # this connection's transaction is to be cut
            for target, args in (
                (self._upstream, (engine_side, redis_side, pending)),
                (self._downstream, (redis_side, engine_side, pending)),
            ):
                threading.Thread(target=target, args=args, daemon=True).start()

    def _upstream(self, source: socket.socket, sink: socket.socket, pending) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(1 << 16):
                if self._EXEC in data and self._armed.is_set():
                    self._armed.clear()
                    pending.set()
                sink.sendall(data)
        self._drop(source, sink)

    def _downstream(self, source: socket.socket, sink: socket.socket, pending) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(1 << 16):
                if pending.is_set():
                    # Redis has answered the transaction: it was applied. The engine
                    # never hears so, and cannot ask for a while.
                    self._refuse_until = time.monotonic() + self._hold_s
                    self.cuts += 1
                    break
                sink.sendall(data)
        self._drop(source, sink)

    def _drop(self, *sockets: socket.socket) -> None:
        with self._lock:
            for s in sockets:
                _shut(s)
                self._sockets.discard(s)


def _shut(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)
    s.close()


# Scenarios.


@dataclass(frozen=True)
class Scale:
    """Sizes of one run of the scenarios. Stages are ``radii_m`` with ``stage_s``
    seconds for all but the last (which lasts ten minutes, longer than any scenario)."""

    devices: int = 40_000
    seed: int = 23
    radii_m: tuple[float, float, float] = (2_000.0, 4_000.0, 6_000.0)
    stage_s: tuple[int, int] = (1, 2)
    batch_devices: int = 100
    #: Seconds a slow gateway holds each message before acking it.
    ack_delay_s: float = 0.05

    def stages(self) -> list[tuple[float, int]]:
        (r1, r2, r3), (d1, d2) = self.radii_m, self.stage_s
        return [(r1, d1), (r2, d2), (r3, 600)]


class Rig:
    """A scenario's processes: Redis, the engine (optionally behind a
    :class:`CuttingProxy`), the gateways; :meth:`close` ends them all."""

    def __init__(
        self,
        folder: Path,
        scale: Scale,
        *,
        snapshot: bool = False,
        snapshot_interval_s: float = 60.0,
        proxy: bool = False,
        ack_delay_s: float | None = None,
    ) -> None:
        self.scale = scale
        self.devices = Devices(scale.devices, scale.seed)
        self.redis = RedisServer(folder / "redis")
        self.redis.start()
        self.proxy = CuttingProxy(self.redis.port) if proxy else None
        self.snapshot = folder / "live.arrow" if snapshot else None
        self.engine = Engine(
            folder / "engine",
            self.proxy.url if self.proxy else self.redis.url,
            batch_devices=scale.batch_devices,
            snapshot=self.snapshot,
            snapshot_interval_s=snapshot_interval_s,
        )
        delay = scale.ack_delay_s if ack_delay_s is None else ack_delay_s
        self.gateways = gateways(delay)

    def __enter__(self) -> Rig:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self, *, report: bool = True, connect: bool = True) -> float:
        serving = self.engine.start()
        if report:
            counted = self.engine.report(self.devices)
            assert counted == len(self.devices), f"{counted} of {len(self.devices)} reported"
        if connect:
            connect_all(self.gateways, self.engine)
        return serving

    def close(self) -> None:
        disconnect_all(self.gateways)
        self.engine.close()
        if self.proxy is not None:
            self.proxy.close()
        self.redis.stop()

    def create(self, alert_id: str, stages: list[tuple[float, int]]) -> alert_pb2.Alert:
        return self.engine.issuer.CreateAlert(create_request(alert_id, stages), timeout=30)

    def delivered(self, alert_id: str, radius_m: float) -> alert_pb2.Alert:
        return wait_delivered(self.engine, self.devices, self.gateways, alert_id, radius_m)

    def handled(self, alert_id: str, gateway: int, stage: int) -> int:
        return sum(
            1 for d in self.gateways[gateway].handled(alert_id) if d.message.stage_number == stage
        )

    def wall(self, monotonic: float) -> float:
        """The Unix time of a monotonic reading."""
        return time.time() - (time.monotonic() - monotonic)

    def catch_up_s(self, result: Result, alert_id: str, radius_m: float) -> None:
        """Seconds from the last start to the last device of ``radius_m`` delivered."""
        last = caught_up(self.devices, self.gateways, alert_id, radius_m, self.engine.started_at)
        result.caught_up_s = None if last is None else last - self.engine.started_at


def snapshot_devices(path: Path) -> int:
    """Devices in a snapshot file; 0 when there is none yet."""
    try:
        with pa.OSFile(str(path)) as source:
            metadata = pa.ipc.open_file(source).schema.metadata or {}
    except (FileNotFoundError, pa.ArrowInvalid):
        return 0
    return int(metadata.get(b"tuanyuan.snapshot.devices", 0))


def engine_killed_mid_stage(folder: Path, scale: Scale, *, snapshot: bool) -> Result:
    """SIGKILL the engine while stage 2 is handed over to slow gateways, restart it.

    Checks: the alert keeps its start time and the start times of the stages it ran,
    and resumes at the stage its timeline implies; stage 3 does not start before its
    time; every device of the last ring is notified; a device notified twice is one of
    a batch the gateway had not acked (as Redis held the acks at the kill); Redis holds
    each notified id once. Without ``snapshot`` the devices are reported again after the
    restart; with it nothing is reported again and the snapshot brings them back.
    """
    how = "snapshot" if snapshot else "devices re-reported"
    with Rig(folder, scale, snapshot=snapshot, snapshot_interval_s=0.5) as rig:
        result = Result(f"engine SIGKILL in stage 2 ({how})", len(rig.devices))
        engine, devices = rig.engine, rig.devices
        rig.start()
        if snapshot:
            wait_until(
                lambda: snapshot_devices(rig.snapshot) == len(devices), what="a whole snapshot"
            )
        stages = scale.stages()
        created = rig.create("kill-mid-stage", stages)

        # Kill once the busiest gateway has handled part of its stage 2 batches.
        _, ring_2 = devices.within(stages[1][0], 1)
        ring_1, _ = devices.within(stages[0][0], 1)
        batches = -(-(ring_2.size - ring_1.size) // scale.batch_devices)
        wait_until(
            lambda: 1 <= rig.handled(created.alert_id, 1, 2) <= batches // 2,
            what="stage 2 half handed over",
        )
        before = engine.get(created.alert_id)
        engine.kill()
        acked = durable_acks(rig.redis.client)
        allowed = {
            g: unacked_ids(gw, created.alert_id, acked[g], gw.connections)
            for g, gw in rig.gateways.items()
        }
        result.details["acked_at_kill"] = acked
        result.details["handled_up_to_at_kill"] = {
            g: max((d.message.sequence for d in gw.deliveries), default=0)
            for g, gw in rig.gateways.items()
        }
        disconnect_all(rig.gateways)

        # Restart: the alert resumes on its own timeline.
        result.serving_s = engine.start()
        asked = time.time()
        alert = engine.get(created.alert_id)
        answered = time.time()
        result.check(
            alert.start_time == created.start_time,
            f"start time moved from {seconds(created.start_time)} to {seconds(alert.start_time)}",
        )
        for stage in (1, 2):
            result.check(
                alert.stages[stage - 1].started_at == before.stages[stage - 1].started_at,
                f"stage {stage} start time changed by the restart",
            )
        # The engine's scheduler ticks every 20 ms: a stage that fell due a moment
        # before the question may not have started yet.
        due = range(stage_due(alert, asked - SCHEDULER_SLACK_S), stage_due(alert, answered) + 1)
        result.check(
            alert.current_stage in due,
            f"resumed at stage {alert.current_stage}, the timeline says {list(due)}",
        )
        if not snapshot:
            engine.report(devices)
        connect_all(rig.gateways, engine)
        final = rig.delivered(created.alert_id, stages[-1][0])

        result.check(final.current_stage == 3, f"stage {final.current_stage} after catching up")
        stage_3_due = seconds(created.start_time) + stages[0][1] + stages[1][1]
        result.check(
            seconds(final.stages[2].started_at) >= stage_3_due - 0.01,
            "stage 3 started before its time",
        )
        score(result, devices, rig.gateways, created.alert_id, stages[-1][0], allowed)
        radius_due = stages[stage_due(alert, rig.wall(engine.serving_at)) - 1][0]
        rig.catch_up_s(result, created.alert_id, radius_due)
        check_journal(result, rig.redis.client, [created.alert_id])
    return result


def engine_killed_after_create(folder: Path, scale: Scale) -> Result:
    """SIGKILL the engine right after CreateAlert returned, before any gateway could be
    sent a sweep (none is connected), restart it and report the devices again.

    Checks: the alert exists after the restart with its start time, and reaches every
    device of its rings exactly once.
    """
    with Rig(folder, scale, ack_delay_s=0.0) as rig:
        result = Result("engine SIGKILL right after CreateAlert", len(rig.devices))
        engine = rig.engine
        rig.start(connect=False)
        stages = [scale.stages()[0], scale.stages()[2]]
        created = rig.create("kill-after-create", stages)
        engine.kill()

        result.serving_s = engine.start()
        try:
            alert = engine.get(created.alert_id)
        except grpc.RpcError as error:
            result.check(False, f"the accepted alert is gone after the restart: {error.code()}")
            return result
        result.check(alert.start_time == created.start_time, "start time changed")
        engine.report(rig.devices)
        connect_all(rig.gateways, engine)
        rig.delivered(created.alert_id, stages[-1][0])
        score(result, rig.devices, rig.gateways, created.alert_id, stages[-1][0])
        radius_due = stages[stage_due(alert, rig.wall(engine.serving_at)) - 1][0]
        rig.catch_up_s(result, created.alert_id, radius_due)
        check_journal(result, rig.redis.client, [created.alert_id])
    return result


def gateway_dropped_mid_stream(folder: Path, scale: Scale) -> Result:
    """Gateway 1's connection dies (its channel closed) with messages handled but not
    acked; it connects again.

    Checks: the new stream starts right after the last ack and brings every unacked
    message again, same sequence numbers and devices; nothing is lost; only devices of
    those messages come twice.
    """
    window, acked_count = 8, 3
    with Rig(folder, scale, ack_delay_s=0.0) as rig:
        result = Result("gateway connection dropped with unacked messages", len(rig.devices))
        engine, gw1 = rig.engine, rig.gateways[1]
        rig.start(connect=False)
        for g in (2, 3):
            rig.gateways[g].connect(engine)
        radius = scale.radii_m[-1]
        created = rig.create("gateway-drop", [(radius, 600)])

        # A gateway of its own channel: reads `window` messages, acks a few, dies.
        stream = RawStream(engine, gw1, window)
        messages = [stream.next() for _ in range(window)]
        last_ack = messages[acked_count - 1].sequence
        stream.ack(last_ack)
        wait_until(lambda: durable_acks(rig.redis.client)[1] == last_ack, what="the ack written")
        stream.die()
        unacked = [m for m in messages if m.sequence > last_ack]
        allowed = {1: unacked_ids(gw1, created.alert_id, last_ack, stream.connection)}

        gw1.connect(engine)
        rig.delivered(created.alert_id, radius)
        again = {d.message.sequence: d for d in gw1.deliveries if d.connection == gw1.connections}
        first = min(again) if again else None
        result.check(first == last_ack + 1, f"the new stream starts at {first}, not {last_ack + 1}")
        for message in unacked:
            resent = again.get(message.sequence)
            same = resent is not None and resent.message.SerializeToString() == (
                message.SerializeToString()
            )
            result.check(same, f"message {message.sequence} not sent again as it was")
        result.details["unacked_at_drop"] = len(unacked)
        score(result, rig.devices, rig.gateways, created.alert_id, radius, allowed)
        check_journal(result, rig.redis.client, [created.alert_id])
    return result


def engine_killed_before_resolve(folder: Path, scale: Scale) -> Result:
    """Each gateway acks the alert and holds the first recipient message it is sent,
    unacked (a window of one); SIGKILL the engine; restart it and resolve the alert with
    a follow-up before the gateways come back.

    Checks: the restarted engine cannot know whether the held messages were pushed, so
    it counts them as sent: the resolve withdraws every other recipient message, the
    held ones come again before CLOSED and nothing else does, and the follow-up goes to
    exactly their devices. Here **expected** counts the held devices, **delivered** the
    devices the follow-up reached.
    """
    release = threading.Event()
    held: dict[int, np.ndarray] = {}

    def holding(gateway: int):
        def handle(message: gateway_pb2.GatewayMessage, ids: np.ndarray) -> None:
            if message.kind == RECIPIENTS:
                held.setdefault(gateway, ids)
                release.wait()

        return handle

    with Rig(folder, scale, ack_delay_s=0.0) as rig:
        result = Result("engine SIGKILL with messages held, then resolve", len(rig.devices))
        engine = rig.engine
        rig.start(connect=False)
        holders = [
            client.GatewaySubscription(
                engine.channel(f"dev-gateway-{g}"), g, holding(g), max_unacked_messages=1
            )
            for g in rig.gateways
        ]
        alert_id = "resolve-after-kill"
        rig.create(alert_id, [(scale.radii_m[0], 600)])
        wait_until(lambda: len(held) == len(rig.gateways), what="a message held by each gateway")
        engine.kill()
        for holder in holders:
            holder.close(timeout=0)
        release.set()

        result.serving_s = engine.start()
        request = alert_pb2.ResolveAlertRequest(
            alert_id=alert_id,
            resolution=alert_pb2.RESOLUTION_FOUND,
            follow_up=[alert_pb2.LocalizedNotice(language="en", text="Found, thank you")],
        )
        resolved = engine.issuer.ResolveAlert(request, timeout=30)
        connect_all(rig.gateways, engine)
        for g, gateway in rig.gateways.items():
            wait_until(lambda gw=gateway: gw.handled(alert_id, FOLLOW_UP), what=f"follow-up to {g}")
            mine = np.unique(held[g])
            again = np.unique(gateway.ids(alert_id))
            parts = [d.ids for d in gateway.handled(alert_id, FOLLOW_UP)]
            follow_up = np.unique(np.concatenate(parts))
            where = f"gateway {g}"
            result.expected += int(mine.size)
            result.delivered += int(np.intersect1d(follow_up, mine).size)
            result.duplicated += int(np.intersect1d(again, mine).size)
            result.duplicates_allowed += int(mine.size)
            result.lost += int(np.setdiff1d(mine, follow_up).size)
            result.unexpected += int(np.setdiff1d(np.union1d(again, follow_up), mine).size)
            result.check(
                np.array_equal(again, mine), f"{where}: other recipients than the held came"
            )
            result.check(np.array_equal(follow_up, mine), f"{where}: follow-up not to the held")
            kinds = [d.message.kind for d in gateway.deliveries if d.message.alert_id == alert_id]
            closed = kinds.index(CLOSED) if CLOSED in kinds else len(kinds)
            result.check(closed < len(kinds), f"{where}: no CLOSED message")
            result.check(RECIPIENTS not in kinds[closed:], f"{where}: recipients after CLOSED")
        result.check(
            resolved.follow_up_devices == result.expected,
            f"ResolveAlert counts {resolved.follow_up_devices} follow-up devices, "
            f"{result.expected} were held",
        )
        stage = engine.get(alert_id).stages[0]
        result.details["held_at_kill"] = result.expected
        result.details["withdrawn"] = sum(g.withdrawn for g in stage.gateways)
        for tally in stage.gateways:
            result.check(
                tally.withdrawn == tally.recipients - held[tally.gateway_id].size,
                f"gateway {tally.gateway_id}: {tally.withdrawn} of {tally.recipients} "
                "withdrawn, the held ones included",
            )
    return result


class RawStream:
    """A gateway's Subscribe stream on a channel of its own, read and acked by hand;
    what it reads counts as handled by ``gateway`` (as a subscription of its own)."""

    def __init__(self, engine: Engine, gateway: Gateway, window: int) -> None:
        self.gateway = gateway
        gateway.connections += 1
        self.connection = gateway.connections
        token = engine.token(f"dev-gateway-{gateway.gateway_id}")
        self._channel = client.connect(engine.target, token=token)
        self._up: queue.Queue = queue.Queue()
        self._down: queue.Queue = queue.Queue()
        hello = gateway_pb2.Hello(gateway_id=gateway.gateway_id, max_unacked_messages=window)
        self._up.put(gateway_pb2.GatewayUpstream(hello=hello))
        stub = gateway_pb2_grpc.GatewayServiceStub(self._channel)
        self._call = stub.Subscribe(iter(self._up.get, None))
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        with contextlib.suppress(grpc.RpcError):
            for message in self._call:
                self._down.put(message)

    def next(self, timeout: float = 30.0) -> gateway_pb2.GatewayMessage:
        message = self._down.get(timeout=timeout)
        self.gateway.record(message, self.connection)
        return message

    def ack(self, sequence: int) -> None:
        self._up.put(gateway_pb2.GatewayUpstream(ack=gateway_pb2.Ack(sequence=sequence)))

    def die(self) -> None:
        """The gateway process is gone: its connection closes, nothing more is acked."""
        self._channel.close()


def redis_killed(folder: Path, scale: Scale) -> Result:
    """SIGKILL redis-server once stage 1 of an alert is delivered and acked (the engine
    writes nothing until stage 2, so it has not noticed); stage 2 starts while Redis is
    down; start Redis again on the same port and folder.

    Checks, while Redis is down: CreateAlert answers UNAVAILABLE in under 2 s, both as
    the first write after the kill and once the outage is known, and leaves nothing
    behind; AlertService's health is NOT_SERVING; ReportLocations and PreviewAlert work;
    stage 2 starts, but none of its recipients is sent (they are not durable). After
    Redis is back: the engine reconnects by itself (SERVING again, a new alert is
    accepted), stage 2 is written and delivered, nothing lost, nobody notified twice,
    Redis holds each notified id once.
    """
    with Rig(folder, scale) as rig:
        result = Result("redis-server SIGKILL in stage 1, restarted in stage 2", len(rig.devices))
        engine, devices = rig.engine, rig.devices
        rig.start()
        (r1, d1), (_, d2), (r3, _) = scale.stages()
        # A longer stage 1, so that it is delivered and acked well before stage 2.
        stages = [(r1, d1 + d2), (r3, 600)]
        created = rig.create("redis-killed", stages)
        wait_until(
            lambda: (
                (a := engine.get(created.alert_id)).current_stage == 1
                and a.stages[0].recipients > 0
                and all_acked(a)
            ),
            what="stage 1 delivered and acked",
        )
        rig.redis.kill()

        # Redis is down: alerts are refused at once, the rest goes on.
        refused = [create_request(f"refused-while-down-{n}", [(r1, 600)]) for n in (1, 2)]
        for request, name in zip(refused, ("first_write", "known_outage"), strict=True):
            started = time.monotonic()
            try:
                engine.issuer.CreateAlert(request, timeout=30)
                code = grpc.StatusCode.OK
            except grpc.RpcError as error:
                code = error.code()
            took = time.monotonic() - started
            result.details[f"create_refused_s_{name}"] = round(took, 3)
            where = f"CreateAlert ({name.replace('_', ' ')})"
            result.check(code == grpc.StatusCode.UNAVAILABLE, f"{where} answered {code.name}")
            result.check(took < 2.0, f"{where} took {took:.2f} s to answer UNAVAILABLE")
        wait_until(lambda: engine.health() == NOT_SERVING, what="AlertService NOT_SERVING")
        result.check(engine.report(devices) == len(devices), "ReportLocations failed")
        preview = engine.operator.PreviewAlert(preview_request([r1, r3]), timeout=10)
        for stage, radius in zip(preview.stages, (r1, r3), strict=True):
            must = sum(devices.within(radius, g)[0].size for g in GATEWAYS)
            may = sum(devices.within(radius, g)[1].size for g in GATEWAYS)
            result.check(
                must <= stage.cumulative_recipients <= may,
                f"PreviewAlert at {radius} m: {stage.cumulative_recipients}, not {must}..{may}",
            )
        wait_until(
            lambda: (
                (a := engine.get(created.alert_id)).current_stage == 2
                and a.stages[1].recipients > 0
            ),
            what="stage 2 swept",
        )
        time.sleep(0.3)  # a moment for a wrong send to show
        sent = [d for g in rig.gateways.values() for d in g.handled(created.alert_id)]
        early = [d for d in sent if d.message.stage_number == 2]
        result.check(not early, f"{len(early)} stage 2 messages sent before they were durable")

        # Redis is back on the same port and folder: the engine reconnects by itself.
        restarted = time.monotonic()
        rig.redis.start()
        wait_until(lambda: engine.health() == SERVING, what="AlertService SERVING again")
        result.serving_s = time.monotonic() - restarted
        rig.delivered(created.alert_id, r3)
        last = caught_up(devices, rig.gateways, created.alert_id, r3, restarted)
        result.caught_up_s = None if last is None else last - restarted
        again = rig.create("after-redis-restart", [(1.0, 600)])
        result.check(again.alert_id == "after-redis-restart", "no alert accepted after")
        store = rig.redis.client
        for request in refused:
            try:
                engine.get(request.alert_id)
                result.check(False, f"{request.alert_id}, refused as UNAVAILABLE, exists")
            except grpc.RpcError as error:
                result.check(error.code() == grpc.StatusCode.NOT_FOUND, f"GetAlert: {error.code()}")
            leftovers = store.keys(f"{PREFIX}alert:{request.alert_id}*")
            result.check(not leftovers, f"Redis holds {leftovers} of {request.alert_id}")
            result.check(
                not store.sismember(f"{PREFIX}alerts", request.alert_id),
                f"{request.alert_id} is in Redis's alert set",
            )
        score(result, devices, rig.gateways, created.alert_id, r3)
        check_journal(result, store, [created.alert_id, again.alert_id])
    return result


def redis_connections_cut(folder: Path, scale: Scale, cuts: int = 8) -> Result:
    """``CLIENT KILL TYPE normal`` every tenth of a second while an alert is delivered.

    Checks: nothing lost, nobody notified twice, and Redis holds each notified and acked
    id once with tallies that agree (no transaction applied twice).
    """
    with Rig(folder, scale) as rig:
        result = Result(f"Redis connections killed ({cuts} x CLIENT KILL)", len(rig.devices))
        rig.start()
        stages = scale.stages()
        created = rig.create("connections-cut", stages)
        killed = 0
        for _ in range(cuts):
            time.sleep(0.1 + 0.05 * (killed % 3))
            killed += rig.redis.cut_clients()
        result.details["connections_killed"] = killed
        rig.delivered(created.alert_id, stages[-1][0])
        result.details["outages_seen_by_engine"] = rig.engine.outages()
        score(result, rig.devices, rig.gateways, created.alert_id, stages[-1][0])
        check_journal(result, rig.redis.client, [created.alert_id])
    return result


def redis_reply_lost(folder: Path, scale: Scale, hold_s: float = 0.5) -> Result:
    """The engine's Redis connection is cut after a transaction was applied and before
    its reply came back, and Redis stays unreachable for ``hold_s`` seconds (a proxy
    does it): first the CreateAlert's transaction, then, during delivery, a few more.

    Checks: the alert exists once (one create in its log, one audit entry), nothing
    lost, nobody notified twice, Redis holds each id once and the audit chain is
    unbroken: the engine asked Redis what was applied before writing anything again.
    """
    with Rig(folder, scale, proxy=True) as rig:
        result = Result("Redis reply lost after EXEC (proxy cut)", len(rig.devices))
        proxy = rig.proxy
        rig.start()
        stages = scale.stages()
        proxy.arm(hold_s)
        try:
            created = rig.create("reply-lost", stages)
            result.details["create"] = "OK"
        except grpc.RpcError as error:
            # Refused while its transaction was in flight: once the engine knows it was
            # applied, the same request returns the alert (alert ids make it idempotent).
            wait_until(lambda: rig.engine.health() == SERVING, what="SERVING again")
            created = rig.create("reply-lost", stages)
            result.details["create"] = f"{error.code().name} while in flight, then OK again"
        for _ in range(3):  # and during delivery
            wait_until(lambda: not proxy.armed, what="a transaction cut")
            time.sleep(hold_s)
            proxy.arm(hold_s)
        wait_until(lambda: not proxy.armed, what="a transaction cut")
        result.details["cuts"] = proxy.cuts
        rig.delivered(created.alert_id, stages[-1][0])
        result.details["outages_seen_by_engine"] = rig.engine.outages()
        score(result, rig.devices, rig.gateways, created.alert_id, stages[-1][0])
        check_journal(result, rig.redis.client, [created.alert_id])
    return result


def engine_restarted_gracefully(folder: Path, scale: Scale) -> Result:
    """SIGTERM the engine after an alert was delivered, start it again on its snapshot.

    Checks: the engine exits 0; the live devices come back from the snapshot (nothing
    is reported again); a new alert with the same rings reaches exactly the devices the
    first one did, and the first one sends nothing again.
    """
    with Rig(folder, scale, snapshot=True, snapshot_interval_s=3600, ack_delay_s=0.0) as rig:
        result = Result("engine SIGTERM, restarted on its snapshot", len(rig.devices))
        engine, devices = rig.engine, rig.devices
        rig.start()
        radius = scale.radii_m[1]
        first = rig.create("before-restart", [(radius, 600)])
        rig.delivered(first.alert_id, radius)
        code = engine.terminate()
        result.check(code == 0, f"the engine exited with status {code}")
        disconnect_all(rig.gateways)

        result.serving_s = engine.start()
        live = engine.operator.PreviewAlert(preview_request([radius]), timeout=10).live_devices
        result.check(live == len(devices), f"{live} live devices after the restart")
        connect_all(rig.gateways, engine)
        second = rig.create("after-restart", [(radius, 600)])
        rig.delivered(second.alert_id, radius)
        rig.catch_up_s(result, second.alert_id, radius)
        for g, gateway in rig.gateways.items():
            before = np.unique(gateway.ids(first.alert_id))
            after = np.unique(gateway.ids(second.alert_id))
            result.check(
                np.array_equal(before, after),
                f"gateway {g}: {np.setxor1d(before, after).size} devices differ between the "
                "alerts before and after the restart",
            )
            resent = gateway.ids(first.alert_id, connection=2)
            result.check(not resent.size, f"gateway {g}: {resent.size} sent again after restart")
        score(result, devices, rig.gateways, second.alert_id, radius)
        check_journal(result, rig.redis.client, [first.alert_id, second.alert_id])
    return result


#: Every scenario, in the order the benchmark runs them: (key, function, options).
SCENARIOS: list[tuple[str, Callable[..., Result], dict]] = [
    ("engine-kill-rereport", engine_killed_mid_stage, {"snapshot": False}),
    ("engine-kill-snapshot", engine_killed_mid_stage, {"snapshot": True}),
    ("engine-kill-after-create", engine_killed_after_create, {}),
    ("engine-kill-before-resolve", engine_killed_before_resolve, {}),
    ("gateway-drop", gateway_dropped_mid_stream, {}),
    ("redis-kill", redis_killed, {}),
    ("redis-client-kill", redis_connections_cut, {}),
    ("redis-reply-lost", redis_reply_lost, {}),
    ("engine-sigterm-snapshot", engine_restarted_gracefully, {}),
]
