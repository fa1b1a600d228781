"""The engine and the peers a user would otherwise pick, behind one small interface.

Each peer builds its structure from a population and answers a radius query with the
device ids inside, the way its users would write it. ``query`` is what gets timed;
``answer_ids`` turns an answer into a uint64 array of ids for checking, outside the timing.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import REDIS_EARTH_RADIUS_M
from engine.population import EARTH_RADIUS_M, ID_BASE


def _haversine_numpy(
    lat: float, lng: float, lat_rad: np.ndarray, lng_rad: np.ndarray, cos_lat: np.ndarray
) -> np.ndarray:
    """Haversine distances in metres from one point to arrays of points in radians,
    written the way a numpy user writes it."""
    phi, lam = math.radians(lat), math.radians(lng)
    a = (
        np.sin((lat_rad - phi) / 2.0) ** 2
        + math.cos(phi) * cos_lat * np.sin((lng_rad - lam) / 2.0) ** 2
    )
    return 2.0 * EARTH_RADIUS_M * np.arcsin(np.sqrt(np.minimum(a, 1.0)))


class Peer:
    """A structure answering "which devices are within r metres of this point"."""

    name = "peer"
    #: Process whose resident memory holds the structure (None: this one).
    memory_pid: int | None = None

    def build(self, pop: dict[str, np.ndarray]) -> dict[str, object]:
        """Builds the structure from a population; returns facts worth reporting."""
        raise NotImplementedError

    def devices(self) -> int:
        """Devices the structure holds."""
        raise NotImplementedError

    def query(self, lat: float, lng: float, radius_m: float) -> object:
        """The ids of the devices within ``radius_m`` metres, in the peer's own form."""
        raise NotImplementedError

    def answer_ids(self, answer: object) -> np.ndarray:
        """An answer as a uint64 array of device ids."""
        return np.asarray(answer, dtype=np.uint64)

    def close(self) -> None:
        """Releases what the peer holds outside this process."""


class EnginePeer(Peer):
    """tuanyuan's LocationIndex, fed in batches like a live feed, then compacted."""

    name = "engine"

    def __init__(self, resolution: int = 10, batch: int = 1_000_000) -> None:
        self.resolution = resolution
        self.batch = batch
        self.index = None

    def build(self, pop: dict[str, np.ndarray]) -> dict[str, object]:
        import engine

        # A TTL far beyond the run: a slow peer's queries must never see devices expire.
        self.index = engine.LocationIndex(ttl_s=6 * 3600, resolution=self.resolution)
        # Reported a minute ago, so the moves measured later are always newer reports.
        seen = time.time() - 60.0
        n = pop["device_id"].size
        added = 0
        t0 = time.perf_counter()
        for start in range(0, n, self.batch):
            end = min(start + self.batch, n)
            got, _, _ = self.index.upsert(
                device_id=pop["device_id"][start:end],
                lat=pop["lat"][start:end],
                lng=pop["lng"][start:end],
                gateway=pop["gateway"][start:end],
                seen_at=seen,
            )
            added += got
        t1 = time.perf_counter()
        # Measured queries run on the sorted store, as a long-running index mostly is.
        self.index.compact()
        t2 = time.perf_counter()
        return {"added": added, "upsert_s": t1 - t0, "compact_s": t2 - t1}

    def devices(self) -> int:
        return len(self.index)

    def query(self, lat: float, lng: float, radius_m: float) -> np.ndarray:
        return self.index.within(lat, lng, radius_m)


class BruteForcePeer(Peer):
    """numpy haversine over every device, on radians precomputed once."""

    name = "brute-force"

    def build(self, pop: dict[str, np.ndarray]) -> dict[str, object]:
        self.ids = pop["device_id"]
        self.lat_rad = np.radians(pop["lat"])
        self.lng_rad = np.radians(pop["lng"])
        self.cos_lat = np.cos(self.lat_rad)
        return {}

    def devices(self) -> int:
        return int(self.ids.size)

    def query(self, lat: float, lng: float, radius_m: float) -> np.ndarray:
        distance = _haversine_numpy(lat, lng, self.lat_rad, self.lng_rad, self.cos_lat)
        return self.ids[distance <= radius_m]


def unit_vectors(lat: np.ndarray, lng: np.ndarray) -> np.ndarray:
    """(n, 3) unit vectors of positions in degrees."""
    lat_rad, lng_rad = np.radians(lat), np.radians(lng)
    cos_lat = np.cos(lat_rad)
    return np.column_stack([cos_lat * np.cos(lng_rad), cos_lat * np.sin(lng_rad), np.sin(lat_rad)])


class KDTreePeer(Peer):
    """scipy's cKDTree over 3-D unit vectors with default build arguments; a ring is a
    ball whose radius is the chord of the arc."""

    name = "cKDTree"

    def build(self, pop: dict[str, np.ndarray]) -> dict[str, object]:
        from scipy.spatial import cKDTree

        self.ids = pop["device_id"]
        self.tree = cKDTree(unit_vectors(pop["lat"], pop["lng"]))
        return {}

    def devices(self) -> int:
        return int(self.ids.size)

    def query(self, lat: float, lng: float, radius_m: float) -> np.ndarray:
        centre = unit_vectors(np.array([lat]), np.array([lng]))[0]
        chord = 2.0 * math.sin(min(radius_m / EARTH_RADIUS_M, math.pi) / 2.0)
        rows = self.tree.query_ball_point(centre, chord)
        return self.ids[np.asarray(rows, dtype=np.intp)]


class H3DictPeer(Peer):
    """A dict from H3 cell to the array of its devices' rows, queried with
    ``grid_disk`` and a haversine filter: what a Python user writes with h3-py."""

    name = "h3-dict"

    def __init__(self, resolution: int = 9, chunk: int = 100_000) -> None:
        self.resolution = resolution
        self.chunk = chunk

    def build(self, pop: dict[str, np.ndarray]) -> dict[str, object]:
        import h3.api.basic_int as h3i

        self.h3 = h3i
        self.ids, self.lat, self.lng = pop["device_id"], pop["lat"], pop["lng"]
        n = self.ids.size
        res = self.resolution
        cells = np.empty(n, dtype=np.uint64)
        # In chunks: lists of ten million Python floats at once would double the peak.
        for start in range(0, n, self.chunk):
            end = min(start + self.chunk, n)
            lats, lngs = self.lat[start:end].tolist(), self.lng[start:end].tolist()
            cells[start:end] = [
                h3i.latlng_to_cell(a, b, res) for a, b in zip(lats, lngs, strict=True)
            ]
        order = np.argsort(cells, kind="stable")
        ordered = cells[order]
        del cells
        starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]]) if n else np.zeros(0)
        ends = np.r_[starts[1:], n].astype(np.int64)
        self.cells = {
            cell: order[s:e]
            for cell, s, e in zip(
                ordered[starts].tolist(), starts.tolist(), ends.tolist(), strict=True
            )
        }
        return {"cells": len(self.cells), "h3_resolution": res}

    def devices(self) -> int:
        return int(self.ids.size)

    def query(self, lat: float, lng: float, radius_m: float) -> np.ndarray:
        h3i = self.h3
        origin = h3i.latlng_to_cell(lat, lng, self.resolution)
        # Local hexagon edge from the cell's area. Every device within the radius sits in
        # a cell whose centre is within radius + 2 edges of the origin's centre, and a
        # k-disk holds every centre within 1.5 k edges; 15 % more for H3's distortion.
        edge = math.sqrt(2.0 * h3i.cell_area(origin, "m^2") / (3.0 * math.sqrt(3.0)))
        k = math.ceil(1.15 * (radius_m + 2.0 * edge) / (1.5 * edge))
        get = self.cells.get
        parts = [rows for cell in h3i.grid_disk(origin, k) if (rows := get(cell)) is not None]
        if not parts:
            return self.ids[:0]
        rows = np.concatenate(parts)
        lat_rad, lng_rad = np.radians(self.lat[rows]), np.radians(self.lng[rows])
        distance = _haversine_numpy(lat, lng, lat_rad, lng_rad, np.cos(lat_rad))
        return self.ids[rows[distance <= radius_m]]


def _free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisGeoPeer(Peer):
    """A redis-server of our own on a loopback port, loaded with GEOADD and queried with
    ``GEOSEARCH ... FROMLONLAT lng lat BYRADIUS r m``. Redis keeps members as strings
    and measures on its own Earth radius (6372797.56 m)."""

    name = "redis-geo"
    key = "devices"
    earth_radius_m = REDIS_EARTH_RADIUS_M

    def __init__(
        self, limit: int | None = None, members_per_command: int = 10_000, pipeline: int = 10
    ) -> None:
        # Only devices whose key is below ``limit`` are loaded (a random subset).
        self.limit = limit
        self.members_per_command = members_per_command
        self.pipeline_depth = pipeline
        self.process: subprocess.Popen | None = None
        self.workdir = Path(tempfile.mkdtemp(prefix="tuanyuan-redis-"))
        self.loaded = 0

    def start(self) -> None:
        """Starts the server and waits until it answers PING."""
        import redis
        import redis.backoff
        import redis.retry

        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        port = _free_port()
        # No snapshots, no append-only file: a pure in-memory store, as a cache is run.
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port", str(port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.workdir),
                "--logfile", str(self.workdir / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.memory_pid = self.process.pid
        # A large ring takes Redis many seconds: that is a measurement, not a failure;
        # and no silent retries, which would time a query twice.
        self.client = redis.Redis(
            host="127.0.0.1",
            port=port,
            socket_timeout=900,
            retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0),
        )
        deadline = time.monotonic() + 20.0
        while True:
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                if self.process.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
            log = (self.workdir / "redis.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"redis-server did not start on port {port}: {log}")
        self.port = port

    def build(self, pop: dict[str, np.ndarray]) -> dict[str, object]:
        ids, lat, lng = pop["device_id"], pop["lat"], pop["lng"]
        if self.limit is not None and self.limit < ids.size:
            chosen = np.flatnonzero(ids - np.uint64(ID_BASE) < np.uint64(self.limit))
            ids, lat, lng = ids[chosen], lat[chosen], lng[chosen]
        pipe = self.client.pipeline(transaction=False)
        queued = 0
        step = self.members_per_command
        for start in range(0, ids.size, step):
            end = min(start + step, ids.size)
            args: list[object] = []
            for x, y, member in zip(
                lng[start:end].tolist(),
                lat[start:end].tolist(),
                ids[start:end].tolist(),
                strict=True,
            ):
                args += (x, y, member)
            pipe.execute_command("GEOADD", self.key, *args)
            queued += 1
            if queued == self.pipeline_depth:
                pipe.execute()
                queued = 0
        if queued:
            pipe.execute()
        self.loaded = int(self.client.zcard(self.key))
        used = int(self.client.info("memory")["used_memory"])
        # Redis's own time in GEOADD: the rest of the build is the client encoding.
        geoadd = self.client.info("commandstats").get("cmdstat_geoadd", {})
        return {
            "loaded": self.loaded,
            "used_memory": used,
            "server_geoadd_s": geoadd.get("usec", 0) / 1e6,
            "port": self.port,
        }

    def devices(self) -> int:
        return self.loaded

    def query(self, lat: float, lng: float, radius_m: float) -> list[bytes]:
        return self.client.execute_command(
            "GEOSEARCH", self.key, "FROMLONLAT", lng, lat, "BYRADIUS", radius_m, "m"
        )

    def answer_ids(self, answer: object) -> np.ndarray:
        # Members are the ids' decimal text; numpy parses byte strings to integers.
        if not answer:
            return np.zeros(0, dtype=np.uint64)
        return np.array(answer).astype(np.uint64)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        with contextlib.suppress(OSError):
            shutil.rmtree(self.workdir)


def make_peer(name: str, options: dict[str, object]) -> Peer:
    """A peer by its table name, configured from the run's options."""
    if name == "engine":
        return EnginePeer(
            resolution=int(options.get("engine_resolution", 10)),
            batch=int(options.get("batch", 1_000_000)),
        )
    if name == "brute-force":
        return BruteForcePeer()
    if name == "cKDTree":
        return KDTreePeer()
    if name == "h3-dict":
        return H3DictPeer(resolution=int(options.get("h3_resolution", 9)))
    if name == "redis-geo":
        limit = options.get("redis_devices")
        return RedisGeoPeer(limit=None if limit is None else int(limit))
    raise ValueError(f"unknown peer {name!r}")
