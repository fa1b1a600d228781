"""Brute-force reference for the location index.

Every answer here comes from the haversine formula in numpy float64 over a plain dict of
devices: no cells, no fixed point, no chord tests and nothing imported from ``engine``.
It is slow on purpose; its only job is to be obviously right, so that agreement with
the engine means something.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

#: The sphere the engine promises to measure on (mean Earth radius, IUGG). Written out
#: again rather than read from the engine so that a wrong constant there is caught.
EARTH_RADIUS_M = 6_371_008.8

#: Half the circumference: no two points are further apart, so a radius of at least
#: this much holds the whole sphere.
HALF_CIRCUMFERENCE_M = math.pi * EARTH_RADIUS_M

#: Devices this close to a ring's boundary may be answered either way: the engine
#: rounds stored positions, and the float64 haversine itself is only good to about a
#: decimetre near the antipode.
SLACK_M = 1.0

Key = tuple[int, int]
"""A device: (gateway, device id)."""


def haversine_m(lat1: object, lng1: object, lat2: object, lng2: object) -> np.ndarray:
    """Great-circle distance in metres between points given in degrees (broadcasts)."""
    p1 = np.radians(np.asarray(lat1, dtype=np.float64))
    p2 = np.radians(np.asarray(lat2, dtype=np.float64))
    dl = np.radians(np.asarray(lng2, dtype=np.float64) - np.asarray(lng1, dtype=np.float64))
    a = np.sin((p2 - p1) / 2.0) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dl / 2.0) ** 2
    # Rounding can push `a` a hair above 1 for antipodal points; arcsin would give NaN.
    return 2.0 * EARTH_RADIUS_M * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


@dataclass(frozen=True)
class Ring:
    """What a radius query may answer: every key of ``must``, and nothing outside ``may``
    (``must`` is a subset of ``may``; the difference is the 1 m band at the boundary)."""

    must: frozenset[Key]
    may: frozenset[Key]
    distance: dict[Key, float] = field(compare=False)


def classify(
    lats: np.ndarray, lngs: np.ndarray, lat: float, lng: float, radius: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For devices at (lats, lngs): whether each must be inside the ring, whether it may
    be, and its distance in metres from the centre."""
    d = haversine_m(lat, lng, lats, lngs)
    if radius >= HALF_CIRCUMFERENCE_M:
        must = np.ones(d.shape, dtype=bool)
    else:
        # A device exactly at the centre (distance 0) is inside even at radius 0.
        must = d <= max(radius - SLACK_M, 0.0)
    return must, d <= radius + SLACK_M, d


def ring(devices: dict[Key, tuple[float, float]], lat: float, lng: float, radius: float) -> Ring:
    """The ring of ``radius`` metres around (lat, lng) over ``devices`` {key: (lat, lng)}."""
    keys = list(devices)
    if not keys:
        return Ring(frozenset(), frozenset(), {})
    lats = np.array([devices[k][0] for k in keys], dtype=np.float64)
    lngs = np.array([devices[k][1] for k in keys], dtype=np.float64)
    must, may, d = classify(lats, lngs, lat, lng, radius)
    return Ring(
        must=frozenset(k for k, keep in zip(keys, must, strict=True) if keep),
        may=frozenset(k for k, keep in zip(keys, may, strict=True) if keep),
        distance=dict(zip(keys, d.tolist(), strict=True)),
    )


def union(rings: Iterable[Ring]) -> Ring:
    """The union of several rings (the area of several centres)."""
    must: set[Key] = set()
    may: set[Key] = set()
    distance: dict[Key, float] = {}
    for r in rings:
        must |= r.must
        may |= r.may
        for key, d in r.distance.items():
            distance[key] = min(d, distance.get(key, math.inf))
    return Ring(frozenset(must), frozenset(may), distance)


def assert_answer(found: Iterable[Key], expected: Ring, what: str = "query") -> None:
    """Fails unless ``found`` holds each key once, all of ``expected.must`` and nothing
    outside ``expected.may``; the message names the offending keys and distances."""
    tally = Counter(found)
    seen = set(tally)
    problems = []
    dupes = sorted(k for k, n in tally.items() if n > 1)
    if dupes:
        problems.append(f"{len(dupes)} key(s) answered more than once, e.g. {dupes[:5]}")
    missing = sorted(expected.must - seen)
    extra = sorted(seen - expected.may)

    def show(keys: list[Key]) -> str:
        shown = ", ".join(f"{k} at {expected.distance.get(k, math.nan):.3f} m" for k in keys[:5])
        return f"{len(keys)}: {shown}"

    if missing:
        problems.append(f"missing {show(missing)}")
    if extra:
        problems.append(f"unexpected {show(extra)}")
    assert not problems, f"{what}: " + "; ".join(problems)


@dataclass
class Held:
    lat: float
    lng: float
    seen: int


@dataclass
class Counts:
    """Expected ``(added, updated, stale)`` of one upsert. ``settled`` is False when the
    batch touches a device whose held report already expired but was not dropped yet:
    whether that counts as added or updated is not pinned down here."""

    added: int = 0
    updated: int = 0
    stale: int = 0
    settled: bool = True

    def triple(self) -> tuple[int, int, int]:
        return (self.added, self.updated, self.stale)


class Model:
    """The index as a dict {(gateway, id): Held}, with its documented rules spelled out.

    It stores exactly what the engine stores (including expired devices not dropped
    yet) as long as the caller mirrors every call that drops devices: ``expire``, and
    ``live``/``len`` which expire first.
    """

    def __init__(self, ttl_s: int) -> None:
        self.ttl_s = ttl_s
        self.held: dict[Key, Held] = {}

    def is_live(self, held: Held, now: float) -> bool:
        return now - held.seen <= self.ttl_s

    def upsert(
        self,
        reports: Iterable[tuple[int, int, float, float, float]],
        clock_now: float,
    ) -> Counts:
        """Applies reports ``(gateway, id, lat, lng, seen_at)`` in order, as one call made
        when the clock read ``clock_now``; returns the counts the engine should report.

        Per device of the call: the newest report wins, the later one on equal times,
        unless what is held is newer. A device counts once (added or updated); every
        other report of it is stale.
        """
        groups: dict[Key, list[tuple[float, float, int]]] = {}
        for gateway, device_id, lat, lng, seen_at in reports:
            groups.setdefault((gateway, device_id), []).append((lat, lng, math.floor(seen_at)))
        counts = Counts()
        for key, group in groups.items():
            newest = max(range(len(group)), key=lambda i: (group[i][2], i))
            lat, lng, seen = group[newest]
            held = self.held.get(key)
            if held is not None and not self.is_live(held, clock_now):
                counts.settled = False
            if held is None:
                counts.added += 1
                counts.stale += len(group) - 1
                self.held[key] = Held(lat, lng, seen)
            elif seen >= held.seen:
                counts.updated += 1
                counts.stale += len(group) - 1
                self.held[key] = Held(lat, lng, seen)
            else:
                counts.stale += len(group)
        return counts

    def remove(self, ids: Iterable[int], gateway: int | None = None) -> int:
        """Forgets ids on one gateway, or on all when ``gateway`` is None."""
        removed = 0
        for device_id in ids:
            doomed = [k for k in self.held if k[1] == device_id and gateway in (None, k[0])]
            for key in doomed:
                del self.held[key]
                removed += 1
        return removed

    def expire(self, now: float) -> int:
        """Drops what is no longer live at ``now``; returns how many."""
        dead = [k for k, h in self.held.items() if not self.is_live(h, now)]
        for key in dead:
            del self.held[key]
        return len(dead)

    def live(self, now: float) -> dict[Key, tuple[float, float]]:
        """Live devices at ``now`` (without dropping anything)."""
        return {k: (h.lat, h.lng) for k, h in self.held.items() if self.is_live(h, now)}

    def ring(self, lat: float, lng: float, radius: float, now: float) -> Ring:
        return ring(self.live(now), lat, lng, radius)
