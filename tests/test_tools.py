"""Operator tools: population files, ``tuanyuan tune`` and the counting behind it.

Every count is checked against the brute-force haversine of ``tests/oracle.py`` on
generated populations, per gateway; proposals for goals are recomputed with the oracle
and must meet them.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, note
from hypothesis import strategies as st
from oracle import haversine_m
from support import destination, one_line_error, places, populations
from support import run_cli as run

from engine import population, populations_io, tuning
from engine.schedules import MAX_RADIUS_M, SHIPPED, Schedule, Stage

LOCAL = SHIPPED["local"]
# Radii of the counting tests: zero, the local schedule, the class disk, a region.
RADII = [0.0, 250.0, 1_000.0, 2_000.0, 3_000.0, 12_345.6, 60_000.0]


def oracle_counts(people: dict, lat: float, lng: float, radii) -> dict[int, list[int]]:
    """{gateway: [devices within each radius]} by brute force."""
    d = haversine_m(lat, lng, people["lat"], people["lng"])
    return {
        int(g): [int((d[people["gateway"] == g] <= r).sum()) for r in radii]
        for g in np.unique(people["gateway"])
    }


@pytest.fixture(scope="module")
def metro() -> dict[str, np.ndarray]:
    return population.metro(100_000, seed=11, city="Beijing")


@pytest.fixture(scope="module")
def files(tmp_path_factory, metro) -> dict[str, str]:
    """The metro population as Parquet and as CSV."""
    folder = tmp_path_factory.mktemp("people")
    paths = {"parquet": str(folder / "metro.parquet"), "csv": str(folder / "metro.csv")}
    for path in paths.values():
        populations_io.write(path, metro)
    return paths


@pytest.fixture(scope="module")
def counter(metro) -> tuning.RingCounter:
    return tuning.RingCounter(metro["lat"], metro["lng"], metro["gateway"])


# ---------------------------------------------------------------------------------------
# Counting against the oracle


def test_counts_match_the_oracle_per_gateway(metro, counter):
    rng = np.random.default_rng(3)
    rows = rng.integers(0, metro["lat"].size, 12)
    lat = np.append(metro["lat"][rows], [39.9042, 39.0, 40.5])
    lng = np.append(metro["lng"][rows], [116.4074, 116.0, 117.5])
    counts = counter.counts(lat, lng, RADII)
    assert counts.shape == (lat.size, 3, len(RADII))
    assert counter.gateways.tolist() == [1, 2, 3]
    for c in range(lat.size):
        expected = oracle_counts(metro, lat[c], lng[c], RADII)
        for s, g in enumerate(counter.gateways):
            assert counts[c, s].tolist() == expected[int(g)], (c, int(g))


def test_one_centre_per_stage_matches_the_oracle(metro, counter):
    lat, lng = float(metro["lat"][5]), float(metro["lng"][5])
    stages = tuning.reach_one(counter, lat, lng, LOCAL)
    expected = oracle_counts(metro, lat, lng, [s.radius_m for s in LOCAL.stages])
    previous = dict.fromkeys(expected, 0)
    cumulative = 0
    for k, got in enumerate(stages):
        new = {g: expected[g][k] - previous[g] for g in expected}
        previous = {g: expected[g][k] for g in expected}
        cumulative += sum(new.values())
        assert got.per_gateway == new
        assert got.new == sum(new.values())
        assert got.cumulative == cumulative
        assert (got.radius_m, got.duration_s) == (LOCAL.stages[k].radius_m, 3600)


def test_a_ring_over_a_pole_and_across_the_antimeridian():
    rng = np.random.default_rng(5)
    lat_a, lng_a = destination(
        89.99, 0.0, rng.uniform(0, 300_000, 4_000), rng.uniform(0, 360, 4_000)
    )
    lat_b, lng_b = destination(
        -16.5, 179.99, rng.uniform(0, 80_000, 4_000), rng.uniform(0, 360, 4_000)
    )
    people = {
        "lat": np.concatenate([lat_a, lat_b]),
        "lng": np.concatenate([lng_a, lng_b]),
        "gateway": np.repeat(np.array([0, 9], dtype=np.uint16), 4_000),
    }
    counter = tuning.RingCounter(people["lat"], people["lng"], people["gateway"])
    radii = [1_000.0, 50_000.0, 150_000.0, 400_000.0]
    for lat, lng in [(90.0, 0.0), (89.5, 120.0), (-16.5, -180.0), (-16.4, 179.9), (-17.0, -179.5)]:
        got = counter.counts(lat, lng, radii)[0]
        expected = oracle_counts(people, lat, lng, radii)
        assert got.tolist() == [expected[0], expected[9]], (lat, lng)


@given(
    people=populations(max_per_cluster=150),
    centre=places(),
    radii=st.lists(st.floats(0.0, MAX_RADIUS_M), min_size=1, max_size=5),
    on_device=st.booleans(),
    cell_m=st.sampled_from([50.0, 250.0, 5_000.0]),
)
def test_counting_property_against_the_oracle(people, centre, radii, on_device, cell_m):
    """Any clustered population (poles, antimeridian, pentagons, one spot), any centre,
    any radii: the count per gateway is the oracle's, up to devices within a micrometre
    of a boundary."""
    lat, lng = (float(people.lat[0]), float(people.lng[0])) if on_device else centre
    # Radii just either side of a device's distance decide the boundary itself.
    d = haversine_m(lat, lng, people.lat, people.lng)
    radii = sorted(
        {*radii, *[min(float(x) + s, MAX_RADIUS_M) for x in d[:3] for s in (-0.01, 0.0, 0.01)]}
    )
    radii = [max(r, 0.0) for r in radii]
    note(f"centre {lat}, {lng}; radii {radii}")
    counter = tuning.RingCounter(people.lat, people.lng, people.gateways, cell_m=cell_m)
    got = counter.counts(lat, lng, radii)[0]
    for s, g in enumerate(counter.gateways):
        mine = d[people.gateways == g]
        for k, r in enumerate(radii):
            low = int((mine <= r - 1e-6).sum())
            high = int((mine <= r + 1e-6).sum())
            assert low <= got[s, k] <= high, (int(g), r, got[s, k], low, high)


def test_counter_refuses_bad_input(counter):
    with pytest.raises(ValueError, match="ascending"):
        counter.counts(39.9, 116.4, [2_000.0, 1_000.0])
    with pytest.raises(ValueError, match="from 0 to"):
        counter.counts(39.9, 116.4, [-1.0])
    with pytest.raises(ValueError, match="not a valid position"):
        counter.counts([39.9, 95.0], [116.4, 116.4], [1_000.0])
    with pytest.raises(ValueError, match="row 1"):
        tuning.RingCounter(np.array([1.0, np.nan]), np.array([2.0, 3.0]), np.zeros(2))


def test_sampled_reach_matches_the_oracle(metro, counter):
    centres = tuning.sample_centres(metro["lat"], metro["lng"], 30, seed=4, share_box=0.2)
    assert len(centres) == 30 and int((~centres.from_device).sum()) == 6
    sampled = tuning.reach_sampled(
        counter, centres, LOCAL, city_per_km2=1_000.0, suburb_per_km2=100.0
    )
    radii = [s.radius_m for s in LOCAL.stages]
    area = tuning.disk_area_km2(1_000.0)
    totals = []
    for c in range(len(centres)):
        expected = oracle_counts(metro, centres.lat[c], centres.lng[c], [*radii, 1_000.0])
        for s, g in enumerate(sampled.gateways):
            assert sampled.cumulative[c, s].tolist() == expected[int(g)][:3]
        within = sum(v[3] for v in expected.values())
        assert sampled.classes[c] == (
            0 if within >= 1_000 * area else 1 if within >= 100 * area else 2
        )
        totals.append([sum(v[k] for v in expected.values()) for k in range(3)])
    totals = np.array(totals)
    spreads = sampled.stage_spreads()
    new = np.diff(totals, axis=1, prepend=0)
    for k in range(3):
        for q in (10, 50, 90):
            assert spreads[k]["cumulative_recipients"][f"p{q}"] == pytest.approx(
                np.percentile(totals[:, k], q)
            )
            assert spreads[k]["new_recipients"][f"p{q}"] == pytest.approx(
                np.percentile(new[:, k], q)
            )


# ---------------------------------------------------------------------------------------
# Population files


@pytest.mark.parametrize("kind", ["parquet", "csv"])
def test_synth_then_info_round_trip(capsys, tmp_path, kind):
    path = tmp_path / f"people.{kind}"
    status, out, err = run(
        capsys, f"population synth --kind metro --n 20000 --seed 3 --city Shanghai --out {path}"
    )
    assert status == 0, err
    assert f"wrote 20,000 devices (metro Shanghai, seed 3) to {path}" in out

    read = populations_io.read(path)
    made = population.metro(20_000, seed=3, city="Shanghai")
    for name, column in made.items():
        got = read.columns()[name]
        assert got.dtype == column.dtype and np.array_equal(got, column), name
    if kind == "parquet":
        schema = pq.read_schema(path)
        types = [schema.field(n).type for n in ("device_id", "lat", "lng", "gateway")]
        assert types == [pa.uint64(), pa.float64(), pa.float64(), pa.uint16()]

    status, out, err = run(capsys, "population info", path)
    assert status == 0, err
    assert f"({kind}): 20,000 devices" in out
    counts = np.bincount(made["gateway"])
    for g in (1, 2, 3):
        assert f"gateway {g}: {counts[g]:,} devices ({100 * counts[g] / 20_000:.1f} %)" in out
    assert f"latitude {made['lat'].min():.5f} to {made['lat'].max():.5f}" in out
    assert "devices/km²" in out and "within 1 km: " in out and "10 km: " in out


def test_info_density_matches_the_oracle(metro, counter):
    found = tuning.density(metro["lat"], metro["lng"], counter)
    assert found.max_per_km2 >= found.p90_per_km2 >= found.p50_per_km2 > 0
    expected = oracle_counts(
        {**metro, "gateway": np.zeros(metro["lat"].size)},
        found.densest_lat,
        found.densest_lng,
        [1_000.0, 3_000.0, 10_000.0],
    )[0]
    assert list(found.around_densest.values()) == expected
    # The densest 1 km cell holds its density times about 1 km² of devices.
    assert 0.5 < found.max_per_km2 / expected[0] * math.pi < 4.0


def test_synth_nation_and_its_flags(capsys, tmp_path):
    path = tmp_path / "nation.parquet"
    status, out, _ = run(
        capsys, f"population synth --kind nation --n 5000 --country FR --out {path}"
    )
    assert status == 0 and "nation FR" in out and len(populations_io.read(path)) == 5_000
    status, _, err = run(capsys, f"population synth --kind nation --n 10 --city Paris --out {path}")
    assert status == 2 and "--city is for --kind metro" in one_line_error(err)
    status, _, err = run(capsys, f"population synth --kind metro --n 10 --city Qqqzzx --out {path}")
    assert status == 2 and "unknown city 'Qqqzzx'" in one_line_error(err)
    status, _, err = run(capsys, "population synth --kind metro --n 10 --out", tmp_path / "x.txt")
    assert status == 2 and "must end in .parquet or .csv" in one_line_error(err)


def test_csv_without_gateway_puts_everyone_on_gateway_0(capsys, tmp_path):
    path = tmp_path / "plain.csv"
    path.write_text("device_id,lng,lat,extra\n18446744073709551615,116.4,39.9,x\n7,116.41,39.9,y\n")
    read = populations_io.read(path)
    assert not read.gateway_given
    assert read.device_id.tolist() == [2**64 - 1, 7]
    assert read.gateway.tolist() == [0, 0] and read.gateway.dtype == np.uint16
    assert read.lat.tolist() == [39.9, 39.9] and read.lng.tolist() == [116.4, 116.41]
    status, out, _ = run(capsys, "population info", path)
    assert status == 0 and "no gateway column: every device on gateway 0" in out


def _csv(tmp_path, text: str, name: str = "bad.csv") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _parquet(tmp_path, columns: dict, name: str = "bad.parquet") -> str:
    path = tmp_path / name
    pq.write_table(pa.table(columns), path)
    return str(path)


GOOD_ROWS = "device_id,lat,lng,gateway\n1,39.9,116.4,1\n2,39.91,116.41,1\n3,39.92,116.42,2\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("device_id,lng\n1,116.4\n", "missing column lat (columns present: device_id, lng"),
        ("id,lat,lng\n1,39.9,116.4\n", "missing column device_id"),
        (GOOD_ROWS + "4,91.5,116.4,1\n", "column lat, row 4: 91.5 is outside [-90, 90]"),
        (GOOD_ROWS + "4,39.9,-180.5,1\n", "column lng, row 4: -180.5 is outside [-180, 180]"),
        (GOOD_ROWS + "4,nan,116.4,1\n", "column lat, row 4: nan is not a finite number"),
        (GOOD_ROWS + "4,inf,116.4,1\n", "column lat, row 4: inf is not a finite number"),
        (GOOD_ROWS + "4,39.9,east,1\n", "column lng, row 4: 'east' is not a number"),
        (GOOD_ROWS + "4,,116.4,1\n", "column lat, row 4: empty"),
        (GOOD_ROWS + "-4,39.9,116.4,1\n", "column device_id, row 4: -4 is negative"),
        (GOOD_ROWS + "4.5,39.9,116.4,1\n", "column device_id, row 4: '4.5' is not a whole number"),
        (GOOD_ROWS + "4,39.9,116.4,70000\n", "column gateway, row 4: 70000 is above 65535"),
        (GOOD_ROWS + "4,39.9,116.4,two\n", "column gateway, row 4: 'two' is not a whole number"),
        (
            GOOD_ROWS + "1,39.9,116.4,2\n3,39.0,116.0,2\n",
            "row 5 repeats the device of row 3 (gateway 2, device_id 3)",
        ),
        ("device_id,lat,lng\n", "no devices"),
        ("", "not a readable CSV file"),
    ],
)
def test_a_bad_csv_is_named_by_column_and_row(capsys, tmp_path, text, expected):
    path = _csv(tmp_path, text)
    status, out, err = run(capsys, "population info", path)
    assert status == 2 and out == ""
    message = one_line_error(err)
    assert message.startswith(f"tuanyuan: {path}: ")
    assert expected in message


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        (
            {"device_id": [1, 2, 3], "lat": [39.9, 39.9, 39.9], "lng": [116.4, np.nan, 116.4]},
            "column lng, row 2: nan is not a finite number",
        ),
        (
            {"device_id": [1, 2, 3], "lat": [39.9, 39.9, -95.0], "lng": [116.4, 116.4, 116.4]},
            "column lat, row 3: -95.0 is outside [-90, 90]",
        ),
        (
            {"device_id": [1, 2, 3], "lat": ["39.9", "39.9", "north"], "lng": [1.0, 2.0, 3.0]},
            "column lat, row 3: 'north' is not a number",
        ),
        (
            {"device_id": [1, 2], "lat": [True, False], "lng": [1.0, 2.0]},
            "column lat, row 1: True is stored as bool",
        ),
        (
            {"device_id": [1.0, 2.0], "lat": [1.0, 2.0], "lng": [1.0, 2.0]},
            "column device_id, row 1: 1.0 is stored as double; device_id needs an integer type",
        ),
        (
            {"device_id": [1, None], "lat": [1.0, 2.0], "lng": [1.0, 2.0]},
            "column device_id, row 2: empty",
        ),
        ({"device_id": [1, 2], "lng": [1.0, 2.0]}, "missing column lat"),
        (
            {"device_id": [5, 5], "lat": [1.0, 2.0], "lng": [1.0, 2.0], "gateway": [0, 0]},
            "row 2 repeats the device of row 1 (gateway 0, device_id 5)",
        ),
    ],
)
def test_a_bad_parquet_is_named_by_column_and_row(capsys, tmp_path, columns, expected):
    path = _parquet(tmp_path, columns)
    status, _, err = run(capsys, "population info", path)
    assert status == 2
    assert expected in one_line_error(err)


def test_integer_degrees_and_shared_ids_across_gateways_are_fine(tmp_path):
    path = _parquet(
        tmp_path,
        {
            "device_id": pa.array([5, 5, 6], pa.int64()),
            "lat": pa.array([40, 40, -33], pa.int32()),
            "lng": pa.array([116, 116, 151], pa.int16()),
            "gateway": pa.array([1, 2, 1], pa.int32()),
        },
    )
    read = populations_io.read(path)
    assert read.lat.dtype == np.float64 and read.lat.tolist() == [40.0, 40.0, -33.0]
    assert read.gateway.tolist() == [1, 2, 1] and read.device_id.dtype == np.uint64


def test_a_missing_file_and_a_non_parquet_file(capsys, tmp_path):
    status, _, err = run(capsys, "population info", tmp_path / "none.parquet")
    assert status == 2 and "no such file" in one_line_error(err)
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet at all")
    status, _, err = run(capsys, "population info", junk)
    assert status == 2 and "not a readable Parquet file" in one_line_error(err)


def test_the_real_command_prints_no_traceback(tmp_path):
    path = _csv(tmp_path, GOOD_ROWS + "4,39.9,116.4,x\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine.cli",
            "tune",
            "--population",
            path,
            "--center",
            "39.9,116.4",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"tuanyuan: {path}: column gateway, row 4: 'x' is not a whole number"
    )
    assert "Traceback" not in done.stderr and done.stdout == ""


# ---------------------------------------------------------------------------------------
# tuanyuan tune


@pytest.mark.parametrize("kind", ["parquet", "csv"])
def test_tune_one_centre_json_matches_the_oracle(capsys, tmp_path, metro, files, kind):
    lat, lng = float(metro["lat"][42]), float(metro["lng"][42])
    out_json = tmp_path / "one.json"
    status, out, err = run(
        capsys,
        f"tune --population {files[kind]} --center {lat!r},{lng!r} --schedule local",
        "--json",
        out_json,
    )
    assert status == 0, err
    document = json.loads(out_json.read_text())
    assert set(document) >= {"stages", "centre", "schedule", "population"}
    expected = oracle_counts(metro, lat, lng, [1_000.0, 2_000.0, 3_000.0])
    cumulative = 0
    for k, row in enumerate(document["stages"]):
        assert list(row)[:4] == [
            "radius_m",
            "duration_s",
            "new_recipients",
            "cumulative_recipients",
        ]
        new = {str(g): v[k] - (v[k - 1] if k else 0) for g, v in expected.items()}
        cumulative += sum(new.values())
        assert row["radius_m"] == 1_000.0 * (k + 1) and row["duration_s"] == 3_600
        assert row["per_gateway"] == new
        assert row["new_recipients"] == sum(new.values())
        assert row["cumulative_recipients"] == cumulative
        # The printed table says the same.
        assert f"{row['new_recipients']:,}" in out.splitlines()[4 + k]


WIDE = Schedule((Stage(2_000.0, 3_600), Stage(4_500.0, 7_200)), name="wide")


def test_schedules_counted_together_match_each_counted_alone(metro, counter):
    together = tuning.reach_one_each(counter, 39.91, 116.41, [LOCAL, WIDE])
    assert together == [tuning.reach_one(counter, 39.91, 116.41, s) for s in (LOCAL, WIDE)]
    expected = oracle_counts(metro, 39.91, 116.41, [2_000.0, 4_500.0])
    assert [s.cumulative for s in together[1]] == [
        sum(v[k] for v in expected.values()) for k in range(2)
    ]
    centres = tuning.sample_centres(metro["lat"], metro["lng"], 20, seed=2, share_box=0.1)
    options = {"city_per_km2": 1_000.0, "suburb_per_km2": 100.0}
    each = tuning.reach_sampled_each(counter, centres, [LOCAL, WIDE], **options)
    for schedule, sampled in zip((LOCAL, WIDE), each, strict=True):
        alone = tuning.reach_sampled(counter, centres, schedule, **options)
        assert np.array_equal(sampled.cumulative, alone.cumulative)
        assert np.array_equal(sampled.classes, alone.classes)


def test_tune_compares_schedules_side_by_side(capsys, tmp_path, metro, files):
    wide = tmp_path / "wide.toml"
    wide.write_text(
        'name = "wide"\n[[stage]]\nradius_km = 2\nduration_h = 1\n'
        "[[stage]]\nradius_m = 4500\nduration_h = 2\n"
    )
    lat, lng = float(metro["lat"][7]), float(metro["lng"][7])
    one, both = tmp_path / "one.json", tmp_path / "both.json"
    centre = f"--center {lat!r},{lng!r}"
    single = f"tune --population {files['parquet']} {centre} --schedule {wide} --json {one}"
    assert run(capsys, single)[0] == 0

    def compare(where: str) -> tuple[dict, str]:
        status, out, err = run(
            capsys,
            f"tune --population {files['parquet']} {where} --schedule local --schedule {wide}",
            "--json",
            both,
        )
        assert status == 0, err
        return json.loads(both.read_text()), out

    document, out = compare(centre)
    assert [s["schedule"]["name"] for s in document["schedules"]] == ["local", "wide"]
    assert document["schedules"][1]["stages"] == json.loads(one.read_text())["stages"]
    assert "schedule local:" in out and "schedule wide:" in out

    document, _ = compare("--samples 10")
    assert document["centres"]["count"] == 10
    assert [len(s["stages"]) for s in document["schedules"]] == [3, 2]

    status, _, err = run(
        capsys, f"tune --population {files['parquet']} {centre} --schedule local --schedule "
        f"{wide} --movement",
    )  # fmt: skip
    assert status == 2 and "take one" in one_line_error(err)


def test_tune_sampled_json_shape_and_percentiles(capsys, tmp_path, metro, files):
    out_json = tmp_path / "sampled.json"
    status, out, err = run(
        capsys,
        f"tune --population {files['parquet']} --samples 25 --seed 9 --city-density 2000 "
        f"--suburb-density 200 --json {out_json}",
    )
    assert status == 0, err
    document = json.loads(out_json.read_text())
    centres = document["centres"]
    assert centres["count"] == 25 and centres["from_devices"] + centres["from_bounding_box"] == 25
    positions = centres["positions"]
    assert len(positions) == 25
    totals = np.array(
        [
            np.sum(list(oracle_counts(metro, p["lat"], p["lng"], [1e3, 2e3, 3e3]).values()), 0)
            for p in positions
        ]
    )
    for k, row in enumerate(document["stages"]):
        assert list(row)[:4] == [
            "radius_m",
            "duration_s",
            "new_recipients",
            "cumulative_recipients",
        ]
        assert set(row["new_recipients"]) == {"p10", "p50", "p90"}
        assert set(row["per_gateway"]) == {"1", "2", "3"}
        for q in (10, 50, 90):
            assert row["cumulative_recipients"][f"p{q}"] == pytest.approx(
                np.percentile(totals[:, k], q)
            )
    classes = {name: document["centres"]["classes"][name] for name in tuning.CLASSES}
    assert sum(classes.values()) == 25
    for name, part in document["by_class"].items():
        assert part["centres"] == classes[name]
        assert len(part["stages"]) == (3 if part["centres"] else 0)
    assert "all 25 centres" in out and "p10 / p50 / p90" in out


def test_tune_target_meets_its_goals_by_the_oracle(capsys, tmp_path, metro, files):
    out_json = tmp_path / "target.json"
    saved = tmp_path / "tuned.toml"
    status, out, err = run(
        capsys,
        f"tune --population {files['parquet']} --target --samples 30 --min-first-hour 250 "
        "--max-new-per-stage 1500 --max-gateway-rate 100 --push-minutes 4 "
        f"--json {out_json} --save-schedule {saved}",
    )
    assert status == 0, err
    document = json.loads(out_json.read_text())
    radii = [row["radius_m"] for row in document["stages"]]
    assert radii == sorted(radii) and len(radii) == 3
    assert [row["duration_s"] for row in document["stages"]] == [3600, 3600, 3600]
    bindings = {"schedule", "previous", "min_first", "max_new", "max_gateway_rate"}
    assert {row["binding"] for row in document["stages"]} <= bindings
    assert all(row["goals_met"] for row in document["stages"])
    assert "pushed evenly over its first 4 min" in document["target"]["assumption"]

    # Recompute every goal with the oracle at the sampled centres.
    cumulative = np.array(
        [
            [oracle_counts(metro, p["lat"], p["lng"], radii)[g] for g in (1, 2, 3)]
            for p in document["centres"]["positions"]
        ]
    )  # (centres, gateways, stages)
    new = np.diff(cumulative, axis=2, prepend=0)
    assert np.percentile(cumulative[:, :, 0].sum(axis=1), 50) >= 250
    assert np.all(np.percentile(new.sum(axis=1), 90, axis=0) <= 1_500)
    assert np.all(np.percentile(new.max(axis=1) / 4.0, 90, axis=0) <= 100)
    # The proposal is written as a schedule that checks.
    status, _, err = run(capsys, "schedules check", saved)
    assert status == 0, err
    assert "why" in out and ("raised" in out or "lowered" in out or "kept" in out)


def test_tune_target_reports_goals_it_cannot_meet(capsys, files):
    status, out, err = run(
        capsys,
        f"tune --population {files['parquet']} --target --samples 10 --min-first-hour 5000 "
        "--max-new-per-stage 100",
    )
    assert status == 1
    assert "the cap wins" in out
    assert "goals cannot all be met" in err


def test_propose_moves_radii_only_as_far_as_a_goal_demands():
    # Two centres, one gateway; counts grow by 10 devices per candidate radius.
    radii = np.arange(1.0, 11.0) * 1_000.0
    counts = np.stack([np.arange(1, 11) * 10, np.arange(1, 11) * 20])[:, None, :]
    schedule = Schedule((Stage(2_000.0, 3600), Stage(3_000.0, 3600), Stage(9_000.0, 3600)))
    goals = tuning.Goals(min_first=55, max_new=80, percentile=50, cap_percentile=100)
    first, second, third = tuning.propose(counts, radii, schedule, goals)
    # p50 of (10k, 20k) is 15k at radius k km: 55 needs 4 km.
    assert (first.radius_m, first.binding, first.met) == (4_000.0, "min_first", True)
    assert first.lowest_m == 4_000.0
    # Stage 2 would shrink below 4 km: held there.
    assert (second.radius_m, second.binding) == (4_000.0, "previous")
    # Stage 3: the busier centre gets 20 new devices per km: 80 allows 4 km more.
    assert (third.radius_m, third.binding) == (8_000.0, "max_new")
    assert "lowered from 9 km to 8 km by --max-new-per-stage 80" in third.reason
    kept = tuning.propose(counts, radii, schedule, tuning.Goals(max_new=10_000))
    assert [p.radius_m for p in kept] == [2_000.0, 3_000.0, 9_000.0]
    assert all(p.binding == "schedule" for p in kept)


def test_tune_flags_are_checked(capsys, files):
    population_file = files["parquet"]
    cases = [
        ("--center 39.9", "--center takes LAT,LNG"),
        ("--center 95,116", "latitude 95 is outside [-90, 90]"),
        ("--movement", "--movement simulates one alert"),
        ("--max-new-per-stage 5", "goals for --target"),
        ("--target", "--target needs at least one goal"),
        ("--samples 0", "--samples must be at least 1"),
        ("--schedule nonesuch", "unknown schedule 'nonesuch'"),
        ("--center 39.9,116.4 --movement --share-still 0.9 --share-walk 0.2", "is above 1"),
    ]
    for extra, expected in cases:
        status, _, err = run(capsys, f"tune --population {population_file} {extra}")
        assert status == 2, extra
        assert expected in one_line_error(err), extra


# ---------------------------------------------------------------------------------------
# Movement


def test_movement_with_everyone_still_is_the_static_answer(capsys, tmp_path, metro, files):
    lat, lng = float(metro["lat"][7]), float(metro["lng"][7])
    out_json = tmp_path / "still.json"
    status, _, err = run(
        capsys,
        f"tune --population {files['parquet']} --center {lat!r},{lng!r} --movement "
        f"--share-still 1 --share-walk 0 --json {out_json}",
    )
    assert status == 0, err
    rows = json.loads(out_json.read_text())["stages"]
    static = tuning.reach_one(
        tuning.RingCounter(metro["lat"], metro["lng"], metro["gateway"]), lat, lng, LOCAL
    )
    for row, expected in zip(rows, static, strict=True):
        assert row["new_recipients"] == row["static_new_recipients"] == expected.new
        assert row["cumulative_recipients"] == expected.cumulative
        assert row["per_gateway"] == {str(g): v for g, v in expected.per_gateway.items()}
        assert (row["swept_at_start"], row["walked_in"]) == (expected.new, 0)


def test_moving_people_walk_into_the_rings(metro, counter):
    centre = (float(metro["lat"][3]), float(metro["lng"][3]))
    movement = tuning.Movement(share_still=0.2, share_walk=0.5, step_s=600.0)
    args = (metro["lat"], metro["lng"], metro["gateway"], centre, (39.9042, 116.4074), LOCAL)
    moving = tuning.reach_moving(*args, movement, seed=5)
    again = tuning.reach_moving(*args, movement, seed=5)
    other = tuning.reach_moving(*args, movement, seed=6)
    assert np.array_equal(moving.notified_step, again.notified_step)
    assert not np.array_equal(moving.notified_step, other.notified_step)

    static = tuning.reach_one(counter, *centre, LOCAL)
    # The first sweep happens before anyone moves.
    assert moving.per_stage[0]["swept"] == static[0].new
    walked = sum(stage["walked_in"] for stage in moving.per_stage)
    assert walked > 0
    for stage in moving.per_stage:
        assert stage["swept"] + stage["walked_in"] == stage["new"]
        assert sum(stage["per_gateway"].values()) == stage["new"]
    # 18 steps of 10 minutes over 3 hours; the curve only grows and ends at the total.
    assert moving.step_t.tolist() == [600.0 * k for k in range(18)]
    assert np.all(np.diff(moving.reach_curve) >= 0)
    assert moving.reach_curve[-1] == sum(stage["new"] for stage in moving.per_stage)
    assert moving.reach_curve[-1] == int((moving.notified_step >= 0).sum())


def test_movement_parameters_are_checked():
    with pytest.raises(ValueError, match="share_still"):
        tuning.Movement(share_still=1.5)
    with pytest.raises(ValueError, match="at most 1"):
        tuning.Movement(share_still=0.7, share_walk=0.5)
    with pytest.raises(ValueError, match="step_s"):
        tuning.Movement(step_s=0.0)
    with pytest.raises(ValueError, match="trip_max_m"):
        tuning.Movement(trip_min_m=5_000.0, trip_max_m=1_000.0)


def test_steps_cover_every_stage_start():
    schedule = Schedule((Stage(1_000.0, 90), Stage(2_000.0, 400)))
    times, stages, first = tuning.steps_of(schedule, 60.0)
    assert times.tolist() == [0, 60, 90, 150, 210, 270, 330, 390, 450]
    assert stages.tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 1]
    assert first.tolist() == [0, 2]


# ---------------------------------------------------------------------------------------
# Charts


def test_plots_are_written(capsys, tmp_path, files, metro):
    folder = tmp_path / "charts"
    lat, lng = float(metro["lat"][1]), float(metro["lng"][1])
    status, _, err = run(
        capsys,
        f"tune --population {files['parquet']} --center {lat},{lng} --movement --plot {folder}",
    )
    assert status == 0, err
    for name in ("rings.png", "reach.png"):
        data = (folder / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    status, _, err = run(
        capsys, f"tune --population {files['parquet']} --samples 12 --plot", folder / "s"
    )
    assert status == 0, err
    assert (folder / "s" / "rings.png").stat().st_size > 10_000
