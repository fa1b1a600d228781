"""The gRPC server: AlertService, LocationService, GatewayService, health, reflection.

This layer checks every request and turns it into calls on the
:class:`~engine.alerts.Dispatcher` and the :class:`~engine.index.LocationIndex`; errors
become gRPC status codes whose message names the field. The server runs on one asyncio
event loop; ingest and ring queries run in thread pools (the Rust core releases the GIL).

``EngineServer`` is the server; ``ServerThread`` runs one in a background thread for tests,
the demo and benchmarks; ``serve`` is ``tuanyuan serve``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engine import audit, auth, geofence, logs, metrics_http, schedules
from engine.alerts import AlertError, Dispatcher
from engine.api import alert_pb2, alert_pb2_grpc, gateway_pb2, location_pb2
from engine.clock import Clock
from engine.delivery import DEFAULT_WINDOW, MAX_WINDOW
from engine.index import DEFAULT_RESOLUTION, DEFAULT_TTL_S, LocationIndex
from engine.journal import Journal, PrefixTaken
from engine.metrics import Metrics
from engine.schedules import Schedule, ScheduleError, duration_text
from engine.snapshot import Snapshotter
from engine.tls import ServerTLS

_LOG = logging.getLogger("engine.server")

#: Largest message either side may send, in bytes (a batch of 2.5 million devices).
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
#: The server pings a connection that has been quiet this many seconds, and drops it
#: when the ping is not answered within KEEPALIVE_TIMEOUT_S: a gateway whose host
#: vanished without closing its connection is seen as gone (its stream ends and its
#: messages wait for its return) within half a minute, not when TCP gives up.
KEEPALIVE_S = 20.0
KEEPALIVE_TIMEOUT_S = 10.0
MAX_CENTRES = 16
MAX_LABEL_BYTES = 200
MAX_TEXTS = 16
MAX_PAYLOAD_TEXT_BYTES = 64 * 1024
MAX_NOTICE_BYTES = 1024
MAX_PHOTOS = 8
MAX_URL_BYTES = 2048
MAX_AGE_YEARS = 17
MAX_HEIGHT_CM = 250
#: How far ahead an alert's start may be, in seconds.
MAX_START_AHEAD_S = 24 * 3600
MAX_FORGET = 1_000_000
#: Most devices one LocationBatch may carry.
MAX_BATCH_DEVICES = 1_000_000
MAX_GATEWAY = 65535
#: Slowest push rate a gateway may declare, in devices a second (0 means no limit).
MIN_GATEWAY_RATE = 1.0
_ALERT_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_INDEX_FIELDS = {
    "device_id": "device_ids",
    "lat": "latitudes",
    "lng": "longitudes",
    "seen_at": "observed_at",
}

SERVICES = (
    alert_pb2.DESCRIPTOR.services_by_name["AlertService"].full_name,
    location_pb2.DESCRIPTOR.services_by_name["LocationService"].full_name,
    gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name,
)


class Invalid(AlertError):
    """INVALID_ARGUMENT; the message starts with the field."""


# Checks of requests. Each raises Invalid naming the field path.


def _shown(value: str, limit: int = 40) -> str:
    """A value for an error message: whole when short, else its start and its length.
    A status message travels in a trailer; past 8 KiB the client cannot read it and
    sees RESOURCE_EXHAUSTED instead."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


def _check_alert_id(alert_id: str) -> None:
    if not _ALERT_ID.fullmatch(alert_id):
        raise Invalid(
            "alert_id must be 1 to 128 letters, digits, '-', '_', '.' or ':', got "
            f"{_shown(alert_id)}"
        )


def _seconds(stamp, path: str) -> float:
    """A Timestamp in Unix seconds; Invalid for one outside the range protobuf defines
    (years 1 to 9999, nanos 0 to 999,999,999)."""
    try:
        return stamp.ToNanoseconds() / 1e9
    except ValueError:
        raise Invalid(
            f"{path} is not a valid timestamp (years 1 to 9999, nanos 0 to 999999999): "
            f"seconds={stamp.seconds}, nanos={stamp.nanos}"
        ) from None


def _centres(centres, path: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    if not 1 <= len(centres) <= MAX_CENTRES:
        raise Invalid(f"{path}: an alert has 1 to {MAX_CENTRES} centres, got {len(centres)}")
    for i, centre in enumerate(centres):
        where = f"{path}[{i}]"
        if not (math.isfinite(centre.latitude) and -90 <= centre.latitude <= 90):
            raise Invalid(f"{where}.latitude must be within [-90, 90], got {centre.latitude}")
        if not (math.isfinite(centre.longitude) and -180 <= centre.longitude <= 180):
            raise Invalid(f"{where}.longitude must be within [-180, 180], got {centre.longitude}")
        if len(centre.label.encode()) > MAX_LABEL_BYTES:
            raise Invalid(f"{where}.label is longer than {MAX_LABEL_BYTES} bytes")
    return (
        np.array([c.latitude for c in centres], dtype=np.float64),
        np.array([c.longitude for c in centres], dtype=np.float64),
        [c.label for c in centres],
    )


def _payload(payload: alert_pb2.AlertPayload, path: str, now: float) -> None:
    if not 1 <= len(payload.texts) <= MAX_TEXTS:
        raise Invalid(f"{path}.texts: give 1 to {MAX_TEXTS} languages, got {len(payload.texts)}")
    seen, size = set(), 0
    for i, text in enumerate(payload.texts):
        if not text.language or len(text.language) > 35:
            raise Invalid(f"{path}.texts[{i}].language must be a BCP 47 tag such as 'zh-Hans'")
        if text.language in seen:
            raise Invalid(f"{path}.texts[{i}].language {text.language!r} appears twice")
        seen.add(text.language)
        if not text.name:
            raise Invalid(f"{path}.texts[{i}].name is empty")
        size += text.ByteSize()
    if size > MAX_PAYLOAD_TEXT_BYTES:
        raise Invalid(f"{path}.texts: {size} bytes, more than {MAX_PAYLOAD_TEXT_BYTES}")
    if payload.age_years > MAX_AGE_YEARS:
        raise Invalid(f"{path}.age_years must be 0 to {MAX_AGE_YEARS}, got {payload.age_years}")
    if payload.sex not in alert_pb2.Sex.values():
        raise Invalid(f"{path}.sex: unknown value {payload.sex}")
    if payload.height_cm > MAX_HEIGHT_CM:
        raise Invalid(f"{path}.height_cm must be 0 to {MAX_HEIGHT_CM}, got {payload.height_cm}")
    if len(payload.photo_urls) > MAX_PHOTOS:
        raise Invalid(f"{path}.photo_urls: at most {MAX_PHOTOS}, got {len(payload.photo_urls)}")
    for i, url in enumerate(payload.photo_urls):
        if not url.startswith("https://") or len(url) > MAX_URL_BYTES:
            raise Invalid(f"{path}.photo_urls[{i}] must be an https URL of at most 2 KiB")
    seen = payload.last_seen_at
    if payload.HasField("last_seen_at") and _seconds(seen, f"{path}.last_seen_at") > now + 300:
        raise Invalid(f"{path}.last_seen_at is in the future")


def _notices(notices, path: str) -> None:
    if len(notices) > MAX_TEXTS:
        raise Invalid(f"{path}: at most {MAX_TEXTS} languages, got {len(notices)}")
    seen = set()
    for i, notice in enumerate(notices):
        if not notice.language or notice.language in seen:
            raise Invalid(f"{path}[{i}].language must be a BCP 47 tag, once per language")
        seen.add(notice.language)
        if not notice.text or len(notice.text.encode()) > MAX_NOTICE_BYTES:
            raise Invalid(f"{path}[{i}].text must be 1 byte to {MAX_NOTICE_BYTES} bytes")


@dataclass
class ServerOptions:
    """Settings of an engine; ``tuanyuan serve`` sets them from its flags."""

    #: host:port to listen on; port 0 picks a free one.
    listen: str = "127.0.0.1:0"
    #: Seconds a location report stays valid.
    ttl_s: float = DEFAULT_TTL_S
    #: H3 resolution of the index.
    resolution: int = DEFAULT_RESOLUTION
    #: Device ids per RECIPIENTS message.
    batch_devices: int = 16_384
    #: Where "now" comes from.
    clock: Clock = field(default_factory=Clock)
    #: host:port of the Prometheus endpoint; None for none.
    metrics_listen: str | None = None
    #: Folder of operator schedules (``*.toml``), added to the shipped ones.
    schedules_dir: Path | None = None
    #: Threads applying location batches.
    ingest_threads: int = 4
    #: Threads running ring queries.
    query_threads: int = 2
    #: Who may call what; required unless ``allow_all_callers``.
    credentials: auth.Credentials | None = None
    #: Admits every call without a token (tests of the handlers only).
    allow_all_callers: bool = False
    #: Certificate and key (and client CA for mutual TLS); plaintext when None.
    tls: ServerTLS | None = None
    #: ``redis://HOST:PORT/DB`` keeping the durable state; in memory only when None.
    redis_url: str | None = None
    #: Prefix of every Redis key of this engine.
    redis_prefix: str = "tuanyuan:"
    #: Without Redis: a JSON-lines file for the audit trail (kept in memory when None).
    audit_log: Path | None = None
    #: Arrow IPC file of the live locations, loaded at start and rewritten periodically.
    snapshot_path: Path | None = None
    #: Seconds of the engine's clock between two snapshots.
    snapshot_interval_s: float = 60.0
    #: Seconds after an alert closes that the lists of who it reached are purged.
    purge_after_s: float = 7 * 24 * 3600.0
    #: Seconds of quiet before the server pings a connection, and seconds it waits for
    #: the answer before dropping it.
    keepalive_s: float = KEEPALIVE_S
    keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_S


def _split_host_port(text: str, flag: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{flag} must be HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


class EngineServer:
    """One engine: index, alerts, gRPC server and metrics endpoint."""

    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self.clock = options.clock
        self.index = LocationIndex(
            ttl_s=options.ttl_s, resolution=options.resolution, clock=self.clock.now
        )
        self.schedules: dict[str, Schedule] = dict(schedules.SHIPPED)
        if options.schedules_dir is not None:
            for name, (_, schedule) in schedules.load_folder(options.schedules_dir).items():
                self.schedules[name] = schedule
        if options.credentials is None and not options.allow_all_callers:
            raise ValueError("an engine needs credentials (or allow_all_callers for tests)")
        if options.credentials is None and options.metrics_listen:
            raise ValueError("the metrics endpoint needs credentials: it is never open")
        self.metrics = Metrics(lambda: self.index.live())
        self.ingest_pool = ThreadPoolExecutor(options.ingest_threads, "ingest")
        self.query_pool = ThreadPoolExecutor(options.query_threads, "query")
        self.audit_file = None
        if options.audit_log is not None and options.redis_url is None:
            self.audit_file = audit.AuditFile(options.audit_log)
        self.journal = Journal(
            options.redis_url,
            prefix=options.redis_prefix,
            seal=audit.seal,
            audit_sink=self.audit_file.write_sealed if self.audit_file else None,
            on_availability=self._store_availability,
            on_taken=lambda reason: self.stop_requested.set(),
        )
        if self.audit_file is not None:
            self.journal.audit_seq = self.audit_file.chain.seq
            self.journal.audit_head = self.audit_file.chain.last_hash
        self.dispatcher = Dispatcher(
            self.index,
            self.clock,
            self.query_pool,
            self.metrics,
            batch_devices=options.batch_devices,
            journal=self.journal,
            purge_after_s=options.purge_after_s,
        )
        self.snapshotter = None
        if options.snapshot_path is not None:
            self.snapshotter = Snapshotter(
                self.index, Path(options.snapshot_path), self.clock, options.snapshot_interval_s
            )
        self._snapshots: asyncio.Task | None = None
        self.port = 0
        self.metrics_port = 0
        self._server: grpc.aio.Server | None = None
        self._metrics_http = None
        self._stop = asyncio.Event()
        #: Set to ask :func:`serve` to stop: a signal, or another engine took the Redis
        #: prefix (then ``journal.taken`` says so).
        self.stop_requested = asyncio.Event()
        self._scheduler: asyncio.Task | None = None
        self._health = health.aio.HealthServicer()

    def _store_availability(self, available: bool) -> None:
        """While Redis is unreachable, AlertService reports NOT_SERVING."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if available
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        asyncio.get_running_loop().create_task(self._health.set(SERVICES[0], status))

    async def start(self) -> int:
        """Loads the snapshot and the durable state, binds and starts serving; returns
        the gRPC port."""
        # The geofence kernel loads on first use (half a second): not on a report's time.
        await asyncio.to_thread(geofence.warm_up)
        if self.snapshotter is not None:
            await self.snapshotter.load()
        restored = await self.journal.start()
        self.dispatcher.restore(restored)
        if self.options.allow_all_callers:
            interceptor = auth.AuthInterceptor(None, insecure_allow_all=True)
        else:
            interceptor = auth.AuthInterceptor(self.options.credentials, auth.RateLimits())
        server = grpc.aio.server(
            interceptors=[interceptor, _UnparsedRequests()],
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.keepalive_time_ms", round(self.options.keepalive_s * 1000)),
                ("grpc.keepalive_timeout_ms", round(self.options.keepalive_timeout_s * 1000)),
                # Newer gRPC cores time a ping out by this one, a minute unless set.
                ("grpc.http2.ping_timeout_ms", round(self.options.keepalive_timeout_s * 1000)),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.max_pings_without_data", 0),
            ],
        )
        alert_pb2_grpc.add_AlertServiceServicer_to_server(AlertServicer(self), server)
        server.add_generic_rpc_handlers((_location_handler(self), _gateway_handler(self)))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        host, port = _split_host_port(self.options.listen, "--listen")
        if self.options.tls is not None:
            self.port = server.add_secure_port(
                f"{host}:{port}", self.options.tls.grpc_credentials()
            )
        else:
            self.port = server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"cannot listen on {self.options.listen}")
        await server.start()
        self._server = server
        for name in ("", *SERVICES):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.options.metrics_listen:
            host, port = _split_host_port(self.options.metrics_listen, "--metrics")
            self._metrics_http, self.metrics_port = metrics_http.serve_metrics(
                self.metrics.registry, host, port, self.options.credentials, self.options.tls
            )
        loop = asyncio.get_running_loop()
        self._scheduler = loop.create_task(self.dispatcher.run(self._stop))
        if self.snapshotter is not None:
            self._snapshots = loop.create_task(self.snapshotter.run(self._stop))
        for alert in list(self.dispatcher.alerts.values()):
            if not alert.closed:
                self.dispatcher.spawn(self.dispatcher.catch_up(alert))
        _LOG.info(
            "serving on %s:%d (TTL %g s, H3 resolution %d, schedules: %s)%s",
            host,
            self.port,
            self.options.ttl_s,
            self.options.resolution,
            ", ".join(sorted(self.schedules)),
            f"; metrics on port {self.metrics_port}" if self.metrics_port else "",
        )
        return self.port

    async def stop(self, grace_s: float = 5.0) -> None:
        """Refuses new calls, lets running ones finish for ``grace_s`` seconds, stops."""
        await self._health.enter_graceful_shutdown()
        self._stop.set()
        if self._server is not None:
            await self._server.stop(grace_s)
        if self._scheduler is not None:
            await self._scheduler
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
        self.ingest_pool.shutdown(wait=True)
        if self.snapshotter is not None:
            if self._snapshots is not None:
                await self._snapshots
            await self.snapshotter.write_now("shutdown")
        await self.journal.close()
        if self.audit_file is not None:
            self.audit_file.close()
        self.query_pool.shutdown(wait=True)
        _LOG.info(
            "stopped: %d live devices, %d alerts", self.index.live(), len(self.dispatcher.alerts)
        )

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    # Shared by the servicers.

    def schedule_of(self, request, now_field: str) -> Schedule | None:
        """The schedule a request names or gives inline; None when it gives none."""
        kind = request.WhichOneof("schedule")
        if kind == "schedule_name":
            schedule = self.schedules.get(request.schedule_name)
            if schedule is None:
                raise Invalid(
                    f"schedule_name {_shown(request.schedule_name)} is unknown; known: "
                    f"{', '.join(sorted(self.schedules))}"
                )
            return schedule
        if kind == "stages":
            stages = tuple(
                schedules.Stage(radius_m=s.radius_m, duration_s=s.duration_s)
                for s in request.stages.stages
            )
            try:
                return Schedule(stages)
            except ScheduleError as error:
                raise Invalid(f"stages: {error}") from None
        if now_field:
            raise Invalid(f"{now_field}: give schedule_name or stages")
        return None


# Requests that do not parse.


class _Unparsed:
    """Stands for the request of a call whose bytes do not parse as its message."""

    def __init__(self, message: str) -> None:
        self.message = message


def _tolerant(parse):
    """``parse`` returning :class:`_Unparsed` where it would raise DecodeError."""
    message_type = getattr(getattr(parse, "__self__", None), "DESCRIPTOR", None)
    name = message_type.full_name if message_type is not None else "the request message"

    def deserialize(data: bytes):
        try:
            return parse(data)
        except DecodeError as error:
            return _Unparsed(f"the request does not parse as {name}: {error}")

    return deserialize


class _UnparsedRequests(grpc.aio.ServerInterceptor):
    """Ends a call with INVALID_ARGUMENT when its request does not parse.

    Left to gRPC, the deserializer's DecodeError ends the call UNKNOWN and is logged with
    a traceback, as a crashed handler would be. Unary requests only: the streamed ones
    (ReportLocations, Subscribe) arrive as bytes and their handlers parse them. Runs
    inside AuthInterceptor, so a refused call's request is still never parsed.
    """

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        behaviour = handler.unary_unary or handler.unary_stream
        streams = inspect.isasyncgenfunction(behaviour)
        if not (streams or inspect.iscoroutinefunction(behaviour)):
            return handler

        if streams:

            async def guarded(request, context):
                if isinstance(request, _Unparsed):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
                async with contextlib.aclosing(behaviour(request, context)) as responses:
                    async for response in responses:
                        yield response

        else:

            async def guarded(request, context):
                if isinstance(request, _Unparsed):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
                return await behaviour(request, context)

        make = (
            grpc.unary_unary_rpc_method_handler
            if handler.unary_unary is not None
            else grpc.unary_stream_rpc_method_handler
        )
        return make(
            guarded,
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )


def _actor() -> dict:
    """Who is calling, for the audit trail."""
    caller = auth.current_caller()
    return {"actor": caller.name, "role": caller.role, "peer": caller.peer}


class AlertServicer(alert_pb2_grpc.AlertServiceServicer):
    def __init__(self, engine: EngineServer) -> None:
        self.engine = engine
        self.dispatcher = engine.dispatcher

    async def _run(self, context, work):
        try:
            return await work()
        except (AlertError, auth.Forbidden) as error:
            await context.abort(grpc.StatusCode[error.status], str(error))

    async def CreateAlert(self, request, context):
        async def work():
            now = self.engine.clock.now()
            _check_alert_id(request.alert_id)
            existing = self.dispatcher.same_alert(request)  # or ALREADY_EXISTS
            if existing is not None:
                return self.dispatcher.snapshot(existing)
            centres = _centres(request.centres, "centres")
            schedule = self.engine.schedule_of(request, "schedule")
            if not request.HasField("payload"):
                raise Invalid("payload is required")
            _payload(request.payload, "payload", now)
            start = now
            if request.HasField("start_time"):
                start = _seconds(request.start_time, "start_time")
                if start > now + MAX_START_AHEAD_S:
                    raise Invalid("start_time is more than a day ahead")
                if start + schedule.duration_s <= now:
                    raise Invalid(
                        f"start_time is {duration_text(now - start)} ago: the schedule "
                        f"({duration_text(schedule.duration_s)} in all) would have ended, "
                        "and the alert would notify nobody"
                    )
            # Counts against the issuer's alerts_per_minute only if the alert is created.
            with auth.new_alert_quota() as count:  # or RESOURCE_EXHAUSTED
                alert, new = await self.dispatcher.create(
                    request, schedule, centres, start, _actor()
                )
                if new:
                    count.keep()
            if new:
                self.dispatcher.spawn(self.dispatcher.advance(alert))
                # One turn of the loop: a due stage starts (its ring is published and its
                # sweep begins) before the reply is made, so the reply shows it running.
                await asyncio.sleep(0)
            return self.dispatcher.snapshot(alert)

        return await self._run(context, work)

    async def UpdateAlert(self, request, context):
        async def work():
            now = self.engine.clock.now()
            _check_alert_id(request.alert_id)
            centres = (
                _centres(request.centres.centres, "centres.centres")
                if request.HasField("centres")
                else None
            )
            payload = None
            if request.HasField("payload"):
                _payload(request.payload, "payload", now)
                payload = request.payload
            schedule = self.engine.schedule_of(request, "")
            alert = self.dispatcher.get(request.alert_id)
            await self.dispatcher.update(alert, request, centres, payload, schedule, _actor())
            return self.dispatcher.snapshot(alert)

        return await self._run(context, work)

    async def ResolveAlert(self, request, context):
        async def work():
            _check_alert_id(request.alert_id)
            if request.resolution not in (
                alert_pb2.RESOLUTION_FOUND,
                alert_pb2.RESOLUTION_CANCELLED,
                alert_pb2.RESOLUTION_FALSE_REPORT,
            ):
                raise Invalid("resolution must be FOUND, CANCELLED or FALSE_REPORT")
            _notices(request.follow_up, "follow_up")
            alert = self.dispatcher.get(request.alert_id)
            await self.dispatcher.resolve(alert, request, _actor())
            return self.dispatcher.snapshot(alert)

        return await self._run(context, work)

    async def GetAlert(self, request, context):
        async def work():
            _check_alert_id(request.alert_id)
            return self.dispatcher.snapshot(self.dispatcher.get(request.alert_id))

        return await self._run(context, work)

    async def ListAlerts(self, request, context):
        async def work():
            wanted = set(request.statuses)
            for status in wanted:
                if status not in alert_pb2.AlertStatus.values() or status == 0:
                    raise Invalid(f"statuses: unknown status {status}")
            alerts = sorted(
                self.dispatcher.alerts.values(), key=lambda a: a.created_at, reverse=True
            )
            return alert_pb2.ListAlertsResponse(
                alerts=[
                    self.dispatcher.snapshot(a) for a in alerts if not wanted or a.status in wanted
                ]
            )

        return await self._run(context, work)

    async def WatchAlert(self, request, context):
        try:
            _check_alert_id(request.alert_id)
            alert = self.dispatcher.get(request.alert_id)
        except (AlertError, auth.Forbidden) as error:
            await context.abort(grpc.StatusCode[error.status], str(error))
        queue = self.dispatcher.watch(alert)
        try:
            while (event := await queue.get()) is not None:
                yield event
        finally:
            self.dispatcher.unwatch(alert, queue)

    async def PreviewAlert(self, request, context):
        async def work():
            lat, lng, _ = _centres(request.centres, "centres")
            schedule = self.engine.schedule_of(request, "schedule")
            return await asyncio.get_running_loop().run_in_executor(
                self.engine.query_pool, self.dispatcher.preview, lat, lng, schedule
            )

        return await self._run(context, work)


# LocationService: batches are parsed in the ingest threads, not on the event loop.


class _BadBatch(Exception):
    pass


def _apply_batch(engine: EngineServer, raw: bytes, number: int, caller: auth.Caller):
    """In an ingest thread: parses, checks and applies one batch, then runs the geofence."""
    where = f"batch {number}"
    try:
        batch = location_pb2.LocationBatch.FromString(raw)
    except DecodeError as error:
        raise _BadBatch(f"{where}: not a LocationBatch: {error}") from None
    if batch.gateway_id > MAX_GATEWAY:
        raise _BadBatch(f"{where}: gateway_id must be 0 to {MAX_GATEWAY}, got {batch.gateway_id}")
    auth.check_gateway(caller, batch.gateway_id, f"report devices ({where})")
    if len(batch.device_ids) > MAX_BATCH_DEVICES:
        raise _BadBatch(
            f"{where}: device_ids: at most {MAX_BATCH_DEVICES:,} devices a batch, got "
            f"{len(batch.device_ids):,}; split it"
        )
    ids = np.array(batch.device_ids, dtype=np.uint64)
    lat = np.array(batch.latitudes, dtype=np.float64)
    lng = np.array(batch.longitudes, dtype=np.float64)
    observed = np.array(batch.observed_at, dtype=np.float64) if batch.observed_at else None
    for name, values in (("latitudes", lat), ("longitudes", lng), ("observed_at", observed)):
        if values is not None and values.size != ids.size:
            raise _BadBatch(
                f"{where}: {name} has {values.size} values but device_ids has {ids.size}"
            )
    try:
        counts = engine.index.upsert(ids, lat, lng, batch.gateway_id, observed)
    except ValueError as error:
        message = str(error)
        first, _, rest = message.partition(":")
        if first in _INDEX_FIELDS:
            message = f"{_INDEX_FIELDS[first]}:{rest}"
        raise _BadBatch(f"{where}: {message}") from None
    found = []
    if ids.size and engine.dispatcher.rings:
        # The geofence tests where the batch left each device, not the raw reports: a
        # stale report, or one overridden later in the batch, moves nobody.
        held = np.unique(ids)
        held_lat, held_lng = engine.index.positions(held, batch.gateway_id)
        live = ~np.isnan(held_lat)
        found = engine.dispatcher.walk_ins(
            batch.gateway_id, held[live], held_lat[live], held_lng[live]
        )
    return batch.gateway_id, ids.size, counts, found


async def _report_locations(engine: EngineServer, request_iterator, context):
    loop = asyncio.get_running_loop()
    caller = auth.current_caller()  # thread pools do not carry context variables
    summary = location_pb2.ReportSummary()
    number = 0
    async for raw in request_iterator:
        try:
            gateway, reports, counts, found = await loop.run_in_executor(
                engine.ingest_pool, _apply_batch, engine, raw, number, caller
            )
        except _BadBatch as error:
            _LOG.warning("location report stream refused: %s", error)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except auth.Forbidden as error:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(error))
        summary.batches += 1
        summary.reports += reports
        summary.added += counts[0]
        summary.updated += counts[1]
        summary.stale += counts[2]
        summary.geofence_recipients += engine.dispatcher.queue_walk_ins(gateway, found)
        engine.metrics.reports.labels(gateway=str(gateway)).inc(reports)
        number += 1
    return summary


async def _forget_devices(engine: EngineServer, request, context):
    if request.gateway_id > MAX_GATEWAY:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"gateway_id must be 0 to {MAX_GATEWAY}, got {request.gateway_id}",
        )
    if len(request.device_ids) > MAX_FORGET:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"device_ids: at most {MAX_FORGET} a call, got {len(request.device_ids)}",
        )
    try:
        auth.check_gateway(auth.current_caller(), request.gateway_id, "forget devices")
    except auth.Forbidden as error:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(error))
    ids = np.array(request.device_ids, dtype=np.uint64)
    forgotten = await asyncio.get_running_loop().run_in_executor(
        engine.ingest_pool, engine.index.remove, ids, request.gateway_id
    )
    if engine.snapshotter is not None and forgotten:
        # The opted-out devices leave the snapshot file before the call returns, whatever
        # happens to the queued messages below.
        try:
            await engine.snapshotter.write_now("devices forgotten")
        except OSError as error:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"forgotten in memory, but the snapshot could not be rewritten ({error}); retry",
            )
    try:
        await engine.dispatcher.forget(request.gateway_id, ids)
    except AlertError as error:
        await context.abort(
            grpc.StatusCode[error.status],
            f"forgotten in memory{' and in the snapshot' if engine.snapshotter else ''}; {error}",
        )
    _LOG.info(
        "gateway %d: %d devices opted out, %d were held", request.gateway_id, ids.size, forgotten
    )
    return location_pb2.ForgetDevicesResponse(forgotten=forgotten)


def _location_handler(engine: EngineServer) -> grpc.GenericRpcHandler:
    async def report(request_iterator, context):
        return await _report_locations(engine, request_iterator, context)

    async def forget(request, context):
        return await _forget_devices(engine, request, context)

    return grpc.method_handlers_generic_handler(
        SERVICES[1],
        {
            # Raw bytes in: the ingest thread parses them.
            "ReportLocations": grpc.stream_unary_rpc_method_handler(
                report,
                request_deserializer=None,
                response_serializer=location_pb2.ReportSummary.SerializeToString,
            ),
            "ForgetDevices": grpc.unary_unary_rpc_method_handler(
                forget,
                request_deserializer=location_pb2.ForgetDevicesRequest.FromString,
                response_serializer=location_pb2.ForgetDevicesResponse.SerializeToString,
            ),
        },
    )


# GatewayService.


def _upstream(raw: bytes, number: int) -> gateway_pb2.GatewayUpstream:
    """Message ``number`` (0-based) of a Subscribe stream, parsed here rather than by
    gRPC, whose failure to parse would end the call UNKNOWN."""
    try:
        return gateway_pb2.GatewayUpstream.FromString(raw)
    except DecodeError as error:
        raise ValueError(
            f"message {number} does not parse as {gateway_pb2.GatewayUpstream.DESCRIPTOR.full_name}"
            f": {error}"
        ) from None


async def _subscribe(engine: EngineServer, request_iterator, context):
    try:
        first = _upstream(await anext(aiter(request_iterator)), 0)
    except StopAsyncIteration:
        return
    except ValueError as error:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
    if first.WhichOneof("kind") != "hello":
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be a hello")
    hello = first.hello
    if hello.gateway_id > MAX_GATEWAY:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"hello.gateway_id must be 0 to {MAX_GATEWAY}, got {hello.gateway_id}",
        )
    rate = hello.max_devices_per_second
    # Below one device a second, the hand-over times GetAlert reports (now + devices /
    # rate) can pass the year 9999, which no Timestamp holds.
    if not (rate == 0 or (math.isfinite(rate) and rate >= MIN_GATEWAY_RATE)):
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"hello.max_devices_per_second must be 0 (no limit) or at least "
            f"{MIN_GATEWAY_RATE:g}, got {rate}",
        )
    if hello.max_unacked_messages > MAX_WINDOW:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"hello.max_unacked_messages must be 0 to {MAX_WINDOW}, got "
            f"{hello.max_unacked_messages}",
        )

    try:
        auth.check_gateway(auth.current_caller(), hello.gateway_id, "subscribe to its queue")
    except auth.Forbidden as error:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(error))
    gateway = hello.gateway_id
    box = engine.dispatcher.outbox(gateway)
    connection = box.attach(
        hello.max_devices_per_second, hello.max_unacked_messages or DEFAULT_WINDOW
    )
    engine.metrics.connected.labels(gateway=str(gateway)).set(1)
    _LOG.info(
        "gateway %d subscribed (rate %s devices/s, window %d): %d messages to resend, %d queued",
        gateway,
        f"{hello.max_devices_per_second:g}" if hello.max_devices_per_second else "unlimited",
        connection.window,
        len(box.unacked),
        len(box.queued),
        extra=logs.fields(
            gateway_id=gateway,
            event="subscribed",
            rate=hello.max_devices_per_second,
            window=connection.window,
            to_resend=len(box.unacked),
            queued=len(box.queued),
        ),
    )
    failure: list[str] = []

    async def read_acks():
        try:
            number = 0
            async for raw in request_iterator:
                number += 1
                message = _upstream(raw, number)
                if message.WhichOneof("kind") != "ack":
                    raise ValueError("only acks may follow the hello")
                box.ack(message.ack.sequence)
        except ValueError as error:
            failure.append(str(error))
        finally:
            box.wakeup.set()

    reader = asyncio.get_running_loop().create_task(read_acks())
    try:
        while not connection.replaced:
            if failure:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, failure[0])
            if reader.done():
                break  # the gateway closed its side
            entry, wait_s = box.next_message(connection)
            if entry is not None:
                yield entry.data
                continue
            box.wakeup.clear()
            entry, wait_s = box.next_message(connection)
            if entry is not None:
                yield entry.data
                continue
            try:
                timeout = None if math.isinf(wait_s) else wait_s
                await asyncio.wait_for(box.wakeup.wait(), timeout)
            except TimeoutError:
                pass
        if connection.replaced:
            _LOG.info("gateway %d: stream replaced by a newer one", gateway)
    finally:
        reader.cancel()
        box.detach(connection)
        if box.connection is None:
            engine.metrics.connected.labels(gateway=str(gateway)).set(0)
        _LOG.info(
            "gateway %d unsubscribed: acked up to %d, %d messages unacked, %d queued",
            gateway,
            box.acked,
            len(box.unacked),
            len(box.queued),
            extra=logs.fields(
                gateway_id=gateway,
                event="unsubscribed",
                acked=box.acked,
                unacked=len(box.unacked),
                queued=len(box.queued),
            ),
        )


def _gateway_handler(engine: EngineServer) -> grpc.GenericRpcHandler:
    async def subscribe(request_iterator, context):
        async for data in _subscribe(engine, request_iterator, context):
            yield data

    return grpc.method_handlers_generic_handler(
        SERVICES[2],
        {
            # Messages leave already encoded (engine.wire), so no serializer; they
            # arrive as bytes too, parsed by _upstream.
            "Subscribe": grpc.stream_stream_rpc_method_handler(
                subscribe,
                request_deserializer=None,
                response_serializer=None,
            ),
        },
    )


# Running a server.


class ServerThread:
    """An engine on its own event loop in a daemon thread (tests, demo, benchmarks)."""

    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self.engine: EngineServer | None = None
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="engine", daemon=True)

    def start(self) -> int:
        self._thread.start()
        self.engine = self.call(self._create)
        return self.call(self.engine.start)

    async def _create(self) -> EngineServer:
        return EngineServer(self.options)

    def call(self, coroutine_function, *args, timeout: float = 60.0):
        """Runs ``coroutine_function(*args)`` on the engine's loop and returns its result."""
        future = asyncio.run_coroutine_threadsafe(coroutine_function(*args), self.loop)
        return future.result(timeout)

    @property
    def port(self) -> int:
        return self.engine.port

    def stop(self, grace_s: float = 1.0) -> None:
        if self.engine is not None:
            self.call(self.engine.stop, grace_s)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def __enter__(self) -> ServerThread:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


async def serve(options: ServerOptions, port_file: Path | None = None) -> None:
    """Runs until SIGINT or SIGTERM, then stops gracefully. Raises
    :class:`~engine.journal.StoreUnavailable` when Redis cannot be read at start, and
    :class:`~engine.journal.PrefixTaken` when another engine holds or takes its prefix."""
    engine = EngineServer(options)
    port = await engine.start()
    if port_file is not None:
        # Written whole or not at all: a waiting parent never reads half a number.
        partial = port_file.with_name(port_file.name + ".tmp")
        partial.write_text(f"{port}\n")
        os.replace(partial, port_file)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, engine.stop_requested.set)
    await engine.stop_requested.wait()
    _LOG.info("shutting down: finishing running calls for up to 5 s")
    await engine.stop(5.0)
    if engine.journal.taken is not None:
        raise PrefixTaken(engine.journal.taken)


def spawn(
    flags: list[str], port_file: Path, log: Path, *, timeout_s: float = 60.0
) -> tuple[subprocess.Popen, int]:
    """Starts ``tuanyuan serve`` with ``flags`` (``--port-file`` is added) in a child
    process, its output appended to ``log``, and waits until it serves; returns the
    process and its port. Raises ``RuntimeError`` with the end of the log if it exits or
    does not serve within ``timeout_s``."""
    port_file.unlink(missing_ok=True)
    command = [sys.executable, "-m", "engine.cli", "serve", *flags, "--port-file", str(port_file)]
    with log.open("a") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    while not port_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            if process.poll() is None:
                process.kill()
            tail = log.read_text()[-4000:]
            raise RuntimeError(f"the engine did not start; the end of {log}:\n{tail}")
        time.sleep(0.02)
    return process, int(port_file.read_text())
