"""The engine as its users meet it: over gRPC on loopback, one process per party.

``python -m bench.grpc`` starts the engine (``tuanyuan serve --dev``) as a child process
and, on one seeded metro population (10 million devices by default), measures:

1. ingest: three partner-app processes stream their devices through
   ``ReportLocations``, a first load and then a full pass of moved positions;
2. CreateAlert to the last recipient batch at three gateway processes, for several 3 km
   rings at dense places, beside the same ring's query in process;
3. geofence latency: with an alert running, a partner app reports 100,000 devices a
   second, a few of which walk into the ring; from the batch's send to its devices'
   arrival at a gateway;
4. correctness: what the gateways received against a float64 haversine oracle.

Results go to ``grpc.json`` and ``grpc.md`` in ``--out``. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

from bench import common, grpc_report, grpc_worker
from engine import client, population, server
from engine.api import alert_pb2
from engine.index import AlertRecord, LocationIndex

#: Devices this close to a ring's edge count neither as wrong nor as missing (the
#: engine stores positions to about 6 mm).
TOLERANCE_M = common.BOUNDARY_TOLERANCE_M
#: Time-to-live given to the engine: nothing expires during a run.
TTL_S = 24 * 3600
#: Seconds a stage of the benchmark's alerts lasts: longer than any run.
STAGE_S = 3600
#: Seconds between two GetAlert polls while waiting for a delivery to be acked.
POLL_S = 0.02


def _count(text: str) -> int:
    """A device or query count: 10000000, 10_000_000 or 1e7."""
    value = float(text) if any(c in text for c in ".eE") else int(text)
    if value < 0 or value != int(value):
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(value)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; every flag is described in ``--help``."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.grpc",
        description=(
            "Measures the tuanyuan engine over gRPC on loopback: ingest from three "
            "partner-app processes, CreateAlert to the last batch acked by three gateway "
            "processes, and geofence latency under a steady stream of updates, checking "
            "what the gateways received against a float64 haversine oracle. Writes "
            "grpc.json and grpc.md to --out."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--devices", type=_count, default=10_000_000, help="devices in the metro population"
    )
    parser.add_argument(
        "--alerts", type=_count, default=10, help="timed CreateAlert runs, each at another centre"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the population and centres")
    parser.add_argument(
        "--batch", type=_count, default=100_000, help="devices per LocationBatch when ingesting"
    )
    parser.add_argument("--radius-km", type=float, default=3.0, help="radius of every alert ring")
    parser.add_argument(
        "--core-km",
        type=float,
        default=1.5,
        help="alert centres are positions of devices this close to the metro's centre",
    )
    parser.add_argument(
        "--window",
        type=_count,
        default=0,
        help="max_unacked_messages each gateway declares (0: the engine's default, 64)",
    )
    parser.add_argument(
        "--geofence-seconds", type=float, default=15.0, help="length of the geofence phase"
    )
    parser.add_argument(
        "--geofence-rate",
        type=_count,
        default=100_000,
        help="location updates a second during the geofence phase",
    )
    parser.add_argument(
        "--geofence-batch",
        type=_count,
        default=10_000,
        help="devices per batch during the geofence phase",
    )
    parser.add_argument(
        "--walk-in-share",
        type=float,
        default=0.02,
        help="share of each geofence batch that moves from outside into the ring",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results",
        help="directory for grpc.json and grpc.md",
    )
    args = parser.parse_args(argv)
    if args.devices < 10_000:
        parser.error("--devices must be at least 10000")
    if args.alerts < 1:
        parser.error("--alerts must be at least 1")
    if not 0 < args.walk_in_share <= 0.5:
        parser.error("--walk-in-share must be above 0 and at most 0.5")
    if args.batch < 1 or args.geofence_batch < 1 or args.geofence_rate < 1:
        parser.error("--batch, --geofence-batch and --geofence-rate must be at least 1")
    return args


def say(message: str) -> None:
    """A progress line for the operator, flushed at once."""
    print(message, flush=True)


# Processes.


class Engine:
    """``tuanyuan serve --dev`` in a child process, its log in ``workdir``.

    It runs with credentials of the benchmark's own (``--credentials``): an issuer
    allowed the most alerts a minute (the default limit, 10, would refuse the
    benchmark's dozen alerts within a minute), and a reporter and a gateway credential
    per gateway, each party using its own token.
    """

    def __init__(self, workdir: Path) -> None:
        self.port_file = workdir / "engine.port"
        self.log = workdir / "engine.log"
        self.tokens: dict[str, str] = {}
        self.flags = [
            "--listen",
            "127.0.0.1:0",
            "--ttl",
            str(TTL_S),
            # Info, not warning: the engine logs each sweep with its time (one line per
            # alert stage, none per batch), the in-engine baseline of the report.
            "--log-level",
            "info",
            "--credentials",
            str(self._credentials(workdir / "credentials.toml")),
        ]
        self.command = ["-m", "engine.cli", "serve", *self.flags]
        self.process: subprocess.Popen | None = None
        self.port = 0

    def _credentials(self, path: Path) -> Path:
        from engine import auth

        parties = [("issuer", auth.ISSUER, None, auth.MAX_ALERTS_PER_MINUTE)]
        for g in population.GATEWAYS:
            parties += [(f"reporter-{g}", auth.REPORTER, g, None)]
            parties += [(f"gateway-{g}", auth.GATEWAY, g, None)]
        entries = []
        for name, role, gateway, limit in parties:
            credential, self.tokens[name] = auth.new_credential(
                f"bench-{name}", role, gateway, limit
            )
            entries.append(auth.to_toml(credential))
        path.write_text("\n".join(entries))
        path.chmod(0o600)
        return path

    def token(self, party: str) -> str | None:
        """The bearer token of a party ("issuer", "reporter-1", "gateway-1"...), or None
        when the engine takes no credentials."""
        return self.tokens.get(party)

    def start(self) -> None:
        self.process, self.port = server.spawn(self.flags, self.port_file, self.log)

    def cpu_s(self) -> float:
        times = psutil.Process(self.process.pid).cpu_times()
        return times.user + times.system

    def rss(self) -> int:
        return common.rss_bytes(self.process.pid)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


class Child:
    """One multiprocessing child (spawn) and the parent's end of its pipe."""

    _context = multiprocessing.get_context("spawn")

    def __init__(self, name: str, target, *args) -> None:
        self.name = name
        self._cpu_s = 0.0
        self.conn, child_end = self._context.Pipe()
        self.process = self._context.Process(
            target=target, args=(*args, child_end), name=name, daemon=True
        )
        self.process.start()
        child_end.close()

    def send(self, message) -> None:
        self.conn.send(message)

    def recv(self, timeout_s: float = 600.0):
        """The child's next message; raises if it died or took longer than ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not self.conn.poll(0.1):
            if not self.process.is_alive():
                raise RuntimeError(f"{self.name} exited with code {self.process.exitcode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: no answer within {timeout_s:.0f} s")
        message = self.conn.recv()
        if isinstance(message, dict) and message.get("error"):
            raise RuntimeError(f"{self.name}: {message['error']}")
        return message

    def cpu_s(self) -> float:
        """CPU seconds used so far; after the child ended, the last reading."""
        try:
            times = psutil.Process(self.process.pid).cpu_times()
            self._cpu_s = times.user + times.system
        except psutil.NoSuchProcess:
            pass
        return self._cpu_s

    def stop(self) -> None:
        if self.process.is_alive():
            with contextlib.suppress(BrokenPipeError, OSError):
                self.conn.send(None)
            self.process.join(10)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)


class CpuMeter:
    """CPU seconds of the engine, the children and the whole machine over one phase."""

    def __init__(self, engine: Engine, children: dict[str, list[Child]]) -> None:
        self.engine, self.children = engine, children
        self._start = self._read()

    def _read(self) -> dict[str, float]:
        machine = psutil.cpu_times()
        me = psutil.Process().cpu_times()
        reading = {
            "wall": time.monotonic(),
            "engine": self.engine.cpu_s(),
            "parent": me.user + me.system,
            "machine_busy": sum(machine) - machine.idle - getattr(machine, "iowait", 0.0),
        }
        for group, members in self.children.items():
            reading[group] = sum(child.cpu_s() for child in members)
        return reading

    def stop(self) -> dict[str, float]:
        end = self._read()
        wall = end["wall"] - self._start["wall"]
        used = {key: end[key] - self._start[key] for key in end if key != "wall"}
        # Whatever else ran on the machine meanwhile (it is shared).
        ours = sum(value for key, value in used.items() if key != "machine_busy")
        used["other"] = max(0.0, used["machine_busy"] - ours)
        return {
            "wall_s": wall,
            **{f"{key}_cpu_s": value for key, value in used.items()},
            **{f"{key}_cores": value / wall for key, value in used.items() if wall > 0},
        }


# Population, centres and oracle.


def pick_centres(lat: np.ndarray, lng: np.ndarray, count: int, core_m: float, seed: int):
    """``count`` alert centres: positions of devices drawn at random (their own seed)
    among those within ``core_m`` of the metro's centre, where a ring is densest."""
    lat0, lng0 = population.city_centre("Beijing")
    near = np.flatnonzero(population.haversine_m(lat0, lng0, lat, lng) <= core_m)
    if near.size < count:
        raise RuntimeError(f"only {near.size} devices within {core_m:g} m of the centre")
    rows = np.random.default_rng([seed, 0xA1E27]).choice(near, size=count, replace=False)
    return np.column_stack([lat[rows], lng[rows]])


def destination(lat: float, lng: float, bearing: np.ndarray, distance_m: np.ndarray):
    """Points reached from one point by great-circle paths (bearings in radians)."""
    phi1, delta = np.radians(lat), distance_m / population.EARTH_RADIUS_M
    phi2 = np.arcsin(np.sin(phi1) * np.cos(delta) + np.cos(phi1) * np.sin(delta) * np.cos(bearing))
    dlam = np.arctan2(
        np.sin(bearing) * np.sin(delta) * np.cos(phi1), np.cos(delta) - np.sin(phi1) * np.sin(phi2)
    )
    return np.degrees(phi2), lng + np.degrees(dlam)


def score(
    received: dict[int, np.ndarray],
    distance: np.ndarray,
    radius_m: float,
    row_of_key: np.ndarray,
    gateway_of_row: np.ndarray,
    exclude_rows: np.ndarray | None = None,
) -> dict[str, int]:
    """What the gateways received for one ring against the oracle's distances: devices
    received twice, received but outside (``wrong``), inside but not received
    (``missing``), sent to another gateway than the device's (``misrouted``)."""
    n = distance.size
    parts, misrouted, unknown = [], 0, 0
    for gateway, ids in received.items():
        keys = common.keys_of_ids(ids, n)
        unknown += int((keys < 0).sum())
        rows = row_of_key[keys[keys >= 0]]
        misrouted += int((gateway_of_row[rows] != gateway).sum())
        parts.append(rows)
    rows = np.concatenate(parts) if parts else np.empty(0, np.int64)
    unique = np.unique(rows)
    got = np.zeros(n, dtype=bool)
    got[unique] = True
    must = distance <= radius_m - TOLERANCE_M
    if exclude_rows is not None:
        must[exclude_rows] = False
    return {
        "received": int(rows.size + unknown),
        "unique": int(unique.size),
        "duplicates": int(rows.size - unique.size),
        "wrong": unknown + int((distance[unique] > radius_m + TOLERANCE_M).sum()),
        "missing": int((must & ~got).sum()),
        "misrouted": misrouted,
        "oracle_inside": int((distance <= radius_m).sum()),
        "oracle_edge": int((np.abs(distance - radius_m) <= TOLERANCE_M).sum()),
    }


# Gateways' records.


def load_gateways(gateways: dict[int, Child]) -> dict[int, dict]:
    """Asks each gateway process to write its record and loads them."""
    records = {}
    for gateway, child in gateways.items():
        child.send("dump")
        answer = child.recv(120)
        data = np.load(answer["path"])
        names = answer["alerts"]
        alert_of_message = np.array(names, dtype=object)[data["alert"]] if names else []
        records[gateway] = {
            "time": data["time"],
            "alert": np.asarray(alert_of_message),
            "count": data["count"],
            "ids": data["ids"],
            "error": answer["error"],
        }
    return records


def messages_of(record: dict, alert_id: str):
    """Arrival times and id arrays of one alert's RECIPIENTS messages at one gateway."""
    ends = np.cumsum(record["count"])
    starts = ends - record["count"]
    chosen = np.flatnonzero(record["alert"] == alert_id)
    return record["time"][chosen], [record["ids"][starts[i] : ends[i]] for i in chosen]


# The alert service's side.


def alert_request(alert_id: str, lat: float, lng: float, radius_m: float):
    """A CreateAlert with one centre and an inline schedule of one long stage."""
    return alert_pb2.CreateAlertRequest(
        alert_id=alert_id,
        centres=[alert_pb2.Centre(latitude=lat, longitude=lng, label="bench")],
        stages=alert_pb2.Stages(stages=[alert_pb2.Stage(radius_m=radius_m, duration_s=STAGE_S)]),
        payload=alert_pb2.AlertPayload(
            texts=[alert_pb2.LocalizedText(language="en", name="bench", contact="110")],
            age_years=6,
        ),
    )


def wait_acked(stub, alert_id: str, timeout_s: float, walked_in: int = 0):
    """Polls GetAlert until the first stage has recipients (at least ``walked_in`` of
    them walked in) and every one of them is acked; returns the alert, the time the
    poll saw it, and whether it did before the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        alert = stub.GetAlert(alert_pb2.GetAlertRequest(alert_id=alert_id))
        stage = alert.stages[0]
        acked = sum(g.acked for g in stage.gateways)
        done = stage.swept and stage.recipients > 0 and acked == stage.recipients
        if done and stage.walked_in >= walked_in:
            return alert, time.monotonic(), True
        if time.monotonic() > deadline:
            return alert, time.monotonic(), False
        time.sleep(POLL_S)


def resolve(stub, alert_id: str) -> None:
    stub.ResolveAlert(
        alert_pb2.ResolveAlertRequest(alert_id=alert_id, resolution=alert_pb2.RESOLUTION_CANCELLED)
    )


def alert_progress(alert) -> dict[str, object]:
    stage = alert.stages[0]
    return {
        "recipients": stage.recipients,
        "walked_in": stage.walked_in,
        "acked": sum(g.acked for g in stage.gateways),
        "by_gateway": {
            g.gateway_id: {"recipients": g.recipients, "acked": g.acked} for g in stage.gateways
        },
    }


_SWEEP_LINE = re.compile(
    r"alert (?P<id>\S+) stage 1 \([^)]*\), stage start: (?P<count>\d+) new recipients .* "
    r"in (?P<ms>[\d.]+) ms"
)


def sweep_times(log: Path) -> dict[str, dict[str, float]]:
    """The engine's own time of each alert's first sweep, from its log."""
    found = {}
    for line in log.read_text(errors="replace").splitlines():
        match = _SWEEP_LINE.search(line)
        if match:
            found[match["id"]] = {"recipients": int(match["count"]), "ms": float(match["ms"])}
    return found


# The phases.


def ingest(reporters: list[Child], name: str, devices: int, meter: CpuMeter) -> dict:
    """One pass: every reporter streams its devices at once; the rate is devices over
    the time from the first send to the last summary, across the processes."""
    for child in reporters:
        child.send(name)
    answers = [child.recv() for child in reporters]
    cpu = meter.stop()
    first = min(a["first_send"] for a in answers)
    last = max(a["done"] for a in answers)
    reports = sum(a["summary"]["reports"] for a in answers)
    return {
        "devices": devices,
        "reports": reports,
        "seconds": last - first,
        "updates_per_s": reports / (last - first),
        "added": sum(a["summary"]["added"] for a in answers),
        "updated": sum(a["summary"]["updated"] for a in answers),
        "stale": sum(a["summary"]["stale"] for a in answers),
        "reporters": [
            {
                "gateway": a["gateway"],
                "reports": a["summary"]["reports"],
                "batches": a["summary"]["batches"],
                "seconds": a["done"] - a["first_send"],
                "start_lag_s": a["first_send"] - first,
            }
            for a in answers
        ],
        "cpu": cpu,
    }


def geofence_batches(
    args: argparse.Namespace,
    pop: dict[str, np.ndarray],
    lat: np.ndarray,
    lng: np.ndarray,
    centre: np.ndarray,
    path: Path,
) -> dict:
    """Prepares the geofence phase's batches: each is one gateway's (1, 2, 3 in turn);
    ``walk_in_share`` of it are devices outside the ring (never notified by its
    alert) moving to a random point well inside, the rest are devices at least 1 km
    outside taking a ~30 m step, so they stay outside. Each walker walks in once."""
    radius = args.radius_km * 1000.0
    count = max(1, round(args.geofence_seconds * args.geofence_rate / args.geofence_batch))
    walkers_per_batch = max(1, round(args.walk_in_share * args.geofence_batch))
    rng = np.random.default_rng([args.seed, 0x6E0F])
    distance = population.haversine_m(centre[0], centre[1], lat, lng)
    stepped_lat, stepped_lng = population.move(lat, lng, seed=args.seed + 2, step_m=30.0)
    stepped_far = population.haversine_m(centre[0], centre[1], stepped_lat, stepped_lng)

    walkers, others = {}, {}
    for k, gateway in enumerate(population.GATEWAYS):
        batches = len(range(k, count, len(population.GATEWAYS)))
        mine = np.flatnonzero(pop["gateway"] == gateway)
        outside = rng.permutation(mine[distance[mine] > radius + 50.0])
        walkers[gateway] = outside[: batches * walkers_per_batch]
        rest = outside[batches * walkers_per_batch :]
        rest = rest[(distance[rest] > radius + 1000.0) & (stepped_far[rest] > radius + 1000.0)]
        others[gateway] = rest
        if walkers[gateway].size < batches * walkers_per_batch or rest.size < args.geofence_batch:
            raise RuntimeError(f"gateway {gateway}: too few devices outside the ring")

    ids, lats, lngs, gateways, offsets = [], [], [], [], [0]
    walker_rows, walker_batch = [], []
    used = dict.fromkeys(population.GATEWAYS, 0)
    cursor = dict.fromkeys(population.GATEWAYS, 0)
    for k in range(count):
        gateway = population.GATEWAYS[k % len(population.GATEWAYS)]
        start = used[gateway]
        walk = walkers[gateway][start : start + walkers_per_batch]
        used[gateway] += walk.size
        # Walkers land anywhere within 90 % of the radius, uniformly over the disc.
        reach = 0.9 * radius * np.sqrt(rng.random(walk.size))
        walk_lat, walk_lng = destination(
            float(centre[0]), float(centre[1]), rng.random(walk.size) * 2 * np.pi, reach
        )
        # Others cycle through their gateway's pool (a device may report again later).
        pool = others[gateway]
        take = np.arange(cursor[gateway], cursor[gateway] + args.geofence_batch - walk.size)
        cursor[gateway] += take.size
        rest = pool[take % pool.size]
        order = rng.permutation(walk.size + rest.size)
        ids.append(np.concatenate([pop["device_id"][walk], pop["device_id"][rest]])[order])
        lats.append(np.concatenate([walk_lat, stepped_lat[rest]])[order])
        lngs.append(np.concatenate([walk_lng, stepped_lng[rest]])[order])
        gateways.append(gateway)
        offsets.append(offsets[-1] + order.size)
        walker_rows.append(walk)
        walker_batch.append(np.full(walk.size, k))

    walker_rows = np.concatenate(walker_rows)
    inside = population.haversine_m(
        centre[0], centre[1], np.concatenate(lats), np.concatenate(lngs)
    )
    expected_in = int(walker_rows.size)
    if (
        int((inside <= radius).sum()) != expected_in
        or (inside[inside <= radius] > radius - 1).any()
    ):
        raise RuntimeError("geofence batches: walkers and others are not where they should be")
    np.savez(
        path,
        device_id=np.concatenate(ids),
        lat=np.concatenate(lats),
        lng=np.concatenate(lngs),
        gateway=np.array(gateways, dtype=np.uint32),
        offsets=np.array(offsets, dtype=np.int64),
    )
    return {
        "batches": count,
        "batch_devices": args.geofence_batch,
        "interval_s": args.geofence_batch / args.geofence_rate,
        "walkers_per_batch": walkers_per_batch,
        "walker_rows": walker_rows,
        "walker_batch": np.concatenate(walker_batch),
    }


def geofence_latencies(
    records: dict[int, dict],
    alert_id: str,
    plan: dict,
    sent: np.ndarray,
    row_of_key: np.ndarray,
    n: int,
):
    """Per walker: arrival at its gateway minus the send time of the batch that moved
    it in; walkers never received (lost), received twice; other ids (the sweep's)."""
    batch_of_row = np.full(n, -1, dtype=np.int64)
    batch_of_row[plan["walker_rows"]] = plan["walker_batch"]
    latencies, received_walkers, others = [], [], {}
    for gateway, record in records.items():
        times, parts = messages_of(record, alert_id)
        rest = []
        for when, ids in zip(times, parts, strict=True):
            keys = common.keys_of_ids(ids, n)
            rows = row_of_key[keys[keys >= 0]]
            batch = batch_of_row[rows]
            walked = batch >= 0
            latencies.append(when - sent[batch[walked]])
            received_walkers.append(rows[walked])
            rest.append(ids[keys < 0])
            rest.append(ids[keys >= 0][~walked])
        others[gateway] = np.concatenate(rest) if rest else np.empty(0, np.uint64)
    latencies = np.concatenate(latencies) if latencies else np.empty(0)
    got = np.concatenate(received_walkers) if received_walkers else np.empty(0, np.int64)
    unique = np.unique(got)
    lost = int(np.setdiff1d(plan["walker_rows"], unique).size)
    return (
        latencies,
        {"received": int(got.size), "lost": lost, "duplicates": int(got.size - unique.size)},
        others,
    )


def warm_up(
    channel, gateway: int, stub, centre: np.ndarray, pop: dict, lat: np.ndarray, lng: np.ndarray
):
    """An untimed alert (a 300 m ring) that proves every gateway is subscribed, and,
    while it runs, the same small location batch twice: the first geofence test after
    the engine starts loads its numba kernel, which a running service has long done.
    Returns the two reports' times in ms."""
    stub.CreateAlert(alert_request("warm-up", float(centre[0]), float(centre[1]), 300.0))
    alert, _, ok = wait_acked(stub, "warm-up", 30)
    if not ok or len(alert.stages[0].gateways) != len(population.GATEWAYS):
        raise RuntimeError(f"warm-up alert not delivered to every gateway: {alert_progress(alert)}")
    rows = np.flatnonzero(pop["gateway"] == gateway)[:1000]
    batch = client.encode_batch(gateway, pop["device_id"][rows], lat[rows], lng[rows])
    times = []
    for _ in range(2):
        started = time.perf_counter()
        client.report(channel, [batch])
        times.append((time.perf_counter() - started) * 1e3)
    resolve(stub, "warm-up")
    time.sleep(0.2)
    return times


def timed_alerts(stub, centres: np.ndarray, radius_m: float) -> list[dict]:
    """One alert per centre: CreateAlert, poll until every recipient is acked, resolve.
    The gateways' arrival times are matched to ``started`` afterwards."""
    runs = []
    for k, (lat, lng) in enumerate(centres):
        alert_id = f"ring-{k + 1}"
        request = alert_request(alert_id, float(lat), float(lng), radius_m)
        started = time.monotonic()
        stub.CreateAlert(request)
        returned = time.monotonic()
        alert, polled, ok = wait_acked(stub, alert_id, 60)
        runs.append(
            {
                "alert_id": alert_id,
                "centre": [float(lat), float(lng)],
                "started": started,
                "create_returned_ms": (returned - started) * 1e3,
                "acked_seen_ms": (polled - started) * 1e3,
                "acked_in_time": ok,
                **alert_progress(alert),
            }
        )
        resolve(stub, alert_id)
        say(
            f"{alert_id}: {runs[-1]['recipients']:,} recipients, all acked seen by the "
            f"poll after {runs[-1]['acked_seen_ms']:.0f} ms"
        )
        # Let the CLOSED messages go out before the next alert.
        time.sleep(0.2)
    return runs


def score_alerts(
    runs: list[dict],
    records: dict[int, dict],
    sweeps: dict[str, dict],
    radius_m: float,
    lat: np.ndarray,
    lng: np.ndarray,
    row_of_key: np.ndarray,
    gateway_of_row: np.ndarray,
) -> None:
    """Adds to each run its first and last arrival (ms after the call, any gateway and
    per gateway), the engine's sweep time and the oracle's check."""
    for entry in runs:
        started = entry.pop("started")
        arrivals, union, last = [], {}, {}
        for gateway, record in records.items():
            times, parts = messages_of(record, entry["alert_id"])
            arrivals.append(times)
            union[gateway] = np.concatenate(parts) if parts else np.empty(0, np.uint64)
            if times.size:
                last[gateway] = float((times.max() - started) * 1e3)
        arrivals = np.concatenate(arrivals)
        entry["messages"] = int(arrivals.size)
        entry["first_ms"] = float((arrivals.min() - started) * 1e3) if arrivals.size else None
        entry["last_ms"] = float((arrivals.max() - started) * 1e3) if arrivals.size else None
        entry["last_by_gateway_ms"] = last
        distance = population.haversine_m(entry["centre"][0], entry["centre"][1], lat, lng)
        entry["check"] = score(union, distance, radius_m, row_of_key, gateway_of_row)
        entry["engine_sweep"] = sweeps.get(entry["alert_id"])


def baseline(
    pop: dict[str, np.ndarray],
    passes: list[tuple[np.ndarray, np.ndarray]],
    batch: int,
    centres: np.ndarray,
    radius_m: float,
    warm_centre: np.ndarray,
) -> dict:
    """The same work in this process, alone on the machine but for other users: a
    LocationIndex fed the same passes in the same batches (timed, as the in-process
    ingest rate), then ``new_recipients`` with a fresh record per ring."""
    index = LocationIndex(ttl_s=TTL_S)
    rows_of = {g: np.flatnonzero(pop["gateway"] == g) for g in population.GATEWAYS}
    ingest = []
    for lat, lng in passes:
        # Batches gathered before the clock starts, as the reporters encode theirs.
        batches = [
            (pop["device_id"][part], lat[part], lng[part], gateway)
            for gateway, rows in rows_of.items()
            for part in (rows[s : s + batch] for s in range(0, rows.size, batch))
        ]
        meter = _SelfMeter()
        for ids, part_lat, part_lng, gateway in batches:
            index.upsert(ids, part_lat, part_lng, gateway)
        cpu = meter.stop()
        ingest.append({"updates_per_s": pop["device_id"].size / cpu["seconds"], **cpu})
        del batches
    index.new_recipients(AlertRecord(), warm_centre[0], warm_centre[1], radius_m)
    times, counts = [], []
    for lat, lng in centres:
        started = time.perf_counter()
        found = index.new_recipients(AlertRecord(), lat, lng, radius_m)
        times.append((time.perf_counter() - started) * 1e3)
        counts.append(sum(int(ids.size) for ids in found.values()))
    return {"ms": times, "recipients": counts, "ingest": ingest}


class _SelfMeter:
    """Wall time, this process's cores and other processes' cores over a stretch."""

    def __init__(self) -> None:
        self._start = self._read()

    @staticmethod
    def _read() -> tuple[float, float, float]:
        me, machine = psutil.Process().cpu_times(), psutil.cpu_times()
        busy = sum(machine) - machine.idle - getattr(machine, "iowait", 0.0)
        return time.perf_counter(), me.user + me.system, busy

    def stop(self) -> dict[str, float]:
        wall, mine, busy = (b - a for a, b in zip(self._start, self._read(), strict=True))
        return {
            "seconds": wall,
            "cores": mine / wall,
            "other_cores": max(0.0, busy - mine) / wall,
        }


def run(args: argparse.Namespace, workdir: Path, machine: dict) -> dict:
    """Every phase, in order; returns the raw results."""
    n, radius = args.devices, args.radius_km * 1000.0
    result: dict = {"devices": n, "seed": args.seed, "radius_m": radius}

    # The population, its moved positions, and the files the reporters read.
    say(f"generating {n:,} metro devices (seed {args.seed}) and one move step")
    t0 = time.perf_counter()
    pop = population.metro(n, seed=args.seed)
    moved_lat, moved_lng = population.move(pop["lat"], pop["lng"], seed=args.seed + 1)
    arrays = {
        "device_id": pop["device_id"],
        "gateway": pop["gateway"],
        "load_lat": pop["lat"],
        "load_lng": pop["lng"],
        "move_lat": moved_lat,
        "move_lng": moved_lng,
    }
    paths = {}
    for name, values in arrays.items():
        paths[name] = str(workdir / f"{name}.npy")
        np.save(paths[name], values)
    row_of_key = np.empty(n, dtype=np.int64)
    row_of_key[common.keys_of_ids(pop["device_id"], n)] = np.arange(n)
    result["generate_s"] = time.perf_counter() - t0

    # Centres: the timed alerts, the geofence alert and an untimed warm-up.
    centres = pick_centres(moved_lat, moved_lng, args.alerts + 2, args.core_km * 1000.0, args.seed)
    warm_centre, geofence_centre, centres = centres[0], centres[1], centres[2:]
    plan = geofence_batches(args, pop, moved_lat, moved_lng, geofence_centre, workdir / "geo.npz")
    say(
        f"centres: {len(centres)} within {args.core_km:g} km of the metro centre; geofence "
        f"batches prepared ({plan['batches']} of {args.geofence_batch:,})"
    )

    engine = Engine(workdir)
    children: dict[str, list[Child]] = {"reporters": [], "gateways": [], "paced": []}
    try:
        engine.start()
        say(f"engine pid {engine.process.pid} on 127.0.0.1:{engine.port}")
        result["engine_command"] = " ".join(engine.command)
        result["credentials"] = bool(engine.tokens)

        # Children: gateways subscribe now; reporters encode both passes up front.
        gateways = {
            g: Child(
                f"gateway-{g}",
                grpc_worker.gateway,
                engine.port,
                engine.token(f"gateway-{g}"),
                g,
                args.window,
                str(workdir),
            )
            for g in population.GATEWAYS
        }
        reporters = [
            Child(
                f"reporter-{g}",
                grpc_worker.reporter,
                engine.port,
                engine.token(f"reporter-{g}"),
                g,
                paths,
                args.batch,
            )
            for g in population.GATEWAYS
        ]
        paced = Child(
            "paced-reporter",
            grpc_worker.paced_reporter,
            engine.port,
            {g: engine.token(f"reporter-{g}") for g in population.GATEWAYS},
            str(workdir / "geo.npz"),
        )
        children["gateways"] = list(gateways.values())
        children["reporters"] = reporters
        children["paced"] = [paced]
        ready = [child.recv(300) for child in reporters]
        for child in (*gateways.values(), paced):
            child.recv(300)
        result["reporters"] = ready
        say(
            "3 reporters ready: "
            + ", ".join(
                f"gateway {r['gateway']}: {r['devices']:,} devices in {r['batches']} batches "
                f"(encoded in {r['encode_s']:.1f} s)"
                for r in ready
            )
        )

        # 1. Ingest: the first load, then every device again at its moved position.
        result["ingest"] = {}
        for name in ("load", "move"):
            meter = CpuMeter(engine, children)
            result["ingest"][name] = ingest(reporters, name, n, meter)
            result["ingest"][name]["engine_rss"] = engine.rss()
            say(
                f"ingest {name}: {n:,} devices in {result['ingest'][name]['seconds']:.2f} s, "
                f"{result['ingest'][name]['updates_per_s'] / 1e6:.2f} M updates/s"
            )
        for child in reporters:
            child.stop()

        # 2. CreateAlert to the last batch acked, after an untimed warm-up.
        issuer = grpc_worker.channel(engine.port, engine.token("issuer"))
        stub = client.alert_stub(issuer)
        app = population.GATEWAYS[0]
        result["first_geofence_report_ms"] = warm_up(
            grpc_worker.channel(engine.port, engine.token(f"reporter-{app}")),
            app,
            stub,
            warm_centre,
            pop,
            moved_lat,
            moved_lng,
        )

        meter = CpuMeter(engine, children)
        runs = timed_alerts(stub, centres, radius)
        alerts_cpu = meter.stop()

        # 3. Geofence: an alert running, then a steady stream of updates.
        stub.CreateAlert(alert_request("geofence", *map(float, geofence_centre), radius))
        sweep, _, ok = wait_acked(stub, "geofence", 60)
        if not ok:
            raise RuntimeError(f"geofence alert's sweep not acked: {alert_progress(sweep)}")
        expected = int(plan["walker_rows"].size)
        meter = CpuMeter(engine, children)
        start_at = time.monotonic() + 0.2
        paced.send((start_at, plan["interval_s"]))
        stream = paced.recv(args.geofence_seconds * 10 + 120)
        geo_cpu = meter.stop()
        final, _, delivered = wait_acked(stub, "geofence", 30, walked_in=expected)
        resolve(stub, "geofence")
        time.sleep(0.5)

        records = load_gateways(gateways)
        engine_rss = engine.rss()
    finally:
        for group in children.values():
            for child in group:
                child.stop()
        engine.stop()
    result["engine_rss_end"] = engine_rss
    sweeps = sweep_times(engine.log)

    # 4. Timings and correctness of the CreateAlert runs.
    say("scoring against the haversine oracle")
    score_alerts(runs, records, sweeps, radius, moved_lat, moved_lng, row_of_key, pop["gateway"])
    result["alerts"] = {"runs": runs, "cpu": alerts_cpu}

    # The geofence phase: latencies, lost and duplicate walkers, and its sweep.
    sent = np.array(stream["sent"])
    latencies, walk_check, sweep_ids = geofence_latencies(
        records, "geofence", plan, sent, row_of_key, n
    )
    distance = population.haversine_m(geofence_centre[0], geofence_centre[1], moved_lat, moved_lng)
    total_updates = stream["summary"]["reports"]
    result["geofence"] = {
        "centre": geofence_centre.tolist(),
        "batches": plan["batches"],
        "batch_devices": plan["batch_devices"],
        "interval_s": plan["interval_s"],
        "target_rate": args.geofence_rate,
        "walkers_per_batch": plan["walkers_per_batch"],
        "walkers": expected,
        "updates": total_updates,
        "send_span_s": float(sent[-1] - sent[0]),
        "achieved_rate": total_updates / (stream["done"] - sent[0]),
        "send_rate": (sent.size - 1) * plan["batch_devices"] / (sent[-1] - sent[0])
        if sent.size > 1
        else None,
        "send_lag_max_s": float(
            (sent - (start_at + np.arange(sent.size) * plan["interval_s"])).max()
        ),
        "summary": stream["summary"],
        "latency_s": latencies.tolist(),
        "walk_check": walk_check,
        "delivered_in_time": delivered,
        "final": alert_progress(final),
        "sweep": alert_progress(sweep),
        "sweep_check": score(
            sweep_ids, distance, radius, row_of_key, pop["gateway"], exclude_rows=None
        ),
        "engine_sweep": sweeps.get("geofence"),
        "cpu": geo_cpu,
    }
    result["gateway_errors"] = {g: r["error"] for g, r in records.items() if r["error"]}

    # The in-process baseline for the same rings.
    say("in-process baseline: a LocationIndex fed the same passes, the same rings")
    result["baseline"] = baseline(
        pop,
        [(pop["lat"], pop["lng"]), (moved_lat, moved_lng)],
        args.batch,
        centres,
        radius,
        warm_centre,
    )
    return result


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark the command line asks for and writes its outputs."""
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    machine = common.machine_info()
    import google.protobuf
    import grpc

    machine["grpcio"] = grpc.__version__
    machine["protobuf"] = google.protobuf.__version__
    say(
        f"machine: {machine['cpu_count']} cores ({machine['cpu_model']}), "
        f"{machine['memory_gib']} GiB, load average {machine['load_average_at_start']}"
    )
    workdir = Path(tempfile.mkdtemp(prefix="tuanyuan-bench-grpc-"))
    try:
        raw = run(args, workdir, machine)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    command = (
        " ".join([os.path.basename(sys.executable), "-m", "bench.grpc", *sys.argv[1:]])
        if argv is None
        else "python -m bench.grpc " + " ".join(argv)
    )
    results = {
        "machine": machine,
        "command": command,
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "wall_s": time.perf_counter() - started,
        "load_average_at_end": common.load_average(),
        "peak_rss_parent": common.peak_rss_bytes(),
        **raw,
    }
    grpc_report.summarise(results)
    (args.out / "grpc.json").write_text(json.dumps(results, indent=1, default=_jsonable))
    (args.out / "grpc.md").write_text(grpc_report.markdown(results))
    say(f"wrote {args.out / 'grpc.json'} and {args.out / 'grpc.md'}")
    say(f"total wall time {results['wall_s'] / 60:.1f} min")
    # Missed speed targets are results; wrong answers are failures.
    return 0 if all(t["ok"] for t in results["targets"] if t["kind"] == "correctness") else 1


def _jsonable(value):
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON: {type(value).__name__}")


if __name__ == "__main__":
    sys.exit(main())
