"""Turns raw measurements into summaries, markdown tables, targets and charts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bench.common import PEERS, REDIS_EARTH_RADIUS_M
from engine.population import EARTH_RADIUS_M

#: The issue's targets for the engine.
CKDTREE_1KM_SPEEDUP = 10.0
CKDTREE_FAR_SPEEDUP = 20.0
REDIS_SPEEDUP = 200.0
GATHER_RATIO = 4.0
BUILD_SPEEDUP = 5.0
MOVES_PER_S = 3_000_000.0
BYTES_PER_DEVICE = 40.0


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _km(radius_m: float) -> str:
    return f"{radius_m / 1000:g} km"


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if value >= 0.001 else f"{value:.1e}"


def _rate(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1e6:
        return f"{value / 1e6:.2f} M"
    if value >= 1e3:
        return f"{value / 1e3:.0f} k"
    return f"{value:.0f}"


def _ratio(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}x" if value >= 100 else f"{value:.3g}x"


def _int(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def summarise(results: dict) -> None:
    """Adds per-peer summaries, speed-ups, gather cost and targets to each population."""
    for pop in results["populations"].values():
        radii = pop["radii_m"]
        summary: dict[str, dict] = {}
        for name, raw in pop["peers"].items():
            if "error" in raw:
                summary[name] = {"error": raw["error"]}
                continue
            per_radius = {}
            for radius in radii:
                cell = raw["radii"][str(radius)]
                oracle_counts = [
                    s["recipients_oracle"] for s in pop["oracle"][str(radius)][: cell["queries"]]
                ]
                per_radius[str(radius)] = {
                    "queries": cell["queries"],
                    "oracle_mean_recipients": float(np.mean(oracle_counts))
                    if oracle_counts
                    else None,
                    "stopped_by_budget": cell["stopped_by_budget"],
                    "p50_ms": _pct(cell["latency_ms"], 50),
                    "p95_ms": _pct(cell["latency_ms"], 95),
                    "mean_recipients": float(np.mean(cell["recipients"]))
                    if cell["recipients"]
                    else None,
                    "wrong": cell["wrong"]["oracle"],
                    "wrong_own_sphere": cell["wrong"].get("own"),
                    "error": cell.get("error"),
                }
            summary[name] = {
                "devices": raw["devices"],
                "build_s": raw["build_s"],
                "ingest_devices_per_s": raw["ingest_devices_per_s"],
                "resident_bytes_per_device": raw["resident_bytes_per_device"],
                "wrong": sum(c["wrong"] for c in per_radius.values()),
                "wrong_own_sphere": sum(c["wrong_own_sphere"] or 0 for c in per_radius.values())
                if name == "redis-geo"
                else None,
                "radii": per_radius,
            }
        pop["summary"] = summary

        gather = {}
        for radius in radii:
            stats = pop["oracle"][str(radius)]
            times = [s["gather_ms"] for s in stats]
            gather[str(radius)] = {
                "p50_ms": _pct(times, 50),
                "p95_ms": _pct(times, 95),
                "mean_recipients": float(np.mean([s["recipients_oracle"] for s in stats])),
            }
        pop["gather"] = gather

        engine = summary.get("engine")
        speedups: dict[str, dict[str, float | None]] = {}
        if engine and "error" not in engine:
            for name, peer in summary.items():
                if name == "engine" or "error" in peer:
                    continue
                speedups[name] = {}
                for radius in radii:
                    mine = engine["radii"][str(radius)]["p95_ms"]
                    theirs = peer["radii"][str(radius)]["p95_ms"]
                    speedups[name][str(radius)] = theirs / mine if mine and theirs else None
            for radius in radii:
                g = gather[str(radius)]
                e = engine["radii"][str(radius)]
                g["engine_p50_over_gather_p50"] = e["p50_ms"] / g["p50_ms"] if g["p50_ms"] else None
                g["engine_p95_over_gather_p50"] = e["p95_ms"] / g["p50_ms"] if g["p50_ms"] else None
        pop["speedups"] = speedups
        pop["targets"] = _targets(pop)


def _check(name: str, target: str, measured: str, ok: bool | None) -> dict:
    return {
        "name": name,
        "target": target,
        "measured": measured,
        "pass": ok,
    }


def _targets(pop: dict) -> list[dict]:
    """The issue's targets, each with what was measured and whether it passed."""
    summary, speedups, radii = pop["summary"], pop["speedups"], pop["radii_m"]
    engine = summary.get("engine")
    if not engine or "error" in engine:
        return [_check("all", "engine measured", "engine not run", None)]
    raw = pop["peers"]["engine"]
    out = []

    ckd = speedups.get("cKDTree")
    near = [r for r in radii if r <= 1000.0]
    far = [r for r in radii if r >= 3000.0]
    if ckd and near:
        values = [ckd[str(r)] for r in near]
        out.append(
            _check(
                "query p95 vs cKDTree, 1 km",
                f">= {CKDTREE_1KM_SPEEDUP:g}x faster",
                ", ".join(f"{_km(r)} {_ratio(v)}" for r, v in zip(near, values, strict=True)),
                all(v is not None and v >= CKDTREE_1KM_SPEEDUP for v in values),
            )
        )
    if ckd and far:
        values = [ckd[str(r)] for r in far]
        out.append(
            _check(
                "query p95 vs cKDTree, 3 km and beyond",
                f">= {CKDTREE_FAR_SPEEDUP:g}x faster",
                ", ".join(f"{_km(r)} {_ratio(v)}" for r, v in zip(far, values, strict=True)),
                all(v is not None and v >= CKDTREE_FAR_SPEEDUP for v in values),
            )
        )
    redis = speedups.get("redis-geo")
    if redis:
        values = [redis[str(r)] for r in radii]
        capped = summary["redis-geo"]["devices"] < pop["devices"]
        out.append(
            _check(
                "query p95 vs Redis GEOSEARCH",
                f">= {REDIS_SPEEDUP:g}x faster" + (" (Redis on fewer devices)" if capped else ""),
                ", ".join(f"{_km(r)} {_ratio(v)}" for r, v in zip(radii, values, strict=True)),
                all(v is not None and v >= REDIS_SPEEDUP for v in values),
            )
        )
    ratios = [pop["gather"][str(r)].get("engine_p95_over_gather_p50") for r in radii]
    out.append(
        _check(
            "query p95 vs gather cost (ids[oracle rows], p50)",
            f"<= {GATHER_RATIO:g}x",
            ", ".join(f"{_km(r)} {_ratio(v)}" for r, v in zip(radii, ratios, strict=True)),
            all(v is not None and v <= GATHER_RATIO for v in ratios),
        )
    )
    kd = summary.get("cKDTree")
    if kd and "error" not in kd:
        speed = kd["build_s"] / engine["build_s"]
        out.append(
            _check(
                "build vs cKDTree build",
                f">= {BUILD_SPEEDUP:g}x faster",
                f"{_ratio(speed)} ({engine['build_s']:.2f} s vs {kd['build_s']:.2f} s)",
                speed >= BUILD_SPEEDUP,
            )
        )
    moves = raw.get("moves")
    if moves:
        out.append(
            _check(
                "moves (upsert of known devices, batches of 1M)",
                f">= {MOVES_PER_S / 1e6:g} M devices/s",
                f"{_rate(moves['devices_per_s'])} devices/s",
                (moves["devices_per_s"] or 0) >= MOVES_PER_S,
            )
        )
    per_device = engine["resident_bytes_per_device"]
    out.append(
        _check(
            "resident memory (RSS growth / devices)",
            f"<= {BYTES_PER_DEVICE:g} B/device",
            f"{per_device:.1f} B/device (memory_bytes {raw.get('memory_bytes_per_device', 0):.1f})",
            per_device <= BYTES_PER_DEVICE,
        )
    )
    after = sum(c["wrong"] for c in (moves or {}).get("after_moves", {}).values())
    checked = sum(c["queries"] for c in engine["radii"].values())
    checked_after = sum(c["queries"] for c in (moves or {}).get("after_moves", {}).values())
    out.append(
        _check(
            "wrong devices (engine vs haversine oracle)",
            "0",
            f"{engine['wrong']} in {checked} queries; {after} in {checked_after} after moves",
            engine["wrong"] == 0 and after == 0,
        )
    )
    return out


def _peer_label(name: str, peer: dict, pop: dict) -> str:
    if name == "redis-geo" and peer.get("devices", pop["devices"]) < pop["devices"]:
        return f"redis-geo (on {peer['devices']:,} of {pop['devices']:,} devices)"
    return name


def _population_markdown(pop: dict) -> list[str]:
    radii = pop["radii_m"]
    summary = pop["summary"]
    names = [n for n in PEERS if n in summary]
    lines = [
        f"## {pop['population']}: {pop['devices']:,} devices",
        "",
        f"{pop['description'][:1].upper()}{pop['description'][1:]}; seed {pop['seed']}. "
        f"{pop['queries']} query centres per radius (brute force: {pop['brute_queries']}), "
        f"drawn from devices' positions, the same for every peer. Population generated in "
        f"{pop['generate_s']:.1f} s; oracle answers computed in {pop['oracle_s']:.0f} s.",
        "",
        "### Peers",
        "",
        "| peer | build (s) | ingest (devices/s) | resident B/device | "
        + " | ".join(f"{_km(r)} p50 / p95 (ms)" for r in radii)
        + " | wrong devices | queries per radius |",
        "|---|---:|---:|---:|" + "---:|" * len(radii) + "---:|---|",
    ]
    budget_hit = False
    errors: list[str] = []
    for name in names:
        peer = summary[name]
        if "error" in peer:
            lines.append(f"| {name} | failed: {peer['error']} |" + " |" * (len(radii) + 5))
            continue
        cells = []
        counts = []
        for r in radii:
            c = peer["radii"][str(r)]
            cells.append(f"{_ms(c['p50_ms'])} / {_ms(c['p95_ms'])}")
            mark = ("*" if c["stopped_by_budget"] else "") + ("!" if c.get("error") else "")
            counts.append(f"{c['queries']}{mark}")
            budget_hit |= c["stopped_by_budget"]
            if c.get("error"):
                errors.append(f"{name} at {_km(r)}: {c['error']}")
        wrong = _int(peer["wrong"])
        if name == "redis-geo":
            wrong += f" ({_int(peer['wrong_own_sphere'])} on its own sphere)"
        lines.append(
            f"| {_peer_label(name, peer, pop)} | {peer['build_s']:.2f} | "
            f"{_rate(peer['ingest_devices_per_s'])} | "
            f"{peer['resident_bytes_per_device']:.1f} | "
            + " | ".join(cells)
            + f" | {wrong} | {', '.join(counts)} |"
        )
    lines.append("")
    if budget_hit:
        lines += [
            f"\\* stopped by the time budget ({pop['budget_s']:g} s per peer and radius, at "
            f"least {pop['min_queries']} queries): percentiles are over the queries that ran, "
            "which are the first centres of the common list.",
            "",
        ]

    loads = [
        f"{name} {pop['peers'][name]['load_average']['before']:g} → "
        f"{pop['peers'][name]['load_average']['after']:g}"
        for name in names
        if "load_average" in pop["peers"][name]
    ]
    if loads:
        lines += [
            "1-minute load average before → after each peer (about 1 is the benchmark "
            "alone; more means other work shared the cores): " + ", ".join(loads) + ".",
            "",
        ]
    if errors:
        lines += ["! a query failed and ended that radius: " + "; ".join(errors), ""]
    if pop["speedups"]:
        lines += [
            "### Engine speed-up at p95 (peer p95 ÷ engine p95)",
            "",
            "| vs peer | " + " | ".join(_km(r) for r in radii) + " |",
            "|---|" + "---:|" * len(radii),
        ]
        for name in names:
            if name in pop["speedups"]:
                values = pop["speedups"][name]
                lines.append(
                    f"| {_peer_label(name, summary[name], pop)} | "
                    + " | ".join(_ratio(values[str(r)]) for r in radii)
                    + " |"
                )
        lines.append("")

    lines += [
        "### Mean recipients per query",
        "",
        "| | " + " | ".join(_km(r) for r in radii) + " |",
        "|---|" + "---:|" * len(radii),
        "| oracle (haversine) | "
        + " | ".join(_int(pop["gather"][str(r)]["mean_recipients"]) for r in radii)
        + " |",
    ]
    partial = False
    for name in names:
        peer = summary[name]
        if "error" in peer:
            continue
        cells = []
        for r in radii:
            c = peer["radii"][str(r)]
            text = _int(c["mean_recipients"])
            if c["queries"] < pop["queries"]:
                text += f" ({_int(c['oracle_mean_recipients'])})"
                partial = True
            cells.append(text)
        lines.append(f"| {_peer_label(name, peer, pop)} | " + " | ".join(cells) + " |")
    lines.append("")
    if partial:
        lines += [
            "A peer that ran fewer queries ran the first centres of the list; in brackets, "
            "the oracle's mean over those same centres.",
            "",
        ]

    engine = summary.get("engine")
    if engine and "error" not in engine:
        lines += [
            "### Gather cost: `ids[oracle_rows]` alone",
            "",
            "| | " + " | ".join(_km(r) for r in radii) + " |",
            "|---|" + "---:|" * len(radii),
            "| gather p50 (ms) | "
            + " | ".join(_ms(pop["gather"][str(r)]["p50_ms"]) for r in radii)
            + " |",
            "| gather p95 (ms) | "
            + " | ".join(_ms(pop["gather"][str(r)]["p95_ms"]) for r in radii)
            + " |",
            "| engine p50 ÷ gather p50 | "
            + " | ".join(_ratio(pop["gather"][str(r)]["engine_p50_over_gather_p50"]) for r in radii)
            + " |",
            "| engine p95 ÷ gather p50 | "
            + " | ".join(_ratio(pop["gather"][str(r)]["engine_p95_over_gather_p50"]) for r in radii)
            + " |",
            "",
        ]
        raw = pop["peers"]["engine"]
        lines += ["### Engine", ""]
        lines.append(
            f"- `index.memory_bytes()`: {raw['memory_bytes_per_device']:.1f} B/device after "
            f"build; resident (RSS growth in a fresh process): "
            f"{raw['resident_bytes_per_device']:.1f} B/device."
        )
        info = raw["build_info"]
        lines.append(
            f"- build: {raw['build_s']:.2f} s = upserts of {pop['batch']:,} devices "
            f"{info['upsert_s']:.2f} s + compact {info['compact_s']:.2f} s."
        )
        moves = raw.get("moves")
        if moves:
            lines.append(
                f"- moves: {moves['devices']:,} known devices re-reported (`move()`: 30 % "
                f"still, the rest a ~30 m step) in batches of {moves['batch']:,}: "
                f"{moves['seconds']:.2f} s, {_rate(moves['devices_per_s'])} devices/s "
                f"({moves['updated']:,} updated, {moves['stale']:,} stale); memory_bytes "
                f"{moves['memory_bytes_per_device']:.1f} B/device before compaction, "
                f"{moves.get('memory_bytes_per_device_compacted', 0):.1f} after "
                f"(compaction {moves.get('compact_s', 0):.2f} s)."
            )
            after = moves.get("after_moves", {})
            if after:
                lines.append(
                    "- after the moves, before compaction, checked against a fresh oracle: "
                    + "; ".join(
                        f"{_km(float(r))}: {c['queries']} queries, p95 "
                        f"{_ms(_pct(c['latency_ms'], 95))} ms, {c['wrong']} wrong"
                        for r, c in after.items()
                    )
                    + "."
                )
        lines.append("")

    redis = pop["peers"].get("redis-geo", {})
    if "build_info" in redis:
        info = redis["build_info"]
        lines += [
            "### Redis",
            "",
            f"- {info['loaded']:,} devices loaded in {redis['build_s']:.1f} s, of which "
            f"{info['server_geoadd_s']:.1f} s inside GEOADD on the server (the rest is "
            f"redis-py encoding the commands); `used_memory` "
            f"{info['used_memory'] / max(info['loaded'], 1):.1f} B/device.",
            "",
        ]

    lines += ["### Targets", "", "| target | goal | measured | result |", "|---|---|---|---|"]
    for t in pop["targets"]:
        result = "n/a" if t["pass"] is None else ("PASS" if t["pass"] else "FAIL")
        lines.append(f"| {t['name']} | {t['target']} | {t['measured']} | {result} |")
    lines.append("")

    wrong_lines = []
    for name in names:
        raw = pop["peers"].get(name, {})
        for cell in raw.get("radii", {}).values():
            wrong_lines.extend(
                f"- {name}, {_km(w['radius_m'])} at ({w['lat']:.6f}, {w['lng']:.6f})"
                + ("" if w.get("sphere", "oracle") == "oracle" else f" on the {w['sphere']} sphere")
                + f": {w['missing']} missing, {w['extra']} extra, {w['duplicate']} duplicated"
                for w in cell["wrong_queries"]
            )
        for cell in raw.get("moves", {}).get("after_moves", {}).values():
            wrong_lines.extend(
                f"- {name} after moves, {_km(w['radius_m'])} at ({w['lat']:.6f}, "
                f"{w['lng']:.6f}): {w['missing']} missing, {w['extra']} extra"
                for w in cell["wrong_queries"]
            )
    if wrong_lines:
        lines += ["### Wrong answers (first of each peer and radius; details in results.json)", ""]
        lines += wrong_lines[:60]
        lines.append("")

    notes = [
        "### How to read this",
        "",
        "- Latency: wall time of one call from Python, per query, after one untimed "
        "warm-up query per radius; p50/p95 over the queries run. Engine: `within()`; "
        "brute force: numpy haversine over all devices; cKDTree: "
        "`query_ball_point` on unit vectors with the chord radius, then `ids[rows]`; "
        "redis-geo: `GEOSEARCH` round trip on loopback including redis-py's reply parsing "
        "(members as bytes, not converted to ints); h3-dict: `grid_disk` + dict look-ups + "
        "numpy haversine filter.",
        "- Build: engine = upserts + `compact()`; cKDTree = unit vectors + tree; redis-geo = "
        "pipelined GEOADD of 10,000 members per command; h3-dict = `latlng_to_cell` per "
        "device + grouping by cell; brute force = radians and cosines.",
        "- Resident B/device: RSS growth over the build, measured in a fresh process per "
        "peer after garbage collection and `malloc_trim`, divided by the devices held "
        "(redis-geo: growth of the redis-server process).",
        f"- Wrong devices: missing + extra + duplicated against the float64 haversine "
        f"oracle (R = {EARTH_RADIUS_M} m), devices within 1 m of the edge ignored. Redis "
        f"measures on its own Earth radius ({REDIS_EARTH_RADIUS_M} m, 0.028 % larger), so it "
        "misses devices just inside the edge; the figure in brackets counts its errors "
        "against an oracle on Redis's sphere.",
        "- Gather cost: time of `ids[rows]` with numpy for the oracle's rows, the floor of "
        "any index that returns ids.",
    ]
    return lines + notes + [""]


def markdown(results: dict) -> str:
    """The whole results.md."""
    m = results["machine"]
    lines = [
        "# tuanyuan benchmark",
        "",
        f"Run {m['date']} on {m['cpu_count']} cores ({m['cpu_model']}), {m['memory_gib']} GiB; "
        f"Python {m['python']}, numpy {m['numpy']}, scipy {m['scipy']}, h3 {m['h3']}, "
        f"redis-server {m['redis_server']}, redis-py {m['redis_py']}. "
        f"Command: `{results['command']}`; wall time {results['wall_s'] / 60:.1f} min.",
        "",
    ]
    build = m.get("engine_build", {})
    if build:
        dirty = build.get("uncommitted_changes") or []
        lines += [
            f"Engine: commit {str(build.get('commit'))[:12]}, extension built "
            f"{build.get('extension_built')}"
            + (
                f", with uncommitted changes in {', '.join(d.split()[-1] for d in dirty)}"
                if dirty
                else ""
            )
            + ".",
            "",
        ]
    for pop in results["populations"].values():
        lines += _population_markdown(pop)
    return "\n".join(lines)


def charts(results: dict, out: Path) -> list[Path]:
    """PNG charts per population: p95 latency by radius, build time, bytes per device."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for kind, pop in results["populations"].items():
        summary = pop["summary"]
        names = [n for n in PEERS if n in summary and "error" not in summary[n]]
        if not names:
            continue
        radii = pop["radii_m"]

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name in names:
            values = [summary[name]["radii"][str(r)]["p95_ms"] for r in radii]
            ax.plot([r / 1000 for r in radii], values, marker="o", label=name)
        gather = [pop["gather"][str(r)]["p50_ms"] for r in radii]
        ax.plot([r / 1000 for r in radii], gather, "k--", label="gather ids (p50)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("radius (km)")
        ax.set_ylabel("p95 latency (ms, log)")
        ax.set_title(f"Query latency p95, {kind}, {pop['devices']:,} devices")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
        fig.tight_layout()
        path = out / f"latency_p95_{kind}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

        for metric, label, filename, log in (
            ("build_s", "build time (s, log)", f"build_time_{kind}.png", True),
            (
                "resident_bytes_per_device",
                "resident bytes per device",
                f"bytes_per_device_{kind}.png",
                False,
            ),
        ):
            fig, ax = plt.subplots(figsize=(7, 4.5))
            values = [max(summary[n][metric], 1e-3) for n in names]
            bars = ax.bar(names, values, color="tab:blue")
            if "engine" in names:
                bars[names.index("engine")].set_color("tab:red")
            for bar, value in zip(bars, values, strict=True):
                ax.annotate(
                    f"{value:.3g}",
                    (bar.get_x() + bar.get_width() / 2, value),
                    ha="center",
                    va="bottom",
                    fontsize=9,
                )
            if log:
                ax.set_yscale("log")
            ax.set_ylabel(label)
            ax.set_title(f"{label.split(' (')[0].capitalize()}, {kind}, {pop['devices']:,} devices")
            ax.grid(True, axis="y", alpha=0.3)
            fig.tight_layout()
            path = out / filename
            fig.savefig(path, dpi=120)
            plt.close(fig)
            written.append(path)
    return written


def write(results: dict, out: Path) -> list[Path]:
    """Writes results.json, results.md and the charts; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "results.json"
    json_path.write_text(json.dumps(results, indent=1))
    md_path = out / "results.md"
    md_path.write_text(markdown(results))
    return [json_path, md_path, *charts(results, out)]


def write_scale(result: dict, out: Path) -> None:
    """Writes scale.json and scale.md for a ``--scale`` run."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(result, indent=1))
    m = result["machine"]
    if "error" in result:
        (out / "scale.md").write_text(f"# Scale run failed\n\n{result['error']}\n")
        return
    gib = 2**30
    lines = [
        f"# Scale: {result['devices']:,} devices in one engine index",
        "",
        f"Run {m['date']} on {m['cpu_count']} cores, {m['memory_gib']} GiB. Nation "
        f"population (China's cities) generated in chunks of {result['chunk']:,} and "
        f"upserted in batches; wall time {result['wall_s'] / 60:.1f} min.",
        "",
        "| metric | value |",
        "|---|---:|",
        f"| devices | {result['devices']:,} |",
        f"| build (upserts + compact) | {result['build_s']:.1f} s "
        f"({result['upsert_s']:.1f} + {result['compact_s']:.1f}) |",
        f"| ingest rate | {_rate(result['ingest_devices_per_s'])} devices/s |",
        f"| RSS at the end | {result['rss_end'] / gib:.2f} GiB |",
        f"| peak RSS | {result['peak_rss'] / gib:.2f} GiB |",
        f"| resident bytes per device | {result['resident_bytes_per_device']:.1f} |",
        f"| index.memory_bytes() per device | {result['memory_bytes_per_device']:.1f} |",
        f"| machine memory | {m['memory_gib']} GiB |",
        "",
        "| radius | queries | p50 (ms) | p95 (ms) | mean recipients |",
        "|---|---:|---:|---:|---:|",
    ]
    lines.extend(
        f"| {_km(cell['radius_m'])} | {cell['queries']} | {_ms(_pct(cell['latency_ms'], 50))} "
        f"| {_ms(_pct(cell['latency_ms'], 95))} | {_int(np.mean(cell['recipients']))} |"
        for cell in result["radii"].values()
    )
    lines += ["", "| devices loaded | upsert (s) | RSS (GiB) | memory_bytes / device |"]
    lines.append("|---:|---:|---:|---:|")
    for c in result["chunks"]:
        lines.append(
            f"| {c['devices']:,} | {c['upsert_s']:.1f} | {c['rss'] / gib:.2f} | "
            f"{c['memory_bytes'] / c['devices']:.1f} |"
        )
    (out / "scale.md").write_text("\n".join(lines) + "\n")
