"""Which freshly reported devices stand inside a running alert's ring.

Location reports arrive in batches of thousands; each batch is tested against the ring
of every running alert (a handful of centres each). The test is the haversine distance
in float64 on the engine's sphere, inclusive, as the rings themselves are defined.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from engine.index import EARTH_RADIUS_M


@njit(cache=True, nogil=True)
def _inside_kernel(lat, lng, centre_lat, centre_lng, radius_m, earth_radius_m, out):
    # Half the central angle of the radius, as the haversine term it bounds.
    half = min(radius_m / earth_radius_m, math.pi) / 2.0
    limit = math.sin(half) ** 2
    count = 0
    for i in range(lat.size):
        p = math.radians(lat[i])
        for c in range(centre_lat.size):
            pc = math.radians(centre_lat[c])
            dp = math.sin((p - pc) / 2.0)
            dl = math.sin(math.radians(lng[i] - centre_lng[c]) / 2.0)
            h = dp * dp + math.cos(p) * math.cos(pc) * dl * dl
            if h <= limit:
                out[count] = i
                count += 1
                break
    return count


def inside(
    lat: np.ndarray, lng: np.ndarray, centre_lat: np.ndarray, centre_lng: np.ndarray, radius_m
) -> np.ndarray:
    """Positions (int64, ascending) of the points within ``radius_m`` metres of any
    centre."""
    out = np.empty(lat.size, dtype=np.int64)
    count = _inside_kernel(lat, lng, centre_lat, centre_lng, float(radius_m), EARTH_RADIUS_M, out)
    return out[:count]


def warm_up() -> None:
    """Compiles (or loads from numba's cache) the kernel, so that the first report of a
    running alert does not wait for it."""
    point = np.zeros(1)
    inside(point, point, point, point, 1.0)
