"""The ``tuanyuan`` command: the server, its alert client, the demo and operator tools."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import os
import sys
from pathlib import Path

import grpc
from google.protobuf import json_format

from engine import schedules, security_cli, tools
from engine.api import alert_pb2
from engine.schedules import distance_text

#: Where the alert commands find the engine unless --server says otherwise.
DEFAULT_SERVER = os.environ.get("TUANYUAN_SERVER", "127.0.0.1:50051")

_STATUS = {
    "scheduled": alert_pb2.ALERT_STATUS_SCHEDULED,
    "active": alert_pb2.ALERT_STATUS_ACTIVE,
    "expired": alert_pb2.ALERT_STATUS_EXPIRED,
    "resolved": alert_pb2.ALERT_STATUS_RESOLVED,
}
_RESOLUTION = {
    "found": alert_pb2.RESOLUTION_FOUND,
    "cancelled": alert_pb2.RESOLUTION_CANCELLED,
    "false-report": alert_pb2.RESOLUTION_FALSE_REPORT,
}
_SEX = {"female": alert_pb2.SEX_FEMALE, "male": alert_pb2.SEX_MALE}


class UsageError(Exception):
    """A bad flag value; printed as ``tuanyuan: ...`` with exit status 2."""


# tuanyuan serve


def serve(args: argparse.Namespace) -> int:
    from engine.clock import Clock, ScaledClock
    from engine.journal import StoreUnavailable
    from engine.server import ServerOptions
    from engine.server import serve as run_server

    try:
        security = security_cli.server_security(args, dev=args.dev)
    except ValueError as error:
        raise UsageError(str(error)) from None
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if security.dev_tokens is not None:
        logging.getLogger("engine.server").warning(
            "development credentials: tokens for the issuer, the operator and each gateway's "
            "reporter and gateway are in %s",
            security.dev_tokens,
        )
    if not 1 <= args.batch_devices <= 65536:
        raise UsageError(f"--batch-devices must be 1 to 65536, got {args.batch_devices}")
    clock = Clock() if args.clock_speed == 1 else ScaledClock(args.clock_speed)
    options = ServerOptions(
        listen=args.listen,
        ttl_s=args.ttl,
        resolution=args.resolution,
        batch_devices=args.batch_devices,
        clock=clock,
        metrics_listen=args.metrics,
        schedules_dir=args.schedules,
        credentials=security.credentials,
        tls=security.tls,
        redis_url=args.redis,
        redis_prefix=args.redis_prefix,
        audit_log=args.audit_log,
        snapshot_path=args.snapshot,
        snapshot_interval_s=args.snapshot_interval,
        purge_after_s=args.purge_after,
    )
    try:
        asyncio.run(run_server(options, port_file=args.port_file))
    except (OSError, ValueError, schedules.ScheduleError) as error:
        raise UsageError(str(error)) from None
    except StoreUnavailable as error:
        print(f"tuanyuan: {error}", file=sys.stderr)
        return 1
    return 0


# tuanyuan alert ...


def _centre(text: str) -> alert_pb2.Centre:
    parts = text.split(",", 2)
    try:
        lat, lng = float(parts[0]), float(parts[1])
    except (ValueError, IndexError):
        raise UsageError(f"--centre must be LAT,LNG[,LABEL] in degrees, got {text!r}") from None
    return alert_pb2.Centre(latitude=lat, longitude=lng, label=parts[2] if len(parts) > 2 else "")


def _time(text: str, flag: str):
    """A timestamp from ISO 8601 (UTC unless an offset is given) or ``+SECONDS``."""
    from google.protobuf.timestamp_pb2 import Timestamp

    try:
        if text.startswith("+"):
            moment = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=float(text[1:]))
        else:
            moment = dt.datetime.fromisoformat(text)
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=dt.UTC)
    except ValueError:
        raise UsageError(f"{flag} must be an ISO 8601 time or +SECONDS, got {text!r}") from None
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def _set_schedule(request, value: str | None) -> None:
    """A shipped or server-side name goes by name; a TOML file goes inline."""
    if value is None:
        return
    if value.endswith(".toml") or Path(value).is_file():
        try:
            schedule = schedules.load(value)
        except schedules.ScheduleError as error:
            raise UsageError(str(error)) from None
        request.stages.stages.extend(
            alert_pb2.Stage(radius_m=s.radius_m, duration_s=s.duration_s) for s in schedule.stages
        )
    else:
        request.schedule_name = value


def _payload(args: argparse.Namespace) -> alert_pb2.AlertPayload | None:
    """The payload from --payload (JSON of AlertPayload) and/or the single-language flags."""
    payload = alert_pb2.AlertPayload()
    if args.payload:
        try:
            json_format.Parse(Path(args.payload).read_text(encoding="utf-8"), payload)
        except (OSError, json_format.ParseError) as error:
            raise UsageError(f"--payload {args.payload}: {error}") from None
    if args.name:
        payload.texts.add(
            language=args.language,
            name=args.name,
            description=args.description or "",
            last_seen_place=args.last_seen_place or "",
            suspect_description=args.suspect or "",
            contact=args.contact or "",
        )
    if args.age is not None:
        payload.age_years = args.age
    if args.sex:
        payload.sex = _SEX[args.sex]
    if args.height_cm is not None:
        payload.height_cm = args.height_cm
    payload.photo_urls.extend(args.photo or [])
    if args.last_seen_at:
        payload.last_seen_at.CopyFrom(_time(args.last_seen_at, "--last-seen-at"))
    return payload if payload.ByteSize() else None


def _when(stamp) -> str:
    if not stamp.seconds and not stamp.nanos:
        return "-"
    return stamp.ToDatetime(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def format_alert(alert: alert_pb2.Alert) -> str:
    """An alert as a few lines for operators."""
    status = alert_pb2.AlertStatus.Name(alert.status).removeprefix("ALERT_STATUS_").lower()
    lines = [
        f"alert {alert.alert_id}: {status}, version {alert.version}, "
        f"{alert.notified_devices:,} devices notified"
        + (f", follow-up to {alert.follow_up_devices:,}" if alert.follow_up_devices else "")
    ]
    if alert.resolution:
        resolution = alert_pb2.Resolution.Name(alert.resolution).removeprefix("RESOLUTION_")
        lines.append(f"  resolved: {resolution.lower()} at {_when(alert.closed_at)}")
    if alert.current_stage:
        lines.append(
            f"  stage {alert.current_stage} of {len(alert.stages)} running until "
            f"{_when(alert.stage_ends_at)}"
        )
    lines.append(f"  starts {_when(alert.start_time)}, schedule {alert.schedule_name or 'inline'}")
    for centre in alert.centres:
        label = f" ({centre.label})" if centre.label else ""
        lines.append(f"  centre {centre.latitude:.6f}, {centre.longitude:.6f}{label}")
    for stage in alert.stages:
        started = _when(stage.started_at) if stage.HasField("started_at") else "not started"
        lines.append(
            f"  stage {stage.stage_number}: {distance_text(stage.radius_m)} "
            f"for {stage.duration_s} s, "
            f"{stage.recipients:,} recipients ({stage.walked_in:,} walked in), {started}"
        )
        for g in stage.gateways:
            eta = (
                f", all handed over by {_when(g.expected_handover_at)}"
                if g.HasField("expected_handover_at")
                else ""
            )
            withdrawn = f", {g.withdrawn:,} withdrawn" if g.withdrawn else ""
            lines.append(
                f"    gateway {g.gateway_id}: {g.recipients:,} recipients, "
                f"{g.handed_over:,} handed over, {g.acked:,} acked{withdrawn}{eta}"
            )
    return "\n".join(lines)


def _show(message, args: argparse.Namespace, text: str) -> None:
    if args.json:
        print(json_format.MessageToJson(message, indent=2))
    else:
        print(text)


def alert_command(args: argparse.Namespace) -> int:
    from engine.client import alert_stub

    try:
        channel = security_cli.client_channel(args, args.server)
    except ValueError as error:
        raise UsageError(str(error)) from None
    stub = alert_stub(channel)
    action = args.action
    try:
        if action == "create":
            request = alert_pb2.CreateAlertRequest(
                alert_id=args.id, centres=[_centre(c) for c in args.centre]
            )
            _set_schedule(request, args.schedule)
            payload = _payload(args)
            if payload is not None:
                request.payload.CopyFrom(payload)
            if args.start:
                request.start_time.CopyFrom(_time(args.start, "--start"))
            alert = stub.CreateAlert(request, timeout=args.timeout)
            _show(alert, args, format_alert(alert))
        elif action == "update":
            request = alert_pb2.UpdateAlertRequest(alert_id=args.id)
            if args.centre:
                request.centres.centres.extend(_centre(c) for c in args.centre)
            _set_schedule(request, args.schedule)
            payload = _payload(args)
            if payload is not None:
                request.payload.CopyFrom(payload)
            alert = stub.UpdateAlert(request, timeout=args.timeout)
            _show(alert, args, format_alert(alert))
        elif action == "resolve":
            request = alert_pb2.ResolveAlertRequest(
                alert_id=args.id, resolution=_RESOLUTION[args.reason]
            )
            if args.notice:
                request.follow_up.add(language=args.language, text=args.notice)
            alert = stub.ResolveAlert(request, timeout=args.timeout)
            _show(alert, args, format_alert(alert))
        elif action == "get":
            alert = stub.GetAlert(alert_pb2.GetAlertRequest(alert_id=args.id), timeout=args.timeout)
            _show(alert, args, format_alert(alert))
        elif action == "list":
            request = alert_pb2.ListAlertsRequest(statuses=[_STATUS[s] for s in args.status or []])
            response = stub.ListAlerts(request, timeout=args.timeout)
            text = "\n".join(format_alert(a).splitlines()[0] for a in response.alerts)
            _show(response, args, text or "no alerts")
        elif action == "watch":
            for event in stub.WatchAlert(alert_pb2.WatchAlertRequest(alert_id=args.id)):
                kind = alert_pb2.AlertEventKind.Name(event.kind).removeprefix("ALERT_EVENT_KIND_")
                if args.json:
                    print(json_format.MessageToJson(event, indent=None), flush=True)
                else:
                    stage = f" stage {event.stage_number}" if event.stage_number else ""
                    print(f"[{_when(event.time)}] {kind.lower()}{stage}")
                    print(format_alert(event.alert), flush=True)
        elif action == "preview":
            request = alert_pb2.PreviewAlertRequest(centres=[_centre(c) for c in args.centre])
            _set_schedule(request, args.schedule or "local")
            response = stub.PreviewAlert(request, timeout=args.timeout)
            lines = [f"{response.live_devices:,} live devices"]
            for s in response.stages:
                per = ", ".join(f"gateway {g.gateway_id}: {g.devices:,}" for g in s.new_by_gateway)
                lines.append(
                    f"  stage {s.stage_number}: {distance_text(s.radius_m)}, "
                    f"{s.new_recipients:,} new, "
                    f"{s.cumulative_recipients:,} in all ({per or 'none'})"
                )
            _show(response, args, "\n".join(lines))
    except grpc.RpcError as error:
        print(f"tuanyuan: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    return 0


def _add_alert_commands(commands) -> None:
    alert = commands.add_parser(
        "alert",
        help="create, update, resolve and follow alerts on a running engine",
        description="The command-line client of AlertService.",
    )
    actions = alert.add_subparsers(dest="action", required=True, metavar="ACTION")

    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--server",
            default=DEFAULT_SERVER,
            help=f"engine address HOST:PORT (default {DEFAULT_SERVER}, or $TUANYUAN_SERVER)",
        )
        parser.add_argument("--json", action="store_true", help="print the reply as JSON")
        parser.add_argument(
            "--timeout", type=float, default=30.0, help="seconds to wait for the reply (30)"
        )
        security_cli.add_client_flags(parser)
        parser.set_defaults(handler=alert_command)

    def payload_flags(parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("payload (what the apps show)")
        group.add_argument("--payload", help="JSON file of an AlertPayload (several languages)")
        group.add_argument("--language", default="zh-Hans", help="language of the texts (zh-Hans)")
        group.add_argument("--name", help="the child's name")
        group.add_argument("--age", type=int, help="age in years")
        group.add_argument("--sex", choices=sorted(_SEX), help="sex")
        group.add_argument("--height-cm", type=int, help="height in centimetres")
        group.add_argument("--description", help="appearance and clothing")
        group.add_argument("--last-seen-place", help="where the child was last seen, in words")
        group.add_argument("--last-seen-at", help="when, ISO 8601 (UTC unless an offset is given)")
        group.add_argument("--suspect", help="description of a suspect")
        group.add_argument("--contact", help="whom to call")
        group.add_argument("--photo", action="append", help="https URL of a photo (repeatable)")

    schedule_help = "schedule name (local, regional or one the server has) or a TOML file"
    create = actions.add_parser("create", help="publish an alert")
    create.add_argument("--id", required=True, help="your alert id (makes the call idempotent)")
    create.add_argument(
        "--centre",
        action="append",
        required=True,
        help="LAT,LNG[,LABEL] where the child was last seen (repeatable)",
    )
    create.add_argument("--schedule", default="local", help=schedule_help + " (local)")
    create.add_argument("--start", help="start time, ISO 8601 or +SECONDS (default now)")
    payload_flags(create)
    common(create)

    update = actions.add_parser("update", help="new sighting, corrected payload or schedule")
    update.add_argument("--id", required=True, help="alert id")
    update.add_argument(
        "--centre", action="append", help="LAT,LNG[,LABEL]; replaces all centres (repeatable)"
    )
    update.add_argument("--schedule", help=schedule_help)
    payload_flags(update)
    common(update)

    resolve = actions.add_parser("resolve", help="close an alert")
    resolve.add_argument("--id", required=True, help="alert id")
    resolve.add_argument("--reason", required=True, choices=sorted(_RESOLUTION), help="why")
    resolve.add_argument("--notice", help="follow-up text for every device the alert reached")
    resolve.add_argument("--language", default="zh-Hans", help="language of --notice (zh-Hans)")
    common(resolve)

    get = actions.add_parser("get", help="one alert and its progress")
    get.add_argument("--id", required=True, help="alert id")
    common(get)

    listing = actions.add_parser("list", help="alerts, newest first")
    listing.add_argument(
        "--status", action="append", choices=sorted(_STATUS), help="only these (repeatable)"
    )
    common(listing)

    watch = actions.add_parser("watch", help="follow an alert's progress until it closes")
    watch.add_argument("--id", required=True, help="alert id")
    common(watch)

    preview = actions.add_parser("preview", help="recipients per stage now, nothing sent")
    preview.add_argument("--centre", action="append", required=True, help="LAT,LNG (repeatable)")
    preview.add_argument("--schedule", help=schedule_help + " (local)")
    common(preview)


def _add_serve_command(commands) -> None:
    from engine.index import DEFAULT_RESOLUTION, DEFAULT_TTL_S

    run = commands.add_parser(
        "serve",
        help="run the engine's gRPC server",
        description="Runs the engine with its state in this process until SIGINT or SIGTERM "
        "(then finishes running calls for up to 5 s).",
    )
    run.add_argument(
        "--listen", default="127.0.0.1:50051", help="HOST:PORT to serve gRPC on (127.0.0.1:50051)"
    )
    run.add_argument(
        "--dev",
        action="store_true",
        help="without --credentials: generate credentials for local use, tokens written to "
        "--dev-tokens",
    )
    run.add_argument(
        "--redis",
        help="redis://HOST:PORT/DB keeping alerts, recipients, queues and the audit trail "
        "(default: in this process only, lost at exit)",
    )
    run.add_argument(
        "--redis-prefix",
        default="tuanyuan:",
        help="prefix of this engine's Redis keys; one engine at a time holds a prefix (tuanyuan:)",
    )
    run.add_argument(
        "--snapshot",
        type=Path,
        help="Arrow IPC file of the live locations: loaded at start, rewritten periodically, "
        "at shutdown and after ForgetDevices (off)",
    )
    run.add_argument(
        "--snapshot-interval",
        type=float,
        default=60.0,
        help="seconds of the engine's clock between snapshots (60)",
    )
    run.add_argument(
        "--purge-after",
        type=float,
        default=7 * 24 * 3600.0,
        help="seconds after an alert closes that the lists of who it reached are deleted "
        "(604800, a week)",
    )
    run.add_argument(
        "--audit-log",
        type=Path,
        help="without --redis: JSON-lines file of the hash-chained audit trail (off)",
    )
    run.add_argument("--metrics", help="HOST:PORT to serve Prometheus metrics on (off)")
    run.add_argument(
        "--ttl",
        type=float,
        default=DEFAULT_TTL_S,
        help=f"seconds a location report stays valid ({DEFAULT_TTL_S})",
    )
    run.add_argument(
        "--resolution",
        type=int,
        default=DEFAULT_RESOLUTION,
        help=f"H3 resolution of the index, 5 to 13 ({DEFAULT_RESOLUTION})",
    )
    run.add_argument(
        "--batch-devices",
        type=int,
        default=16_384,
        help="device ids per recipient message, 1 to 65536 (16384)",
    )
    run.add_argument(
        "--clock-speed",
        type=float,
        default=1.0,
        help="simulated seconds per real second, for trials (1: real time)",
    )
    run.add_argument("--schedules", type=Path, help="folder of operator schedules (*.toml)")
    run.add_argument("--port-file", type=Path, help="write the bound port to this file")
    run.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning"], help="(info)"
    )
    security_cli.add_server_flags(run)
    run.set_defaults(handler=serve)


def _add_demo_command(commands) -> None:
    from engine import demo

    run = commands.add_parser(
        "demo",
        help="the whole story over gRPC on loopback, three hours in about half a minute",
        description=demo.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_arguments(run)
    run.set_defaults(handler=demo.run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tuanyuan",
        description="Geospatial fan-out engine for verified missing-child alerts.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo_command(commands)
    _add_serve_command(commands)
    _add_alert_commands(commands)
    tools.add_commands(commands)
    security_cli.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except UsageError as error:
        print(f"tuanyuan: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
