"""``tuanyuan schedules check`` and ``list``: shipped schedules pass, broken files fail
with one line naming the stage and the rule."""

from __future__ import annotations

from importlib import resources

import pytest

from engine import cli, schedules

SHIPPED_FILES = sorted(
    entry.name
    for entry in (resources.files("engine") / "data" / "schedules").iterdir()
    if entry.name.endswith(".toml")
)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def stage(radius_km: float, hours: float) -> str:
    return f"[[stage]]\nradius_km = {radius_km}\nduration_h = {hours}\n"


@pytest.mark.parametrize("name", sorted(schedules.SHIPPED))
def test_check_accepts_a_shipped_schedule_by_name(capsys, name):
    status, out, err = run(capsys, "schedules", "check", name)
    assert status == 0, err
    shipped = schedules.SHIPPED[name]
    assert f'a valid schedule "{name}"' in out
    # One line per stage with its radius, then the total duration.
    for stage_ in shipped.stages:
        radius = f"{stage_.radius_m / 1000:g} km"
        assert any(radius in line for line in out.splitlines()), radius
    hours = shipped.duration_s // 3600
    assert f"{len(shipped.stages)} stage(s), {hours} h in all" in out


@pytest.mark.parametrize("filename", SHIPPED_FILES)
def test_check_accepts_the_shipped_files(capsys, filename):
    path = resources.files("engine") / "data" / "schedules" / filename
    status, out, err = run(capsys, "schedules", "check", str(path))
    assert status == 0, err
    assert "a valid schedule" in out and err == ""


def test_check_explains_starts_ends_and_areas(capsys, tmp_path):
    path = tmp_path / "walk.toml"
    path.write_text(
        'name = "walk"\n' + stage(0.5, 0.5) + "[[stage]]\nradius_m = 1500\nduration_min = 90\n"
    )
    status, out, _ = run(capsys, "schedules", "check", str(path))
    assert status == 0
    lines = out.splitlines()
    first = next(line for line in lines if line.strip().startswith("1 "))
    second = next(line for line in lines if line.strip().startswith("2 "))
    # stage, radius, starts, lasts, ends, area (pi * 0.5^2 = 0.785 km²)
    assert first.split()[:5] == ["1", "500", "m", "0:00", "30"]
    assert "0:30" in first and "0.8 km²" in first
    assert "0:30" in second and "90 min" in second and "2:00" in second
    assert "2 stage(s), 2 h in all; the widest ring is 1.5 km" in out


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            stage(2, 1) + stage(1, 1),
            "stage 2: radius 1 km is smaller than the 2 km of stage 1; rings must not shrink",
        ),
        (
            stage(1, 1) + "[[stage]]\nradius_km = 2\nduration_s = 0\n",
            "stage 2: duration_s must be above 0",
        ),
        ('colour = "red"\n' + stage(1, 1), "unknown key(s) colour"),
        (
            stage(1, 1) + "[[stage]]\nradius_km = 2\nduration_h = 1\nspeed = 3\n",
            "stage 2: unknown key(s) speed",
        ),
        ("".join(stage(1 + k, 1) for k in range(17)), "a schedule has at most 16 stages, got 17"),
        ('name = "empty"\n', "a schedule needs at least one stage"),
        ("[[stage]]\nradius_km = 1\nradius_m = 1000\nduration_h = 1\n", "give exactly one radius"),
        ("[[stage]]\nradius_km = 1\nduration_s = 1.5\n", "whole number of seconds"),
        (stage(2000, 1), "at most 1000 km"),
        ("[[stage]\nradius_km = 1\n", "not valid TOML"),
    ],
)
def test_check_rejects_a_broken_schedule_with_its_reason(capsys, tmp_path, text, expected):
    path = tmp_path / "broken.toml"
    path.write_text(text)
    status, out, err = run(capsys, "schedules", "check", str(path))
    assert status == 2
    assert out == ""
    assert err.startswith(f"tuanyuan: {path}: ")
    assert expected in err
    assert err.count("\n") == 1  # one line, no traceback


def test_check_names_a_missing_file(capsys, tmp_path):
    status, _, err = run(capsys, "schedules", "check", str(tmp_path / "nowhere.toml"))
    assert status == 2
    assert err.startswith("tuanyuan: ") and "cannot read" in err


def test_check_names_an_unknown_schedule(capsys):
    status, _, err = run(capsys, "schedules", "check", "nonesuch")
    assert status == 2
    assert "unknown schedule 'nonesuch'" in err and "local" in err


def test_list_prints_every_shipped_schedule(capsys):
    status, out, _ = run(capsys, "schedules", "list")
    assert status == 0
    for name, shipped in schedules.SHIPPED.items():
        assert f"{name}: {shipped.description}" in out
        assert shipped.describe() in out
    assert "(3 h in all)" in out and "(24 h in all)" in out
