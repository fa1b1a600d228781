"""Benchmark of the engine beside the structures a user would otherwise pick.

``python -m bench.run`` measures, on one seeded population and one set of query centres:
build time, resident memory per device, query latency per radius, recipients and wrong
devices against a brute-force haversine oracle, for the engine, numpy brute force,
scipy's cKDTree, Redis GEOSEARCH and a dict of H3 cells. ``--scale N`` instead fills
one engine index with N devices to see whether they fit. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import common, report
from bench.oracle import Oracle, build_store
from bench.peers import RedisGeoPeer
from engine.population import EARTH_RADIUS_M


def _count(text: str) -> int:
    """A device or query count: 10000000, 10_000_000 or 1e7."""
    value = float(text) if any(c in text for c in ".eE") else int(text)
    if value < 0 or value != int(value):
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(value)


def _radii(text: str) -> list[float]:
    """Comma-separated radii in kilometres, as metres."""
    try:
        radii = [float(part) * 1000.0 for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"radii must be numbers of km: {error}") from None
    if not radii or any(r <= 0 for r in radii):
        raise argparse.ArgumentTypeError(f"expected positive radii in km, got {text!r}")
    return sorted(set(radii))


def _peers(text: str) -> list[str]:
    """Comma-separated peer names (any case), in the tables' order."""
    known = {p.lower(): p for p in common.PEERS}
    chosen = set()
    for part in text.split(","):
        name = part.strip().lower()
        if not name:
            continue
        if name not in known:
            raise argparse.ArgumentTypeError(
                f"unknown peer {part.strip()!r}; choose from {', '.join(common.PEERS)}"
            )
        chosen.add(known[name])
    return [p for p in common.PEERS if p in chosen]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; every flag is described in ``--help``."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=(
            "Measures the tuanyuan engine beside numpy brute force, scipy cKDTree, Redis "
            "GEOSEARCH and an h3-py dict on the same seeded population and query centres, "
            "checking every answer against a float64 haversine oracle. Writes "
            "results.json, results.md and PNG charts to --out."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--population",
        choices=["metro", "nation", "both"],
        default="metro",
        help="metro: dense area around Beijing; nation: China's cities by population; "
        "both: one after the other, a table each",
    )
    parser.add_argument(
        "--devices", type=_count, default=10_000_000, help="devices in the population"
    )
    parser.add_argument(
        "--queries", type=_count, default=100, help="query centres per radius (same for all peers)"
    )
    parser.add_argument(
        "--brute-queries",
        type=_count,
        default=10,
        help="queries per radius for brute force, which scans every device each time",
    )
    parser.add_argument(
        "--radii", type=_radii, default="1,3,10,100", help="comma-separated radii in km"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the population and of the query centres"
    )
    parser.add_argument(
        "--peers",
        type=_peers,
        default=",".join(common.PEERS),
        help="comma-separated subset of the peers, any case",
    )
    parser.add_argument(
        "--redis-devices",
        type=_count,
        default=None,
        help="load only this many devices (a random subset) into Redis; its figures are "
        "then on a smaller population, as the tables say; None: all devices",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=60.0,
        help="seconds a peer may spend on one radius; past it (and past --min-queries) "
        "its remaining queries are skipped and the table says how many ran",
    )
    parser.add_argument(
        "--min-queries",
        type=_count,
        default=3,
        help="queries every peer runs per radius whatever the budget",
    )
    parser.add_argument(
        "--warmup",
        type=_count,
        default=1,
        help="untimed queries per peer and radius, at centres of their own, before timing",
    )
    parser.add_argument(
        "--h3-resolution", type=int, default=9, help="H3 resolution of the h3-dict peer's cells"
    )
    parser.add_argument(
        "--engine-resolution", type=int, default=10, help="H3 resolution the engine files under"
    )
    parser.add_argument(
        "--batch",
        type=_count,
        default=1_000_000,
        help="devices per engine upsert call when building and when moving",
    )
    parser.add_argument(
        "--move-check-queries",
        type=_count,
        default=10,
        help="queries per radius checked against a fresh oracle after the engine's moves",
    )
    parser.add_argument(
        "--scale",
        type=_count,
        default=None,
        metavar="N",
        help="instead of the comparison: fill one engine index with N nation devices in "
        "chunks (e.g. 100_000_000) and report memory, build time and query latency; "
        "writes scale.json and scale.md",
    )
    parser.add_argument(
        "--scale-chunk",
        type=_count,
        default=10_000_000,
        help="devices generated and upserted per chunk in --scale mode",
    )
    parser.add_argument(
        "--scale-queries", type=_count, default=20, help="queries per radius in --scale mode"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results",
        help="directory for results.json, results.md and the charts",
    )
    args = parser.parse_args(argv)
    if args.devices < 1:
        parser.error("--devices must be at least 1")
    if args.queries < 1:
        parser.error("--queries must be at least 1")
    return args


def say(message: str) -> None:
    """A progress line for the operator, flushed at once."""
    print(message, flush=True)


def run_worker(spec: dict, workdir: Path) -> dict:
    """Runs one measurement in a fresh Python process and returns its result."""
    tag = spec.get("peer", spec["mode"])
    spec_path = workdir / f"spec-{tag}.json"
    out_path = workdir / f"result-{tag}.json"
    spec = {**spec, "out": str(out_path)}
    spec_path.write_text(json.dumps(spec))
    started = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, "-m", "bench.worker", str(spec_path)],
        cwd=Path(__file__).resolve().parent.parent,
        check=False,
    )
    if completed.returncode != 0 or not out_path.exists():
        return {"error": f"worker exited with code {completed.returncode}"}
    result = json.loads(out_path.read_text())
    result["wall_s"] = time.perf_counter() - started
    return result


def bench_population(kind: str, args: argparse.Namespace, workdir: Path) -> dict:
    """Generates one population, stores the oracle's answers, measures every peer."""
    n, seed = args.devices, args.seed
    say(f"[{kind}] generating {n:,} devices ({common.describe_population(kind)}), seed {seed}")
    t0 = time.perf_counter()
    pop = common.make_population(kind, n, seed)
    generate_s = time.perf_counter() - t0
    digest = common.checksum(pop)
    say(f"[{kind}] generated in {generate_s:.1f} s")

    centres = common.query_centres(pop, args.queries, seed)
    # Warm-up centres come from another seed so no timed query finds its ring hot.
    warmup = common.query_centres(pop, max(args.warmup, 0), seed + 7919)[: args.warmup]
    np.save(workdir / "centres.npy", centres)
    np.save(workdir / "warmup.npy", warmup)

    spheres = {"oracle": EARTH_RADIUS_M}
    say(f"[{kind}] oracle: float64 haversine for {len(centres)} centres x {len(args.radii)} radii")
    t0 = time.perf_counter()
    oracle = Oracle(pop)
    oracle_stats = build_store(
        oracle,
        pop["device_id"],
        centres,
        args.radii,
        workdir / "oracle",
        spheres,
        lambda message: say(f"[{kind}] {message}"),
    )
    oracle_s = time.perf_counter() - t0
    # Workers regenerate the population; the parent's copy would only crowd memory.
    del oracle, pop

    options = {
        "h3_resolution": args.h3_resolution,
        "engine_resolution": args.engine_resolution,
        "batch": args.batch,
        "move_batch": args.batch,
        "move_check_queries": args.move_check_queries,
        "redis_devices": args.redis_devices,
    }
    peers: dict[str, dict] = {}
    for name in args.peers:
        queries = min(args.queries, args.brute_queries) if name == "brute-force" else args.queries
        say(f"[{kind}] {name}: fresh process, build then {queries} queries per radius")
        spec = {
            "mode": "peer",
            "peer": name,
            "population": kind,
            "n": n,
            "seed": seed,
            "checksum": digest,
            "radii_m": args.radii,
            "centres": str(workdir / "centres.npy"),
            "warmup": str(workdir / "warmup.npy"),
            "oracle_dir": str(workdir / "oracle"),
            "queries": queries,
            "min_queries": args.min_queries,
            "budget_s": args.budget_s,
            "options": options,
            "own_sphere_m": RedisGeoPeer.earth_radius_m if name == "redis-geo" else None,
            "key_limit": args.redis_devices if name == "redis-geo" else None,
        }
        load_before = common.load_average()
        peers[name] = run_worker(spec, workdir)
        peers[name]["load_average"] = {"before": load_before, "after": common.load_average()}
        if "error" in peers[name]:
            say(f"[{kind}] {name}: FAILED ({peers[name]['error']})")
        else:
            say(f"[{kind}] {name}: done in {peers[name]['wall_s']:.0f} s")
    shutil.rmtree(workdir / "oracle", ignore_errors=True)
    return {
        "population": kind,
        "description": common.describe_population(kind),
        "devices": n,
        "seed": seed,
        "queries": args.queries,
        "brute_queries": min(args.queries, args.brute_queries),
        "radii_m": args.radii,
        "budget_s": args.budget_s,
        "min_queries": args.min_queries,
        "redis_devices": args.redis_devices,
        "h3_resolution": args.h3_resolution,
        "engine_resolution": args.engine_resolution,
        "batch": args.batch,
        "generate_s": generate_s,
        "oracle_s": oracle_s,
        "centres": centres.tolist(),
        "oracle": oracle_stats,
        "peers": peers,
    }


def run_scale(args: argparse.Namespace, workdir: Path) -> dict:
    """The ``--scale`` mode: one engine index with ``args.scale`` devices."""
    say(
        f"[scale] {args.scale:,} nation devices into one engine index, chunks of "
        f"{args.scale_chunk:,}, seed {args.seed}"
    )
    spec = {
        "mode": "scale",
        "n": args.scale,
        "chunk": args.scale_chunk,
        "seed": args.seed,
        "queries": args.scale_queries,
        "radii_m": args.radii,
        "options": {"batch": args.batch, "engine_resolution": args.engine_resolution},
    }
    return run_worker(spec, workdir)


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark the command line asks for and writes its outputs."""
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    machine = common.machine_info()
    say(
        f"machine: {machine['cpu_count']} cores ({machine['cpu_model']}), "
        f"{machine['memory_gib']} GiB, python {machine['python']}, numpy {machine['numpy']}"
    )
    workdir = Path(tempfile.mkdtemp(prefix="tuanyuan-bench-"))
    try:
        if args.scale is not None:
            result = run_scale(args, workdir)
            result = {"machine": machine, "wall_s": time.perf_counter() - started, **result}
            report.write_scale(result, args.out)
            say(f"wrote {args.out / 'scale.json'} and {args.out / 'scale.md'}")
            return 0 if "error" not in result else 1
        kinds = ["metro", "nation"] if args.population == "both" else [args.population]
        populations = {kind: bench_population(kind, args, workdir) for kind in kinds}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    wall_s = time.perf_counter() - started
    results = {
        "machine": machine,
        "command": " ".join([os.path.basename(sys.executable), "-m", "bench.run", *sys.argv[1:]])
        if argv is None
        else "python -m bench.run " + " ".join(argv),
        "wall_s": wall_s,
        "populations": populations,
    }
    report.summarise(results)
    paths = report.write(results, args.out)
    for path in paths:
        say(f"wrote {path}")
    say(f"total wall time {wall_s / 60:.1f} min")
    failed = any("error" in p for pop in populations.values() for p in pop["peers"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
