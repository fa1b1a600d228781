"""Schedule tuning: how many devices each ring of a schedule reaches, fast.

Pure functions and numba kernels behind ``tuanyuan tune`` and ``tuanyuan population
info``, usable without the command line.

Distances are the engine's: great-circle haversine on a sphere of
:data:`engine.EARTH_RADIUS_M` metres, and a device is inside a ring when its distance
is at most the radius. The haversine here is the float64 formula of the brute-force
reference (``tests/oracle.py``), term for term.

Counting many rings around many centres
---------------------------------------
:class:`RingCounter` sorts a population once into cells of about 250 m (latitude bands,
each cut into equal longitude buckets) and keeps, per cell, its devices by gateway and
the distance from a reference point to its furthest device. For a centre and a sorted
list of radii, it visits only the cells within the bounding box of the widest ring; a
cell whose devices all fall between the same two radii (by the triangle inequality on
the cell's reference point) is counted whole, the others device by device. The answer
is, per centre, per gateway and per radius, the number of devices within that radius:
any number of radii (a schedule, or thousands of candidate radii) in one pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from numba import njit, prange

from engine.index import EARTH_RADIUS_M
from engine.schedules import MAX_RADIUS_M, Schedule, Stage, distance_text

#: Side of the cells :class:`RingCounter` sorts devices into, in metres.
DEFAULT_CELL_M = 250.0
#: Percentiles reported over sampled centres.
PERCENTILES = (10, 50, 90)
#: Radius of the disk whose device count classifies a centre (city centre, suburb,
#: countryside), in metres.
CLASS_RADIUS_M = 1_000.0
#: Density classes of a centre, densest first.
CLASSES = ("city centre", "suburb", "countryside")

Progress = Callable[[int, int], None]
"""Called with (done, total) as long work advances."""

_DEG = math.pi / 180.0
_METRES_PER_DEGREE = EARTH_RADIUS_M * _DEG
# Bits of a cell key: band << _BUCKET_BITS | bucket; a device key appends its gateway
# slot in the low bits. Cells of at least 50 m keep buckets under 2^20.
_BUCKET_BITS = 20
_MIN_CELL_M = 50.0
# Slack, in metres, added on both sides when a whole cell is placed between two radii:
# far above the float64 error of a distance under MAX_RADIUS_M (nanometres), so a cell
# counted whole never holds a device that its own distance would put elsewhere.
_CELL_SLACK_M = 0.5
# Widening of the bounding box, in degrees, against rounding at its edges.
_BOX_SLACK_DEG = 1e-7


# ---------------------------------------------------------------------------------------
# Geometry shared by every kernel


@njit(cache=True, inline="always")
def _haversine(phi1, cos1, lng1, phi2, cos2, lng2):
    """Metres between two points given as (latitude in radians, its cosine, longitude in
    degrees); the oracle's formula, term for term."""
    s_phi = math.sin((phi2 - phi1) / 2.0)
    s_lam = math.sin((lng2 - lng1) * _DEG / 2.0)
    a = s_phi * s_phi + cos1 * cos2 * s_lam * s_lam
    return 2.0 * EARTH_RADIUS_M * math.asin(math.sqrt(min(max(a, 0.0), 1.0)))


@njit(cache=True, inline="always")
def _band(lat, cell_deg, bands):
    return min(max(int((lat + 90.0) / cell_deg), 0), bands - 1)


@njit(cache=True, inline="always")
def _buckets(band, cell_deg):
    """Longitude buckets of a band: about ``cell_deg`` of latitude wide on the ground."""
    mid = -90.0 + (band + 0.5) * cell_deg
    return max(1, int(360.0 * math.cos(mid * _DEG) / cell_deg))


@njit(cache=True, inline="always")
def _bucket(lng, buckets):
    return min(max(int((lng + 180.0) / 360.0 * buckets), 0), buckets - 1)


@njit(cache=True, parallel=True)
def _device_keys(lat, lng, slot, slot_bits, cell_deg, bands, out):
    """Sort key of each device: its cell (band, then bucket), then its gateway slot."""
    for i in prange(lat.size):
        band = _band(lat[i], cell_deg, bands)
        bucket = _bucket(lng[i], _buckets(band, cell_deg))
        out[i] = (((band << _BUCKET_BITS) | bucket) << slot_bits) | slot[i]


@njit(cache=True)
def _radix_sort(keys, lat, lng):
    """``keys`` ascending, with ``lat`` and ``lng`` carried along (new arrays).

    An LSD radix sort, 11 bits a pass over the span of the keys (three passes for a
    metro area): every pass reads and writes the columns in order, 2048 output streams
    at a time, where an argsort and a gather would read them at random.
    """
    n = keys.size
    low = keys.min() if n else 0
    span = keys.max() - low if n else 0
    k1, a1, b1 = keys - low, lat.copy(), lng.copy()
    k2, a2, b2 = np.empty_like(k1), np.empty_like(a1), np.empty_like(b1)
    counts = np.empty(2048, np.int64)
    shift = 0
    while shift < 63 and (span >> shift) > 0:
        counts[:] = 0
        for i in range(n):
            counts[(k1[i] >> shift) & 2047] += 1
        total = 0
        for d in range(2048):
            here = counts[d]
            counts[d] = total
            total += here
        for i in range(n):
            d = (k1[i] >> shift) & 2047
            at = counts[d]
            counts[d] = at + 1
            k2[at] = k1[i]
            a2[at] = a1[i]
            b2[at] = b1[i]
        k1, k2 = k2, k1
        a1, a2 = a2, a1
        b1, b2 = b2, b1
        shift += 11
    return k1 + low, a1, b1


@njit(cache=True, parallel=True)
def _radians(lat, phi, cos_phi):
    for j in prange(lat.size):
        phi[j] = lat[j] * _DEG
        cos_phi[j] = math.cos(phi[j])


@njit(cache=True)
def _layout(keys, slot_bits, bands):
    """Cells, gateway runs and band starts of devices sorted by key."""
    n = keys.size
    mask = (1 << slot_bits) - 1
    cells = 0
    runs = 0
    for j in range(n):
        if j == 0 or keys[j] != keys[j - 1]:
            runs += 1
            if j == 0 or (keys[j] >> slot_bits) != (keys[j - 1] >> slot_bits):
                cells += 1
    cell_key = np.empty(cells, np.int64)
    cell_start = np.empty(cells + 1, np.int64)
    cell_run_start = np.empty(cells + 1, np.int64)
    run_slot = np.empty(runs, np.int64)
    run_count = np.zeros(runs, np.int64)
    c = -1
    r = -1
    for j in range(n):
        if j == 0 or keys[j] != keys[j - 1]:
            r += 1
            run_slot[r] = keys[j] & mask
            if j == 0 or (keys[j] >> slot_bits) != (keys[j - 1] >> slot_bits):
                c += 1
                cell_key[c] = keys[j] >> slot_bits
                cell_start[c] = j
                cell_run_start[c] = r
        run_count[r] += 1
    cell_start[cells] = n
    cell_run_start[cells] = runs

    band_start = np.empty(bands + 1, np.int64)
    c = 0
    for b in range(bands + 1):
        while c < cells and (cell_key[c] >> _BUCKET_BITS) < b:
            c += 1
        band_start[b] = c
    return cell_key, cell_start, cell_run_start, run_slot, run_count, band_start


@njit(cache=True, parallel=True)
def _cell_reach(cell_start, phi, cos_phi, lng):
    """Reference point of each cell, the mean of its devices (a bucket never straddles
    the antimeridian), and its reach: the distance to the furthest of them."""
    cells = cell_start.size - 1
    cell_phi = np.empty(cells)
    cell_cos = np.empty(cells)
    cell_lng = np.empty(cells)
    cell_reach = np.empty(cells)
    for c in prange(cells):
        lo, hi = cell_start[c], cell_start[c + 1]
        sum_phi = 0.0
        sum_lng = 0.0
        for j in range(lo, hi):
            sum_phi += phi[j]
            sum_lng += lng[j]
        cell_phi[c] = sum_phi / (hi - lo)
        cell_cos[c] = math.cos(cell_phi[c])
        cell_lng[c] = sum_lng / (hi - lo)
        reach = 0.0
        for j in range(lo, hi):
            d = _haversine(cell_phi[c], cell_cos[c], cell_lng[c], phi[j], cos_phi[j], lng[j])
            reach = max(reach, d)
        cell_reach[c] = reach
    return cell_phi, cell_cos, cell_lng, cell_reach


@njit(cache=True)
def _count_cells(c, lo, hi, phi0, cos0, lng0, edges, cells, devices, slot_map, out):
    """Adds the devices of cells ``lo..hi`` to ``out[c]`` by gateway slot and radius bin."""
    cell_start, cell_run_start, run_slot, run_count, cell_phi, cell_cos, cell_lng, cell_reach = (
        cells
    )
    phi, cos_phi, lng, slot = devices
    widest = edges[edges.size - 1]
    for k in range(lo, hi):
        dm = _haversine(phi0, cos0, lng0, cell_phi[k], cell_cos[k], cell_lng[k])
        near = dm - cell_reach[k] - _CELL_SLACK_M
        if near > widest:
            continue
        far = dm + cell_reach[k] + _CELL_SLACK_M
        first = np.searchsorted(edges, near)
        last = np.searchsorted(edges, far)
        if first == last:
            # Every device of the cell lies between the same two radii.
            for r in range(cell_run_start[k], cell_run_start[k + 1]):
                out[c, slot_map[run_slot[r]], first] += run_count[r]
            continue
        for j in range(cell_start[k], cell_start[k + 1]):
            d = _haversine(phi0, cos0, lng0, phi[j], cos_phi[j], lng[j])
            b = np.searchsorted(edges, d)
            if b < edges.size:
                out[c, slot_map[slot[j]], b] += 1


@njit(cache=True, parallel=True)
def _count_kernel(
    centre_lat,
    centre_lng,
    edges,
    cell_deg,
    bands,
    cell_key,
    band_start,
    cells,
    devices,
    slot_map,
    out,
):
    """``out[c, s, b]``: devices of output slot ``s`` whose distance from centre ``c``
    is above ``edges[b - 1]`` and at most ``edges[b]`` (edges ascending)."""
    widest = edges[edges.size - 1]
    angle = widest / EARTH_RADIUS_M
    for c in prange(centre_lat.size):
        lat0, lng0 = centre_lat[c], centre_lng[c]
        phi0 = lat0 * _DEG
        cos0 = math.cos(phi0)
        reach_deg = angle / _DEG + _BOX_SLACK_DEG
        b_lo = _band(lat0 - reach_deg, cell_deg, bands)
        b_hi = _band(lat0 + reach_deg, cell_deg, bands)
        # Longitude half-width of the ring's bounding box; every longitude when the ring
        # holds a pole.
        every = lat0 + reach_deg >= 90.0 or lat0 - reach_deg <= -90.0
        half = 180.0
        if not every:
            s = math.sin(angle) / cos0
            if s >= 1.0:
                every = True
            else:
                half = math.asin(s) / _DEG + _BOX_SLACK_DEG
        for b in range(b_lo, b_hi + 1):
            first, last = band_start[b], band_start[b + 1]
            if first == last:
                continue
            if every:
                _count_cells(c, first, last, phi0, cos0, lng0, edges, cells, devices, slot_map, out)
                continue
            buckets = _buckets(b, cell_deg)
            west, east = lng0 - half, lng0 + half
            # Up to two longitude spans, split at the antimeridian.
            spans = 1
            w1, e1, w2, e2 = west, east, 0.0, 0.0
            if west < -180.0:
                spans = 2
                w1, e1, w2, e2 = west + 360.0, 180.0, -180.0, east
            elif east > 180.0:
                spans = 2
                w1, e1, w2, e2 = west, 180.0, -180.0, east - 360.0
            for span in range(spans):
                w = w1 if span == 0 else w2
                e = e1 if span == 0 else e2
                key_lo = (b << _BUCKET_BITS) | _bucket(w, buckets)
                key_hi = (b << _BUCKET_BITS) | _bucket(e, buckets)
                lo = first + np.searchsorted(cell_key[first:last], key_lo)
                hi = first + np.searchsorted(cell_key[first:last], key_hi, side="right")
                _count_cells(c, lo, hi, phi0, cos0, lng0, edges, cells, devices, slot_map, out)


class RingCounter:
    """A population laid out for counting, around any centres, the devices within any
    radii; see the module docstring for how.

    Building it sorts the population once (a few seconds for 10 million devices) and
    holds about 26 bytes a device. ``gateways`` are the gateways present, ascending:
    per-gateway counts come in that order.
    """

    def __init__(
        self,
        lat: np.ndarray,
        lng: np.ndarray,
        gateway: np.ndarray,
        *,
        cell_m: float = DEFAULT_CELL_M,
    ) -> None:
        lat = np.ascontiguousarray(lat, dtype=np.float64)
        lng = np.ascontiguousarray(lng, dtype=np.float64)
        gateway = np.ascontiguousarray(gateway, dtype=np.uint16)
        if not (lat.ndim == 1 and lat.shape == lng.shape == gateway.shape):
            raise ValueError(
                f"lat, lng and gateway must be 1-D of equal length, got {lat.shape}, "
                f"{lng.shape} and {gateway.shape}"
            )
        bad = np.flatnonzero(~((np.abs(lat) <= 90.0) & (np.abs(lng) <= 180.0)))
        if bad.size:
            raise ValueError(
                f"{bad.size} position(s) are not finite or out of range, first at "
                f"row {bad[0]}: ({lat[bad[0]]}, {lng[bad[0]]})"
            )
        if not (isinstance(cell_m, int | float) and _MIN_CELL_M <= cell_m <= 100_000.0):
            raise ValueError(f"cell_m must be from {_MIN_CELL_M:g} to 100000 m, got {cell_m!r}")

        # Gateway slots: the gateways present, numbered from 0.
        present = np.bincount(gateway, minlength=65536)
        self.gateways = np.flatnonzero(present).astype(np.uint16)
        lookup = np.zeros(65536, dtype=np.int64)
        lookup[self.gateways] = np.arange(self.gateways.size)
        slot = lookup[gateway]

        self.size = int(lat.size)
        self._cell_deg = float(cell_m) / _METRES_PER_DEGREE
        self._bands = math.ceil(180.0 / self._cell_deg)
        # Only as many key bits for the slot as the gateways need: fewer radix passes.
        slot_bits = max(1, (self.gateways.size - 1).bit_length())
        keys = np.empty(lat.size, dtype=np.int64)
        _device_keys(lat, lng, slot, slot_bits, self._cell_deg, self._bands, keys)
        keys, sorted_lat, sorted_lng = _radix_sort(keys, lat, lng)
        phi, cos_phi = sorted_lat, np.empty(lat.size)
        _radians(sorted_lat, phi, cos_phi)  # in place: latitudes become radians
        sorted_slot = (keys & ((1 << slot_bits) - 1)).astype(np.uint16)
        layout = _layout(keys, slot_bits, self._bands)
        self._cell_key, cell_start, cell_run_start, run_slot, run_count, self._band_start = layout
        del keys
        cell_phi, cell_cos, cell_lng, cell_reach = _cell_reach(cell_start, phi, cos_phi, sorted_lng)
        self._cells = (
            cell_start,
            cell_run_start,
            run_slot,
            run_count,
            cell_phi,
            cell_cos,
            cell_lng,
            cell_reach,
        )
        self._devices = (phi, cos_phi, sorted_lng, sorted_slot)

    def __len__(self) -> int:
        return self.size

    def counts(
        self,
        lat: object,
        lng: object,
        radii: Sequence[float] | np.ndarray,
        *,
        by_gateway: bool = True,
        progress: Progress | None = None,
    ) -> np.ndarray:
        """Devices within each radius of each centre.

        Args:
            lat, lng: centres in degrees (scalars or equal-length 1-D arrays).
            radii: metres, ascending, each from 0 to
                :data:`engine.schedules.MAX_RADIUS_M`.
            by_gateway: count per gateway (in the order of :attr:`gateways`), or all
                gateways together in one slot.
            progress: called with (centres done, centres) between batches.

        Returns:
            int64 array of shape (centres, gateway slots, radii): ``[c, g, k]`` is the
            number of devices of gateway slot ``g`` at most ``radii[k]`` metres from
            centre ``c``.
        """
        lat = np.atleast_1d(np.asarray(lat, dtype=np.float64))
        lng = np.atleast_1d(np.asarray(lng, dtype=np.float64))
        edges = np.ascontiguousarray(radii, dtype=np.float64)
        if lat.ndim != 1 or lat.shape != lng.shape:
            raise ValueError(f"centre lat and lng must be 1-D of equal length: {lat.shape}")
        bad = np.flatnonzero(~((np.abs(lat) <= 90.0) & (np.abs(lng) <= 180.0)))
        if bad.size:
            raise ValueError(
                f"centre {bad[0]} ({lat[bad[0]]}, {lng[bad[0]]}) is not a valid position"
            )
        if edges.ndim != 1 or edges.size == 0:
            raise ValueError("radii must be a non-empty list of metres")
        if not (np.all(edges >= 0.0) and np.all(edges <= MAX_RADIUS_M)):
            raise ValueError(f"radii must be from 0 to {MAX_RADIUS_M:g} m, got {edges}")
        if np.any(np.diff(edges) < 0):
            raise ValueError(f"radii must be ascending, got {edges}")

        slots = self.gateways.size if by_gateway else 1
        slot_map = (
            np.arange(self.gateways.size, dtype=np.int64)
            if by_gateway
            else np.zeros(max(self.gateways.size, 1), dtype=np.int64)
        )
        out = np.zeros((lat.size, slots, edges.size), dtype=np.int64)
        # Batches only so that progress can be shown between them.
        batch = 16
        for start in range(0, lat.size, batch):
            stop = min(start + batch, lat.size)
            _count_kernel(
                lat[start:stop],
                lng[start:stop],
                edges,
                self._cell_deg,
                self._bands,
                self._cell_key,
                self._band_start,
                self._cells,
                self._devices,
                slot_map,
                out[start:stop],
            )
            if progress is not None:
                progress(stop, lat.size)
        return np.cumsum(out, axis=2)


def distances_m(lat: np.ndarray, lng: np.ndarray, lat0: float, lng0: float) -> np.ndarray:
    """Haversine metres from ``(lat0, lng0)`` to every device, on all cores."""
    lat = np.ascontiguousarray(lat, dtype=np.float64)
    lng = np.ascontiguousarray(lng, dtype=np.float64)
    out = np.empty(lat.size)
    _distances_kernel(lat, lng, float(lat0), float(lng0), out)
    return out


@njit(cache=True, parallel=True)
def _distances_kernel(lat, lng, lat0, lng0, out):
    phi0 = lat0 * _DEG
    cos0 = math.cos(phi0)
    for i in prange(lat.size):
        phi = lat[i] * _DEG
        out[i] = _haversine(phi0, cos0, lng0, phi, math.cos(phi), lng[i])


@njit(cache=True, parallel=True)
def _project_kernel(lat, lng, lat0, lng0, out_x, out_y):
    """Azimuthal equidistant coordinates (metres east and north) around a centre: the
    distance from the centre is the great-circle distance, so rings are circles."""
    phi0 = lat0 * _DEG
    cos0, sin0 = math.cos(phi0), math.sin(phi0)
    for i in prange(lat.size):
        phi = lat[i] * _DEG
        cos1 = math.cos(phi)
        d = _haversine(phi0, cos0, lng0, phi, cos1, lng[i])
        dlam = (lng[i] - lng0) * _DEG
        bearing = math.atan2(
            math.sin(dlam) * cos1, cos0 * math.sin(phi) - sin0 * cos1 * math.cos(dlam)
        )
        out_x[i] = d * math.sin(bearing)
        out_y[i] = d * math.cos(bearing)


def project(
    lat: np.ndarray, lng: np.ndarray, lat0: float, lng0: float
) -> tuple[np.ndarray, np.ndarray]:
    """Positions as metres east and north of ``(lat0, lng0)`` in the azimuthal
    equidistant projection: a ring of radius r around the centre is the circle of
    radius r."""
    lat = np.ascontiguousarray(lat, dtype=np.float64)
    lng = np.ascontiguousarray(lng, dtype=np.float64)
    x, y = np.empty(lat.size), np.empty(lat.size)
    _project_kernel(lat, lng, float(lat0), float(lng0), x, y)
    return x, y


# ---------------------------------------------------------------------------------------
# Schedules around one centre and over sampled centres


@dataclass(frozen=True)
class StageReach:
    """What one stage of a schedule reaches around one centre, without movement."""

    radius_m: float
    duration_s: int
    new: int
    cumulative: int
    per_gateway: dict[int, int]


def stage_edges(schedule: Schedule, *extra: float) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct radii of a schedule plus ``extra`` ones, and the index of each
    stage's radius among them."""
    edges, (at,) = shared_edges([schedule], *extra)
    return edges, at


def shared_edges(
    schedules: Sequence[Schedule], *extra: float
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Sorted distinct radii of several schedules plus ``extra`` ones, and for each
    schedule the index of each of its stages' radii among them: one counting pass at
    these edges answers every schedule."""
    radii = [[stage.radius_m for stage in schedule.stages] for schedule in schedules]
    edges = np.unique(np.array([r for own in radii for r in own] + list(extra), np.float64))
    return edges, [np.searchsorted(edges, own) for own in radii]


def reach_one(counter: RingCounter, lat: float, lng: float, schedule: Schedule) -> list[StageReach]:
    """New and cumulative recipients of each stage around one centre, per gateway."""
    return reach_one_each(counter, lat, lng, [schedule])[0]


def reach_one_each(
    counter: RingCounter, lat: float, lng: float, schedules: Sequence[Schedule]
) -> list[list[StageReach]]:
    """:func:`reach_one` for several schedules, from one counting pass."""
    edges, ats = shared_edges(schedules)
    counts = counter.counts(lat, lng, edges)[0]
    return [
        _stages(counter, schedule, counts[:, at])
        for schedule, at in zip(schedules, ats, strict=True)
    ]


def _stages(counter: RingCounter, schedule: Schedule, cum: np.ndarray) -> list[StageReach]:
    """Per stage reach from the cumulative counts at its radii, (gateways, stages)."""
    stages = []
    previous = np.zeros(cum.shape[0], dtype=np.int64)
    for k, stage in enumerate(schedule.stages):
        new = cum[:, k] - previous
        previous = cum[:, k]
        stages.append(
            StageReach(
                radius_m=stage.radius_m,
                duration_s=stage.duration_s,
                new=int(new.sum()),
                cumulative=int(cum[:, k].sum()),
                per_gateway={int(g): int(v) for g, v in zip(counter.gateways, new, strict=True)},
            )
        )
    return stages


@dataclass(frozen=True)
class Centres:
    """Sampled alert centres: ``from_device`` is True where a centre is a random
    device's position, False where it is a random point of the bounding box."""

    lat: np.ndarray
    lng: np.ndarray
    from_device: np.ndarray

    def __len__(self) -> int:
        return int(self.lat.size)


def sample_centres(
    lat: np.ndarray, lng: np.ndarray, samples: int, seed: int, share_box: float = 0.1
) -> Centres:
    """``samples`` centres: most at the positions of random devices (where alerts
    happen, as people are), ``round(samples * share_box)`` at random points of the
    population's latitude/longitude bounding box, uniform by area (often where nobody
    is). Seeded."""
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    rng = np.random.default_rng([int(seed), 21])
    boxed = round(samples * share_box)
    rows = rng.integers(0, lat.size, samples - boxed)
    south, north = float(lat.min()), float(lat.max())
    west, east = float(lng.min()), float(lng.max())
    sin_lat = rng.uniform(math.sin(south * _DEG), math.sin(north * _DEG), boxed)
    box_lat = np.clip(np.degrees(np.arcsin(sin_lat)), south, north)
    box_lng = rng.uniform(west, east, boxed)
    return Centres(
        lat=np.concatenate([lat[rows], box_lat]),
        lng=np.concatenate([lng[rows], box_lng]),
        from_device=np.concatenate([np.ones(rows.size, bool), np.zeros(boxed, bool)]),
    )


def disk_area_km2(radius_m: float) -> float:
    """Area of a spherical cap of great-circle radius ``radius_m``, in km²."""
    return 2.0 * math.pi * EARTH_RADIUS_M**2 * (1.0 - math.cos(radius_m / EARTH_RADIUS_M)) / 1e6


def classify(
    within_1km: np.ndarray, city_per_km2: float, suburb_per_km2: float
) -> tuple[np.ndarray, tuple[float, float]]:
    """Density class of centres (an index into :data:`CLASSES`) by the devices within
    :data:`CLASS_RADIUS_M` of them: a city centre has at least ``city_per_km2`` devices
    per km² there, a suburb at least ``suburb_per_km2``, the countryside fewer.

    Returns the classes and the two thresholds as device counts within the disk.
    """
    area = disk_area_km2(CLASS_RADIUS_M)
    city, suburb = city_per_km2 * area, suburb_per_km2 * area
    classes = np.where(within_1km >= city, 0, np.where(within_1km >= suburb, 1, 2))
    return classes, (city, suburb)


def spread(values: np.ndarray) -> dict[str, float]:
    """:data:`PERCENTILES` of ``values`` (numpy's default, linear interpolation)."""
    if values.size == 0:
        return {f"p{q}": math.nan for q in PERCENTILES}
    points = np.percentile(values, PERCENTILES)
    return {f"p{q}": float(v) for q, v in zip(PERCENTILES, points, strict=True)}


@dataclass(frozen=True)
class SampledReach:
    """Per-centre reach of a schedule over sampled centres.

    ``cumulative[c, g, k]``: devices of gateway slot ``g`` notified by the end of stage
    ``k`` around centre ``c``; ``classes[c]`` indexes :data:`CLASSES`.
    """

    schedule: Schedule
    centres: Centres
    gateways: np.ndarray
    cumulative: np.ndarray
    classes: np.ndarray
    thresholds: tuple[float, float]

    @property
    def new(self) -> np.ndarray:
        """``new[c, g, k]``: devices first notified by stage ``k``."""
        return np.diff(self.cumulative, axis=2, prepend=0)

    def stage_spreads(self, mask: np.ndarray | None = None) -> list[dict]:
        """Per stage, percentiles over the centres selected by ``mask`` (all by
        default) of new and cumulative recipients, in total and per gateway."""
        rows = slice(None) if mask is None else mask
        new, cum = self.new[rows], self.cumulative[rows]
        stages = []
        for k, stage in enumerate(self.schedule.stages):
            stages.append(
                {
                    "radius_m": stage.radius_m,
                    "duration_s": stage.duration_s,
                    "new_recipients": spread(new[:, :, k].sum(axis=1)),
                    "cumulative_recipients": spread(cum[:, :, k].sum(axis=1)),
                    "per_gateway": {
                        str(int(g)): spread(new[:, s, k]) for s, g in enumerate(self.gateways)
                    },
                }
            )
        return stages


def reach_sampled(
    counter: RingCounter,
    centres: Centres,
    schedule: Schedule,
    *,
    city_per_km2: float,
    suburb_per_km2: float,
    progress: Progress | None = None,
) -> SampledReach:
    """The schedule's reach around every sampled centre, in one counting pass that also
    classifies the centres by density."""
    return reach_sampled_each(
        counter,
        centres,
        [schedule],
        city_per_km2=city_per_km2,
        suburb_per_km2=suburb_per_km2,
        progress=progress,
    )[0]


def reach_sampled_each(
    counter: RingCounter,
    centres: Centres,
    schedules: Sequence[Schedule],
    *,
    city_per_km2: float,
    suburb_per_km2: float,
    progress: Progress | None = None,
) -> list[SampledReach]:
    """:func:`reach_sampled` for several schedules, from one counting pass."""
    edges, _ = shared_edges(schedules, CLASS_RADIUS_M)
    counts = counter.counts(centres.lat, centres.lng, edges, progress=progress)
    return sampled_reach_from(
        counts, edges, counter, centres, schedules, city_per_km2, suburb_per_km2
    )


def sampled_reach_from(
    counts: np.ndarray,
    edges: np.ndarray,
    counter: RingCounter,
    centres: Centres,
    schedules: Sequence[Schedule],
    city_per_km2: float,
    suburb_per_km2: float,
) -> list[SampledReach]:
    """Each schedule's reach from counts made at ``edges`` (which hold every stage's
    radius and :data:`CLASS_RADIUS_M`), the centres classified by density."""
    within = counts[:, :, int(np.searchsorted(edges, CLASS_RADIUS_M))].sum(axis=1)
    classes, thresholds = classify(within, city_per_km2, suburb_per_km2)
    return [
        SampledReach(
            schedule=schedule,
            centres=centres,
            gateways=counter.gateways,
            cumulative=counts[:, :, np.searchsorted(edges, [s.radius_m for s in schedule.stages])],
            classes=classes,
            thresholds=thresholds,
        )
        for schedule in schedules
    ]


# ---------------------------------------------------------------------------------------
# Density


@dataclass(frozen=True)
class Density:
    """How crowded a population is, on a grid of cells of about ``cell_km`` km a side."""

    cell_km: float
    occupied_cells: int
    max_per_km2: float
    p50_per_km2: float
    p90_per_km2: float
    densest_lat: float
    densest_lng: float
    #: Devices within each radius (metres) of the densest point.
    around_densest: dict[float, int]


@njit(cache=True, parallel=True)
def _cell_of(lat, lng, cell_deg, bands, out):
    for i in prange(lat.size):
        band = _band(lat[i], cell_deg, bands)
        out[i] = (band << _BUCKET_BITS) | _bucket(lng[i], _buckets(band, cell_deg))


@njit(cache=True)
def _cell_area_km2(key, cell_deg):
    band = key >> _BUCKET_BITS
    south = (-90.0 + band * cell_deg) * _DEG
    north = min(90.0, -90.0 + (band + 1) * cell_deg) * _DEG
    width = 2.0 * math.pi / _buckets(band, cell_deg)
    return EARTH_RADIUS_M**2 * width * (math.sin(north) - math.sin(south)) / 1e6


@njit(cache=True)
def _cell_areas(keys, cell_deg, out):
    for i in range(keys.size):
        out[i] = _cell_area_km2(keys[i], cell_deg)


def density(
    lat: np.ndarray,
    lng: np.ndarray,
    counter: RingCounter | None = None,
    *,
    cell_m: float = 1_000.0,
    radii: Sequence[float] = (1_000.0, 3_000.0, 10_000.0),
) -> Density:
    """Devices per km² over occupied grid cells (latitude bands of ``cell_m`` cut into
    longitude buckets about as wide; each cell's exact area on the sphere), and the
    devices within ``radii`` of the densest point (the mean position of the devices in
    the densest cell)."""
    lat = np.ascontiguousarray(lat, dtype=np.float64)
    lng = np.ascontiguousarray(lng, dtype=np.float64)
    cell_deg = cell_m / _METRES_PER_DEGREE
    bands = math.ceil(180.0 / cell_deg)
    keys = np.empty(lat.size, dtype=np.int64)
    _cell_of(lat, lng, cell_deg, bands, keys)
    ordered = np.sort(keys)
    starts = np.flatnonzero(np.diff(ordered, prepend=ordered[0] - 1))
    occupied = ordered[starts]
    counts = np.diff(np.append(starts, ordered.size))
    areas = np.empty(occupied.size)
    _cell_areas(occupied, cell_deg, areas)
    per_km2 = counts / areas
    densest = int(np.argmax(per_km2))
    members = keys == occupied[densest]
    point = float(lat[members].mean()), float(lng[members].mean())
    if counter is None:
        counter = RingCounter(lat, lng, np.zeros(lat.size, dtype=np.uint16))
    around = counter.counts(*point, sorted(radii), by_gateway=False)[0, 0]
    p50, p90 = np.percentile(per_km2, [50, 90])
    return Density(
        cell_km=cell_m / 1000.0,
        occupied_cells=int(occupied.size),
        max_per_km2=float(per_km2[densest]),
        p50_per_km2=float(p50),
        p90_per_km2=float(p90),
        densest_lat=point[0],
        densest_lng=point[1],
        around_densest={float(r): int(v) for r, v in zip(sorted(radii), around, strict=True)},
    )


# ---------------------------------------------------------------------------------------
# Movement during an alert


@dataclass(frozen=True)
class Movement:
    """How devices move while an alert runs. Every device draws its kind once:

    - ``share_still`` stand still the whole alert (at home, at work);
    - ``share_walk`` walk at ``walk_speed_mps`` (1.4 m/s, 5 km/h), keeping a heading
      and picking a new uniformly random one after ``turn_s`` seconds on average;
    - the rest commute at ``commute_speed_mps`` (8 m/s, about 29 km/h door to door
      by metro, bus or car), half towards the metro core, half away from it, along
      the straight line through the core, for a trip drawn uniformly from
      ``trip_min_m`` to ``trip_max_m`` (inbound trips end at the core at the latest),
      then stand still.

    Positions advance every ``step_s`` seconds of alert time (and at every stage
    start); in the azimuthal equidistant plane around the alert's centre, where the
    distance from the centre is the great-circle distance, so the ring test is exact
    for the simulated position.
    """

    share_still: float = 0.6
    share_walk: float = 0.25
    walk_speed_mps: float = 1.4
    turn_s: float = 300.0
    commute_speed_mps: float = 8.0
    trip_min_m: float = 3_000.0
    trip_max_m: float = 25_000.0
    step_s: float = 300.0

    def __post_init__(self) -> None:
        for name in ("share_still", "share_walk"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be from 0 to 1, got {value!r}")
        if self.share_still + self.share_walk > 1.0 + 1e-12:
            raise ValueError(
                f"share_still + share_walk must be at most 1, got "
                f"{self.share_still} + {self.share_walk}"
            )
        for name in ("walk_speed_mps", "commute_speed_mps", "trip_min_m"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not self.trip_min_m <= self.trip_max_m < math.inf:
            raise ValueError(
                f"trip_max_m must be finite and at least trip_min_m "
                f"({self.trip_min_m}), got {self.trip_max_m!r}"
            )
        for name in ("turn_s", "step_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0.0):
                raise ValueError(f"{name} must be a number of seconds above 0, got {value!r}")


@dataclass(frozen=True)
class MovingReach:
    """The continuous geofence over a moving population around one centre.

    ``step_t`` are the simulation times (seconds from the alert's start) and
    ``step_stage`` the stage running at each; ``notified_step[i]`` is the step at
    which device ``i`` was notified (-1: never). ``per_stage`` gives, per stage, the
    devices reached by the sweep at its start (``swept``) and by walking in later
    (``walked_in``), in total and per gateway.
    """

    step_t: np.ndarray
    step_stage: np.ndarray
    notified_step: np.ndarray
    reach_curve: np.ndarray
    per_stage: list[dict] = field(repr=False)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


@njit(cache=True, inline="always")
def _uniform(key, device, step, draw):
    """A uniform draw in [0, 1) for (device, step, draw) under ``key`` (splitmix64 of
    a counter): the same on any number of threads."""
    z = key + np.uint64(device) * _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    z = z ^ (z >> np.uint64(31))
    z = z + np.uint64(step * 4 + draw + 1) * _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    z = z ^ (z >> np.uint64(31))
    return float(z >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@njit(cache=True, parallel=True)
def _movement_kernel(
    lat,
    lng,
    lat0,
    lng0,
    core_x,
    core_y,
    step_t,
    step_stage,
    radius,
    stage_step,
    params,
    key,
    offset,
    out,
):
    share_still, share_walk, walk_speed, turn_s, commute_speed, trip_min, trip_max = params
    steps = step_t.size
    widest = radius[radius.size - 1]
    span = step_t[steps - 1] - step_t[0]
    phi0 = lat0 * _DEG
    cos0, sin0 = math.cos(phi0), math.sin(phi0)
    first_radius = radius[step_stage[0]]
    for i in prange(lat.size):
        device = offset + i
        phi = lat[i] * _DEG
        cos1 = math.cos(phi)
        d0 = _haversine(phi0, cos0, lng0, phi, cos1, lng[i])
        out[i] = -1
        if d0 <= first_radius:
            out[i] = 0
            continue
        kind = _uniform(key, device, 0, 0)
        if kind < share_still:
            # Standing still: notified by the sweep of the first stage that holds it.
            for k in range(radius.size):
                if d0 <= radius[k]:
                    out[i] = stage_step[k]
                    break
            continue
        walker = kind < share_still + share_walk
        if d0 - (walk_speed * span if walker else trip_max) > widest:
            continue  # cannot reach the widest ring before the alert ends

        dlam = (lng[i] - lng0) * _DEG
        bearing = math.atan2(
            math.sin(dlam) * cos1, cos0 * math.sin(phi) - sin0 * cos1 * math.cos(dlam)
        )
        x, y = d0 * math.sin(bearing), d0 * math.cos(bearing)
        if walker:
            heading = 2.0 * math.pi * _uniform(key, device, 0, 1)
            ux, uy = math.sin(heading), math.cos(heading)
            speed, left = walk_speed, math.inf
        else:
            dx, dy = core_x - x, core_y - y
            gap = math.sqrt(dx * dx + dy * dy)
            left = trip_min + (trip_max - trip_min) * _uniform(key, device, 0, 2)
            if gap == 0.0:
                heading = 2.0 * math.pi * _uniform(key, device, 0, 3)
                ux, uy = math.sin(heading), math.cos(heading)
            elif _uniform(key, device, 0, 1) < 0.5:  # inbound
                ux, uy = dx / gap, dy / gap
                left = min(left, gap)
            else:
                ux, uy = -dx / gap, -dy / gap
            speed = commute_speed

        for t in range(1, steps):
            dt = step_t[t] - step_t[t - 1]
            if walker:
                if _uniform(key, device, t, 0) < dt / turn_s:
                    heading = 2.0 * math.pi * _uniform(key, device, t, 1)
                    ux, uy = math.sin(heading), math.cos(heading)
                move = speed * dt
            else:
                move = min(speed * dt, left)
                left -= move
            x += move * ux
            y += move * uy
            if math.sqrt(x * x + y * y) <= radius[step_stage[t]]:
                out[i] = t
                break


def steps_of(schedule: Schedule, step_s: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Simulation times of a schedule: every stage start and every ``step_s`` seconds
    within a stage. Returns the times (seconds), the stage of each, and the step at
    which each stage starts."""
    times, stages, first = [], [], []
    for k, (start, stage) in enumerate(zip(schedule.stage_starts(), schedule.stages, strict=True)):
        first.append(len(times))
        count = max(1, math.ceil(stage.duration_s / step_s))
        times.extend(start + j * step_s for j in range(count))
        stages.extend([k] * count)
    return np.array(times, dtype=np.float64), np.array(stages, np.int64), np.array(first, np.int64)


def reach_moving(
    lat: np.ndarray,
    lng: np.ndarray,
    gateway: np.ndarray,
    centre: tuple[float, float],
    core: tuple[float, float],
    schedule: Schedule,
    movement: Movement,
    seed: int,
    *,
    progress: Progress | None = None,
) -> MovingReach:
    """The continuous geofence of one alert over a moving population: at every step,
    the devices inside the running stage's ring that were not notified yet are
    notified. ``core`` is the metro core commuters head to or from. Seeded: the same
    arguments give the same answer on any number of threads.

    With ``movement.share_still == 1`` nobody moves, and every stage notifies exactly
    the devices :func:`reach_one` counts.
    """
    lat = np.ascontiguousarray(lat, dtype=np.float64)
    lng = np.ascontiguousarray(lng, dtype=np.float64)
    gateway = np.ascontiguousarray(gateway, dtype=np.uint16)
    step_t, step_stage, stage_step = steps_of(schedule, movement.step_s)
    radius = np.array([stage.radius_m for stage in schedule.stages], dtype=np.float64)
    core_x, core_y = project(np.array([core[0]]), np.array([core[1]]), *centre)
    params = (
        movement.share_still,
        movement.share_walk,
        movement.walk_speed_mps,
        movement.turn_s,
        movement.commute_speed_mps,
        movement.trip_min_m,
        movement.trip_max_m,
    )
    key = np.uint64(np.random.SeedSequence([int(seed), 31]).generate_state(1, np.uint64)[0])
    notified = np.empty(lat.size, dtype=np.int64)
    batch = 2_000_000
    for start in range(0, lat.size, batch):
        stop = min(start + batch, lat.size)
        _movement_kernel(
            lat[start:stop],
            lng[start:stop],
            float(centre[0]),
            float(centre[1]),
            float(core_x[0]),
            float(core_y[0]),
            step_t,
            step_stage,
            radius,
            stage_step,
            params,
            key,
            start,
            notified[start:stop],
        )
        if progress is not None:
            progress(stop, lat.size)

    # Per stage: swept at its start, walked in later; in total and per gateway.
    reached = notified >= 0
    steps = notified[reached]
    by_step = np.bincount(steps, minlength=step_t.size)
    gateways = np.flatnonzero(np.bincount(gateway, minlength=65536))
    slot = np.searchsorted(gateways, gateway[reached])
    stages = len(schedule.stages)
    by_stage_gateway = np.bincount(
        step_stage[steps] * gateways.size + slot, minlength=stages * gateways.size
    ).reshape(stages, gateways.size)
    per_stage = []
    for k, stage in enumerate(schedule.stages):
        new = int(by_stage_gateway[k].sum())
        swept = int(by_step[stage_step[k]])
        per_stage.append(
            {
                "radius_m": stage.radius_m,
                "duration_s": stage.duration_s,
                "new": new,
                "swept": swept,
                "walked_in": new - swept,
                "per_gateway": {
                    int(g): int(v) for g, v in zip(gateways, by_stage_gateway[k], strict=True)
                },
            }
        )
    return MovingReach(
        step_t=step_t,
        step_stage=step_stage,
        notified_step=notified,
        reach_curve=np.cumsum(by_step),
        per_stage=per_stage,
    )


# ---------------------------------------------------------------------------------------
# Proposing radii for goals


@dataclass(frozen=True)
class Goals:
    """What a tuned schedule must achieve over the sampled centres.

    - ``min_first``: at least this many devices in the first stage, at the
      ``percentile`` centre (by default the median one);
    - ``max_new``: at most this many new recipients in any stage, at the
      ``cap_percentile`` centre (by default the 90th);
    - ``max_gateway_rate``: at most this many notifications a minute on any one
      gateway, at the ``cap_percentile`` centre, assuming each stage's new recipients
      are pushed evenly over its first ``push_minutes`` minutes (or the whole stage, if
      shorter).
    """

    min_first: int | None = None
    max_new: int | None = None
    max_gateway_rate: float | None = None
    percentile: float = 50.0
    cap_percentile: float = 90.0
    push_minutes: float = 5.0

    def __post_init__(self) -> None:
        if self.min_first is None and self.max_new is None and self.max_gateway_rate is None:
            raise ValueError("give at least one goal: min_first, max_new or max_gateway_rate")
        for name in ("min_first", "max_new", "max_gateway_rate"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        for name in ("percentile", "cap_percentile"):
            value = getattr(self, name)
            if not 0.0 <= value <= 100.0:
                raise ValueError(f"{name} must be from 0 to 100, got {value!r}")
        if not (math.isfinite(self.push_minutes) and self.push_minutes > 0):
            raise ValueError(f"push_minutes must be above 0, got {self.push_minutes!r}")


@dataclass(frozen=True)
class StageProposal:
    """The radius proposed for one stage and why. ``lowest_m``/``highest_m`` bound the
    radii that meet the goals (given the previous stage); ``binding`` names the goal
    that set the radius (``"schedule"`` when none did)."""

    radius_m: float
    duration_s: int
    schedule_radius_m: float
    lowest_m: float
    highest_m: float
    binding: str
    reason: str
    met: bool


def candidate_radii(max_radius_m: float, include: Sequence[float] = ()) -> np.ndarray:
    """Radii a proposal chooses from: three significant figures (10.0 m, 10.1 m, ...,
    1.00 km, 1.01 km, ...) from 10 m to ``max_radius_m``, plus ``include``."""
    mantissa = np.arange(100, 1000, dtype=np.float64)
    grid = np.concatenate([mantissa * 10.0**e for e in range(-1, 5)] + [np.array([1e6])])
    grid = np.round(grid, 1)
    grid = grid[grid <= max_radius_m]
    return np.unique(np.concatenate([grid, np.asarray(include, dtype=np.float64)]))


def _first(mask: np.ndarray) -> int | None:
    hits = np.flatnonzero(mask)
    return int(hits[0]) if hits.size else None


def _last(mask: np.ndarray) -> int | None:
    hits = np.flatnonzero(mask)
    return int(hits[-1]) if hits.size else None


def propose(
    cumulative: np.ndarray, radii: np.ndarray, schedule: Schedule, goals: Goals
) -> list[StageProposal]:
    """Stage radii meeting ``goals``, chosen among ``radii`` (ascending, holding every
    radius of ``schedule``), from per-centre counts ``cumulative[c, g, k]``: devices of
    gateway slot ``g`` within ``radii[k]`` of centre ``c``.

    Stage by stage, each radius is the schedule's own, moved only as far as a goal
    demands: up to the smallest radius meeting ``min_first`` (first stage), down to
    the largest meeting the caps, and never below the previous stage's radius. The
    counts only grow with the radius, so each bound is the first or last radius where a
    goal holds. When ``min_first`` and a cap conflict, the cap wins and the proposal is
    marked unmet. Stage count and durations are the schedule's.
    """
    total = cumulative.sum(axis=1)  # (centres, radii)
    proposals: list[StageProposal] = []
    previous = None  # index of the previous stage's radius
    for k, stage in enumerate(schedule.stages):
        own = int(np.searchsorted(radii, stage.radius_m))
        floor = 0 if previous is None else previous
        base = np.zeros(total.shape[0]) if previous is None else total[:, previous]
        base_gw = np.zeros(cumulative.shape[:2]) if previous is None else cumulative[:, :, previous]
        lowest, lowest_by = floor, "previous"
        met, notes = True, []

        if k == 0 and goals.min_first is not None:
            reach = np.percentile(total, goals.percentile, axis=0)
            need = _first(reach >= goals.min_first)
            if need is None:
                met = False
                notes.append(
                    f"--min-first-hour {goals.min_first:,} cannot be met within "
                    f"{distance_text(radii[-1])}: the p{goals.percentile:g} centre reaches "
                    f"{reach[-1]:,.0f} there"
                )
                lowest, lowest_by = len(radii) - 1, "min_first"
            elif need > lowest:
                lowest, lowest_by = need, "min_first"

        # Caps: the largest radius (not below the floor) where each still holds.
        caps = {}
        if goals.max_new is not None:
            load = np.percentile(total - base[:, None], goals.cap_percentile, axis=0)
            caps["max_new"] = (_last(load[floor:] <= goals.max_new), load)
        if goals.max_gateway_rate is not None:
            minutes = min(goals.push_minutes, stage.duration_s / 60.0)
            busiest = (cumulative - base_gw[:, :, None]).max(axis=1) / minutes
            load = np.percentile(busiest, goals.cap_percentile, axis=0)
            caps["max_gateway_rate"] = (_last(load[floor:] <= goals.max_gateway_rate), load)
        highest, highest_by = len(radii) - 1, None
        for name, (last, _load) in caps.items():
            # At the floor itself nobody new is notified, so every cap holds there.
            limit = floor + (last if last is not None else 0)
            if limit < highest:
                highest, highest_by = limit, name

        # The schedule's radius, moved into [lowest, highest].
        chosen, binding = own, "schedule"
        if lowest > highest:
            met = False
            notes.append(
                f"--min-first-hour needs at least {distance_text(radii[lowest])} but "
                f"{_flag(highest_by)} allows at most {distance_text(radii[highest])}: the cap wins"
            )
            chosen, binding = highest, highest_by
        elif own < lowest:
            chosen, binding = lowest, lowest_by
        elif own > highest:
            chosen, binding = highest, highest_by

        reason = _reason(
            k, binding, chosen, own, lowest, highest, highest_by, radii, total, caps, goals
        )
        proposals.append(
            StageProposal(
                radius_m=float(radii[chosen]),
                duration_s=stage.duration_s,
                schedule_radius_m=stage.radius_m,
                lowest_m=float(radii[lowest]),
                highest_m=float(radii[highest]),
                binding=binding,
                reason="; ".join([reason, *notes]),
                met=met,
            )
        )
        previous = chosen
    return proposals


def _reason(k, binding, chosen, own, lowest, highest, highest_by, radii, total, caps, goals):
    """One sentence on why a stage got its radius, with the numbers that decided."""
    r, r_own = distance_text(radii[chosen]), distance_text(radii[own])
    if binding == "schedule":
        if not caps:
            return f"kept {r} from the schedule: no goal binds"
        room = (
            f"the caps allow up to {distance_text(radii[highest])}"
            if highest_by
            else f"the caps hold up to {distance_text(radii[highest])}, the widest radius searched"
        )
        return f"kept {r} from the schedule: no goal binds ({room})"
    if binding == "previous":
        return f"raised from {r_own} to {r}, the previous stage's radius: rings never shrink"
    if binding == "min_first":
        reach = np.percentile(total[:, chosen], goals.percentile)
        return (
            f"raised from {r_own} to {r} by --min-first-hour {goals.min_first:,}: the "
            f"p{goals.percentile:g} centre reaches {reach:,.0f} there"
        )
    load = caps[binding][1]
    over = chosen + 1 < len(radii)
    beyond = f", {load[chosen + 1]:,.0f} at {distance_text(radii[chosen + 1])}" if over else ""
    unit = " a minute on the busiest gateway" if binding == "max_gateway_rate" else ""
    limit = goals.max_new if binding == "max_new" else goals.max_gateway_rate
    return (
        f"{'lowered from ' + r_own + ' to ' + r if chosen < own else 'set to ' + r} by "
        f"{_flag(binding)} {limit:,g}: the p{goals.cap_percentile:g} centre gets "
        f"{load[chosen]:,.0f} new{unit} at {r}{beyond}"
    )


def _flag(goal: str | None) -> str:
    return {
        "max_new": "--max-new-per-stage",
        "max_gateway_rate": "--max-gateway-rate",
        "min_first": "--min-first-hour",
    }.get(goal or "", "the caps")


def proposed_schedule(schedule: Schedule, proposals: list[StageProposal]) -> Schedule:
    """The schedule with the proposed radii (same durations)."""
    return Schedule(
        tuple(Stage(p.radius_m, p.duration_s) for p in proposals),
        name=f"{schedule.name or 'schedule'}-tuned",
        description=f"radii tuned from {schedule.name or 'a schedule'}: "
        + ", ".join(distance_text(p.radius_m) for p in proposals),
    )
