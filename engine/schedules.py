"""Ring schedules: how far an alert reaches, and for how long.

A schedule is a list of stages. Stage ``k`` starts when stages ``1..k-1`` have run their
durations and notifies the devices within its radius of any centre of the alert that were
not notified yet; the alert expires when the last stage ends. Radii never shrink, so every
stage widens (or holds) the ring of the one before.

Schedules are TOML files::

    name = "local"
    description = "1 km the first hour, 2 km the second, 3 km the third"

    [[stage]]
    radius_km = 1       # or radius_m = 1000
    duration_h = 1      # or duration_min = 60, or duration_s = 3600

The engine ships ``local`` and ``regional`` (:data:`SHIPPED`); operators add their own
files with ``tuanyuan serve --schedules DIR`` (:func:`load_folder`), under names of their
own: a shipped schedule cannot be redefined.
"""

from __future__ import annotations

import logging
import tomllib
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

_LOG = logging.getLogger("engine.schedules")

#: Most stages a schedule may have.
MAX_STAGES = 16
#: Widest ring a stage may have, in metres (a country, not a continent).
MAX_RADIUS_M = 1_000_000.0
#: Longest a stage may last, in seconds (a week).
MAX_STAGE_DURATION_S = 7 * 24 * 3600

_RADIUS_UNITS = {"radius_m": 1.0, "radius_km": 1000.0}
_DURATION_UNITS = {"duration_s": 1, "duration_min": 60, "duration_h": 3600}


class ScheduleError(ValueError):
    """A schedule that cannot be used; the message names the stage and the field."""


@dataclass(frozen=True)
class Stage:
    """One ring: ``radius_m`` metres around every centre, for ``duration_s`` seconds."""

    radius_m: float
    duration_s: int


@dataclass(frozen=True)
class Schedule:
    """Stages in order. ``name`` is empty for a schedule given inline with an alert."""

    stages: tuple[Stage, ...]
    name: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        check_stages(self.stages)

    @property
    def duration_s(self) -> int:
        """Seconds from the start of the first stage to the end of the last."""
        return sum(stage.duration_s for stage in self.stages)

    def stage_starts(self) -> list[int]:
        """Seconds after the alert's start at which each stage begins."""
        starts, elapsed = [], 0
        for stage in self.stages:
            starts.append(elapsed)
            elapsed += stage.duration_s
        return starts

    def stage_at(self, elapsed_s: float) -> int | None:
        """Index of the stage running ``elapsed_s`` seconds after the start; ``None``
        before the start and after the end."""
        if elapsed_s < 0:
            return None
        for index, start in enumerate(self.stage_starts()):
            if elapsed_s < start + self.stages[index].duration_s:
                return index
        return None

    def describe(self) -> str:
        """The stages in one line, e.g. ``1 km for 1 h, 2 km for 1 h``."""
        return ", ".join(
            f"{distance_text(stage.radius_m)} for {duration_text(stage.duration_s)}"
            for stage in self.stages
        )


def check_stages(stages: tuple[Stage, ...]) -> None:
    """Raises :class:`ScheduleError` naming the first stage (1-based) that breaks a rule:
    1 to :data:`MAX_STAGES` stages; radii above 0 and at most :data:`MAX_RADIUS_M`,
    never shrinking; whole durations of 1 s to :data:`MAX_STAGE_DURATION_S`."""
    if not stages:
        raise ScheduleError("a schedule needs at least one stage")
    if len(stages) > MAX_STAGES:
        raise ScheduleError(f"a schedule has at most {MAX_STAGES} stages, got {len(stages)}")
    previous = 0.0
    for number, stage in enumerate(stages, start=1):
        radius, duration = stage.radius_m, stage.duration_s
        if not isinstance(radius, int | float) or isinstance(radius, bool):
            raise ScheduleError(f"stage {number}: radius must be a number, got {radius!r}")
        if not 0 < radius <= MAX_RADIUS_M:  # also false for NaN
            raise ScheduleError(
                f"stage {number}: radius must be above 0 and at most "
                f"{MAX_RADIUS_M / 1000:g} km, got {radius!r} m"
            )
        if radius < previous:
            raise ScheduleError(
                f"stage {number}: radius {distance_text(radius)} is smaller than the "
                f"{distance_text(previous)} of stage {number - 1}; rings must not shrink"
            )
        if not isinstance(duration, int) or isinstance(duration, bool):
            raise ScheduleError(
                f"stage {number}: duration must be a whole number of seconds, got {duration!r}"
            )
        if not 1 <= duration <= MAX_STAGE_DURATION_S:
            raise ScheduleError(
                f"stage {number}: duration must be from 1 s to {MAX_STAGE_DURATION_S} s "
                f"(a week), got {duration} s"
            )
        previous = radius


def parse(text: str, *, source: str = "schedule") -> Schedule:
    """A schedule from TOML text; ``source`` names it in errors (a file path)."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ScheduleError(f"{source}: not valid TOML: {error}") from None
    unknown = sorted(set(document) - {"name", "description", "stage"})
    if unknown:
        raise ScheduleError(f"{source}: unknown key(s) {', '.join(unknown)}")
    name, description = document.get("name", ""), document.get("description", "")
    for key, value in (("name", name), ("description", description)):
        if not isinstance(value, str):
            raise ScheduleError(f"{source}: {key} must be a string, got {value!r}")
    tables = document.get("stage", [])
    if not isinstance(tables, list):
        raise ScheduleError(f"{source}: stages are written as [[stage]] tables")
    stages = tuple(_stage(table, number, source) for number, table in enumerate(tables, 1))
    try:
        return Schedule(stages, name=name, description=description)
    except ScheduleError as error:
        raise ScheduleError(f"{source}: {error}") from None


def _stage(table: object, number: int, source: str) -> Stage:
    where = f"{source}: stage {number}"
    if not isinstance(table, dict):
        raise ScheduleError(f"{where}: must be a [[stage]] table")
    unknown = sorted(set(table) - set(_RADIUS_UNITS) - set(_DURATION_UNITS))
    if unknown:
        raise ScheduleError(f"{where}: unknown key(s) {', '.join(unknown)}")
    radius_m = _one_of(table, _RADIUS_UNITS, where, "radius")
    duration_s = _one_of(table, _DURATION_UNITS, where, "duration")
    if duration_s != int(duration_s):
        raise ScheduleError(f"{where}: duration must be a whole number of seconds")
    return Stage(radius_m=float(radius_m), duration_s=int(duration_s))


def _one_of(table: dict, units: dict, where: str, what: str) -> float:
    given = [key for key in units if key in table]
    if len(given) != 1:
        raise ScheduleError(f"{where}: give exactly one {what}, as {' or '.join(units)}")
    value = table[given[0]]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ScheduleError(f"{where}: {given[0]} must be a number, got {value!r}")
    if value != value or value <= 0:
        raise ScheduleError(f"{where}: {given[0]} must be above 0, got {value!r}")
    return value * units[given[0]]


def load(path: str | Path) -> Schedule:
    """A schedule from a TOML file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ScheduleError(f"{path}: cannot read: {error.strerror}") from None
    return parse(text, source=str(path))


def load_folder(folder: str | Path) -> dict[str, tuple[Path, Schedule]]:
    """The operator schedules of a folder (its ``*.toml`` files), by name, with the file
    each comes from; a file without ``name`` is named after the file (``night.toml``:
    ``night``).

    Raises :class:`ScheduleError` naming the path when the folder is missing or is not a
    folder, when a file cannot be used, when a schedule takes the name of a shipped one
    (:data:`SHIPPED`), and when two files give the same name. Logs the schedules found,
    and a warning when the folder has none.
    """
    folder = Path(folder)
    if not folder.exists():
        raise ScheduleError(f"schedules folder {folder}: does not exist")
    if not folder.is_dir():
        raise ScheduleError(
            f"schedules folder {folder}: is a file; give the folder that holds the *.toml files"
        )
    try:
        paths = sorted(folder.glob("*.toml"))
    except OSError as error:
        raise ScheduleError(f"schedules folder {folder}: cannot read: {error.strerror}") from None
    found: dict[str, tuple[Path, Schedule]] = {}
    for path in paths:
        schedule = load(path)
        name = schedule.name or path.stem
        named_as = (
            f"names its schedule {name!r}"
            if schedule.name
            else f"has no name, so its schedule is named {name!r} after the file"
        )
        if name in SHIPPED:
            raise ScheduleError(
                f"{path}: {named_as}, the name of a schedule shipped with the engine "
                f"({', '.join(sorted(SHIPPED))}); shipped schedules cannot be redefined: "
                "give this one another name"
            )
        if name in found:
            raise ScheduleError(
                f"{path}: {named_as}, as {found[name][0]} does already; "
                "every schedule needs its own name"
            )
        # Alerts report the schedule by the name they were created with.
        found[name] = (path, replace(schedule, name=name))
    if not found:
        _LOG.warning(
            "schedules folder %s has no *.toml files: only the shipped schedules (%s) are "
            "available",
            folder,
            ", ".join(sorted(SHIPPED)),
        )
    for name, (path, schedule) in found.items():
        _LOG.info("operator schedule %s from %s: %s", name, path, schedule.describe())
    return found


def _shipped() -> dict[str, Schedule]:
    folder = resources.files("engine") / "data" / "schedules"
    found = {}
    for entry in sorted(folder.iterdir(), key=lambda entry: entry.name):
        if entry.name.endswith(".toml"):
            schedule = parse(entry.read_text(encoding="utf-8"), source=entry.name)
            found[schedule.name] = schedule
    return found


#: The schedules shipped with the engine, by name: ``local`` and ``regional``.
SHIPPED: dict[str, Schedule] = _shipped()


def named(name_or_path: str) -> Schedule:
    """A shipped schedule by name, or else a TOML file by path."""
    if name_or_path in SHIPPED:
        return SHIPPED[name_or_path]
    if name_or_path.endswith(".toml") or Path(name_or_path).exists():
        return load(name_or_path)
    raise ScheduleError(
        f"unknown schedule {name_or_path!r}: use one of {', '.join(sorted(SHIPPED))} "
        "or the path of a TOML file"
    )


def distance_text(metres: float) -> str:
    """``1 km``, ``1.5 km`` or ``800 m``: a radius for people."""
    return f"{metres / 1000:g} km" if metres >= 1000 else f"{metres:g} m"


def duration_text(seconds: float) -> str:
    """``1 h``, ``90 min`` or ``45 s``: a whole number of seconds for people."""
    seconds = int(seconds)
    if seconds % 3600 == 0:
        return f"{seconds // 3600} h"
    if seconds % 60 == 0:
        return f"{seconds // 60} min"
    return f"{seconds} s"
