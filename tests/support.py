"""Shared test helpers: a fake clock, awkward places on the globe, and hypothesis
strategies for clustered device populations.

Populations are clustered on purpose: uniformly scattered devices would leave small
rings empty, and an empty answer agrees with any oracle.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import strategies as st
from oracle import EARTH_RADIUS_M, HALF_CIRCUMFERENCE_M, Key, haversine_m

#: A fixed "now" for tests (November 2023), far from both ends of the u32 seconds range.
T0 = 1_700_000_000.0


class FakeClock:
    """A clock the test moves by hand, so expiry never depends on how fast tests run."""

    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


#: The twelve icosahedron vertices: H3 puts a pentagon here at every resolution, where
#: cells are most distorted.
PENTAGONS = [
    (64.7, 10.536199),
    (50.103201, -143.47849),
    (39.1, 122.3),
    (23.717925, -67.132326),
    (10.447345, 58.157706),
    (2.300882, -5.24539),
    (-2.300882, 174.75461),
    (-10.447345, -121.842294),
    (-23.717925, 112.867674),
    (-39.1, -57.7),
    (-50.103201, 36.52151),
    (-64.7, -169.463801),
]

#: Poles, both sides of the antimeridian, the origin, a few cities, the pentagons.
SPECIAL_PLACES = [
    (90.0, 0.0),
    (90.0, 135.0),
    (-90.0, 0.0),
    (-90.0, -180.0),
    (0.0, 180.0),
    (0.0, -180.0),
    (51.5, 180.0),
    (-17.7, -180.0),
    (65.9, 179.99999),
    (0.0, 0.0),
    (89.9999, -45.0),
    (39.9042, 116.4074),
    (31.2304, 121.4737),
    (22.3193, 114.1694),
    *PENTAGONS,
]

latitudes = st.floats(-90.0, 90.0, allow_nan=False)
longitudes = st.floats(-180.0, 180.0, allow_nan=False)


def places() -> st.SearchStrategy[tuple[float, float]]:
    """Points on the globe, biased towards the places where indexes break."""
    return st.one_of(
        st.sampled_from(SPECIAL_PLACES),
        st.tuples(st.sampled_from([-90.0, 90.0]), longitudes),
        st.tuples(latitudes, st.sampled_from([-180.0, 180.0])),
        st.tuples(latitudes, longitudes),
    )


def destination(
    lat: float, lng: float, distance_m: np.ndarray, bearing_deg: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Points ``distance_m`` away from (lat, lng) along initial bearings, in degrees,
    latitudes within [-90, 90] and longitudes within [-180, 180)."""
    p1, l1 = math.radians(lat), math.radians(lng)
    delta = np.asarray(distance_m, dtype=np.float64) / EARTH_RADIUS_M
    theta = np.radians(np.asarray(bearing_deg, dtype=np.float64))
    sin_p2 = math.sin(p1) * np.cos(delta) + math.cos(p1) * np.sin(delta) * np.cos(theta)
    p2 = np.arcsin(np.clip(sin_p2, -1.0, 1.0))
    l2 = l1 + np.arctan2(
        np.sin(theta) * np.sin(delta) * math.cos(p1), np.cos(delta) - math.sin(p1) * sin_p2
    )
    lat2 = np.clip(np.degrees(p2), -90.0, 90.0)
    lng2 = (np.degrees(l2) + 180.0) % 360.0 - 180.0
    return lat2, lng2


@dataclass
class Population:
    """Devices as columns, one row each; (gateway, id) pairs are distinct."""

    gateways: np.ndarray
    ids: np.ndarray
    lat: np.ndarray
    lng: np.ndarray
    anchors: list[tuple[float, float]]

    def __len__(self) -> int:
        return len(self.ids)

    def keys(self) -> list[Key]:
        return list(zip(self.gateways.tolist(), self.ids.tolist(), strict=True))

    def positions(self) -> dict[Key, tuple[float, float]]:
        coords = zip(self.lat.tolist(), self.lng.tolist(), strict=True)
        return dict(zip(self.keys(), coords, strict=True))


#: Cluster sizes in metres: one spot, a room, a street, a town, a region, a country.
SPREADS_M = [0.0, 0.8, 6.0, 80.0, 1_500.0, 40_000.0, 600_000.0]


@st.composite
def populations(draw: st.DrawFn, max_clusters: int = 4, max_per_cluster: int = 250) -> Population:
    """Clusters of devices around awkward places. Hypothesis picks the structure
    (anchors, spreads, sizes, how ids are shared) and a seed; numpy fills in the
    positions, which keeps large populations cheap to generate."""
    clusters = draw(
        st.lists(
            st.tuples(places(), st.sampled_from(SPREADS_M), st.integers(1, max_per_cluster)),
            min_size=1,
            max_size=max_clusters,
        )
    )
    at_anchor = draw(st.sampled_from([0.0, 0.1, 0.5]))
    shared_ids = draw(st.booleans())
    id_base = draw(st.sampled_from([0, 2**32, 2**63, None]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

    lats, lngs = [], []
    for (alat, alng), spread, count in clusters:
        distance = spread * np.sqrt(rng.random(count))
        lat, lng = destination(alat, alng, distance, rng.uniform(0.0, 360.0, count))
        exact = rng.random(count) < at_anchor
        # Exactly the anchor's coordinates, not a round trip through trigonometry.
        lats.append(np.where(exact, alat, lat))
        lngs.append(np.where(exact, alng, lng))
    lat, lng = np.concatenate(lats), np.concatenate(lngs)
    n = lat.size
    if id_base is None:
        id_base = 2**64 - n  # ends on the largest id
    if shared_ids:
        # Each id on two gateways for two different phones: the keys stay distinct.
        ids = id_base + np.arange(n, dtype=np.uint64) // 2
        gateways = np.where(np.arange(n) % 2 == 0, 0, 65535).astype(np.uint16)
    else:
        ids = id_base + np.arange(n, dtype=np.uint64)
        gateways = rng.choice(np.array([0, 1, 7, 65535], dtype=np.uint16), n)
    ids = ids.astype(np.uint64)
    return Population(gateways, ids, lat, lng, [c[0] for c in clusters])


@st.composite
def queries(draw: st.DrawFn, population: Population) -> tuple[float, float, float]:
    """A centre and a radius up to 19,000 km that make a meaningful test of
    ``population``: centres on devices, anchors and awkward places; radii of zero,
    of a few metres, just either side of a device, and up to continental."""
    n = len(population)
    centre = draw(
        st.one_of(
            st.integers(0, n - 1).map(lambda i: (population.lat[i], population.lng[i])),
            st.sampled_from(population.anchors),
            places(),
        )
    )
    lat, lng = float(centre[0]), float(centre[1])
    kind = draw(st.sampled_from(["zero", "tiny", "edge", "log", "wide"]))
    if kind == "zero":
        radius = 0.0
    elif kind == "tiny":
        radius = draw(st.floats(0.0, 10.0))
    elif kind == "edge":
        # A device just inside or just outside: the boundary must be decided to 1 m.
        i = draw(st.integers(0, n - 1))
        d = float(haversine_m(lat, lng, population.lat[i], population.lng[i]))
        radius = max(0.0, d + draw(st.sampled_from([-1, 1])) * draw(st.floats(1.05, 30.0)))
        # Boundaries near the centre's antipode have a test of their own.
        radius = min(radius, 19_000_000.0)
    elif kind == "log":
        radius = 10 ** draw(st.floats(0.0, math.log10(500_000.0)))
    else:
        radius = draw(st.floats(500_000.0, 19_000_000.0))
    return lat, lng, radius


#: Radii that hold the whole sphere.
EVERYTHING_M = [HALF_CIRCUMFERENCE_M, HALF_CIRCUMFERENCE_M + 1.0, 1e9]


def answer(
    index: object, lat: float, lng: float, radius: float, now: float | None = None
) -> list[Key]:
    """Keys answered for a ring (at the index's clock by default), after checking that
    ``within`` and ``within_keys`` agree and return the documented dtypes."""
    gateways, ids = index.within_keys(lat, lng, radius, now=now)
    assert gateways.dtype == np.uint16 and ids.dtype == np.uint64
    assert gateways.shape == ids.shape and ids.ndim == 1
    plain = index.within(lat, lng, radius, now=now)
    assert plain.dtype == np.uint64
    # `within` drops the gateway: the same multiset of ids, duplicates included.
    assert sorted(plain.tolist()) == sorted(ids.tolist())
    return list(zip(gateways.tolist(), ids.tolist(), strict=True))


# The command line, run in this process.


def run_cli(capsys, *argv: object) -> tuple[int, str, str]:
    """``tuanyuan ARGV...`` in this process: (status, stdout, stderr). A string argument
    is split like a shell line; other values (paths) are passed as one word."""
    from engine import cli

    words: list[str] = []
    for arg in argv:
        words.extend(shlex.split(arg) if isinstance(arg, str) else [str(arg)])
    status = cli.main(words)
    out, err = capsys.readouterr()
    return status, out, err


def one_line_error(err: str) -> str:
    """The message of a refused command: exactly one ``tuanyuan:`` line on stderr, and no
    traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("tuanyuan: "), err
    assert "Traceback" not in err
    return lines[0]


def help_text(capsys, *command: str) -> str:
    """``tuanyuan COMMAND --help``, its whitespace folded to single spaces."""
    from engine import cli

    with pytest.raises(SystemExit):  # argparse exits after the help
        cli.main([*command, "--help"])
    return " ".join(capsys.readouterr().out.split())
