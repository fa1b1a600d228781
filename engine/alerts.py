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
import json
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from engine import audit, geofence, logs
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
from engine.journal import Journal, Restored, StoreUnavailable
from engine.metrics import Metrics
from engine.persist import Change, decode_request, encode_request, ids_from_bytes, restore_entry
from engine.schedules import Schedule, Stage

_LOG = logging.getLogger("engine.alerts")

#: Device ids a RECIPIENTS or FOLLOW_UP message carries at most by default.
DEFAULT_BATCH_DEVICES = 16_384
#: Seconds after an alert closes that the lists of who it reached are purged (a week).
DEFAULT_PURGE_AFTER_S = 7 * 24 * 3600.0
#: Radii of the steps of a sweep, as shares of the way from the previous stage's radius
#: to the stage's own (see ``Dispatcher._sweep``).
SWEEP_STEPS = (0.125, 0.5, 1.0)
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


class Unavailable(AlertError):
    status = "UNAVAILABLE"


class Conflict(AlertError):
    status = "ABORTED"


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
    #: Sweeps of this stage under way.
    sweeping: int = 0
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
    #: Set once the messages of a resolve (CLOSED, follow-up) are written.
    close_written: bool = False
    #: Set once the lists of who it reached are purged.
    purged: bool = False
    #: The follow-up notice of a resolve, kept to write its messages after a restart.
    follow_up_texts: list = field(default_factory=list)
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
        journal: Journal | None = None,
        purge_after_s: float = DEFAULT_PURGE_AFTER_S,
    ) -> None:
        self.index = index
        self.clock = clock
        self.metrics = metrics
        self.batch_devices = batch_devices
        self.purge_after_s = purge_after_s
        self.journal = journal if journal is not None else Journal(None)
        self.alerts: dict[str, AlertState] = {}
        self.outboxes: dict[int, Outbox] = {}
        #: The running rings; replaced whole, so ingest threads read a consistent tuple.
        self.rings: tuple[Ring, ...] = ()
        self._query_pool = query_pool
        self._tasks: set[asyncio.Task] = set()
        #: Serialises the issuer's actions (create, update, resolve) across alerts.
        self._actions = asyncio.Lock()
        #: Serialises opt-outs: each holds the messages it changes until it is durable.
        self._forgetting = asyncio.Lock()
        #: Opt-outs not yet durable, by gateway: their ids and their write's future.
        self._forgets: dict[int, list[list]] = {}

    # Outboxes.

    def outbox(self, gateway: int) -> Outbox:
        box = self.outboxes.get(gateway)
        if box is None:
            record = self._record_handover if self.journal.durable else None
            box = Outbox(gateway, self._on_sent, self._on_acked, self._on_ack, record)
            self.outboxes[gateway] = box
        return box

    def _on_sent(self, entry: Entry) -> None:
        alert = self.alerts.get(entry.alert_id)
        if entry.kind == KIND_RECIPIENTS and alert is not None:
            alert.stages[entry.stage - 1].tally(entry.gateway).handed_over += entry.devices
            self._progress(alert)

    def _on_acked(self, entry: Entry, latency_s: float) -> None:
        gateway = entry.gateway
        self.metrics.ack_latency.labels(gateway=str(gateway)).observe(latency_s)
        alert = self.alerts.get(entry.alert_id)
        if entry.kind == KIND_RECIPIENTS and alert is not None:
            alert.stages[entry.stage - 1].tally(gateway).acked += entry.devices
            alert.acked_ids.setdefault(gateway, []).append(entry.ids)
            self._progress(alert)
        self.metrics.pending.labels(gateway=str(gateway)).set(self.outbox(gateway).pending())

    def _on_ack(self, sequence: int, entries: list[Entry]) -> None:
        """Writes an ack: the cursor, the acked messages gone from the stream, and the
        acked devices (the follow-up goes to them)."""
        box = self.outbox(entries[0].gateway)
        change = Change(self.journal)
        change.acked_upto(box.gateway_id, sequence)
        change.removed(box, entries)
        for entry in entries:
            if entry.kind == KIND_RECIPIENTS:
                change.count(
                    entry.alert_id, f"s{entry.stage}:g{entry.gateway}:acked", entry.devices
                )
                change.acked_ids(entry.alert_id, entry.gateway, entry.ids)
        if box.has_forgotten and not box.queued and not box.unacked:
            change.forget_list_done(box.gateway_id)  # no message left to filter
            box.has_forgotten = False
        self.journal.submit(change.op())

    def _record_handover(self, box: Outbox, queue_number: int) -> None:
        change = Change(self.journal)
        change.handover_mark(box.gateway_id, queue_number)
        self.journal.submit(change.op(lambda: box.handover_recorded(queue_number)))

    def _queue(self, gateway: int, entry: Entry, change: Change) -> None:
        """Puts a message in a gateway's queue; it is sent once ``change`` is durable."""
        entry.gateway = gateway
        entry.header.queued_at.CopyFrom(timestamp(self.clock.now()))
        box = self.outbox(gateway)
        entry.queue_number = box.next_queue_id
        box.next_queue_id += 1
        entry.durable = False
        box.put(entry)
        change.entry(box, entry)
        self.metrics.pending.labels(gateway=str(gateway)).set(box.pending())

    def _queue_payload(self, alert: AlertState, gateway: int, change: Change) -> None:
        """Queues the alert's payload for a gateway unless it has this version already."""
        box = self.outbox(gateway)
        if box.payload_versions.get(alert.alert_id) == alert.payload_version:
            return
        box.payload_versions[alert.alert_id] = alert.payload_version
        change.payload_version(gateway, alert.alert_id, alert.payload_version)
        header = gateway_pb2.GatewayMessage(
            kind=KIND_ALERT,
            alert_id=alert.alert_id,
            payload=alert.payload,
            payload_version=alert.payload_version,
        )
        self._queue(gateway, Entry(KIND_ALERT, alert.alert_id, header), change)

    def _queue_recipients(
        self,
        alert: AlertState,
        stage: int,
        by_gateway: dict[int, np.ndarray],
        walked_in: bool,
        change: Change | None = None,
    ) -> int:
        """Queues new recipients of a stage (1-based) in batches, recording them as
        notified in the same journal change; returns how many."""
        change = change if change is not None else Change(self.journal)
        state = alert.stages[stage - 1]
        total = 0
        for gateway, ids in sorted(by_gateway.items()):
            if ids.size == 0:
                continue
            self._queue_payload(alert, gateway, change)
            for start in range(0, ids.size, self.batch_devices):
                chunk = ids[start : start + self.batch_devices]
                header = gateway_pb2.GatewayMessage(
                    kind=KIND_RECIPIENTS,
                    alert_id=alert.alert_id,
                    payload_version=alert.payload_version,
                    stage_number=stage,
                )
                entry = Entry(KIND_RECIPIENTS, alert.alert_id, header, stage, chunk)
                self._queue(gateway, entry, change)
            change.notified(alert.alert_id, gateway, ids)
            change.count(alert.alert_id, f"s{stage}:g{gateway}:recipients", ids.size)
            state.tally(gateway).recipients += int(ids.size)
            self.metrics.recipients.labels(stage=str(stage), gateway=str(gateway)).inc(ids.size)
            total += int(ids.size)
        if walked_in:
            state.walked_in += total
            change.count(alert.alert_id, f"s{stage}:walked", total)
        self.journal.submit(change.op())
        if total:
            self._progress(alert)
        return total

    # Alerts.

    def get(self, alert_id: str) -> AlertState:
        alert = self.alerts.get(alert_id)
        if alert is None:
            raise NotFound(f"no alert has alert_id {alert_id!r}")
        return alert

    def _audit(self, actor: dict, action: str, alert: str, version: int, request) -> dict:
        """Fields of an audit entry (sealed into the chain by the journal)."""
        return {
            "at": self.clock.now(),
            "actor": actor.get("actor", "engine"),
            "role": actor.get("role", "engine"),
            "peer": actor.get("peer", ""),
            "action": action,
            "alert_id": alert,
            "version": version,
            "request_sha256": "" if request is None else audit.request_sha256(request),
            "outcome": "OK",
        }

    async def _commit(self, change: Change, then) -> None:
        try:
            await self.journal.commit(change.op(then))
        except StoreUnavailable as error:
            raise Unavailable(f"{error}; retry later") from None

    def same_alert(self, request: alert_pb2.CreateAlertRequest) -> AlertState | None:
        """The alert a repeated CreateAlert asks for, or None when its id is new; raises
        AlreadyExists when the id is taken by other content."""
        existing = self.alerts.get(request.alert_id)
        if existing is not None and existing.fingerprint != fingerprint(request):
            raise AlreadyExists(
                f"alert_id {request.alert_id!r} is already used by an alert with other "
                "content; use UpdateAlert to change it"
            )
        return existing

    async def create(
        self,
        request: alert_pb2.CreateAlertRequest,
        schedule: Schedule,
        centres: tuple[np.ndarray, np.ndarray, list[str]],
        start_time: float,
        actor: dict | None = None,
    ) -> tuple[AlertState, bool]:
        """Stores a checked alert once it is durable; returns it and whether it is new."""
        async with self._actions:
            existing = self.same_alert(request)
            if existing is not None:
                return existing, False
            now = self.clock.now()
            alert = AlertState(
                alert_id=request.alert_id,
                fingerprint=fingerprint(request),
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
            change = Change(self.journal)
            change.log(
                alert.alert_id,
                {
                    "action": "create",
                    "at": now,
                    "start_time": start_time,
                    "schedule": _schedule_record(schedule),
                    "request": encode_request(request),
                },
            )
            change.audit = self._audit(actor or {}, "CreateAlert", alert.alert_id, 1, request)
            await self._commit(change, lambda: self._install(alert))
            return alert, True

    def _install(self, alert: AlertState) -> None:
        self.alerts[alert.alert_id] = alert
        self.metrics.alerts.labels(event="created").inc()
        _LOG.info(
            "alert %s created: %d centre(s), schedule %s (%s), starts in %.0f s",
            alert.alert_id,
            alert.centre_lat.size,
            alert.schedule.name or "inline",
            alert.schedule.describe(),
            max(0.0, alert.start_time - self.clock.now()),
            extra=logs.fields(
                alert_id=alert.alert_id,
                event="created",
                centres=int(alert.centre_lat.size),
                schedule=alert.schedule.name or "inline",
                radii_m=[stage.radius_m for stage in alert.schedule.stages],
                start_time=alert.start_time,
            ),
        )

    async def update(
        self,
        alert: AlertState,
        request: alert_pb2.UpdateAlertRequest,
        centres: tuple[np.ndarray, np.ndarray, list[str]] | None,
        payload: alert_pb2.AlertPayload | None,
        schedule: Schedule | None,
        actor: dict | None = None,
    ) -> None:
        """Applies a checked update once it is durable (see the module docstring)."""
        async with self._actions:
            if alert.closed:
                raise FailedPrecondition(
                    f"alert {alert.alert_id!r} is {_status_word(alert.status)}; it cannot change"
                )
            if centres is None and payload is None and schedule is None:
                raise AlertError("nothing to update: set centres, payload or a schedule")
            expected = request.expected_version
            if expected and expected != alert.version:
                raise Conflict(
                    f"alert {alert.alert_id!r} is at version {alert.version}, not "
                    f"expected_version {expected}: it changed since it was read; read it "
                    "again and rebuild the change"
                )
            change = Change(self.journal)
            record = {
                "action": "update",
                "at": self.clock.now(),
                "request": encode_request(request),
            }
            if schedule is not None:
                record["schedule"] = _schedule_record(schedule)
            change.log(alert.alert_id, record)
            change.audit = self._audit(
                actor or {}, "UpdateAlert", alert.alert_id, alert.version + 1, request
            )
            await self._commit(
                change, lambda: self._apply_update(alert, centres, payload, schedule, record["at"])
            )

        if schedule is not None:
            await self.advance(alert)  # may start stages, or expire the alert
        # New centres, or a new radius for the running stage: its ring is redrawn at once.
        redrawn = centres is not None or schedule is not None
        if redrawn and alert.status == ACTIVE and alert.stage is not None:
            self._refresh_rings()
            reason = "new centres" if centres is not None else "new schedule"
            await self._sweep(alert, alert.stage + 1, reason=reason)

    def _apply_update(self, alert, centres, payload, schedule, at: float, replay=False) -> None:
        alert.version += 1
        alert.updated_at = at
        changes = []
        if payload is not None:
            alert.payload = payload
            alert.payload_version = alert.version
            if not replay:
                change = Change(self.journal)
                for box in self.outboxes.values():
                    if alert.alert_id in box.payload_versions:
                        self._queue_payload(alert, box.gateway_id, change)
                self.journal.submit(change.op())
            changes.append("payload")
        if schedule is not None:
            alert.set_schedule(schedule)
            changes.append(f"schedule {schedule.name or 'inline'} ({schedule.describe()})")
        if centres is not None:
            alert.centre_lat, alert.centre_lng, alert.centre_labels = centres
            changes.append(f"{centres[0].size} centre(s)")
        if replay:
            return
        _LOG.info(
            "alert %s updated to version %d: %s",
            alert.alert_id,
            alert.version,
            changes,
            extra=logs.fields(
                alert_id=alert.alert_id, event="updated", version=alert.version, changes=changes
            ),
        )
        self._emit(alert, alert_pb2.ALERT_EVENT_KIND_UPDATED)

    async def resolve(
        self,
        alert: AlertState,
        request: alert_pb2.ResolveAlertRequest,
        actor: dict | None = None,
    ) -> None:
        """Closes an alert for good, once that is durable (see the module docstring)."""
        async with self._actions:
            if alert.status == RESOLVED:
                raise FailedPrecondition(f"alert {alert.alert_id!r} is already resolved")
            change = Change(self.journal)
            at = self.clock.now()
            change.log(
                alert.alert_id,
                {"action": "resolve", "at": at, "request": encode_request(request)},
            )
            change.audit = self._audit(
                actor or {}, "ResolveAlert", alert.alert_id, alert.version + 1, request
            )
            await self._commit(
                change,
                lambda: self._apply_resolve(alert, request.resolution, list(request.follow_up), at),
            )

    def _apply_resolve(self, alert, resolution: int, follow_up: list, at: float) -> None:
        """The resolve in memory, and its messages: withdraw what was never sent, CLOSED
        after what was, then the follow-up."""
        alert.status, alert.resolution = RESOLVED, resolution
        alert.stage = None
        alert.version += 1
        alert.closed_at = alert.updated_at = at
        self._refresh_rings()

        change = Change(self.journal)
        withdrawn = 0
        reached = 0
        for box in list(self.outboxes.values()):
            if alert.alert_id not in box.payload_versions:
                continue
            removed = box.withdraw(alert.alert_id, KIND_RECIPIENTS)
            change.removed(box, removed)
            for entry in removed:
                alert.stages[entry.stage - 1].tally(box.gateway_id).withdrawn += entry.devices
                change.count(
                    alert.alert_id, f"s{entry.stage}:g{box.gateway_id}:withdrawn", entry.devices
                )
                withdrawn += entry.devices
            self._queue_closed(alert, box.gateway_id, follow_up, change)
            if follow_up:
                reached += self._queue_follow_up(alert, box, change)
        alert.follow_up_devices = reached
        alert.close_written = True
        change.state(alert.alert_id, "closed", 1)
        change.state(alert.alert_id, "follow_up_devices", reached)
        self.journal.submit(change.op())
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
            extra=logs.fields(
                alert_id=alert.alert_id,
                event="resolved",
                resolution=alert_pb2.Resolution.Name(resolution),
                notified=len(alert.record) - withdrawn,
                withdrawn=withdrawn,
                follow_up=reached,
            ),
        )
        self._emit(alert, alert_pb2.ALERT_EVENT_KIND_RESOLVED, final=True)

    def _queue_closed(self, alert: AlertState, gateway: int, follow_up: list, change) -> None:
        header = gateway_pb2.GatewayMessage(
            kind=KIND_CLOSED,
            alert_id=alert.alert_id,
            status=alert.status,
            resolution=alert.resolution,
            follow_up=follow_up,
        )
        self._queue(gateway, Entry(KIND_CLOSED, alert.alert_id, header), change)

    def _queue_follow_up(self, alert: AlertState, box: Outbox, change: Change) -> int:
        """The follow-up goes to the devices handed over to this gateway: acked, or sent
        and in flight, or maybe sent before a restart (the gateway handles all of those
        before the CLOSED message)."""
        parts = list(alert.acked_ids.get(box.gateway_id, []))
        handed = list(box.unacked) + [entry for entry in box.queued if entry.handed]
        parts += [
            entry.ids
            for entry in handed
            if entry.alert_id == alert.alert_id and entry.kind == KIND_RECIPIENTS
        ]
        if not parts:
            return 0
        ids = np.unique(np.concatenate(parts))
        for start in range(0, ids.size, self.batch_devices):
            header = gateway_pb2.GatewayMessage(kind=KIND_FOLLOW_UP, alert_id=alert.alert_id)
            chunk = ids[start : start + self.batch_devices]
            self._queue(
                box.gateway_id, Entry(KIND_FOLLOW_UP, alert.alert_id, header, 0, chunk), change
            )
        return int(ids.size)

    def _expire(self, alert: AlertState) -> None:
        alert.status, alert.stage = EXPIRED, None
        alert.closed_at = alert.updated_at = self.clock.now()
        self._refresh_rings()
        change = Change(self.journal)
        change.log(alert.alert_id, {"action": "expire", "at": alert.closed_at})
        change.audit = self._audit({}, "ExpireAlert", alert.alert_id, alert.version, None)
        for box in self.outboxes.values():
            if alert.alert_id in box.payload_versions:
                self._queue_closed(alert, box.gateway_id, [], change)
        self.journal.submit(change.op())
        self.metrics.alerts.labels(event="expired").inc()
        _LOG.info(
            "alert %s expired after %d stage(s): %d devices notified",
            alert.alert_id,
            len(alert.stages),
            len(alert.record),
            extra=logs.fields(
                alert_id=alert.alert_id,
                event="expired",
                stages=len(alert.stages),
                notified=len(alert.record),
            ),
        )
        self._emit(alert, alert_pb2.ALERT_EVENT_KIND_EXPIRED, final=True)

    # Restart.

    def restore(self, restored: Restored) -> None:
        """Rebuilds alerts and gateway queues from what the journal read back: replays
        each alert's accepted actions, then its tallies, notified devices and acks.
        Call before serving; then :meth:`catch_up` each open alert."""
        for alert_id, data in restored.alerts.items():
            alert = self._replay(alert_id, [json.loads(raw) for raw in data["log"]])
            if alert is None:
                _LOG.error("alert %s: no create in its journal log; skipped", alert_id)
                continue
            self._restore_state(alert, data["state"])
            for gateway, blob in data["notified"].items():
                alert.record.add(gateway, ids_from_bytes(blob))
            for gateway, blob in data["acked"].items():
                alert.acked_ids[gateway] = [ids_from_bytes(blob)]
            self.alerts[alert_id] = alert
        for gateway, data in restored.gateways.items():
            box = self.outbox(gateway)
            box.acked = data["acked"]
            box.next_sequence = box.acked + 1
            box.next_queue_id = data["last_id"] + 1
            box.handover_mark = data["handed"]
            box.payload_versions = dict(data["payloads"])
            forgotten = ids_from_bytes(data["forgotten"])
            box.has_forgotten = forgotten.size > 0
            for stream_id, fields in data["entries"]:
                entry = restore_entry(gateway, stream_id, fields)
                entry.handed = entry.queue_number <= box.handover_mark
                if forgotten.size and entry.ids is not None and entry.kind == KIND_RECIPIENTS:
                    entry.ids = entry.ids[~np.isin(entry.ids, forgotten)]
                box.queued.append(entry)
        # A resolve whose messages were not written before a crash: write them now.
        for alert in self.alerts.values():
            if alert.status == RESOLVED and not alert.close_written:
                self._apply_resolve(alert, alert.resolution, alert.follow_up_texts, alert.closed_at)
        self._refresh_rings()
        self.metrics.active.set(self._active_count())
        queued = sum(len(box.queued) for box in self.outboxes.values())
        _LOG.info(
            "restored %d alert(s) (%d open) and %d gateway queue(s) with %d message(s) to send",
            len(self.alerts),
            sum(1 for a in self.alerts.values() if not a.closed),
            len(self.outboxes),
            queued,
        )

    def _replay(self, alert_id: str, records: list[dict]) -> AlertState | None:
        alert = None
        for record in records:
            action, at = record["action"], record["at"]
            if action == "create":
                request = decode_request(alert_pb2.CreateAlertRequest, record["request"])
                schedule = _schedule_from_record(record["schedule"])
                alert = AlertState(
                    alert_id=alert_id,
                    fingerprint=fingerprint(request),
                    centre_lat=np.array([c.latitude for c in request.centres]),
                    centre_lng=np.array([c.longitude for c in request.centres]),
                    centre_labels=[c.label for c in request.centres],
                    start_time=record["start_time"],
                    schedule=schedule,
                    payload=request.payload,
                    created_at=at,
                    updated_at=at,
                )
                alert.set_schedule(schedule)
            elif alert is None:
                continue
            elif action == "update":
                request = decode_request(alert_pb2.UpdateAlertRequest, record["request"])
                centres = None
                if request.HasField("centres"):
                    cs = request.centres.centres
                    centres = (
                        np.array([c.latitude for c in cs]),
                        np.array([c.longitude for c in cs]),
                        [c.label for c in cs],
                    )
                payload = request.payload if request.HasField("payload") else None
                schedule = (
                    _schedule_from_record(record["schedule"]) if "schedule" in record else None
                )
                self._apply_update(alert, centres, payload, schedule, at, replay=True)
            elif action == "resolve":
                request = decode_request(alert_pb2.ResolveAlertRequest, record["request"])
                alert.status, alert.resolution, alert.stage = RESOLVED, request.resolution, None
                alert.follow_up_texts = list(request.follow_up)
                alert.version += 1
                alert.closed_at = alert.updated_at = at
            elif action == "expire" and alert.status != RESOLVED:
                alert.status, alert.stage = EXPIRED, None
                alert.closed_at = alert.updated_at = at
        return alert

    @staticmethod
    def _restore_state(alert: AlertState, state: dict[str, str]) -> None:
        for name, value in state.items():
            parts = name.split(":")
            if parts[0] == "started":
                alert.stages[int(parts[1]) - 1].started_at = float(value)
            elif parts[0] == "closed":
                alert.close_written = True
            elif parts[0] == "purged":
                alert.purged = True
            elif parts[0] == "follow_up_devices":
                alert.follow_up_devices = int(value)
            elif len(parts) == 2 and parts[1] == "walked":
                alert.stages[int(parts[0][1:]) - 1].walked_in = int(value)
            elif len(parts) == 3:
                tally = alert.stages[int(parts[0][1:]) - 1].tally(int(parts[1][1:]))
                setattr(tally, parts[2], int(value))
        for stage in alert.stages:
            for tally in stage.gateways.values():
                tally.handed_over = tally.acked  # the rest is sent again
        if not alert.closed:
            started = [i for i, stage in enumerate(alert.stages) if stage.started_at is not None]
            alert.stage = started[-1] if started else None
            alert.status = ACTIVE if started else SCHEDULED

    async def catch_up(self, alert: AlertState) -> None:
        """After a restart: brings an open alert to the stage its timeline implies, and
        sweeps the running stage again for the devices that came into its ring while the
        engine was down (the record keeps everyone else out)."""
        await self.advance(alert)
        if alert.status == ACTIVE and alert.stage is not None:
            await self._sweep(alert, alert.stage + 1, reason="restart catch-up")

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
            change = Change(self.journal)
            change.state(alert.alert_id, f"started:{stage + 1}", alert.stages[stage].started_at)
            self.journal.submit(change.op())
            self._refresh_rings()
            self.metrics.active.set(self._active_count())
            self._emit(alert, alert_pb2.ALERT_EVENT_KIND_STAGE_STARTED, stage_number=stage + 1)
            await self._sweep(alert, stage + 1, reason="stage start")
        if target >= len(alert.stages) and not alert.closed:
            self._expire(alert)
            self.metrics.active.set(self._active_count())

    async def _sweep(self, alert: AlertState, stage: int, reason: str) -> None:
        """Queues the devices inside a stage's ring (1-based) not yet notified.

        The ring is swept from the inside out, in :data:`SWEEP_STEPS` widening disks: the
        record returns each device once, so every step yields only its own annulus, and
        the first devices (the closest to the child) are on their way after a sixtieth
        of the work. The steps cost about a quarter more than one sweep."""
        state = alert.stages[stage - 1]
        state.sweeping += 1
        try:
            await self._sweep_steps(alert, stage, state, reason)
        finally:
            state.sweeping -= 1
            self._progress(alert)

    async def _sweep_steps(self, alert: AlertState, stage: int, state, reason: str) -> None:
        inner = alert.stages[stage - 2].radius_m if stage > 1 else 0.0
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        total: dict[int, int] = {}
        for step in SWEEP_STEPS:
            radius = inner + (state.radius_m - inner) * step
            found = await loop.run_in_executor(
                self._query_pool,
                self.index.new_recipients,
                alert.record,
                alert.centre_lat,
                alert.centre_lng,
                radius,
            )
            if alert.status == RESOLVED:
                _LOG.info(
                    "alert %s: stage %d sweep stopped (%d devices dropped): the alert was "
                    "resolved meanwhile",
                    alert.alert_id,
                    stage,
                    sum(ids.size for ids in found.values()),
                    extra=logs.fields(alert_id=alert.alert_id, event="sweep_stopped", stage=stage),
                )
                return
            self._queue_recipients(alert, stage, found, walked_in=False)
            for gateway, ids in found.items():
                total[gateway] = total.get(gateway, 0) + int(ids.size)
        per_gateway = ", ".join(f"gateway {g}: {n:,}" for g, n in sorted(total.items()) if n)
        _LOG.info(
            "alert %s stage %d (%g m), %s: %d new recipients (%s) in %.1f ms",
            alert.alert_id,
            stage,
            state.radius_m,
            reason,
            sum(total.values()),
            per_gateway or "none",
            (time.perf_counter() - started) * 1e3,
            extra=logs.fields(
                alert_id=alert.alert_id,
                event="swept",
                stage=stage,
                radius_m=state.radius_m,
                reason=reason,
                new_recipients=sum(total.values()),
                per_gateway={str(g): n for g, n in sorted(total.items())},
                ms=round((time.perf_counter() - started) * 1e3, 2),
            ),
        )

    def tick(self) -> None:
        """Starts the stage changes that are due, each alert in its own task so that a
        large sweep does not hold back the others."""
        now = self.clock.now()
        for alert in list(self.alerts.values()):
            if alert.closed:
                if not alert.purged and now >= alert.closed_at + self.purge_after_s:
                    self._purge(alert)
                continue
            if alert.advancing.locked() or now < alert.start_time:
                continue
            if alert.schedule.stage_at(now - alert.start_time) != alert.stage:
                self.spawn(self.advance(alert))

    def _purge(self, alert: AlertState) -> None:
        """Forgets who a closed alert reached, once ``purge_after_s`` has passed; its
        counts and its audit trail stay."""
        gateways = sorted(set(alert.record.gateways()) | set(alert.acked_ids))
        alert.record = AlertRecord()
        alert.acked_ids = {}
        alert.purged = True
        change = Change(self.journal)
        for gateway in gateways:
            change.delete(alert.alert_id, "notified", gateway)
            change.delete(alert.alert_id, "acked", gateway)
        change.state(alert.alert_id, "purged", 1)
        self.journal.submit(change.op())
        _LOG.info(
            "alert %s: recipient lists purged (%d gateway(s)), %.0f s after it closed",
            alert.alert_id,
            len(gateways),
            self.clock.now() - alert.closed_at,
            extra=logs.fields(alert_id=alert.alert_id, event="purged", gateways=len(gateways)),
        )

    def spawn(self, work) -> None:
        """Runs a coroutine in the background, logging its failure."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    async def settle(self) -> None:
        """Returns once the background work started so far (stage changes, sweeps) is
        done; for callers that read the state right after a burst of calls."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

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
                swept=state.started_at is not None and state.sweeping == 0,
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
        if rate <= 0:
            return now
        # Kept within what a timestamp holds (a year later at most) whatever the rate.
        return now + min(ahead / rate * self.clock.speed, 366 * 24 * 3600.0)

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

    async def forget(self, gateway: int, ids: np.ndarray) -> int:
        """Drops opted-out devices from the gateway's messages not yet sent (the index
        forgets them separately); returns how many were dropped.

        The messages holding them are held back (not sent) until the ids are written,
        with Redis, to the gateway's ``forgotten`` list together with the withdrawn
        counts; then the messages lose them. That write is never dropped: while Redis is
        unreachable the call answers UNAVAILABLE, the messages stay held, and the write
        happens when Redis is back; a retry waits for it. A restart drops the listed ids
        again from the messages it reads back (stream entries cannot be rewritten in
        place); the list is deleted once the gateway's queue is empty."""
        async with self._forgetting:
            pending = self._forgets.setdefault(gateway, [])
            waits = [future for listed, future in pending if np.isin(ids, listed).any()]
            if pending:
                ids = np.setdiff1d(ids, np.concatenate([listed for listed, _ in pending]))
            box = self.outboxes.get(gateway)
            held = []
            for entry in box.queued if box is not None and ids.size else ():
                if entry.ids is not None and entry.kind == KIND_RECIPIENTS:
                    found = entry.ids[np.isin(entry.ids, ids)]
                    if found.size:
                        held.append((entry, found))
            if held:
                waits.append(self._hold_back(box, held, pending))
        if not waits:
            return 0
        if not self.journal.available:
            raise Unavailable(_HELD_BACK.format(gateway=gateway))
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.gather(*waits)), 5.0)
        except TimeoutError:
            raise Unavailable(_HELD_BACK.format(gateway=gateway)) from None
        return sum(int(found.size) for _, found in held)

    def _hold_back(self, box: Outbox, held: list, pending: list) -> asyncio.Future:
        """Holds back the queued messages in ``held`` (pairs of a message and its
        opted-out devices) and writes the opt-out; returns the write's future."""
        change = Change(self.journal)
        listed = np.concatenate([found for _, found in held])
        change.forgotten(box.gateway_id, listed)
        for entry, found in held:
            # Counted as withdrawn: found, but never handed over.
            change.count(entry.alert_id, f"s{entry.stage}:g{box.gateway_id}:withdrawn", found.size)
            entry.durable = False  # not sent with these devices meanwhile

        def drop() -> None:
            for entry, found in held:
                entry.ids = entry.ids[~np.isin(entry.ids, found)]
                entry.durable = True
                alert = self.alerts.get(entry.alert_id)
                if alert is not None:
                    alert.stages[entry.stage - 1].tally(box.gateway_id).withdrawn += found.size
            box.has_forgotten = True
            box.wakeup.set()
            pending[:] = [p for p in pending if p is not mine]

        mine = [listed, None]  # [ids, the write's future] until the write is durable
        pending.append(mine)
        mine[1] = self.journal.write(change.op(drop))
        return mine[1]


_HELD_BACK = (
    "Redis is unreachable: the messages queued for gateway {gateway} that hold these "
    "devices are held back, and lose them as soon as Redis is back; retrying is safe"
)


def _schedule_record(schedule: Schedule) -> dict:
    return {
        "name": schedule.name,
        "stages": [[stage.radius_m, stage.duration_s] for stage in schedule.stages],
    }


def _schedule_from_record(record: dict) -> Schedule:
    stages = tuple(Stage(float(r), int(d)) for r, d in record["stages"])
    return Schedule(stages, name=record.get("name", ""))


def _status_word(status: int) -> str:
    return {EXPIRED: "expired", RESOLVED: "resolved"}.get(status, "open")
