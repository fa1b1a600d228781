"""The brute-force oracle: which devices are truly inside each ring, and scoring.

The oracle is the float64 haversine distance from the centre to every device
(``engine.population.haversine_m``). Only devices in the centre's latitude band are
measured: a great-circle distance is never shorter than the Earth radius times the
latitude difference, so devices outside the band cannot be inside, and skipping them
changes no answer while making small rings cheap.

Answers are stored per query as a bitmap over device *keys* (``id - ID_BASE``) of the
devices strictly inside (further than the tolerance from the edge), plus the keys of the
devices within the tolerance of the edge, which count neither way.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numba import njit

from bench.common import BOUNDARY_TOLERANCE_M, keys_of_ids
from engine import population
from engine.population import EARTH_RADIUS_M, haversine_m


@dataclass
class Ring:
    """The oracle's answer for one centre and radius."""

    #: Population rows of every device at most the radius away, ascending.
    rows: np.ndarray
    #: Bitmap (``np.packbits``) over keys of the devices inside and not near the edge.
    bits: np.ndarray
    #: Keys of the devices within the tolerance of the edge.
    boundary: np.ndarray


class Oracle:
    """A latitude-sorted copy of a population answering rings by brute force."""

    def __init__(self, pop: dict[str, np.ndarray]) -> None:
        order = np.argsort(pop["lat"], kind="stable")
        self.n = int(order.size)
        self.lat = pop["lat"][order]
        self.lng = pop["lng"][order]
        self.rows = order
        self.keys = (pop["device_id"][order] - np.uint64(population.ID_BASE)).astype(np.int64)

    def rings(
        self, lat: float, lng: float, radius_m: float, spheres: dict[str, float]
    ) -> dict[str, Ring]:
        """Devices within ``radius_m`` of a centre, on each sphere of ``spheres`` (name to
        Earth radius in metres), from one pass of distances."""
        # The band is computed on the smallest sphere so it covers them all.
        smallest = min([EARTH_RADIUS_M, *spheres.values()])
        reach = math.degrees((radius_m + BOUNDARY_TOLERANCE_M) / smallest)
        lo = np.searchsorted(self.lat, lat - reach - 1e-9, side="left")
        hi = np.searchsorted(self.lat, lat + reach + 1e-9, side="right")
        distance = haversine_m(lat, lng, self.lat[lo:hi], self.lng[lo:hi])
        nbytes = (self.n + 7) // 8
        answers = {}
        for name, earth_radius in spheres.items():
            row_bits = np.zeros(nbytes, dtype=np.uint8)
            key_bits = np.zeros(nbytes, dtype=np.uint8)
            # Haversine distances scale with the radius of the sphere.
            inside, boundary = _classify_kernel(
                distance,
                self.rows[lo:hi],
                self.keys[lo:hi],
                float(radius_m),
                earth_radius / EARTH_RADIUS_M,
                BOUNDARY_TOLERANCE_M,
                row_bits,
                key_bits,
            )
            answers[name] = Ring(rows=_set_bits(row_bits, inside), bits=key_bits, boundary=boundary)
        return answers

    def ring(self, lat: float, lng: float, radius_m: float) -> Ring:
        """Devices within ``radius_m`` of a centre on the engine's sphere."""
        return self.rings(lat, lng, radius_m, {"oracle": EARTH_RADIUS_M})["oracle"]


class OracleStore:
    """Oracle answers of every query of a run, on disk so worker processes can map them.

    Layout under ``directory``: ``{sphere}_{radius index}.bits.npy`` (one row of bytes per query),
    ``{sphere}_{radius index}.edge.npz`` (boundary keys and per-query offsets), and
    ``meta.json``.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        meta = json.loads((self.directory / "meta.json").read_text())
        self.n = meta["n"]
        self.radii_m = meta["radii_m"]
        self.spheres = meta["spheres"]
        self._bits: dict[tuple[str, int], np.ndarray] = {}
        self._edges: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}

    def bits(self, sphere: str, radius_index: int, query: int) -> np.ndarray:
        """Bitmap of the keys strictly inside for one query."""
        key = (sphere, radius_index)
        if key not in self._bits:
            path = self.directory / f"{sphere}_{radius_index}.bits.npy"
            self._bits[key] = np.load(path, mmap_mode="r")
        return np.asarray(self._bits[key][query])

    def boundary(self, sphere: str, radius_index: int, query: int) -> np.ndarray:
        """Keys of the devices within the tolerance of the edge for one query."""
        key = (sphere, radius_index)
        if key not in self._edges:
            with np.load(self.directory / f"{sphere}_{radius_index}.edge.npz") as f:
                self._edges[key] = (f["keys"], f["offsets"])
        keys, offsets = self._edges[key]
        return keys[offsets[query] : offsets[query + 1]]


def build_store(
    oracle: Oracle,
    ids: np.ndarray,
    centres: np.ndarray,
    radii_m: list[float],
    directory: Path,
    spheres: dict[str, float],
    progress: Callable[[str], None],
) -> dict[str, list[dict[str, float]]]:
    """Computes and stores the oracle's answer for every centre and radius on every
    sphere, and times the gather cost: ``ids[rows]`` for the rows inside.

    ``spheres`` maps a name to an Earth radius; it must include "oracle" (the engine's
    sphere). Returns, per radius (a string of metres), one dict per query with
    ``gather_ms`` and ``recipients_{sphere}`` for each sphere.
    """
    directory.mkdir(parents=True, exist_ok=True)
    nbytes = (oracle.n + 7) // 8
    per_radius: dict[str, list[dict[str, float]]] = {}
    for ri, radius in enumerate(radii_m):
        started = time.perf_counter()
        stats: list[dict[str, float]] = [{} for _ in range(len(centres))]
        bits_files = {
            sphere: np.lib.format.open_memmap(
                directory / f"{sphere}_{ri}.bits.npy",
                mode="w+",
                dtype=np.uint8,
                shape=(len(centres), nbytes),
            )
            for sphere in spheres
        }
        edges: dict[str, list[np.ndarray]] = {sphere: [] for sphere in spheres}
        for q, (lat, lng) in enumerate(centres):
            rings = oracle.rings(float(lat), float(lng), radius, spheres)
            for sphere, ring in rings.items():
                bits_files[sphere][q] = ring.bits
                edges[sphere].append(ring.boundary)
                stats[q][f"recipients_{sphere}"] = int(ring.rows.size)
            # The floor under any index: copying the answer's ids out of an array.
            rows = rings["oracle"].rows
            t0 = time.perf_counter_ns()
            gathered = ids[rows]
            stats[q]["gather_ms"] = (time.perf_counter_ns() - t0) / 1e6
            del gathered, rings
        for sphere in spheres:
            bits_files[sphere].flush()
            offsets = np.zeros(len(edges[sphere]) + 1, dtype=np.int64)
            offsets[1:] = np.cumsum([e.size for e in edges[sphere]])
            keys = np.concatenate(edges[sphere]) if centres.size else np.zeros(0, np.int64)
            np.savez(directory / f"{sphere}_{ri}.edge.npz", keys=keys, offsets=offsets)
        del bits_files
        per_radius[str(radius)] = stats
        mean = np.mean([s["recipients_oracle"] for s in stats]) if stats else 0.0
        gather = np.median([s["gather_ms"] for s in stats]) if stats else 0.0
        progress(
            f"oracle {radius / 1000:g} km: {len(centres)} centres, mean {mean:,.0f} devices "
            f"inside, gather p50 {gather:.3f} ms, {time.perf_counter() - started:.1f} s"
        )
    meta = {"n": oracle.n, "radii_m": list(radii_m), "spheres": list(spheres)}
    (directory / "meta.json").write_text(json.dumps(meta))
    return per_radius


@njit(cache=True)
def _classify_kernel(distance, rows, keys, radius, scale, tolerance, row_bits, key_bits):
    """Sets the row bit of every device inside the ring and the key bit of every device
    inside and further than ``tolerance`` from the edge; returns how many are inside
    and the keys of those near the edge. Bits are big-endian like ``np.packbits``."""
    inside = 0
    near = 0
    for i in range(distance.size):
        d = distance[i] * scale
        if abs(d - radius) <= tolerance:
            near += 1
        if d <= radius:
            inside += 1
            r = rows[i]
            row_bits[r >> 3] |= np.uint8(0x80 >> (r & 7))
            if abs(d - radius) > tolerance:
                k = keys[i]
                key_bits[k >> 3] |= np.uint8(0x80 >> (k & 7))
    boundary = np.empty(near, dtype=np.int64)
    j = 0
    for i in range(distance.size):
        if abs(distance[i] * scale - radius) <= tolerance:
            boundary[j] = keys[i]
            j += 1
    return inside, boundary


@njit(cache=True)
def _set_bits(bits, count):
    """Ascending positions of the ``count`` bits set in a big-endian bitmap."""
    out = np.empty(count, dtype=np.int64)
    j = 0
    for byte in range(bits.size):
        value = bits[byte]
        if value == 0:
            continue
        for bit in range(8):
            if value & (0x80 >> bit):
                out[j] = byte * 8 + bit
                j += 1
    return out


# Bits set in each byte value.
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)


@njit(cache=True)
def _bit(bits, key):
    """Whether ``key`` is set in a big-endian ``np.packbits`` bitmap."""
    return (bits[key >> 3] >> (7 - (key & 7))) & 1


@njit(cache=True)
def _score_kernel(ids, base, n, bits, boundary, limit, table):
    """Missing, extra and duplicated devices of an answer given as device ids.

    The answer is turned into a bitmap like the oracle's (1/8 byte a device, so it stays
    in cache) and the two are compared byte by byte, skipping edge devices. An id
    outside the population, or a key at or past ``limit`` (the devices the peer holds),
    is extra.
    """
    nbytes = bits.size
    seen = np.zeros(nbytes, dtype=np.uint8)
    extra = 0
    duplicate = 0
    for raw in ids:
        offset = raw - base  # an id below base wraps around past n
        if offset >= n:
            extra += 1
            continue
        k = np.int64(offset)
        mask = np.uint8(0x80 >> (k & 7))
        if seen[k >> 3] & mask:
            duplicate += 1
        else:
            seen[k >> 3] |= mask
    edge = np.zeros(nbytes, dtype=np.uint8)
    for k in boundary:
        edge[k >> 3] |= np.uint8(0x80 >> (k & 7))
    missing = 0
    full = limit >> 3
    for i in range(nbytes):
        if i < full:
            held = 0xFF
        elif i == full:
            held = (0xFF << (8 - (limit & 7))) & 0xFF
        else:
            held = 0
        keep = 0xFF ^ np.int64(edge[i])
        got = np.int64(seen[i])
        want = np.int64(bits[i]) & held
        missing += table[want & (0xFF ^ got) & keep]
        extra += table[got & (0xFF ^ want) & keep]
    return missing, extra, duplicate


@njit(cache=True)
def _examples_kernel(keys, bits, boundary, scratch, limit, count):
    """Up to ``count`` missing and ``count`` extra keys of an answer, for the report."""
    for b in boundary:
        scratch[b] = 2
    extra = np.full(count, -1, dtype=np.int64)
    n_extra = 0
    for k in keys:
        if k < 0 or scratch[k] & 1:
            continue
        if not (scratch[k] & 2) and not _bit(bits, k) and n_extra < count:
            extra[n_extra] = k
            n_extra += 1
        scratch[k] |= 1
    missing = np.full(count, -1, dtype=np.int64)
    n_missing = 0
    for key in range(limit):
        if n_missing == count:
            break
        if _bit(bits, key) and not (scratch[key] & 1):
            missing[n_missing] = key
            n_missing += 1
    for k in keys:
        if k >= 0:
            scratch[k] = 0
    for b in boundary:
        scratch[b] = 0
    return missing[:n_missing], extra[:n_extra]


class Scorer:
    """Checks answers (device ids) against oracle bitmaps."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._scratch: np.ndarray | None = None

    def score(
        self, ids: np.ndarray, bits: np.ndarray, boundary: np.ndarray, limit: int | None = None
    ) -> tuple[int, int, int]:
        """``(missing, extra, duplicate)`` devices of an answer. Only keys below ``limit``
        are expected (a peer holding part of the population); default all."""
        limit = self.n if limit is None else limit
        missing, extra, duplicate = _score_kernel(
            np.ascontiguousarray(ids, dtype=np.uint64),
            np.uint64(population.ID_BASE),
            np.uint64(self.n),
            bits,
            np.ascontiguousarray(boundary, dtype=np.int64),
            limit,
            _POPCOUNT,
        )
        return int(missing), int(extra), int(duplicate)

    def examples(
        self,
        ids: np.ndarray,
        bits: np.ndarray,
        boundary: np.ndarray,
        limit: int | None = None,
        count: int = 5,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Up to ``count`` keys of missing and of extra devices (only asked for a wrong
        answer, so its scratch array is made on first use)."""
        limit = self.n if limit is None else limit
        if self._scratch is None:
            self._scratch = np.zeros(self.n, dtype=np.uint8)
        return _examples_kernel(
            keys_of_ids(ids, self.n),
            bits,
            np.ascontiguousarray(boundary, dtype=np.int64),
            self._scratch,
            limit,
            count,
        )
