"""The ``tuanyuan`` command: the server, its alert client, the demo and operator tools."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import math
import os
import re
import sys
from pathlib import Path

import grpc
from google.protobuf import json_format

from engine import logs, schedules, security_cli, tools
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
#: Fastest --clock-speed, as engine.clock.ScaledClock accepts it.
MAX_CLOCK_SPEED = 1e6


class UsageError(Exception):
    """A bad flag value; printed as ``tuanyuan: ...`` with exit status 2."""


# tuanyuan serve


def serve(args: argparse.Namespace) -> int:
    from engine.clock import Clock, ScaledClock
    from engine.journal import StoreUnavailable
    from engine.server import ServerOptions
    from engine.server import serve as run_server

    _check_serve_flags(args)
    try:
        security = security_cli.server_security(args, dev=args.dev)
    except ValueError as error:
        raise UsageError(str(error)) from None
    logs.configure(args.log_level, args.log_format)
    if security.dev_tokens is not None:
        logging.getLogger("engine.server").warning(
            "development credentials: tokens for the issuer, the operator and each gateway's "
            "reporter and gateway are in %s",
            security.dev_tokens,
        )
        print(security_cli.dev_credentials_text(security), file=sys.stderr, flush=True)
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


def _check_serve_flags(args: argparse.Namespace) -> None:
    """Refuses flag values the engine cannot run with, before anything is written."""
    if not 0 < args.clock_speed <= MAX_CLOCK_SPEED:  # also refuses nan
        raise UsageError(
            f"--clock-speed must be above 0 and at most {MAX_CLOCK_SPEED:.0f} simulated seconds "
            f"per real second, got {args.clock_speed:g}"
        )
    if not 0 <= args.purge_after < math.inf:
        raise UsageError(
            "--purge-after must be 0 or more seconds (0 deletes the lists as soon as an alert "
            f"closes), got {args.purge_after:g}"
        )
    if not 1 <= args.batch_devices <= 65536:
        raise UsageError(f"--batch-devices must be 1 to 65536, got {args.batch_devices}")


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


#: Flags of the texts in one language (argparse destinations), with the field each sets.
_TEXT_FLAGS = {
    "name": "name",
    "description": "description",
    "last_seen_place": "last_seen_place",
    "suspect": "suspect_description",
    "contact": "contact",
}
#: Every flag of a payload (argparse destinations) but --language.
_PAYLOAD_FLAGS = (*_TEXT_FLAGS, "payload", "age", "sex", "height_cm", "photo", "last_seen_at")


def _payload_given(args: argparse.Namespace) -> bool:
    """Whether any payload flag is on the command line."""
    return any(getattr(args, name) is not None for name in _PAYLOAD_FLAGS)


def _check_payload_numbers(args: argparse.Namespace) -> None:
    """--age and --height-cm within the ranges the engine accepts, checked before any call."""
    if args.age is None and args.height_cm is None:
        return
    # Imported here: the engine's module is slow to load and only its limits are needed.
    from engine.server import MAX_AGE_YEARS, MAX_HEIGHT_CM

    for flag, value, high, unit in (
        ("--age", args.age, MAX_AGE_YEARS, "whole years"),
        ("--height-cm", args.height_cm, MAX_HEIGHT_CM, "centimetres (0: unknown)"),
    ):
        if value is not None and not 0 <= value <= high:
            raise UsageError(f"{flag} must be 0 to {high} {unit}, got {value}")


def _payload(
    args: argparse.Namespace, current: alert_pb2.AlertPayload | None = None
) -> alert_pb2.AlertPayload | None:
    """The payload the flags describe; None when no payload flag is given.

    It starts from --payload FILE (JSON of an AlertPayload), else from ``current`` (the
    alert's payload, for update), else empty. The text flags then set their fields in the
    text of --language, which is added when there is none in that language (it needs
    --name); --age, --sex, --height-cm, --photo and --last-seen-at replace their fields.
    Everything else is kept as it was.
    """
    if not _payload_given(args):
        return None
    payload = alert_pb2.AlertPayload()
    if args.payload:
        try:
            json_format.Parse(Path(args.payload).read_text(encoding="utf-8"), payload)
        except (OSError, json_format.ParseError) as error:
            raise UsageError(f"--payload {args.payload}: {error}") from None
    elif current is not None:
        payload.CopyFrom(current)
    given = {
        field: getattr(args, flag)
        for flag, field in _TEXT_FLAGS.items()
        if getattr(args, flag) is not None
    }
    if given:
        text = next((t for t in payload.texts if t.language == args.language), None)
        if text is None:
            if not given.get("name"):
                raise UsageError(
                    f"--language {args.language}: the payload has no text in this language "
                    "yet; give --name to add one"
                )
            text = payload.texts.add(language=args.language)
        for field, value in given.items():
            setattr(text, field, value)
    if args.age is not None:
        payload.age_years = args.age
    if args.sex:
        payload.sex = _SEX[args.sex]
    if args.height_cm is not None:
        payload.height_cm = args.height_cm
    if args.photo is not None:
        del payload.photo_urls[:]
        payload.photo_urls.extend(args.photo)
    if args.last_seen_at:
        payload.last_seen_at.CopyFrom(_time(args.last_seen_at, "--last-seen-at"))
    return payload


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
            _check_payload_numbers(args)
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
            _check_payload_numbers(args)
            read = None
            if _payload_given(args) and not args.payload:
                # The engine replaces a payload whole: start from the alert's own.
                get = alert_pb2.GetAlertRequest(alert_id=args.id)
                read = stub.GetAlert(get, timeout=args.timeout)
            payload = _payload(args, read.payload if read is not None else None)
            if payload is not None:
                request.payload.CopyFrom(payload)
            if read is not None:
                # A change made since the read is refused (ABORTED), not overwritten.
                request.expected_version = read.version
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

    def payload_flags(parser: argparse.ArgumentParser, description: str) -> None:
        group = parser.add_argument_group("payload (what the apps show)", description)
        group.add_argument(
            "--payload",
            metavar="FILE",
            help="JSON file of a whole AlertPayload (several languages); the other payload "
            "flags change what it holds",
        )
        group.add_argument(
            "--language",
            default="zh-Hans",
            help="language of the text flags' text, added when the payload has none in it "
            "(zh-Hans)",
        )
        group.add_argument("--name", help="the child's name")
        group.add_argument("--age", type=int, help="age in whole years, 0 to 17")
        group.add_argument("--sex", choices=sorted(_SEX), help="sex")
        group.add_argument(
            "--height-cm", type=int, help="height in centimetres, 0 (unknown) to 250"
        )
        group.add_argument("--description", help="appearance and clothing")
        group.add_argument("--last-seen-place", help="where the child was last seen, in words")
        group.add_argument(
            "--last-seen-at",
            help="when, ISO 8601 (UTC unless an offset is given) or +SECONDS from now",
        )
        group.add_argument("--suspect", help="description of a suspect")
        group.add_argument("--contact", help="whom to call")
        group.add_argument(
            "--photo",
            action="append",
            help="https URL of a photo (repeatable); the URLs given replace all photos",
        )

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
    create.add_argument(
        "--start",
        help="start time: ISO 8601 (UTC unless an offset is given) or +SECONDS (default: the "
        "engine's now). +SECONDS counts from this machine's clock, not the engine's: for an "
        "engine run with --clock-speed other than 1, give an ISO time on the engine's clock",
    )
    payload_flags(
        create,
        "The text flags (--name, --description, --last-seen-place, --suspect, --contact) "
        "make the text in --language, or change it in the --payload file.",
    )
    common(create)

    update = actions.add_parser(
        "update",
        help="new sighting, corrected payload or schedule",
        description="Changes centres, payload or schedule of a running or scheduled alert; "
        "what no flag names stays as it is.",
    )
    update.add_argument("--id", required=True, help="alert id")
    update.add_argument(
        "--centre", action="append", help="LAT,LNG[,LABEL]; replaces all centres (repeatable)"
    )
    update.add_argument("--schedule", help=schedule_help)
    payload_flags(
        update,
        "Without --payload, the alert's payload is read first (GetAlert) and only the "
        "fields given change: the text flags (--name, --description, --last-seen-place, "
        "--suspect, --contact; '' clears one) in the text of --language, added if the "
        "alert has none in it (then --name is needed); --age, --sex, --height-cm, --photo "
        "and --last-seen-at replace their fields. Every other field and language is kept. "
        "--payload FILE replaces the whole payload with the file's. If the alert changed "
        "between the read and the update, the update is made from what was read and the "
        "command exits with status 1 naming both versions.",
    )
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
        help="without --credentials: generate credentials for local use, print each with "
        "its token at start and write the tokens to --dev-tokens",
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
        help="seconds of the engine's clock after an alert closes that the lists of who it "
        "reached are deleted, 0 or more (604800, a week)",
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
        help="simulated seconds per real second, above 0 and at most 1e6, for trials "
        "(1: real time); `alert create --start +SECONDS` still counts from the real clock",
    )
    run.add_argument("--schedules", type=Path, help="folder of operator schedules (*.toml)")
    run.add_argument("--port-file", type=Path, help="write the bound port to this file")
    run.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning"], help="(info)"
    )
    run.add_argument(
        "--log-format",
        default="text",
        choices=logs.FORMATS,
        help="text lines, or one JSON object a line with each event's figures as keys "
        "(alert_id, event, stage, new_recipients, ...) for a log pipeline (text)",
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


#: A word that starts like a negative number: "-33.87,151.21", "-.5,3", "-1".
_NEGATIVE = re.compile(r"-\.?[0-9]")


def _subcommand(parser: argparse.ArgumentParser, word: str) -> argparse.ArgumentParser | None:
    for action in parser._actions:  # argparse has no public way to list them
        if isinstance(action, argparse._SubParsersAction) and word in action.choices:
            return action.choices[word]
    return None


def _takes_one_value(parser: argparse.ArgumentParser, word: str) -> bool:
    """Whether ``word`` is a long flag of ``parser`` (or an abbreviation argparse would
    accept) that takes one value."""
    if not word.startswith("--") or "=" in word:
        return False
    flags = parser._option_string_actions
    action = flags.get(word)
    if action is None and parser.allow_abbrev:
        matches = {a for name, a in flags.items() if name.startswith(word)}
        action = matches.pop() if len(matches) == 1 else None
    return action is not None and action.nargs in (None, "?")


def attach_negative_values(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``argv`` with ``--flag -33.87,151.21`` written as ``--flag=-33.87,151.21``.

    argparse takes a word starting with '-' for a flag unless it is a plain number, so a
    coordinate pair with a negative latitude would leave ``--centre`` or ``--center``
    without its value. No tuanyuan flag starts with '-' and a digit, so such a word
    after a flag that takes one value is that value. Subcommands are followed as
    argparse follows them; nothing after ``--`` changes.
    """
    out: list[str] = []
    current = parser
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            return out + argv[i:]
        value = argv[i + 1] if i + 1 < len(argv) else None
        if value is not None and _takes_one_value(current, word):
            if _NEGATIVE.match(value):
                out.append(f"{word}={value}")
                i += 2
                continue
            if not value.startswith("-"):
                # The flag's value: not a subcommand even if it is spelled like one.
                out.extend((word, value))
                i += 2
                continue
        current = _subcommand(current, word) or current
        out.append(word)
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    words = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(attach_negative_values(parser, words))
    try:
        return args.handler(args)
    except UsageError as error:
        print(f"tuanyuan: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
