"""Operator tools: ``tuanyuan population``, ``tuanyuan schedules`` and ``tuanyuan tune``.

- ``population synth`` writes a synthetic population (engine.population) to Parquet or
  CSV; ``population info`` describes a population file: size, bounding box, gateways,
  density.
- ``schedules check FILE`` validates and explains a ring schedule; ``schedules list``
  shows the shipped ones.
- ``tune`` measures what a schedule reaches in a population: around one centre
  (``--center``), or over sampled centres with percentiles and density classes; with
  people moving during the alert (``--movement``); or proposes radii for goals
  (``--target``).

The logic lives in :mod:`engine.tuning` and :mod:`engine.populations_io`; this module
parses flags, prints and writes files. Every operator error prints one line,
``tuanyuan: ...``, on stderr and exits with status 2. Long work shows a progress line
on stderr. Reports go to stdout.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from engine import population as synthetic
from engine import populations_io, schedules, tuning
from engine.schedules import (
    MAX_RADIUS_M,
    Schedule,
    ScheduleError,
    distance_text,
    duration_text,
)

#: Cap on per-gateway counters kept while tuning (centres x gateways x radii).
_MAX_COUNTERS = 60_000_000


class ToolError(Exception):
    """An operator mistake: printed as one line ``tuanyuan: ...``, exit status 2."""


def _operator_errors(handler: Callable[[argparse.Namespace], int]):
    """Runs a command, turning the errors an operator can cause into one line on
    stderr and exit status 2 (no traceback)."""

    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (ToolError, populations_io.PopulationError, ScheduleError) as error:
            message = str(error)
        except ValueError as error:  # bad values caught by engine functions
            message = str(error)
        except OSError as error:
            message = f"{error.filename or 'file'}: {error.strerror or error}"
        print(f"tuanyuan: {message}", file=sys.stderr)
        return 2

    return run


class _Progress:
    """A progress line on stderr, shown once work has run for ``delay_s`` seconds and
    updated at most once a second; rewritten in place on a terminal."""

    def __init__(self, what: str, delay_s: float = 1.0) -> None:
        self.what = what
        self.delay_s = delay_s
        self.started = time.perf_counter()
        self.shown = -math.inf
        self.tty = sys.stderr.isatty()

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if now - self.started < self.delay_s or (done < total and now - self.shown < 1.0):
            return
        self.shown = now
        end = "\r" if self.tty and done < total else "\n"
        print(f"{self.what} {done:,}/{total:,}", end=end, file=sys.stderr, flush=True)


def _status(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _clock(seconds: float) -> str:
    """Time since the alert started as h:mm (h:mm:ss when not whole minutes)."""
    minutes = int(seconds) // 60
    return f"{minutes // 60}:{minutes % 60:02d}" + (
        f":{int(seconds) % 60:02d}" if seconds % 60 else ""
    )


def _point(text: str, flag: str) -> tuple[float, float]:
    """``LAT,LNG`` in degrees, checked."""
    parts = text.replace(" ", "").split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        lat, lng = float(parts[0]), float(parts[1])
    except ValueError:
        raise ToolError(
            f"{flag} takes LAT,LNG in degrees, e.g. 39.9042,116.4074; got {text!r}"
        ) from None
    if not -90.0 <= lat <= 90.0:
        raise ToolError(f"{flag}: latitude {lat:g} is outside [-90, 90]")
    if not -180.0 <= lng <= 180.0:
        raise ToolError(f"{flag}: longitude {lng:g} is outside [-180, 180]")
    return lat, lng


def _at_least(value: float, low: float, flag: str, what: str = "") -> None:
    if not (math.isfinite(value) and value >= low):
        raise ToolError(f"{flag} must be at least {low:g}{what}, got {value:g}")


def _share(value: float, flag: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise ToolError(f"{flag} must be from 0 to 1, got {value:g}")


def _write_json(path: str, document: dict) -> None:
    try:
        Path(path).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    except OSError as error:
        raise ToolError(f"{path}: cannot write: {error.strerror}") from None


def _plot_dir(path: str) -> Path:
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ToolError(f"--plot {path}: cannot create the folder: {error.strerror}") from None
    return folder


# ---------------------------------------------------------------------------------------
# tuanyuan population synth | info


@_operator_errors
def population_synth(args: argparse.Namespace) -> int:
    """Generates a synthetic population and writes it to a file."""
    if args.n < 1:
        raise ToolError(f"--n must be at least 1 device, got {args.n}")
    if args.kind == "metro" and args.country is not None:
        raise ToolError("--country is for --kind nation; a metro takes --city")
    if args.kind == "nation" and args.city is not None:
        raise ToolError("--city is for --kind metro; a nation takes --country")
    started = time.perf_counter()
    if args.kind == "metro":
        where = args.city or "Beijing"
        columns = synthetic.metro(args.n, seed=args.seed, city=where)
    else:
        where = args.country or "CN"
        columns = synthetic.nation(args.n, seed=args.seed, country=where)
    kind = populations_io.write(args.out, columns)
    seconds = time.perf_counter() - started
    print(
        f"wrote {args.n:,} devices ({args.kind} {where}, seed {args.seed}) to {args.out} "
        f"({kind}, {Path(args.out).stat().st_size / 1e6:,.1f} MB) in {seconds:.1f} s"
    )
    return 0


def _read_population(path: str) -> populations_io.Population:
    started = time.perf_counter()
    people = populations_io.read(path)
    seconds = time.perf_counter() - started
    if seconds > 1.0:
        _status(f"read {len(people):,} devices from {path} in {seconds:.1f} s")
    return people


@_operator_errors
def population_info(args: argparse.Namespace) -> int:
    """Describes a population file."""
    people = _read_population(args.file)
    n = len(people)
    print(f"{people.path} ({people.format}): {n:,} devices")

    south, north = float(people.lat.min()), float(people.lat.max())
    west, east = float(people.lng.min()), float(people.lng.max())
    middle = (south + north) / 2.0
    tall = synthetic.haversine_m(south, west, north, west)
    wide = synthetic.haversine_m(middle, west, middle, east)
    print(
        f"bounding box: latitude {south:.5f} to {north:.5f}, longitude {west:.5f} to "
        f"{east:.5f} ({tall / 1000:,.1f} km north-south, {wide / 1000:,.1f} km east-west "
        f"at latitude {middle:.2f})"
    )

    counts = np.bincount(people.gateway, minlength=65536)
    present = np.flatnonzero(counts)
    note = "" if people.gateway_given else " (no gateway column: every device on gateway 0)"
    print(f"gateways: {present.size}{note}")
    for gateway in present:
        share = 100.0 * counts[gateway] / n
        print(f"  gateway {gateway}: {counts[gateway]:,} devices ({share:.1f} %)")

    started = time.perf_counter()
    counter = tuning.RingCounter(people.lat, people.lng, people.gateway)
    found = tuning.density(people.lat, people.lng, counter)
    if time.perf_counter() - started > 1.0:
        _status(f"density measured in {time.perf_counter() - started:.1f} s")
    print(
        f"density on cells of about {found.cell_km:g} km² ({found.occupied_cells:,} "
        f"occupied): max {found.max_per_km2:,.0f} devices/km², p50 "
        f"{found.p50_per_km2:,.1f}, p90 {found.p90_per_km2:,.1f} (over occupied cells)"
    )
    around = ", ".join(f"{distance_text(r)}: {v:,}" for r, v in found.around_densest.items())
    print(
        f"densest point {found.densest_lat:.5f},{found.densest_lng:.5f} "
        f"(mean position in the densest cell); devices within {around}"
    )
    return 0


# ---------------------------------------------------------------------------------------
# tuanyuan schedules check | list


def _explain(schedule: Schedule) -> list[str]:
    lines = [
        f"{'stage':>5}  {'radius':>8}  {'starts':>7}  {'lasts':>7}  {'ends':>7}  {'ring area':>12}"
    ]
    for number, (start, stage) in enumerate(
        zip(schedule.stage_starts(), schedule.stages, strict=True), start=1
    ):
        area = tuning.disk_area_km2(stage.radius_m)
        lines.append(
            f"{number:>5}  {distance_text(stage.radius_m):>8}  {_clock(start):>7}  "
            f"{duration_text(stage.duration_s):>7}  {_clock(start + stage.duration_s):>7}  "
            f"{area:>9,.1f} km²"
        )
    widest = schedule.stages[-1].radius_m
    lines.append(
        f"{len(schedule.stages)} stage(s), {duration_text(schedule.duration_s)} in all; the "
        f"widest ring is {distance_text(widest)} ({tuning.disk_area_km2(widest):,.1f} km²), after "
        f"which the alert expires"
    )
    return lines


@_operator_errors
def schedules_check(args: argparse.Namespace) -> int:
    """Validates and explains a schedule file."""
    schedule = schedules.named(args.file)
    title = f'"{schedule.name}"' if schedule.name else "(no name)"
    print(f"{args.file}: a valid schedule {title}")
    if schedule.description:
        print(f"  {schedule.description}")
    for line in _explain(schedule):
        print(f"  {line}")
    return 0


@_operator_errors
def schedules_list(args: argparse.Namespace) -> int:
    """Prints the shipped schedules."""
    for name, schedule in sorted(schedules.SHIPPED.items()):
        print(f"{name}: {schedule.description}")
        print(f"  {schedule.describe()} ({duration_text(schedule.duration_s)} in all)")
    return 0


# ---------------------------------------------------------------------------------------
# tuanyuan tune


def _per_gateway_text(per_gateway: dict) -> str:
    return "  ".join(f"{g}: {v:,}" for g, v in per_gateway.items())


def _spread_text(spread: dict) -> str:
    return " / ".join(f"{spread[f'p{q}']:,.0f}" for q in tuning.PERCENTILES)


def _goals(args: argparse.Namespace) -> tuning.Goals | None:
    given = [args.min_first_hour, args.max_new_per_stage, args.max_gateway_rate]
    if not args.target:
        if any(value is not None for value in given):
            raise ToolError(
                "--min-first-hour, --max-new-per-stage and --max-gateway-rate are goals "
                "for --target"
            )
        return None
    if all(value is None for value in given):
        raise ToolError(
            "--target needs at least one goal: --min-first-hour N, --max-new-per-stage M "
            "or --max-gateway-rate R"
        )
    for value, flag in zip(
        given, ("--min-first-hour", "--max-new-per-stage", "--max-gateway-rate"), strict=True
    ):
        if value is not None:
            _at_least(value, 0, flag)
    for value, flag in (
        (args.percentile, "--percentile"),
        (args.cap_percentile, "--cap-percentile"),
    ):
        if not 0.0 <= value <= 100.0:
            raise ToolError(f"{flag} must be from 0 to 100, got {value:g}")
    if not (math.isfinite(args.push_minutes) and args.push_minutes > 0):
        raise ToolError(f"--push-minutes must be above 0, got {args.push_minutes:g}")
    return tuning.Goals(
        min_first=args.min_first_hour,
        max_new=args.max_new_per_stage,
        max_gateway_rate=args.max_gateway_rate,
        percentile=args.percentile,
        cap_percentile=args.cap_percentile,
        push_minutes=args.push_minutes,
    )


def _movement(args: argparse.Namespace) -> tuning.Movement | None:
    if not args.movement:
        return None
    if args.center is None:
        raise ToolError("--movement simulates one alert: give its centre with --center LAT,LNG")
    if args.target:
        raise ToolError("--target tunes radii on resting populations; drop --movement")
    _share(args.share_still, "--share-still")
    _share(args.share_walk, "--share-walk")
    if args.share_still + args.share_walk > 1.0:
        raise ToolError(
            f"--share-still {args.share_still:g} plus --share-walk {args.share_walk:g} is "
            "above 1 (the rest are commuters)"
        )
    _at_least(args.walk_speed, 0, "--walk-speed", " m/s")
    _at_least(args.commute_speed, 0, "--commute-speed", " m/s")
    _at_least(args.trip_min_km, 0, "--trip-min-km", " km")
    _at_least(args.trip_max_km, args.trip_min_km, "--trip-max-km", " km (--trip-min-km)")
    if not (math.isfinite(args.step_min) and args.step_min > 0):
        raise ToolError(f"--step-min must be above 0 minutes, got {args.step_min:g}")
    if not (math.isfinite(args.turn_min) and args.turn_min > 0):
        raise ToolError(f"--turn-min must be above 0 minutes, got {args.turn_min:g}")
    return tuning.Movement(
        share_still=args.share_still,
        share_walk=args.share_walk,
        walk_speed_mps=args.walk_speed,
        turn_s=args.turn_min * 60.0,
        commute_speed_mps=args.commute_speed,
        trip_min_m=args.trip_min_km * 1000.0,
        trip_max_m=args.trip_max_km * 1000.0,
        step_s=args.step_min * 60.0,
    )


@_operator_errors
def tune(args: argparse.Namespace) -> int:
    """Measures (or, with --target, tunes) a schedule on a population."""
    centre = None if args.center is None else _point(args.center, "--center")
    names = args.schedule or ["local"]
    compared = [schedules.named(name) for name in names]
    schedule = compared[0]
    goals = _goals(args)
    movement = _movement(args)
    if args.samples < 1:
        raise ToolError(f"--samples must be at least 1, got {args.samples}")
    _share(args.box_share, "--box-share")
    _at_least(args.city_density, 0, "--city-density", " devices/km²")
    _at_least(args.suburb_density, 0, "--suburb-density", " devices/km²")
    if args.suburb_density > args.city_density:
        raise ToolError(
            f"--suburb-density {args.suburb_density:g} is above --city-density "
            f"{args.city_density:g}"
        )
    core = None if args.core is None else _point(args.core, "--core")
    plots = None if args.plot is None else _plot_dir(args.plot)
    if (args.server is None) == (args.population is None):
        raise ToolError("give either --population FILE or --server HOST:PORT")
    several = len(compared) > 1
    if several and (goals is not None or movement is not None or plots is not None or args.server):
        raise ToolError(
            f"{len(compared)} --schedule given: schedules are compared on --population, "
            "around --center or sampled centres; --target, --movement, --plot and --server "
            "take one"
        )
    if args.server is not None:
        if centre is None or goals is not None or movement is not None or plots is not None:
            raise ToolError(
                "--server evaluates one --center as the engine sees it now; --target, "
                "--movement and --plot need --population"
            )
        return _tune_server(args, schedule, centre)

    people = _read_population(args.population)
    started = time.perf_counter()
    counter = tuning.RingCounter(people.lat, people.lng, people.gateway)
    if time.perf_counter() - started > 1.0:
        _status(
            f"sorted {len(people):,} devices into cells in {time.perf_counter() - started:.1f} s"
        )
    population_line = (
        f"population {people.path}: {len(people):,} devices on {counter.gateways.size} gateway(s)"
    )
    heading = f"{population_line}\n{_schedule_line(schedule, names[0])}"
    document = {
        "population": {
            "path": people.path,
            "devices": len(people),
            "gateways": [int(g) for g in counter.gateways],
        },
    }
    if several:
        status = _compare(args, people, counter, compared, names, centre, population_line, document)
        if args.json:
            _write_json(args.json, document)
        return status
    document["schedule"] = _schedule_json(schedule)
    if goals is not None:
        status = _tune_target(args, people, counter, schedule, goals, centre, heading, document)
    elif centre is not None:
        status = _tune_one(
            args, people, counter, schedule, centre, movement, core, heading, document
        )
    else:
        status = _tune_sampled(args, people, counter, schedule, heading, document)
    # Results the charts draw on that JSON cannot hold.
    drawn = {key: document.pop(key) for key in ("_moving", "_sampled") if key in document}
    if args.json:
        _write_json(args.json, document)
    if plots is not None:
        _plot(plots, people, counter, schedule, document, drawn)
    return status


def _schedule_line(schedule: Schedule, name: str) -> str:
    return (
        f"schedule {schedule.name or name}: {schedule.describe()} "
        f"({duration_text(schedule.duration_s)} in all)"
    )


def _compare(args, people, counter, compared, names, centre, population_line, document) -> int:
    """Several schedules side by side, counted in one pass: around --center, or over
    sampled centres (the same centres for each)."""
    print(population_line)
    started = time.perf_counter()
    document["schedules"] = []
    if centre is not None:
        reaches = tuning.reach_one_each(counter, *centre, compared)
        seconds = time.perf_counter() - started
        print(f"alert centre {centre[0]:.5f},{centre[1]:.5f}")
        document["centre"] = {"lat": centre[0], "lng": centre[1]}
        for schedule, name, stages in zip(compared, names, reaches, strict=True):
            rows = _stage_rows(stages)
            print(f"\n{_schedule_line(schedule, name)}")
            _print_stage_rows(rows)
            document["schedules"].append({"schedule": _schedule_json(schedule), "stages": rows})
        _status(f"counted {len(compared)} schedules around the centre in {seconds:.3f} s")
        return 0
    each, seconds = _count_sampled(args, people, counter, compared)
    _report_centres(each[0], args, document)
    for schedule, name, sampled in zip(compared, names, each, strict=True):
        print(f"\n{_schedule_line(schedule, name)}")
        part = {"schedule": _schedule_json(schedule)}
        _report_spreads(sampled, part)
        document["schedules"].append(part)
    _status(
        f"counted {len(compared)} schedules over {len(each[0].centres):,} centres in one pass, "
        f"{seconds:.2f} s"
    )
    return 0


def _tune_server(args: argparse.Namespace, schedule: Schedule, centre) -> int:
    """One centre against a running engine's live devices, through PreviewAlert (nothing
    is recorded or sent)."""
    import grpc

    from engine import security_cli
    from engine.api import alert_pb2
    from engine.client import alert_stub

    request = alert_pb2.PreviewAlertRequest(
        centres=[alert_pb2.Centre(latitude=centre[0], longitude=centre[1])]
    )
    request.stages.stages.extend(
        alert_pb2.Stage(radius_m=stage.radius_m, duration_s=stage.duration_s)
        for stage in schedule.stages
    )
    try:
        channel = security_cli.client_channel(args, args.server, dev_name="dev-operator")
        response = alert_stub(channel).PreviewAlert(request, timeout=60)
    except ValueError as error:
        raise ToolError(str(error)) from None
    except grpc.RpcError as error:
        raise ToolError(f"{args.server}: {error.code().name}: {error.details()}") from None
    rows = [
        {
            "radius_m": stage.radius_m,
            "duration_s": stage.duration_s,
            "new_recipients": stage.new_recipients,
            "cumulative_recipients": stage.cumulative_recipients,
            "per_gateway": {str(g.gateway_id): g.devices for g in stage.new_by_gateway},
        }
        for stage in response.stages
    ]
    print(f"engine {args.server}: {response.live_devices:,} live devices")
    print(_schedule_line(schedule, (args.schedule or ["local"])[0]))
    print(f"alert centre {centre[0]:.5f},{centre[1]:.5f}")
    print(f"{'stage':>5} {'radius':>9} {'lasts':>7} {'new':>12} {'cumulative':>12}  per gateway")
    for number, row in enumerate(rows, start=1):
        per = "  ".join(f"{g}: {n:,}" for g, n in row["per_gateway"].items())
        print(
            f"{number:>5} {distance_text(row['radius_m']):>9} "
            f"{duration_text(row['duration_s']):>7} "
            f"{row['new_recipients']:>12,} {row['cumulative_recipients']:>12,}  {per}"
        )
    if args.json:
        document = {
            "server": args.server,
            "live_devices": response.live_devices,
            "schedule": _schedule_json(schedule),
            "centre": {"lat": centre[0], "lng": centre[1]},
            "stages": rows,
        }
        _write_json(args.json, document)
    return 0


def _schedule_json(schedule: Schedule) -> dict:
    return {
        "name": schedule.name,
        "description": schedule.description,
        "stages": [{"radius_m": s.radius_m, "duration_s": s.duration_s} for s in schedule.stages],
    }


def _tune_one(args, people, counter, schedule, centre, movement, core, heading, document) -> int:
    """One centre: per stage radius, duration, new and cumulative recipients, per gateway;
    with --movement, the continuous geofence over moving people."""
    started = time.perf_counter()
    stages = tuning.reach_one(counter, *centre, schedule)
    _status(f"counted the centre in {time.perf_counter() - started:.3f} s")
    document["centre"] = {"lat": centre[0], "lng": centre[1]}
    rows = _stage_rows(stages)
    print(heading)
    print(f"alert centre {centre[0]:.5f},{centre[1]:.5f}")

    moving = None
    if movement is not None:
        if core is None:
            core_density = tuning.density(people.lat, people.lng, counter)
            core = (core_density.densest_lat, core_density.densest_lng)
            where = "the densest point of the population"
        else:
            where = "--core"
        progress = _Progress("simulated movement of devices")
        moving = tuning.reach_moving(
            people.lat,
            people.lng,
            people.gateway,
            centre,
            core,
            schedule,
            movement,
            args.seed,
            progress=progress,
        )
        print(
            f"people move (seed {args.seed}, a step every {movement.step_s / 60:g} min): "
            f"{movement.share_still:.0%} stand still, {movement.share_walk:.0%} walk at "
            f"{movement.walk_speed_mps:g} m/s turning every {movement.turn_s / 60:g} min "
            f"on average, {1 - movement.share_still - movement.share_walk:.0%} commute at "
            f"{movement.commute_speed_mps:g} m/s to or from the metro core "
            f"{core[0]:.5f},{core[1]:.5f} ({where}) for "
            f"{movement.trip_min_m / 1000:g} to {movement.trip_max_m / 1000:g} km"
        )
        cumulative = 0
        for row, stage in zip(rows, moving.per_stage, strict=True):
            cumulative += stage["new"]
            row["static_new_recipients"] = row["new_recipients"]
            row["static_cumulative_recipients"] = row["cumulative_recipients"]
            row["new_recipients"] = stage["new"]
            row["cumulative_recipients"] = cumulative
            row["per_gateway"] = {str(g): v for g, v in stage["per_gateway"].items()}
            row["swept_at_start"] = stage["swept"]
            row["walked_in"] = stage["walked_in"]
        document["movement"] = {
            "seed": args.seed,
            "core": {"lat": core[0], "lng": core[1]},
            "share_still": movement.share_still,
            "share_walk": movement.share_walk,
            "share_commute": 1.0 - movement.share_still - movement.share_walk,
            "walk_speed_mps": movement.walk_speed_mps,
            "turn_s": movement.turn_s,
            "commute_speed_mps": movement.commute_speed_mps,
            "trip_min_m": movement.trip_min_m,
            "trip_max_m": movement.trip_max_m,
            "step_s": movement.step_s,
        }
        document["reach_curve"] = {
            "hours": (moving.step_t / 3600.0).tolist(),
            "cumulative_recipients": moving.reach_curve.tolist(),
        }

    _print_stage_rows(rows, moving is not None)
    if moving is not None:
        static = rows[-1]["static_cumulative_recipients"]
        extra = rows[-1]["cumulative_recipients"] - static
        print(
            f"with people moving, {rows[-1]['cumulative_recipients']:,} are notified in all, "
            f"{extra:+,} against {static:,} if nobody moved"
        )
    document["stages"] = rows
    document["_moving"] = moving  # for the plots only; removed before writing
    return 0


def _stage_rows(stages: list[tuning.StageReach]) -> list[dict]:
    return [
        {
            "radius_m": s.radius_m,
            "duration_s": s.duration_s,
            "new_recipients": s.new,
            "cumulative_recipients": s.cumulative,
            "per_gateway": {str(g): v for g, v in s.per_gateway.items()},
        }
        for s in stages
    ]


def _print_stage_rows(rows: list[dict], moving: bool = False) -> None:
    header = f"{'stage':>5}  {'radius':>8}  {'lasts':>6}  {'new':>11}  {'cumulative':>11}"
    if moving:
        header += f"  {'at start':>11}  {'walked in':>10}"
    print(header + "  new per gateway")
    for number, row in enumerate(rows, start=1):
        line = (
            f"{number:>5}  {distance_text(row['radius_m']):>8}  "
            f"{duration_text(row['duration_s']):>6}  "
            f"{row['new_recipients']:>11,}  {row['cumulative_recipients']:>11,}"
        )
        if moving:
            line += f"  {row['swept_at_start']:>11,}  {row['walked_in']:>10,}"
        print(line + "  " + _per_gateway_text(row["per_gateway"]))


def _count_sampled(args, people, counter, compared) -> tuple[list[tuning.SampledReach], float]:
    """Each schedule's reach over the --samples centres, from one counting pass, and the
    seconds it took."""
    centres = _sampled_centres(args, people)
    edges, _ = tuning.shared_edges(compared, tuning.CLASS_RADIUS_M)
    _check_counters(len(centres), counter.gateways.size, edges.size)
    started = time.perf_counter()
    each = tuning.reach_sampled_each(
        counter,
        centres,
        compared,
        city_per_km2=args.city_density,
        suburb_per_km2=args.suburb_density,
        progress=_Progress("sampled centres"),
    )
    return each, time.perf_counter() - started


def _sampled_centres(args, people) -> tuning.Centres:
    return tuning.sample_centres(people.lat, people.lng, args.samples, args.seed, args.box_share)


def _check_counters(centres: int, gateways: int, radii: int) -> None:
    if centres * gateways * radii > _MAX_COUNTERS:
        raise ToolError(
            f"{centres:,} centres x {gateways:,} gateways x {radii:,} radii need "
            f"{centres * gateways * radii * 8 / 1e9:.1f} GB of counters: use fewer --samples"
        )


def _centres_json(sampled: tuning.SampledReach, args) -> dict:
    centres = sampled.centres
    city, suburb = sampled.thresholds
    return {
        "count": len(centres),
        "seed": args.seed,
        "from_devices": int(centres.from_device.sum()),
        "from_bounding_box": int((~centres.from_device).sum()),
        "classes": {
            "rule": (
                f"devices within {tuning.CLASS_RADIUS_M:g} m of the centre: city centre at "
                f"least {city:,.0f} ({args.city_density:g}/km²), suburb at least "
                f"{suburb:,.0f} ({args.suburb_density:g}/km²), countryside fewer"
            ),
            **{
                name: int((sampled.classes == index).sum())
                for index, name in enumerate(tuning.CLASSES)
            },
        },
        "positions": [
            {"lat": float(a), "lng": float(b), "class": tuning.CLASSES[c], "from_device": bool(d)}
            for a, b, c, d in zip(
                centres.lat, centres.lng, sampled.classes, centres.from_device, strict=True
            )
        ],
    }


def _print_spreads(title: str, stages: list[dict]) -> None:
    print(title)
    print(
        f"{'stage':>5}  {'radius':>8}  {'lasts':>6}  {'new p10 / p50 / p90':>28}  "
        f"{'cumulative p10 / p50 / p90':>30}"
    )
    for number, stage in enumerate(stages, start=1):
        print(
            f"{number:>5}  {distance_text(stage['radius_m']):>8}  "
            f"{duration_text(stage['duration_s']):>6}  "
            f"{_spread_text(stage['new_recipients']):>28}  "
            f"{_spread_text(stage['cumulative_recipients']):>30}"
        )


def _report_sampled(sampled: tuning.SampledReach, args, document: dict) -> None:
    _report_centres(sampled, args, document)
    _report_spreads(sampled, document)
    document["_sampled"] = sampled


def _report_centres(sampled: tuning.SampledReach, args, document: dict) -> None:
    """What the sampled centres are: how many, where from, their density classes."""
    centres = sampled.centres
    city, suburb = sampled.thresholds
    tally = [int((sampled.classes == i).sum()) for i in range(len(tuning.CLASSES))]
    print(
        f"{len(centres):,} centres (seed {args.seed}): {int(centres.from_device.sum()):,} "
        f"at random devices, {int((~centres.from_device).sum()):,} at random points of the "
        "bounding box"
    )
    print(
        f"density classes by devices within {distance_text(tuning.CLASS_RADIUS_M)} of the centre: "
        f"city centre at least {city:,.0f} ({args.city_density:,g}/km²): {tally[0]}, "
        f"suburb at least {suburb:,.0f} ({args.suburb_density:,g}/km²): {tally[1]}, "
        f"countryside: {tally[2]}"
    )
    document["centres"] = _centres_json(sampled, args)


def _report_spreads(sampled: tuning.SampledReach, document: dict) -> None:
    """The schedule's reach per stage over the centres: in all, per class, per gateway."""
    centres = sampled.centres
    stages = sampled.stage_spreads()
    _print_spreads(f"\nall {len(centres):,} centres", stages)
    by_class = {}
    for index, name in enumerate(tuning.CLASSES):
        mask = sampled.classes == index
        if not mask.any():
            by_class[name] = {"centres": 0, "stages": []}
            continue
        class_stages = sampled.stage_spreads(mask)
        by_class[name] = {"centres": int(mask.sum()), "stages": class_stages}
        _print_spreads(f"\n{name} ({int(mask.sum()):,} centres)", class_stages)
    gateway_line = "  ".join(
        f"{g}: {_spread_text(spread)}" for g, spread in stages[0]["per_gateway"].items()
    )
    print(f"\nnew in stage 1 per gateway (p10 / p50 / p90): {gateway_line}")
    document["stages"] = stages
    document["by_class"] = by_class


def _tune_sampled(args, people, counter, schedule, heading, document) -> int:
    """Sampled centres: per stage p10/p50/p90 of new and cumulative recipients, in all
    and per density class."""
    (sampled,), seconds = _count_sampled(args, people, counter, [schedule])
    print(heading)
    _report_sampled(sampled, args, document)
    _status(f"counted {len(sampled.centres):,} centres in {seconds:.2f} s")
    return 0


def _tune_target(args, people, counter, schedule, goals, centre, heading, document) -> int:
    """Proposes radii meeting the goals over sampled centres (or one centre)."""
    widest = schedule.stages[-1].radius_m
    limit = 2.0 * widest if args.max_radius_km is None else args.max_radius_km * 1000.0
    if not (math.isfinite(limit) and limit > 0):
        raise ToolError(f"--max-radius-km must be above 0, got {args.max_radius_km:g}")
    limit = min(max(limit, widest), MAX_RADIUS_M)
    if centre is None:
        centres = _sampled_centres(args, people)
    else:
        centres = tuning.Centres(np.array([centre[0]]), np.array([centre[1]]), np.ones(1, bool))
    radii = tuning.candidate_radii(
        limit, [s.radius_m for s in schedule.stages] + [tuning.CLASS_RADIUS_M]
    )
    _check_counters(len(centres), counter.gateways.size, radii.size)
    started = time.perf_counter()
    counts = counter.counts(centres.lat, centres.lng, radii, progress=_Progress("sampled centres"))
    seconds = time.perf_counter() - started
    proposals = tuning.propose(counts, radii, schedule, goals)
    tuned = tuning.proposed_schedule(schedule, proposals)

    # The tuned schedule's reach, from the same counts: its radii are among the candidates.
    (sampled,) = tuning.sampled_reach_from(
        counts, radii, counter, centres, [tuned], args.city_density, args.suburb_density
    )

    print(heading)
    over = "one centre" if centre is not None else f"{len(centres):,} sampled centres"
    assumption = (
        f"each stage's new recipients are pushed evenly over its first "
        f"{goals.push_minutes:g} min (the whole stage if shorter)"
    )
    print(f"goals over {over}, radii searched from 10 m to {distance_text(limit)}:")
    if goals.min_first is not None:
        print(
            f"  --min-first-hour {goals.min_first:,}: at least that many devices in the "
            f"first stage at the p{goals.percentile:g} centre"
        )
    if goals.max_new is not None:
        print(
            f"  --max-new-per-stage {goals.max_new:,}: at most that many new recipients in "
            f"any stage at the p{goals.cap_percentile:g} centre"
        )
    if goals.max_gateway_rate is not None:
        print(
            f"  --max-gateway-rate {goals.max_gateway_rate:,g}: at most that many "
            f"notifications a minute on any gateway at the p{goals.cap_percentile:g} "
            f"centre, assuming {assumption}"
        )
    print(f"\n{'stage':>5}  {'schedule':>9}  {'proposed':>9}  {'goals allow':>21}  why")
    for number, p in enumerate(proposals, start=1):
        allowed = f"{distance_text(p.lowest_m)} to {distance_text(p.highest_m)}"
        print(
            f"{number:>5}  {distance_text(p.schedule_radius_m):>9}  "
            f"{distance_text(p.radius_m):>9}  "
            f"{allowed:>21}  {p.reason}"
        )
    toml = _schedule_toml(tuned)
    indented = "\n".join(f"  {line}" if line else "" for line in toml.splitlines())
    print(f"\nproposed schedule:\n{indented}")
    if args.save_schedule:
        try:
            Path(args.save_schedule).write_text(toml, encoding="utf-8")
        except OSError as error:
            raise ToolError(f"{args.save_schedule}: cannot write: {error.strerror}") from None
        print(f"(written to {args.save_schedule})")
    print()
    _report_sampled(sampled, args, document)
    _status(f"counted {len(centres):,} centres at {radii.size:,} radii in {seconds:.2f} s")

    for row, p in zip(document["stages"], proposals, strict=True):
        row.update(
            {
                "schedule_radius_m": p.schedule_radius_m,
                "allowed_radius_m": [p.lowest_m, p.highest_m],
                "binding": p.binding,
                "reason": p.reason,
                "goals_met": p.met,
            }
        )
    document["target"] = {
        "min_first_hour": goals.min_first,
        "max_new_per_stage": goals.max_new,
        "max_gateway_rate_per_min": goals.max_gateway_rate,
        "percentile": goals.percentile,
        "cap_percentile": goals.cap_percentile,
        "push_minutes": goals.push_minutes,
        "assumption": assumption,
        "max_radius_m": limit,
        "schedule_toml": toml,
        "all_met": all(p.met for p in proposals),
    }
    if not all(p.met for p in proposals):
        print("tuanyuan: the goals cannot all be met; see the reasons above", file=sys.stderr)
        return 1
    return 0


def _schedule_toml(schedule: Schedule) -> str:
    lines = [f'name = "{schedule.name}"', f'description = "{schedule.description}"']
    for stage in schedule.stages:
        radius = stage.radius_m
        text = f"{int(radius)}" if radius == int(radius) else f"{radius:g}"
        lines += ["", "[[stage]]", f"radius_m = {text}", f"duration_s = {stage.duration_s}"]
    return "\n".join(lines) + "\n"


def _plot(folder: Path, people, counter, schedule: Schedule, document: dict, drawn: dict) -> None:
    """rings.png and reach.png in ``folder``."""
    from engine import tuning_plots

    radii = [s.radius_m for s in schedule.stages]
    moving = drawn.get("_moving")
    sampled = drawn.get("_sampled")
    try:
        if sampled is None:
            centre = (document["centre"]["lat"], document["centre"]["lng"])
            labels = [
                f"stage {k}: {distance_text(row['radius_m'])}, +{row['new_recipients']:,}"
                for k, row in enumerate(document["stages"], start=1)
            ]
            tuning_plots.rings(
                folder / "rings.png",
                people.lat,
                people.lng,
                centre,
                radii,
                f"Rings of {schedule.name or 'the schedule'} around "
                f"{centre[0]:.4f}, {centre[1]:.4f}\nover the population density",
                labels=labels,
            )
            static = np.array(
                [
                    row.get("static_cumulative_recipients", row["cumulative_recipients"])
                    for row in document["stages"]
                ]
            )
            tuning_plots.reach(
                folder / "reach.png",
                schedule,
                "Devices notified over the alert",
                static=static,
                moving=None if moving is None else (moving.step_t, moving.reach_curve),
            )
        else:
            tuned = sampled.schedule
            radii = [s.radius_m for s in tuned.stages]
            found = tuning.density(people.lat, people.lng, counter)
            centre = (found.densest_lat, found.densest_lng)
            # Wide enough to show most sampled centres, not only the rings.
            spread = tuning.distances_m(sampled.centres.lat, sampled.centres.lng, *centre)
            tuning_plots.rings(
                folder / "rings.png",
                people.lat,
                people.lng,
                centre,
                radii,
                f"Rings of {tuned.name or 'the schedule'} around the densest point "
                f"{centre[0]:.4f}, {centre[1]:.4f}\nand the sampled centres by density class",
                centres=(sampled.centres.lat, sampled.centres.lng, sampled.classes),
                extent_m=max(1.25 * max(radii), 1.05 * float(np.percentile(spread, 95))),
            )
            totals = sampled.cumulative.sum(axis=1)
            bands = {f"p{q}": np.percentile(totals, q, axis=0) for q in tuning.PERCENTILES}
            tuning_plots.reach(
                folder / "reach.png",
                tuned,
                f"Devices notified over the alert, {len(sampled.centres):,} sampled centres",
                bands=bands,
            )
    except RuntimeError as error:
        raise ToolError(str(error)) from None
    print(f"charts written to {folder / 'rings.png'} and {folder / 'reach.png'}")


# ---------------------------------------------------------------------------------------
# Argument wiring


def add_commands(commands) -> None:
    """Adds ``population``, ``schedules`` and ``tune`` to the ``tuanyuan`` parser
    (``commands`` is its subparsers object)."""
    _add_population(commands)
    _add_schedules(commands)
    _add_tune(commands)


def _add_population(commands) -> None:
    parser = commands.add_parser(
        "population",
        help="make or describe a population file (Parquet or CSV)",
        description="Population files have columns device_id (unsigned integer), lat, lng "
        "(degrees) and optionally gateway (0 to 65535; without it every device is on "
        "gateway 0). Parquet or CSV; rows are counted from 1, not counting a CSV header.",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    synth = actions.add_parser(
        "synth",
        help="write a synthetic population",
        description="Writes a seeded synthetic population: a metro area around a city "
        "centre, or a nation's cities weighted by population (engine.population).",
    )
    synth.add_argument("--kind", choices=("metro", "nation"), required=True)
    synth.add_argument("--n", metavar="N", type=int, required=True, help="number of devices")
    synth.add_argument("--seed", metavar="S", type=int, default=0, help="random seed (0)")
    synth.add_argument(
        "--city", metavar="NAME", help="metro: city whose centre it surrounds (Beijing)"
    )
    synth.add_argument("--country", metavar="CC", help="nation: ISO 3166 two-letter code (CN)")
    synth.add_argument(
        "--out", metavar="FILE", required=True, help="output file, .parquet (or .csv) by its suffix"
    )
    synth.set_defaults(handler=population_synth)

    info = actions.add_parser(
        "info",
        help="describe a population file",
        description="Prints the device count, bounding box, gateways and their shares, "
        "and density: devices per km² over occupied cells of about 1 km² (max, p50, "
        "p90) and the devices within 1, 3 and 10 km of the densest point.",
    )
    info.add_argument("file", help="population file (Parquet or CSV)")
    info.set_defaults(handler=population_info)


def _add_schedules(commands) -> None:
    parser = commands.add_parser("schedules", help="check or list ring schedules")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    check = actions.add_parser(
        "check",
        help="validate and explain a TOML schedule",
        description="Validates a TOML schedule and prints its stages: radius, start, "
        "duration, end and ring area, then the total duration.",
    )
    check.add_argument("file", help="schedule file (.toml), or a shipped schedule's name")
    check.set_defaults(handler=schedules_check)
    listing = actions.add_parser("list", help="print the shipped schedules")
    listing.set_defaults(handler=schedules_list)


def _security_flags(parser: argparse.ArgumentParser) -> None:
    from engine import security_cli

    security_cli.add_client_flags(parser)


def _add_tune(commands) -> None:
    parser = commands.add_parser(
        "tune",
        help="what a schedule reaches in a population; propose radii for goals",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Counts, per stage of a ring schedule, the new and cumulative recipients in a population
(great-circle distance on the engine's sphere, a device at most the radius away is
inside).

  --center LAT,LNG   one alert centre: per stage and per gateway
  (no --center)      --samples centres: most at random devices' positions, a share
                     (--box-share) at random points of the bounding box; per stage
                     p10/p50/p90, in all and per density class (devices within 1 km
                     of the centre against --city-density / --suburb-density per km²)
  --movement         with --center: people move during the alert and the ring is a
                     continuous geofence (who walks in is notified at the next step)
  --target           propose radii meeting goals, keeping the stage count and durations

Exit status: 0 done, 1 --target goals cannot all be met, 2 an error in the input.""",
    )
    parser.add_argument("--population", metavar="FILE", help="population file (Parquet or CSV)")
    parser.add_argument(
        "--server",
        metavar="HOST:PORT",
        help="instead of --population: a running engine's live devices, through PreviewAlert "
        "(with --center; an operator token, see the security flags)",
    )
    parser.add_argument(
        "--schedule",
        metavar="NAME|FILE",
        action="append",
        help="shipped schedule name or TOML file (local); repeat it to compare schedules "
        "side by side, counted in one pass",
    )
    parser.add_argument("--center", metavar="LAT,LNG", help="one alert centre, in degrees")
    parser.add_argument(
        "--samples", metavar="N", type=int, default=200, help="centres sampled (200)"
    )
    parser.add_argument(
        "--seed", metavar="S", type=int, default=0, help="seed of sampling and movement (0)"
    )
    parser.add_argument(
        "--box-share",
        metavar="SHARE",
        type=float,
        default=0.1,
        help="share of sampled centres at random points of the bounding box (0.1)",
    )
    parser.add_argument(
        "--city-density",
        metavar="PER_KM2",
        type=float,
        default=5_000.0,
        help="devices per km² within 1 km that make a city centre (5000)",
    )
    parser.add_argument(
        "--suburb-density",
        metavar="PER_KM2",
        type=float,
        default=500.0,
        help="devices per km² within 1 km that make a suburb (500); fewer: countryside",
    )
    parser.add_argument("--json", metavar="OUT", help="write the results as JSON")
    _security_flags(parser)
    parser.add_argument("--plot", metavar="DIR", help="write rings.png and reach.png")

    moving = parser.add_argument_group("movement (--movement, with --center)")
    moving.add_argument("--movement", action="store_true", help="people move during the alert")
    moving.add_argument(
        "--share-still", metavar="SHARE", type=float, default=0.6, help="share standing still (0.6)"
    )
    moving.add_argument(
        "--share-walk",
        metavar="SHARE",
        type=float,
        default=0.25,
        help="share walking (0.25); the rest commute",
    )
    moving.add_argument("--walk-speed", metavar="M_S", type=float, default=1.4, help="m/s (1.4)")
    moving.add_argument(
        "--turn-min",
        metavar="MIN",
        type=float,
        default=5.0,
        help="mean minutes before a walker picks a new heading (5)",
    )
    moving.add_argument("--commute-speed", metavar="M_S", type=float, default=8.0, help="m/s (8)")
    moving.add_argument(
        "--trip-min-km", metavar="KM", type=float, default=3.0, help="shortest commute (3)"
    )
    moving.add_argument(
        "--trip-max-km", metavar="KM", type=float, default=25.0, help="longest commute (25)"
    )
    moving.add_argument(
        "--core",
        metavar="LAT,LNG",
        help="metro core commuters head to or from (the population's densest point)",
    )
    moving.add_argument(
        "--step-min",
        metavar="MIN",
        type=float,
        default=5.0,
        help="minutes of alert time per step (5)",
    )

    target = parser.add_argument_group("goals (--target)")
    target.add_argument("--target", action="store_true", help="propose radii for the goals")
    target.add_argument(
        "--min-first-hour",
        type=int,
        metavar="N",
        help="at least N devices in the first stage at the --percentile centre",
    )
    target.add_argument(
        "--max-new-per-stage",
        type=int,
        metavar="M",
        help="at most M new recipients in any stage at the --cap-percentile centre",
    )
    target.add_argument(
        "--max-gateway-rate",
        type=float,
        metavar="R",
        help="at most R notifications a minute on any gateway at the --cap-percentile "
        "centre, each stage's new recipients pushed evenly over --push-minutes",
    )
    target.add_argument(
        "--percentile",
        metavar="P",
        type=float,
        default=50.0,
        help="centre of --min-first-hour (50)",
    )
    target.add_argument(
        "--cap-percentile",
        metavar="P",
        type=float,
        default=90.0,
        help="centre of the maximum goals (90)",
    )
    target.add_argument(
        "--push-minutes",
        metavar="X",
        type=float,
        default=5.0,
        help="minutes over which a stage's new recipients are pushed (5)",
    )
    target.add_argument(
        "--max-radius-km",
        metavar="KM",
        type=float,
        help="widest radius searched (twice the schedule's widest ring)",
    )
    target.add_argument("--save-schedule", metavar="F.toml", help="write the proposed schedule")
    parser.set_defaults(handler=tune)
