"""Alerts: their stages, who they reached, and what goes to each gateway.

:class:`Dispatcher` owns the alerts and the gateways' outboxes. It lives on the server's
event loop: every change of state happens on that thread, while the heavy work (ring
queries, ingest, geofence tests) runs in thread pools and releases the GIL. Each alert
keeps an :class:`~engine.index.AlertRecord` of the devices it notified; every path that
notifies (a stage's sweep, a new sighting, the geofence) goes through that record, which
adds and answers in one locked step, so no device is notified twice for one alert
whichever paths race.

The flow of one alert:

1. ``create``: checked, stored, stage 1 starts when its start time comes.
2. Stage start: the ring of the stage is swept (``LocationIndex.new_recipients``) and the
   new recipients are queued per gateway, after the alert's payload.
3. While a stage runs, each location batch is tested against its ring (the geofence);
   devices that walked in are queued within the batch's round trip.
4. ``update``: new centres are swept at once with the running stage's radius; a new
   payload is queued as a new version; a new schedule moves the alert to the stage the
   elapsed time implies.
5. ``resolve``: recipients not yet handed over are withdrawn, a CLOSED message follows
   the ones that were, and the optional follow-up goes to exactly those devices.
   ``expire`` (the last stage ended) sends CLOSED without withdrawing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Iterable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from engine import geofence
from engine.api import alert_pb2, gateway_pb2
from engine.clock import Clock
from engine.delivery import (
    KIND_ALERT,
    KIND_CLOSED,
    KIND_FOLLOW_UP,
    KIND_RECIPIENTS,
    Entry,
    Outbox,
    timestamp,
)
from engine.index import AlertRecord, LocationIndex
from engine.metrics import Metrics
from engine.schedules import Schedule

_LOG = logging.getLogger("engine.alerts")

#: Device ids a RECIPIENTS or FOLLOW_UP message carries at most by default.
DEFAULT_BATCH_DEVICES = 16_384
#: Seconds between two PROGRESS events of a watched alert.
PROGRESS_INTERVAL_S = 0.2

SCHEDULED = alert_pb2.ALERT_STATUS_SCHEDULED
ACTIVE = alert_pb2.ALERT_STATUS_ACTIVE
EXPIRED = alert_pb2.ALERT_STATUS_EXPIRED
RESOLVED = alert_pb2.ALERT_STATUS_RESOLVED


class AlertError(Exception):
    """A call that cannot be carried out; ``status`` names its gRPC status code."""

    status = "INVALID_ARGUMENT"


class NotFound(AlertError):
    status = "NOT_FOUND"


class AlreadyExists(AlertError):
    status = "ALREADY_EXISTS"


class FailedPrecondition(AlertError):
    status = "FAILED_PRECONDITION"


@dataclass
class GatewayTally:
    """Delivery of one stage to one gateway, in devices."""

    recipients: int = 0
    handed_over: int = 0
    acked: int = 0
    withdrawn: int = 0


@dataclass
class StageState:
    radius_m: float
    duration_s: int
    started_at: float | None = None
    walked_in: int = 0
    gateways: dict[int, GatewayTally] = field(default_factory=dict)

    def tally(self, gateway: int) -> GatewayTally:
        return self.gateways.setdefault(gateway, GatewayTally())

    @property
    def recipients(self) -> int:
        return sum(tally.recipients for tally in self.gateways.values())


@dataclass(eq=False)
class AlertState:
    """One alert as the engine holds it."""

    alert_id: str
    fingerprint: bytes
    centre_lat: np.ndarray
    centre_lng: np.ndarray
    centre_labels: list[str]
    start_time: float
    schedule: Schedule
    payload: alert_pb2.AlertPayload
    created_at: float
    status: int = SCHEDULED
    stage: int | None = None  # 0-based running stage
    version: int = 1
    payload_version: int = 1
    updated_at: float = 0.0
    closed_at: float | None = None
    resolution: int = alert_pb2.RESOLUTION_UNSPECIFIED
    follow_up_devices: int = 0
    record: AlertRecord = field(default_factory=AlertRecord)
    stages: list[StageState] = field(default_factory=list)
    #: Acknowledged recipient ids per gateway: the devices the follow-up goes to.
    acked_ids: dict[int, list[np.ndarray]] = field(default_factory=dict)
    watchers: set[asyncio.Queue] = field(default_factory=set)
    progress_due: bool = False
    #: Serialises stage changes of this alert (the scheduler and UpdateAlert).
    advancing: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def closed(self) -> bool:
        return self.status in (EXPIRED, RESOLVED)

    def set_schedule(self, schedule: Schedule) -> None:
        old = self.stages
        self.schedule = schedule
        self.stages = [StageState(s.radius_m, s.duration_s) for s in schedule.stages]
        # Stages already run keep their tallies.
        for new, previous in zip(self.stages, old, strict=False):
            if previous.started_at is not None:
                new.started_at, new.walked_in, new.gateways = (
                    previous.started_at,
                    previous.walked_in,
                    previous.gateways,
                )


@dataclass(frozen=True)
class Ring:
    """The running ring of one alert, as the geofence tests it."""

    alert: AlertState
    stage: int
    radius_m: float
    centre_lat: np.ndarray
    centre_lng: np.ndarray


def fingerprint(request: alert_pb2.CreateAlertRequest) -> bytes:
    """What makes two CreateAlert calls "the same content"."""
    return hashlib.sha256(request.SerializeToString(deterministic=True)).digest()


class Dispatcher:
    """Alerts, their rings and the gateways' outboxes (see the module docstring)."""

    def __init__(
        self,
        index: LocationIndex,
        clock: Clock,
        query_pool: Executor,
        metrics: Metrics,
        *,
        batch_devices: int = DEFAULT_BATCH_DEVICES,
    ) -> None:
        self.index = index
        self.clock = clock
        self.metrics = metrics
        self.batch_devices = batch_devices
        self.alerts: dict[str, AlertState] = {}
        self.outboxes: dict[int, Outbox] = {}
        #: The running rings; replaced whole, so ingest threads read a consistent tuple.
        self.rings: tuple[Ring, ...] = ()
        self._query_pool = query_pool
        self._tasks: set[asyncio.Task] = set()

    # Outboxes.

    def outbox(self, gateway: int) -> Outbox:
        box = self.outboxes.get(gateway)
        if box is None:
            box = Outbox(gateway, self._on_sent, self._on_acked)
            self.outboxes[gateway] = box
        return box

    def _on_sent(self, entry: Entry) -> None:
        if entry.kind == KIND_RECIPIENTS:
            alert = self.alerts[entry.alert_id]
            alert.stages[entry.stage - 1].tally(entry.gateway).handed_over += entry.devices
            self._progress(alert)

    def _on_acked(self, entry: Entry, latency_s: float) -> None:
        gateway = entry.gateway
        self.metrics.ack_latency.labels(gateway=str(gateway)).observe(latency_s)
        if entry.kind == KIND_RECIPIENTS:
            alert = self.alerts[entry.alert_id]
            alert.stages[entry.stage - 1].tally(gateway).acked += entry.devices
            alert.acked_ids.setdefault(gateway, []).append(entry.ids)
            self._progress(alert)
        self.metrics.pending.labels(gateway=str(gateway)).set(self.outbox(gateway).pending())

    def _queue(self, gateway: int, entry: Entry) -> None:
        entry.gateway = gateway
        entry.header.queued_at.CopyFrom(timestamp(self.clock.now()))
        box = self.outbox(gateway)
        box.put(entry)
        self.metrics.pending.labels(gateway=str(gateway)).set(box.pending())

    def _queue_payload(self, alert: AlertState, gateway: int) -> None:
        """Queues the alert's payload for a gateway unless it has this version already."""
        box = self.outbox(gateway)
        if box.payload_versions.get(alert.alert_id) == alert.payload_version:
            return
        box.payload_versions[alert.alert_id] = alert.payload_version
        header = gateway_pb2.GatewayMessage(
            kind=KIND_ALERT,
            alert_id=alert.alert_id,
            payload=alert.payload,
            payload_version=alert.payload_version,
        )
        self._queue(gateway, Entry(KIND_ALERT, alert.alert_id, header))

    def _queue_recipients(
        self, alert: AlertState, stage: int, by_gateway: dict[int, np.ndarray], walked_in: bool
    ) -> int:
        """Queues new recipients of a stage (1-based) in batches; returns how many."""
        state = alert.stages[stage - 1]
        total = 0
        for gateway, ids in sorted(by_gateway.items()):
            if ids.size == 0:
                continue
            self._queue_payload(alert, gateway)
            for start in range(0, ids.size, self.batch_devices):
                chunk = ids[start : start + self.batch_devices]
                header = gateway_pb2.GatewayMessage(
                    kind=KIND_RECIPIENTS,
                    alert_id=alert.alert_id,
                    payload_version=alert.payload_version,
                    stage_number=stage,
                )
                self._queue(gateway, Entry(KIND_RECIPIENTS, alert.alert_id, header, stage, chunk))
            state.tally(gateway).recipients += int(ids.size)
            self.metrics.recipients.labels(stage=str(stage), gateway=str(gateway)).inc(ids.size)
            total += int(ids.size)
        if walked_in:
            state.walked_in += total
        if total:
            self._progress(alert)
        return total

    # Alerts.

    def get(self, alert_id: str) -> AlertState:
        alert = self.alerts.get(alert_id)
        if alert is None:
            raise NotFound(f"no alert has alert_id {alert_id!r}")
        return alert

    def create(
        self,
        request: alert_pb2.CreateAlertRequest,
        schedule: Schedule,
        centres: tuple[np.ndarray, np.ndarray, list[str]],
        start_time: float,
    ) -> tuple[AlertState, bool]:
        """Stores a checked alert; returns it and whether it is new."""
        digest = fingerprint(request)
        existing = self.alerts.get(request.alert_id)
        if existing is not None:
            if existing.fingerprint != digest:
                raise AlreadyExists(
                    f"alert_id {request.alert_id!r} is already used by an alert with other "
                    "content; use UpdateAlert to change it"
                )
            return existing, False
        now = self.clock.now()
        alert = AlertState(
            alert_id=request.alert_id,
            fingerprint=digest,
            centre_lat=centres[0],
            centre_lng=centres[1],
            centre_labels=centres[2],
            start_time=start_time,
            schedule=schedule,
            payload=request.payload,
            created_at=now,
            updated_at=now,
        )
        alert.set_schedule(schedule)
        self.alerts[alert.alert_id] = alert
        self.metrics.alerts.labels(event="created").inc()
        _LOG.info(
            "alert %s created: %d centre(s), schedule %s (%s), starts in %.0f s",
            alert.alert_id,
            alert.centre_lat.size,
            schedule.name or "inline",
            schedule.describe(),
            max(0.0, start_time - now),
        )
        return alert, True

    async def update(
        self,
        alert: AlertState,
        centres: tuple[np.ndarray, np.ndarray, list[str]] | None,
        payload: alert_pb2.AlertPayload | None,
        schedule: Schedule | None,
    ) -> None:
        """Applies a checked update (see the module docstring)."""
        if alert.closed:
            raise FailedPrecondition(
                f"alert {alert.alert_id!r} is {_status_word(alert.status)}; it cannot change"
            )
        if centres is None and payload is None and schedule is None:
            raise AlertError("nothing to update: set centres, payload or a schedule")
        alert.version += 1
        alert.updated_at = self.clock.now()
        changes = []
        if payload is not None:
            alert.payload = payload
            alert.payload_version = alert.version
            for box in self.outboxes.values():
                if alert.alert_id in box.payload_versions:
                    self._queue_payload(alert, box.gateway_id)
            changes.append("payload")
        if schedule is not None:
            alert.set_schedule(schedule)
            changes.append(f"schedule {schedule.name or 'inline'} ({schedule.describe()})")
        if centres is not None:
            alert.centre_lat, alert.centre_lng, alert.centre_labels = centres
            changes.append(f"{centres[0].size} centre(s)")
        _LOG.info("alert %s updated to version %d: %s", alert.alert_id, alert.version, changes)
        self._emit(alert, alert_pb2.ALERT_EVENT_KIND_UPDATED)

        if schedule is not None:
            await self.advance(alert)  # may start stages, or expire the alert
        # New centres, or a new radius for the running stage: its ring is redrawn at once.
        redrawn = centres is not None or schedule is not None
        if redrawn and alert.status == ACTIVE and alert.stage is not None:
            self._refresh_rings()
            reason = "new centres" if centres is not None else "new schedule"
            await self._sweep(alert, alert.stage + 1, reason=reason)

    def resolve(
        self, alert: AlertState, resolution: int, follow_up: Iterable[alert_pb2.LocalizedNotice]
    ) -> None:
        """Closes an alert for good (see the module docstring)."""
        if alert.status == RESOLVED:
            raise FailedPrecondition(f"alert {alert.alert_id!r} is already resolved")
        follow_up = list(follow_up)
        alert.status, alert.resolution = RESOLVED, resolution
        alert.stage = None
        alert.version += 1
        alert.closed_at = alert.updated_at = self.clock.now()
        self._refresh_rings()

        withdrawn = 0
        reached = 0
        for box in list(self.outboxes.values()):
            if alert.alert_id not in box.payload_versions:
                continue
            for entry in box.withdraw(alert.alert_id, KIND_RECIPIENTS):
                alert.stages[entry.stage - 1].tally(box.gateway_id).withdrawn += entry.devices
                withdrawn += entry.devices
            self._queue_closed(alert, box.gateway_id, follow_up)
            if follow_up:
                reached += self._queue_follow_up(alert, box)
        alert.follow_up_devices = reached
        self.metrics.alerts.labels(event="resolved").inc()
        self.metrics.active.set(self._active_count())
        _LOG.info(
            "alert %s resolved (%s): %d devices notified, %d withdrawn before hand-over, "
            "follow-up to %d devices",
            alert.alert_id,
            alert_pb2.Resolution.Name(resolution),
            len(alert.record) - withdrawn,
            withdrawn,
            reached,
        )
        self._emit(alert, alert_pb2.ALERT_EVENT_KIND_RESOLVED, final=True)

    def _queue_closed(self, alert: AlertState, gateway: int, follow_up: list) -> None:
        header = gateway_pb2.GatewayMessage(
            kind=KIND_CLOSED,
            alert_id=alert.alert_id,
            status=alert.status,
            resolution=alert.resolution,
            follow_up=follow_up,
        )
        self._queue(gateway, Entry(KIND_CLOSED, alert.alert_id, header))

    def _queue_follow_up(self, alert: AlertState, box: Outbox) -> int:
        """The follow-up goes to the devices handed over to this gateway: acked, or sent
        and in flight (the gateway handles those before the CLOSED message)."""
        parts = list(alert.acked_ids.get(box.gateway_id, []))
        parts += [
            entry.ids
            for entry in box.unacked
            if entry.alert_id == alert.alert_id and entry.kind == KIND_RECIPIENTS
        ]
        if not parts:
            return 0
        ids = np.unique(np.concatenate(parts))
        for start in range(0, ids.size, self.batch_devices):
            header = gateway_pb2.GatewayMessage(kind=KIND_FOLLOW_UP, alert_id=alert.alert_id)
            entry = Entry(
                KIND_FOLLOW_UP, alert.alert_id, header, 0, ids[start : start + self.batch_devices]
            )
            self._queue(box.gateway_id, entry)
        return int(ids.size)

    def _expire(self, alert: AlertState) -> None:
        alert.status, alert.stage = EXPIRED, None
        alert.closed_at = alert.updated_at = self.clock.now()
        self._refresh_rings()
        for box in self.outboxes.values():
            if alert.alert_id in box.payload_versions:
                self._queue_closed(alert, box.gateway_id, [])
        self.metrics.alerts.labels(event="expired").inc()
        _LOG.info(
            "alert %s expired after %d stage(s): %d devices notified",
            alert.alert_id,
            len(alert.stages),
            len(alert.record),
        )
        self._emit(alert, alert_pb2.ALERT_EVENT_KIND_EXPIRED, final=True)

    # Stages.

    async def advance(self, alert: AlertState) -> None:
        """Brings an alert to the stage its clock implies, sweeping every stage it
        enters (in order, so each stage is credited with its own annulus)."""
        async with alert.advancing:
            await self._advance(alert)

    async def _advance(self, alert: AlertState) -> None:
        if alert.closed:
            return
        elapsed = self.clock.now() - alert.start_time
        if elapsed < 0:
            return
        target = alert.schedule.stage_at(elapsed)
        if target is None:  # past the last stage
            target = len(alert.stages)
        current = -1 if alert.stage is None else alert.stage
        for stage in range(current + 1, min(target, len(alert.stages) - 1) + 1):
            if alert.closed:
                return
            alert.status, alert.stage = ACTIVE, stage
            alert.stages[stage].started_at = self.clock.now()
            self._refresh_rings()
            self.metrics.active.set(self._active_count())
            self._emit(alert, alert_pb2.ALERT_EVENT_KIND_STAGE_STARTED, stage_number=stage + 1)
            await self._sweep(alert, stage + 1, reason="stage start")
        if target >= len(alert.stages) and not alert.closed:
            self._expire(alert)
            self.metrics.active.set(self._active_count())

    async def _sweep(self, alert: AlertState, stage: int, reason: str) -> None:
        """Queues the devices inside a stage's ring (1-based) not yet notified."""
        state = alert.stages[stage - 1]
        started = time.perf_counter()
        found = await asyncio.get_running_loop().run_in_executor(
            self._query_pool,
            self.index.new_recipients,
            alert.record,
            alert.centre_lat,
            alert.centre_lng,
            state.radius_m,
        )
        if alert.closed and alert.status == RESOLVED:
            _LOG.info(
                "alert %s: stage %d sweep dropped (%d devices): the alert was resolved meanwhile",
                alert.alert_id,
                stage,
                sum(ids.size for ids in found.values()),
            )
            return
        count = self._queue_recipients(alert, stage, found, walked_in=False)
        per_gateway = ", ".join(f"gateway {g}: {ids.size:,}" for g, ids in sorted(found.items()))
        _LOG.info(
            "alert %s stage %d (%g m), %s: %d new recipients (%s) in %.1f ms",
            alert.alert_id,
            stage,
            state.radius_m,
            reason,
            count,
            per_gateway or "none",
            (time.perf_counter() - started) * 1e3,
        )

    def tick(self) -> None:
        """Starts the stage changes that are due, each alert in its own task so that a
        large sweep does not hold back the others."""
        now = self.clock.now()
        for alert in list(self.alerts.values()):
            if alert.closed or alert.advancing.locked() or now < alert.start_time:
                continue
            if alert.schedule.stage_at(now - alert.start_time) != alert.stage:
                self.spawn(self.advance(alert))

    def spawn(self, work) -> None:
        """Runs a coroutine in the background, logging its failure."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            _LOG.error("alert work failed", exc_info=task.exception())

    async def run(self, stop: asyncio.Event, interval_s: float = 0.02) -> None:
        """Ticks until ``stop`` is set."""
        while not stop.is_set():
            self.tick()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)

    def _active_count(self) -> int:
        return sum(1 for alert in self.alerts.values() if alert.status == ACTIVE)

    def _refresh_rings(self) -> None:
        self.rings = tuple(
            Ring(a, a.stage + 1, a.stages[a.stage].radius_m, a.centre_lat, a.centre_lng)
            for a in self.alerts.values()
            if a.status == ACTIVE and a.stage is not None
        )

    # The geofence: called from ingest threads, then on the loop.

    def walk_ins(
        self, gateway: int, ids: np.ndarray, lat: np.ndarray, lng: np.ndarray
    ) -> list[tuple[Ring, np.ndarray]]:
        """Runs in an ingest thread after the batch is applied: for each running ring,
        the reported devices inside it that the alert had not notified (now recorded as
        notified). Reading ``self.rings`` after the batch is applied closes the race
        with a stage start, which publishes its ring before sweeping."""
        found = []
        for ring in self.rings:
            inside = geofence.inside(lat, lng, ring.centre_lat, ring.centre_lng, ring.radius_m)
            if inside.size:
                fresh = ring.alert.record.add_new(gateway, ids[inside])
                if fresh.size:
                    found.append((ring, fresh))
        return found

    def queue_walk_ins(self, gateway: int, found: list[tuple[Ring, np.ndarray]]) -> int:
        """On the loop: queues what :meth:`walk_ins` found, unless the alert closed."""
        total = 0
        for ring, ids in found:
            if ring.alert.status == RESOLVED:
                continue
            total += self._queue_recipients(ring.alert, ring.stage, {gateway: ids}, walked_in=True)
        if total:
            self.metrics.geofence.labels(gateway=str(gateway)).inc(total)
        return total

    # Watching.

    def watch(self, alert: AlertState) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        alert.watchers.add(queue)
        queue.put_nowait(self._event(alert, alert_pb2.ALERT_EVENT_KIND_SNAPSHOT))
        if alert.closed:
            queue.put_nowait(None)
        return queue

    def unwatch(self, alert: AlertState, queue: asyncio.Queue) -> None:
        alert.watchers.discard(queue)

    def _event(
        self, alert: AlertState, kind: int, stage_number: int | None = None
    ) -> alert_pb2.AlertEvent:
        current = 0 if alert.stage is None else alert.stage + 1
        return alert_pb2.AlertEvent(
            kind=kind,
            time=timestamp(self.clock.now()),
            stage_number=current if stage_number is None else stage_number,
            alert=self.snapshot(alert),
        )

    def _emit(
        self, alert: AlertState, kind: int, stage_number: int | None = None, final: bool = False
    ) -> None:
        if not alert.watchers:
            return
        event = self._event(alert, kind, stage_number)
        for queue in alert.watchers:
            queue.put_nowait(event)
            if final:
                queue.put_nowait(None)

    def _progress(self, alert: AlertState) -> None:
        """Schedules a PROGRESS event, at most one per interval."""
        if not alert.watchers or alert.progress_due:
            return
        alert.progress_due = True

        def send() -> None:
            alert.progress_due = False
            if not alert.closed:
                self._emit(alert, alert_pb2.ALERT_EVENT_KIND_PROGRESS)

        asyncio.get_running_loop().call_later(PROGRESS_INTERVAL_S, send)

    def snapshot(self, alert: AlertState) -> alert_pb2.Alert:
        """The alert as the API shows it."""
        now = self.clock.now()
        message = alert_pb2.Alert(
            alert_id=alert.alert_id,
            status=alert.status,
            centres=[
                alert_pb2.Centre(latitude=float(lat), longitude=float(lng), label=label)
                for lat, lng, label in zip(
                    alert.centre_lat, alert.centre_lng, alert.centre_labels, strict=True
                )
            ],
            start_time=timestamp(alert.start_time),
            schedule_name=alert.schedule.name,
            current_stage=0 if alert.stage is None else alert.stage + 1,
            payload=alert.payload,
            version=alert.version,
            created_at=timestamp(alert.created_at),
            updated_at=timestamp(alert.updated_at),
            resolution=alert.resolution,
            notified_devices=sum(
                tally.recipients - tally.withdrawn
                for stage in alert.stages
                for tally in stage.gateways.values()
            ),
            follow_up_devices=alert.follow_up_devices,
        )
        if alert.closed_at is not None:
            message.closed_at.CopyFrom(timestamp(alert.closed_at))
        starts = alert.schedule.stage_starts()
        if alert.stage is not None:
            ends = alert.start_time + starts[alert.stage] + alert.stages[alert.stage].duration_s
            message.stage_ends_at.CopyFrom(timestamp(ends))
        for number, state in enumerate(alert.stages, start=1):
            stage = message.stages.add(
                stage_number=number,
                radius_m=state.radius_m,
                duration_s=state.duration_s,
                recipients=state.recipients,
                walked_in=state.walked_in,
            )
            if state.started_at is not None:
                stage.started_at.CopyFrom(timestamp(state.started_at))
            for gateway, tally in sorted(state.gateways.items()):
                progress = stage.gateways.add(
                    gateway_id=gateway,
                    recipients=tally.recipients,
                    handed_over=tally.handed_over,
                    acked=tally.acked,
                    withdrawn=tally.withdrawn,
                )
                eta = self._handover_eta(alert, number, gateway, now)
                if eta is not None:
                    progress.expected_handover_at.CopyFrom(timestamp(eta))
        return message

    def _handover_eta(
        self, alert: AlertState, stage: int, gateway: int, now: float
    ) -> float | None:
        box = self.outboxes.get(gateway)
        if box is None or box.connection is None or box.connection.replaced:
            return None
        ahead = box.devices_ahead(alert.alert_id, stage)
        if ahead is None:
            return None
        rate = box.connection.rate
        return now if rate <= 0 else now + ahead / rate * self.clock.speed

    # Preview.

    def preview(
        self, centre_lat: np.ndarray, centre_lng: np.ndarray, schedule: Schedule
    ) -> alert_pb2.PreviewAlertResponse:
        """Runs in a query thread: the recipients of each stage now, nothing recorded."""
        record = AlertRecord()
        response = alert_pb2.PreviewAlertResponse(live_devices=self.index.live())
        cumulative = 0
        for number, stage in enumerate(schedule.stages, start=1):
            found = self.index.new_recipients(record, centre_lat, centre_lng, stage.radius_m)
            new = sum(int(ids.size) for ids in found.values())
            cumulative += new
            response.stages.add(
                stage_number=number,
                radius_m=stage.radius_m,
                duration_s=stage.duration_s,
                new_recipients=new,
                cumulative_recipients=cumulative,
                new_by_gateway=[
                    alert_pb2.GatewayCount(gateway_id=g, devices=int(ids.size))
                    for g, ids in sorted(found.items())
                ],
            )
        return response

    # Ingest bookkeeping shared with the server.

    def forget(self, gateway: int, ids: np.ndarray) -> None:
        """Drops opted-out devices from messages not yet sent (the index forgets them
        separately)."""
        box = self.outboxes.get(gateway)
        if box is None or not box.queued:
            return
        for entry in box.queued:
            if entry.ids is not None and entry.kind == KIND_RECIPIENTS:
                keep = ~np.isin(entry.ids, ids)
                if not keep.all():
                    entry.ids = entry.ids[keep]


def _status_word(status: int) -> str:
    return {EXPIRED: "expired", RESOLVED: "resolved"}.get(status, "open")
