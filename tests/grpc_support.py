"""Helpers of the end-to-end tests: an engine on a manual clock behind a real socket,
gateways that record what they receive, and the oracle's view of who an alert reaches.

Every test talks to a :class:`~engine.server.ServerThread` bound to port 0 through real
gRPC channels. Time moves only when a test calls ``engine.clock.advance``; the engine's
scheduler notices within a few tens of milliseconds, so tests wait for conditions with
:func:`wait_until` and never assert on how long anything took.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence

import grpc
import numpy as np
from oracle import SLACK_M, Key, Ring, haversine_m
from support import destination

from engine import client, population, schedules
from engine.api import alert_pb2, gateway_pb2, gateway_pb2_grpc, location_pb2_grpc
from engine.clock import ManualClock
from engine.server import ServerOptions, ServerThread

#: Where the manual clocks start (January 2027), a round number far from any edge.
START = 1_800_000_000.0
#: Time-to-live of the test engines: a month, so advancing the clock through a few
#: alerts never expires the population.
TTL_S = 30 * 86_400
#: Centre of the generated metro populations.
BEIJING = population.city_centre("Beijing")

RECIPIENTS = gateway_pb2.MESSAGE_KIND_RECIPIENTS
ALERT = gateway_pb2.MESSAGE_KIND_ALERT
CLOSED = gateway_pb2.MESSAGE_KIND_CLOSED
FOLLOW_UP = gateway_pb2.MESSAGE_KIND_FOLLOW_UP


def wait_until(
    predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition"
) -> object:
    """Polls ``predicate`` until it returns something truthy and returns that; fails
    after ``timeout`` real seconds (a generous bound, never a measurement)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


# Requests.


def centre(lat: float, lng: float, label: str = "") -> alert_pb2.Centre:
    return alert_pb2.Centre(latitude=lat, longitude=lng, label=label)


def offset(place: tuple[float, float], metres: float, bearing_deg: float) -> tuple[float, float]:
    """The point ``metres`` from ``place`` along ``bearing_deg``."""
    lat, lng = destination(place[0], place[1], np.array([metres]), np.array([bearing_deg]))
    return float(lat[0]), float(lng[0])


def payload(
    name: str = "Li Xiaoming", description: str = "red coat", **fields
) -> alert_pb2.AlertPayload:
    """A valid payload in two languages; ``fields`` override the other fields."""
    texts = fields.pop(
        "texts",
        [
            alert_pb2.LocalizedText(
                language="zh-Hans", name=name, description=description, contact="110"
            ),
            alert_pb2.LocalizedText(language="en", name=name, description=description),
        ],
    )
    fields.setdefault("age_years", 6)
    fields.setdefault("sex", alert_pb2.SEX_MALE)
    return alert_pb2.AlertPayload(texts=texts, **fields)


def stages(*pairs: tuple[float, int]) -> alert_pb2.Stages:
    """An inline schedule from ``(radius_m, duration_s)`` pairs."""
    return alert_pb2.Stages(stages=[alert_pb2.Stage(radius_m=r, duration_s=d) for r, d in pairs])


def create_request(
    alert_id: str,
    places: Sequence[tuple[float, float]],
    schedule: str | alert_pb2.Stages = "local",
    **fields,
) -> alert_pb2.CreateAlertRequest:
    request = alert_pb2.CreateAlertRequest(
        alert_id=alert_id, centres=[centre(*p) for p in places], **fields
    )
    if isinstance(schedule, str):
        request.schedule_name = schedule
    else:
        request.stages.CopyFrom(schedule)
    if not request.HasField("payload"):
        request.payload.CopyFrom(payload())
    return request


def radii(schedule: str | alert_pb2.Stages) -> list[float]:
    """Radii of a schedule the engine ships ("local") or of inline stages."""
    given = schedules.SHIPPED[schedule] if isinstance(schedule, str) else schedule
    return [s.radius_m for s in given.stages]


def durations(schedule: str | alert_pb2.Stages) -> list[int]:
    """Durations in seconds of a shipped schedule or of inline stages."""
    given = schedules.SHIPPED[schedule] if isinstance(schedule, str) else schedule
    return [s.duration_s for s in given.stages]


def seconds(stamp) -> float:
    return stamp.ToNanoseconds() / 1e9


def tally(alert: alert_pb2.Alert, stage: int, gateway: int) -> alert_pb2.GatewayProgress | None:
    """The delivery of one stage (1-based) to one gateway, as GetAlert shows it."""
    for progress in alert.stages[stage - 1].gateways:
        if progress.gateway_id == gateway:
            return progress
    return None


def delivered(alert: alert_pb2.Alert) -> bool:
    """Whether every device the alert queued was handed over and acked, or withdrawn."""
    swept = all(stage.swept or not stage.HasField("started_at") for stage in alert.stages)
    return swept and all(
        g.acked == g.handed_over == g.recipients - g.withdrawn
        for stage in alert.stages
        for g in stage.gateways
    )


# A population and the oracle's view of it.


class Population:
    """A seeded metro population (``engine.population.metro``) whose positions the tests
    keep up to date as they move devices, so the oracle always sees what the engine
    holds."""

    def __init__(self, n: int, seed: int) -> None:
        columns = population.metro(n, seed=seed)
        self.ids = columns["device_id"]
        self.lat = columns["lat"].copy()
        self.lng = columns["lng"].copy()
        self.gateway = columns["gateway"].astype(np.int64)

    def __len__(self) -> int:
        return self.ids.size

    def batches(self, rows: np.ndarray | None = None) -> list[bytes]:
        """LocationBatches (one per gateway) reporting ``rows`` (all by default)."""
        rows = np.arange(len(self)) if rows is None else np.asarray(rows)
        out = []
        for gateway in np.unique(self.gateway[rows]):
            mine = rows[self.gateway[rows] == gateway]
            out.append(
                client.encode_batch(int(gateway), self.ids[mine], self.lat[mine], self.lng[mine])
            )
        return out

    def keys(self, rows: np.ndarray) -> list[Key]:
        return list(zip(self.gateway[rows].tolist(), self.ids[rows].tolist(), strict=True))

    def distance(self, places: Iterable[tuple[float, float]]) -> np.ndarray:
        """Metres from each device to the nearest of ``places`` (the oracle's haversine)."""
        d = np.full(len(self), np.inf)
        for lat, lng in places:
            d = np.minimum(d, haversine_m(lat, lng, self.lat, self.lng))
        return d

    def move(self, rows: np.ndarray, lat: np.ndarray, lng: np.ndarray) -> list[bytes]:
        """Moves devices and returns the batches that report the move."""
        self.lat[rows], self.lng[rows] = lat, lng
        return self.batches(rows)

    def pick(self, mask: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
        """``count`` rows where ``mask`` holds, chosen at random (seeded)."""
        rows = np.flatnonzero(mask)
        assert rows.size >= count, f"only {rows.size} devices to pick {count} from"
        return np.sort(np.random.default_rng(seed).choice(rows, count, replace=False))


class Expected:
    """Who an alert must and may have notified at each stage, per the oracle.

    Each sweep of the engine (a stage start, or new centres during a stage) is mirrored
    by :meth:`sweep` with the same centres and radius; walk-ins by :meth:`walk_in`. A
    device within ``SLACK_M`` of a boundary may be answered either way, so a device
    near the boundary of an earlier sweep may turn up in that sweep or a later one,
    never in both.
    """

    def __init__(self, devices: Population) -> None:
        self.devices = devices
        self.must_all: set[Key] = set()
        self.may_all: set[Key] = set()
        self.distance: dict[Key, float] = {}
        self.stages: dict[int, tuple[set[Key], set[Key]]] = {}

    def sweep(self, stage: int, places: Sequence[tuple[float, float]], radius: float) -> None:
        d = self.devices.distance(places)
        must = set(self.devices.keys(np.flatnonzero(d <= radius - SLACK_M)))
        near = np.flatnonzero(d <= radius + SLACK_M)
        may = set(self.devices.keys(near))
        for key, metres in zip(self.devices.keys(near), d[near].tolist(), strict=True):
            self.distance[key] = min(metres, self.distance.get(key, np.inf))
        stage_must, stage_may = self.stages.setdefault(stage, (set(), set()))
        stage_must |= must - self.may_all
        stage_may |= may - self.must_all
        self.must_all |= must
        self.may_all |= may

    def walk_in(self, stage: int, keys: Iterable[Key]) -> None:
        keys = set(keys)
        stage_must, stage_may = self.stages.setdefault(stage, (set(), set()))
        stage_must |= keys
        stage_may |= keys
        self.must_all |= keys
        self.may_all |= keys

    def stage(self, stage: int) -> Ring:
        must, may = self.stages.get(stage, (set(), set()))
        return Ring(frozenset(must), frozenset(may), self.distance)

    def union(self) -> Ring:
        return Ring(frozenset(self.must_all), frozenset(self.may_all), self.distance)


# Gateways.


class Recorder:
    """A push gateway (``engine.client.GatewaySubscription``) that records each message
    it handles, once per sequence number as the contract asks of gateways.

    ``hold(message)`` returning True makes the gateway stop at that message (handled,
    not acked) until :meth:`release`: a stuck or very slow gateway.
    """

    def __init__(
        self,
        channel: grpc.Channel,
        gateway: int,
        *,
        hold: Callable[[gateway_pb2.GatewayMessage], bool] | None = None,
        **options,
    ) -> None:
        self.gateway = gateway
        self._hold = hold
        self._released = threading.Event()
        self._lock = threading.Lock()
        self._by_sequence: dict[int, tuple[gateway_pb2.GatewayMessage, np.ndarray]] = {}
        self.handled = 0
        self.subscription = client.GatewaySubscription(channel, gateway, self._handle, **options)

    def _handle(self, message: gateway_pb2.GatewayMessage, ids: np.ndarray) -> None:
        with self._lock:
            self._by_sequence.setdefault(message.sequence, (message, ids))
            self.handled += 1
        if self._hold is not None and self._hold(message) and not self._released.is_set():
            self._released.wait(30)

    def release(self) -> None:
        self._released.set()

    def close(self) -> None:
        self.release()
        self.subscription.close()

    def messages(
        self, alert_id: str | None = None, kind: int | None = None, stage: int | None = None
    ) -> list[tuple[gateway_pb2.GatewayMessage, np.ndarray]]:
        """Messages handled so far, in sequence order, optionally filtered."""
        with self._lock:
            items = [self._by_sequence[s] for s in sorted(self._by_sequence)]
        return [
            (m, ids)
            for m, ids in items
            if (alert_id is None or m.alert_id == alert_id)
            and (kind is None or m.kind == kind)
            and (stage is None or m.stage_number == stage)
        ]

    def keys(self, alert_id: str, stage: int | None = None, kind: int = RECIPIENTS) -> list[Key]:
        """(gateway, id) of every device in the matching messages, repeats included."""
        return [
            (self.gateway, int(i))
            for _, ids in self.messages(alert_id, kind, stage)
            for i in ids.tolist()
        ]

    def devices(self, alert_id: str, stage: int | None = None, kind: int = RECIPIENTS) -> int:
        return sum(ids.size for _, ids in self.messages(alert_id, kind, stage))

    def kinds(self, alert_id: str) -> list[int]:
        return [m.kind for m, _ in self.messages(alert_id)]


_END = object()


class RawGateway:
    """A Subscribe stream driven by hand: the test reads each message and decides what
    to ack, through the generated stub."""

    def __init__(
        self,
        channel: grpc.Channel,
        gateway: int = 0,
        *,
        rate: float = 0.0,
        window: int = 0,
        first: gateway_pb2.GatewayUpstream | None = None,
    ) -> None:
        if first is None:
            first = gateway_pb2.GatewayUpstream(
                hello=gateway_pb2.Hello(
                    gateway_id=gateway, max_devices_per_second=rate, max_unacked_messages=window
                )
            )
        self._up: queue.Queue = queue.Queue()
        self._up.put(first)
        self._down: queue.Queue = queue.Queue()
        self.call = gateway_pb2_grpc.GatewayServiceStub(channel).Subscribe(iter(self._up.get, None))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for message in self.call:
                self._down.put(message)
        except grpc.RpcError as error:
            self._down.put(error)
        else:
            self._down.put(_END)

    def next(self, timeout: float = 10.0) -> gateway_pb2.GatewayMessage:
        item = self._down.get(timeout=timeout)
        if isinstance(item, gateway_pb2.GatewayMessage):
            return item
        raise AssertionError(f"the stream ended: {item!r}")

    def take(self, count: int) -> list[gateway_pb2.GatewayMessage]:
        return [self.next() for _ in range(count)]

    def ack(self, sequence: int) -> None:
        self._up.put(gateway_pb2.GatewayUpstream(ack=gateway_pb2.Ack(sequence=sequence)))

    def finish(self, timeout: float = 10.0) -> grpc.RpcError | None:
        """Waits for the stream to end, skipping messages; returns its error, or None
        when the engine ended it normally."""
        deadline = time.monotonic() + timeout
        while True:
            item = self._down.get(timeout=max(0.01, deadline - time.monotonic()))
            if item is _END:
                return None
            if isinstance(item, grpc.RpcError):
                return item

    def close(self) -> None:
        self.call.cancel()
        self._up.put(None)
        self._reader.join(5)


# The engine.


class Engine:
    """An engine on a manual clock, bound to a free port, with a client channel.

    Gateways opened through :meth:`subscribe` and :meth:`raw` are closed with it.
    """

    def __init__(self, *, batch_devices: int = 16_384, ttl_s: float = TTL_S) -> None:
        self.clock = ManualClock(START)
        self.thread = ServerThread(
            ServerOptions(
                clock=self.clock,
                ttl_s=ttl_s,
                batch_devices=batch_devices,
                allow_all_callers=True,
            )
        )
        self.port = self.thread.start()
        self.channel = client.connect(f"127.0.0.1:{self.port}")
        self.alerts = client.alert_stub(self.channel)
        self.locations = location_pb2_grpc.LocationServiceStub(self.channel)
        self._gateways: list[Recorder | RawGateway] = []

    def subscribe(self, gateway: int, **options) -> Recorder:
        recorder = Recorder(self.channel, gateway, **options)
        self._gateways.append(recorder)
        return recorder

    def raw(self, gateway: int = 0, **options) -> RawGateway:
        stream = RawGateway(self.channel, gateway, **options)
        self._gateways.append(stream)
        return stream

    def report(self, batches: Iterable[bytes]):
        return client.report(self.channel, list(batches), timeout=30)

    def create(self, request: alert_pb2.CreateAlertRequest) -> alert_pb2.Alert:
        return self.alerts.CreateAlert(request)

    def get(self, alert_id: str) -> alert_pb2.Alert:
        return self.alerts.GetAlert(alert_pb2.GetAlertRequest(alert_id=alert_id))

    def resolve(self, alert_id: str, resolution=alert_pb2.RESOLUTION_FOUND, follow_up=()):
        return self.alerts.ResolveAlert(
            alert_pb2.ResolveAlertRequest(
                alert_id=alert_id,
                resolution=resolution,
                follow_up=[alert_pb2.LocalizedNotice(language=lg, text=t) for lg, t in follow_up],
            )
        )

    def live(self) -> int:
        """Live devices, as PreviewAlert reports them."""
        request = alert_pb2.PreviewAlertRequest(centres=[centre(0.0, 0.0)], stages=stages((1.0, 1)))
        return self.alerts.PreviewAlert(request).live_devices

    def acked(self, gateway: int) -> int:
        """The last sequence number the engine has seen acked by a gateway."""

        async def read() -> int:
            return self.thread.engine.dispatcher.outbox(gateway).acked

        return self.thread.call(read)

    def wait_delivered(self, alert_id: str, what: str = "delivery") -> alert_pb2.Alert:
        """Waits until everything the alert queued so far was acked or withdrawn."""

        def done():
            alert = self.get(alert_id)
            return alert if delivered(alert) else None

        return wait_until(done, what=f"{what} of {alert_id}")

    def wait_stage(self, alert_id: str, stage: int, minimum: int = 1) -> alert_pb2.Alert:
        """Waits until ``stage`` (1-based) runs, its sweep has queued at least
        ``minimum`` devices, and everything queued is delivered."""

        def done():
            alert = self.get(alert_id)
            ok = (
                alert.current_stage == stage
                and alert.stages[stage - 1].recipients >= minimum
                and delivered(alert)
            )
            return alert if ok else None

        return wait_until(done, what=f"stage {stage} of {alert_id}")

    def close(self) -> None:
        for gateway in self._gateways:
            gateway.close()
        self.channel.close()
        self.thread.stop()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Watcher:
    """Collects the events of a WatchAlert stream in a background thread."""

    def __init__(self, engine: Engine, alert_id: str) -> None:
        self.events: list[alert_pb2.AlertEvent] = []
        self.error: grpc.RpcError | None = None
        self.ended = threading.Event()
        self.call = engine.alerts.WatchAlert(alert_pb2.WatchAlertRequest(alert_id=alert_id))
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for event in self.call:
                self.events.append(event)
        except grpc.RpcError as error:
            self.error = error
        finally:
            self.ended.set()

    def kinds(self) -> list[int]:
        return [e.kind for e in self.events]

    def close(self) -> None:
        self.call.cancel()
