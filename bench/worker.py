"""One fresh process per measurement: ``python -m bench.worker SPEC.json``.

A worker regenerates the population from its seed (and proves it is the same with a
checksum), reads its resident memory, builds one peer's structure, reads it again, then
runs the queries against the oracle answers that ``bench.run`` stored, and writes what
it measured as JSON. A fresh process per peer keeps each peer's allocations apart.
The ``scale`` mode instead fills one engine index with a nation population in chunks.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

# h3, redis and scipy are imported before the first memory reading, so their code and
# tables are not counted as a structure's memory.
import h3  # noqa: F401
import numpy as np
import redis  # noqa: F401
import scipy.spatial  # noqa: F401

import engine
from bench import common
from bench.oracle import Oracle, OracleStore, Scorer
from bench.peers import Peer, make_peer
from engine import population

#: Wrong queries kept in full (centre, counts, example devices) per peer and radius.
KEEP_WRONG = 20


def say(tag: str, message: str) -> None:
    """A progress line for the operator, flushed at once."""
    print(f"  [{tag}] {message}", flush=True)


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile of a list, or None for an empty one."""
    return float(np.percentile(values, q)) if values else None


def _examples(
    scorer: Scorer,
    ids: np.ndarray,
    bits: np.ndarray,
    boundary: np.ndarray,
    limit: int,
    pop: dict[str, np.ndarray],
    lat: float,
    lng: float,
) -> dict[str, list[dict[str, float]]]:
    """A few missing and extra devices of a wrong answer, with their distances."""
    missing, extra = scorer.examples(ids, bits, boundary, limit)
    pop_keys = pop["device_id"] - np.uint64(population.ID_BASE)
    out: dict[str, list[dict[str, float]]] = {}
    for label, found in (("missing_examples", missing), ("extra_examples", extra)):
        rows = [int(np.flatnonzero(pop_keys == np.uint64(k))[0]) for k in found]
        out[label] = [
            {
                "device_id": int(pop["device_id"][r]),
                "lat": float(pop["lat"][r]),
                "lng": float(pop["lng"][r]),
                "distance_m": float(population.haversine_m(lat, lng, pop["lat"][r], pop["lng"][r])),
            }
            for r in rows
        ]
    return out


def run_queries(
    peer: Peer,
    spec: dict,
    pop: dict[str, np.ndarray],
    centres: np.ndarray,
    warmup: np.ndarray,
    store: OracleStore,
    scorer: Scorer,
) -> dict[str, dict]:
    """Times the peer's queries per radius and checks each answer with the oracle.

    A peer with ``own_sphere_m`` in its spec (Redis) is also checked against an oracle
    on a sphere of that radius, computed here for the queries it actually ran; it is
    judged on that sphere in the WRONG lines and kept examples, since its misses on the
    engine's sphere come from its Earth radius and are only counted.
    """
    n = spec["n"]
    limit = n if spec.get("key_limit") is None else min(n, int(spec["key_limit"]))
    own_radius = spec.get("own_sphere_m")
    own_oracle = Oracle(pop) if own_radius else None
    spheres = ["oracle", "own"] if own_radius else ["oracle"]
    verdict = spheres[-1]
    out: dict[str, dict] = {}
    for ri, radius in enumerate(spec["radii_m"]):
        # Untimed first queries at this radius: the first answers of a size fault in
        # fresh pages for their output, which a running service has long done.
        for lat, lng in warmup:
            with contextlib.suppress(Exception):  # a failing query shows up when timed
                peer.query(float(lat), float(lng), radius)
        latencies: list[float] = []
        recipients: list[int] = []
        totals = {s: {"missing": 0, "extra": 0, "duplicate": 0} for s in spheres}
        wrong_queries: list[dict] = []
        started = time.perf_counter()
        stopped_by_budget = False
        error = None
        for q in range(min(spec["queries"], len(centres))):
            elapsed = time.perf_counter() - started
            if q >= spec["min_queries"] and elapsed > spec["budget_s"]:
                stopped_by_budget = True
                break
            lat, lng = float(centres[q, 0]), float(centres[q, 1])
            t0 = time.perf_counter_ns()
            try:
                answer = peer.query(lat, lng, radius)
            except Exception as failure:  # a failed query ends the radius, not the run
                error = f"{type(failure).__name__}: {failure}"
                say(peer.name, f"query {q} at {radius / 1000:g} km FAILED: {error}")
                break
            latencies.append((time.perf_counter_ns() - t0) / 1e6)
            ids = peer.answer_ids(answer)
            del answer
            recipients.append(int(ids.size))
            for sphere in spheres:
                if sphere == "oracle":
                    bits, boundary = store.bits("oracle", ri, q), store.boundary("oracle", ri, q)
                else:
                    ring = own_oracle.rings(lat, lng, radius, {"own": own_radius})["own"]
                    bits, boundary = ring.bits, ring.boundary
                missing, extra, duplicate = scorer.score(ids, bits, boundary, limit)
                totals[sphere]["missing"] += missing
                totals[sphere]["extra"] += extra
                totals[sphere]["duplicate"] += duplicate
                if sphere == verdict and missing + extra + duplicate:
                    on = "" if sphere == "oracle" else " (on its own sphere)"
                    say(
                        peer.name,
                        f"WRONG{on} at {radius / 1000:g} km, centre ({lat:.6f}, {lng:.6f}): "
                        f"{missing} missing, {extra} extra, {duplicate} duplicated",
                    )
                    if len(wrong_queries) < KEEP_WRONG:
                        wrong_queries.append(
                            {
                                "query": q,
                                "lat": lat,
                                "lng": lng,
                                "radius_m": radius,
                                "sphere": sphere,
                                "missing": missing,
                                "extra": extra,
                                "duplicate": duplicate,
                                **_examples(scorer, ids, bits, boundary, limit, pop, lat, lng),
                            }
                        )
        wrong = {s: t["missing"] + t["extra"] + t["duplicate"] for s, t in totals.items()}
        out[str(radius)] = {
            "radius_m": radius,
            "queries": len(latencies),
            "stopped_by_budget": stopped_by_budget,
            "error": error,
            "latency_ms": latencies,
            "recipients": recipients,
            "totals": totals,
            "wrong": wrong,
            "wrong_queries": wrong_queries,
        }
        summary = (
            f"{radius / 1000:g} km: {len(latencies)} queries in "
            f"{time.perf_counter() - started:.1f} s"
        )
        if latencies:
            summary += (
                f", p50 {percentile(latencies, 50):.3f} ms, p95 {percentile(latencies, 95):.3f}"
                f" ms, mean {np.mean(recipients):,.0f} devices, wrong {wrong['oracle']}"
            )
            if own_radius:
                summary += f" ({wrong['own']} on its own sphere)"
        if stopped_by_budget:
            summary += " [stopped by the time budget]"
        if error:
            summary += f" [stopped by an error: {error}]"
        say(peer.name, summary)
    return out


def engine_moves(peer: Peer, spec: dict, pop: dict[str, np.ndarray], centres: np.ndarray) -> dict:
    """Moves every device one step (batches of known ids), then checks rings again."""
    index = peer.index
    n = pop["device_id"].size
    batch = int(spec["options"].get("move_batch", 1_000_000))
    lat, lng = population.move(pop["lat"], pop["lng"], seed=spec["seed"] + 1)
    moved = {"device_id": pop["device_id"], "lat": lat, "lng": lng, "gateway": pop["gateway"]}
    updated = stale = added = 0
    spent = 0.0
    for start in range(0, n, batch):
        end = min(start + batch, n)
        t0 = time.perf_counter()
        a, u, s = index.upsert(
            device_id=moved["device_id"][start:end],
            lat=lat[start:end],
            lng=lng[start:end],
            gateway=moved["gateway"][start:end],
        )
        spent += time.perf_counter() - t0
        added, updated, stale = added + a, updated + u, stale + s
    rate = n / spent if spent else None
    memory = index.memory_bytes()
    say(
        "engine",
        f"moves: {n:,} known devices re-reported in batches of {batch:,}: {spent:.2f} s, "
        f"{rate or 0:,.0f} devices/s ({updated:,} updated, {added:,} added, {stale:,} stale); "
        f"memory_bytes {memory / n:.1f} B/device before compaction",
    )
    result = {
        "devices": n,
        "batch": batch,
        "seconds": spent,
        "devices_per_s": rate,
        "added": added,
        "updated": updated,
        "stale": stale,
        "memory_bytes_per_device": memory / n if n else None,
    }

    # Rings after the moves, before any compaction: the moved devices sit in the tail.
    checks = int(spec["options"].get("move_check_queries", 10))
    if checks <= 0:
        return result
    oracle = Oracle(moved)
    scorer = Scorer(n)
    after: dict[str, dict] = {}
    for radius in spec["radii_m"]:
        latencies, wrong, wrong_queries = [], 0, []
        for q in range(min(checks, len(centres))):
            lat0, lng0 = float(centres[q, 0]), float(centres[q, 1])
            ring = oracle.ring(lat0, lng0, radius)
            t0 = time.perf_counter_ns()
            answer = index.within(lat0, lng0, radius)
            latencies.append((time.perf_counter_ns() - t0) / 1e6)
            missing, extra, duplicate = scorer.score(answer, ring.bits, ring.boundary)
            if missing + extra + duplicate:
                say(
                    "engine",
                    f"WRONG after moves at {radius / 1000:g} km, centre ({lat0:.6f}, {lng0:.6f}): "
                    f"{missing} missing, {extra} extra, {duplicate} duplicated",
                )
                wrong_queries.append(
                    {
                        "query": q,
                        "lat": lat0,
                        "lng": lng0,
                        "radius_m": radius,
                        "missing": missing,
                        "extra": extra,
                        "duplicate": duplicate,
                        **_examples(scorer, answer, ring.bits, ring.boundary, n, moved, lat0, lng0),
                    }
                )
            wrong += missing + extra + duplicate
        after[str(radius)] = {
            "queries": len(latencies),
            "latency_ms": latencies,
            "wrong": wrong,
            "wrong_queries": wrong_queries[:KEEP_WRONG],
        }
        say(
            "engine",
            f"after moves, {radius / 1000:g} km: {len(latencies)} queries checked, "
            f"p95 {percentile(latencies, 95):.3f} ms, wrong {wrong}",
        )
    result["after_moves"] = after
    t0 = time.perf_counter()
    index.compact()
    result["compact_s"] = time.perf_counter() - t0
    result["memory_bytes_per_device_compacted"] = index.memory_bytes() / n if n else None
    return result


def run_peer(spec: dict) -> dict:
    """Builds one peer in this fresh process and measures it."""
    name = spec["peer"]
    n, seed = spec["n"], spec["seed"]
    t0 = time.perf_counter()
    pop = common.make_population(spec["population"], n, seed)
    if common.checksum(pop) != spec["checksum"]:
        raise RuntimeError("the regenerated population differs from the parent's")
    say(name, f"population regenerated and verified in {time.perf_counter() - t0:.1f} s")
    centres = np.load(spec["centres"])
    warmup = np.load(spec["warmup"])
    store = OracleStore(Path(spec["oracle_dir"]))

    peer = make_peer(name, spec["options"])
    try:
        if hasattr(peer, "start"):
            peer.start()
        common.release_freed_memory()
        rss_before = common.rss_bytes(peer.memory_pid)
        t0 = time.perf_counter()
        info = peer.build(pop)
        build_s = time.perf_counter() - t0
        common.release_freed_memory()
        rss_after = common.rss_bytes(peer.memory_pid)
        held = peer.devices()
        per_device = (rss_after - rss_before) / held if held else None
        say(
            name,
            f"built on {held:,} devices in {build_s:.2f} s ({held / build_s:,.0f} devices/s); "
            f"resident memory +{(rss_after - rss_before) / 2**20:,.0f} MiB = "
            f"{per_device or 0:.1f} B/device",
        )
        result: dict[str, object] = {
            "peer": name,
            "devices": held,
            "population_devices": n,
            "build_s": build_s,
            "ingest_devices_per_s": held / build_s if build_s else None,
            "rss_before": rss_before,
            "rss_after": rss_after,
            "resident_bytes_per_device": per_device,
            "build_info": info,
        }
        if name == "engine":
            memory = peer.index.memory_bytes()
            result["memory_bytes_per_device"] = memory / held if held else None
            say(
                name,
                f"index.memory_bytes() {memory / 2**20:,.0f} MiB = {memory / held:.1f} B/device",
            )

        scorer = Scorer(n)
        result["radii"] = run_queries(peer, spec, pop, centres, warmup, store, scorer)
        if name == "engine" and spec["options"].get("moves", True):
            result["moves"] = engine_moves(peer, spec, pop, centres)
        return result
    finally:
        peer.close()


def run_scale(spec: dict) -> dict:
    """Fills one engine index with a nation population, chunk by chunk, and measures
    memory, build speed and a few queries: does the whole country fit?"""
    total, chunk, seed = spec["n"], spec["chunk"], spec["seed"]
    batch = int(spec["options"].get("batch", 1_000_000))
    index = engine.LocationIndex(
        ttl_s=6 * 3600, resolution=int(spec["options"].get("engine_resolution", 10))
    )
    # Compiles the generator's kernels and loads the city table before the first memory
    # reading, so the growth counted is the index's.
    population.nation(1000, seed=seed)
    common.release_freed_memory()
    rss_start = common.rss_bytes()
    seen = time.time() - 60.0
    rng = np.random.default_rng([seed, 0x5CA1E])
    samples: list[np.ndarray] = []
    chunks: list[dict] = []
    upsert_s = 0.0
    loaded = 0
    for c, start in enumerate(range(0, total, chunk)):
        size = min(chunk, total - start)
        t0 = time.perf_counter()
        pop = population.nation(size, seed=seed + c)
        # Chunks draw the same permutation of keys: shift each chunk's ids past the last.
        ids = pop["device_id"] + np.uint64(start)
        generate_s = time.perf_counter() - t0
        rows = rng.choice(size, size=min(size, 1000), replace=False)
        samples.append(np.column_stack([pop["lat"][rows], pop["lng"][rows]]))
        t0 = time.perf_counter()
        for b in range(0, size, batch):
            e = min(b + batch, size)
            index.upsert(
                device_id=ids[b:e],
                lat=pop["lat"][b:e],
                lng=pop["lng"][b:e],
                gateway=pop["gateway"][b:e],
                seen_at=seen,
            )
        spent = time.perf_counter() - t0
        upsert_s += spent
        loaded += size
        del pop, ids
        common.release_freed_memory()
        rss = common.rss_bytes()
        memory = index.memory_bytes()
        chunks.append(
            {
                "devices": loaded,
                "generate_s": generate_s,
                "upsert_s": spent,
                "rss": rss,
                "memory_bytes": memory,
            }
        )
        say(
            "scale",
            f"chunk {c + 1}: {loaded:,} devices, upsert {spent:.1f} s "
            f"({size / spent:,.0f} devices/s), RSS {rss / 2**30:.2f} GiB "
            f"({(rss - rss_start) / loaded:.1f} B/device), memory_bytes {memory / loaded:.1f} "
            f"B/device",
        )
    t0 = time.perf_counter()
    index.compact()
    compact_s = time.perf_counter() - t0
    common.release_freed_memory()
    rss_end = common.rss_bytes()
    memory = index.memory_bytes()
    live = len(index)
    say(
        "scale",
        f"compacted in {compact_s:.1f} s: {live:,} live devices, RSS {rss_end / 2**30:.2f} GiB, "
        f"{(rss_end - rss_start) / live:.1f} B/device resident, memory_bytes "
        f"{memory / live:.1f} B/device, peak RSS {common.peak_rss_bytes() / 2**30:.2f} GiB",
    )
    centres_all = np.concatenate(samples)
    pick = rng.choice(len(centres_all), size=min(spec["queries"], len(centres_all)), replace=False)
    centres = centres_all[pick]
    warm_lat, warm_lng = centres_all[rng.integers(len(centres_all))]
    radii: dict[str, dict] = {}
    for radius in spec["radii_m"]:
        # One untimed query per radius, as in the comparison: first-touch page faults.
        index.within(float(warm_lat), float(warm_lng), radius)
        latencies, recipients = [], []
        for lat, lng in centres:
            t0 = time.perf_counter_ns()
            answer = index.within(float(lat), float(lng), radius)
            latencies.append((time.perf_counter_ns() - t0) / 1e6)
            recipients.append(int(answer.size))
        radii[str(radius)] = {
            "radius_m": radius,
            "queries": len(latencies),
            "latency_ms": latencies,
            "recipients": recipients,
        }
        say(
            "scale",
            f"{radius / 1000:g} km: {len(latencies)} queries, p50 "
            f"{percentile(latencies, 50):.3f} ms, p95 {percentile(latencies, 95):.3f} ms, mean "
            f"{np.mean(recipients):,.0f} devices",
        )
    return {
        "devices": live,
        "chunk": chunk,
        "upsert_s": upsert_s,
        "compact_s": compact_s,
        "build_s": upsert_s + compact_s,
        "ingest_devices_per_s": loaded / upsert_s if upsert_s else None,
        "rss_start": rss_start,
        "rss_end": rss_end,
        "peak_rss": common.peak_rss_bytes(),
        "resident_bytes_per_device": (rss_end - rss_start) / live if live else None,
        "memory_bytes_per_device": memory / live if live else None,
        "chunks": chunks,
        "radii": radii,
    }


def main(argv: list[str] | None = None) -> int:
    """Runs the measurement a spec file describes and writes its JSON result."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m bench.worker SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    result = run_scale(spec) if spec["mode"] == "scale" else run_peer(spec)
    Path(spec["out"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
