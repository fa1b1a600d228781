"""Faults injected into a real engine, and what came of each: ``python -m bench.reliability``.

Runs the scenarios of ``tests/faults.py`` (the same code ``tests/test_faults.py``
asserts on) at a larger scale: the engine and redis-server as child processes, killed
or cut in the middle of an alert, every recipient checked device by device against the
oracle. Writes ``bench/results/reliability.md`` and ``reliability.json``: per fault,
recipients expected, delivered, duplicated (and how many duplicates the unacked batches
allowed), lost, and the recovery times; then the fuzzing and auth matrix results other
runs left in ``bench/results/fuzz.json`` and ``auth_matrix.json``, or "not run".

Exits with 1 when any check of any scenario failed.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench import common

ROOT = Path(__file__).resolve().parent.parent


def _faults():
    """``tests/faults.py``: the scenarios live with the tests that assert on them."""
    folder = str(ROOT / "tests")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module("faults")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=200_000, help="population (200000)")
    parser.add_argument("--seed", type=int, default=23, help="population seed (23)")
    parser.add_argument(
        "--batch-devices", type=int, default=500, help="device ids per recipient message (500)"
    )
    parser.add_argument(
        "--ack-delay",
        type=float,
        default=0.05,
        help="seconds a slow gateway holds each message before acking it (0.05)",
    )
    parser.add_argument(
        "--scenarios", default="", help="comma-separated scenario keys (default: all)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    return parser.parse_args(argv)


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_scenarios(args: argparse.Namespace) -> list[dict]:
    faults = _faults()
    scale = faults.Scale(
        devices=args.devices,
        seed=args.seed,
        batch_devices=args.batch_devices,
        ack_delay_s=args.ack_delay,
    )
    wanted = {key for key in args.scenarios.split(",") if key}
    unknown = wanted - {key for key, _, _ in faults.SCENARIOS}
    if unknown:
        raise SystemExit(f"unknown scenario(s) {sorted(unknown)}")
    records = []
    for key, scenario, options in faults.SCENARIOS:
        if wanted and key not in wanted:
            continue
        say(f"{key} ...")
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=f"tuanyuan-{key}-") as folder:
            try:
                record = scenario(Path(folder), scale, **options).record()
            except Exception as error:  # a scenario that could not finish is a failure too
                record = {
                    "fault": key,
                    "devices": scale.devices,
                    "failures": [f"the scenario did not finish: {error!r}"],
                    "traceback": traceback.format_exc(),
                    "engine_log": _tail(Path(folder) / "engine" / "engine.log"),
                }
        record["key"] = key
        record["seconds"] = round(time.monotonic() - started, 1)
        records.append(record)
        verdict = "ok" if not record["failures"] else f"{len(record['failures'])} FAILED"
        say(
            f"{key}: {verdict}; expected {record.get('expected')}, delivered "
            f"{record.get('delivered')}, duplicated {record.get('duplicated')}, lost "
            f"{record.get('lost')} ({record['seconds']} s)"
        )
        for failure in record["failures"]:
            say(f"  {failure}")
    return records


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def _read(path: Path) -> dict | None:
    """A result file of another run, or None when there is none."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        return {"unreadable": str(error)}


def _produced(path: Path) -> str:
    stamp = datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.UTC)
    return stamp.isoformat(timespec="seconds")


# The report.


def _s(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f} s"


def _n(value: int | None) -> str:
    return "—" if value is None else f"{value:,}"


def fault_table(records: list[dict]) -> list[str]:
    lines = [
        "| fault | devices | expected | delivered | duplicated (allowed) | lost | outside "
        "the ring | serving after | caught up after | checks |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in records:
        failures = r.get("failures", [])
        checks = "pass" if not failures else f"**{len(failures)} failed**"
        duplicated = f"{_n(r.get('duplicated'))} ({_n(r.get('duplicates_allowed'))})"
        lost = _n(r.get("lost")) if not r.get("lost") else f"**{_n(r.get('lost'))}**"
        lines.append(
            f"| {r['fault']} | {_n(r.get('devices'))} | {_n(r.get('expected'))} | "
            f"{_n(r.get('delivered'))} | {duplicated} | {lost} | "
            f"{_n(r.get('unexpected'))} | {_s(r.get('serving_s'))} | "
            f"{_s(r.get('caught_up_s'))} | {checks} |"
        )
    return lines


def fuzz_summary(path: Path) -> dict | None:
    """Cases and failures per rpc from ``bench.fuzz``'s file; None when it did not run."""
    document = _read(path)
    if document is None or "unreadable" in document:
        return document
    rpcs = {
        name: {
            "cases": sum(int(m.get("cases", 0)) for m in modes.values()),
            "failures": sum(len(m.get("failures", [])) for m in modes.values()),
        }
        for name, modes in document.get("rpcs", {}).items()
    }
    return {
        "file": path.name,
        "produced": _produced(path),
        "examples": document.get("examples"),
        "seed": document.get("seed"),
        "seconds": document.get("seconds"),
        "rpcs": rpcs,
        "cases": sum(row["cases"] for row in rpcs.values()),
        "failures": sum(row["failures"] for row in rpcs.values()),
    }


def auth_summary(path: Path) -> dict | None:
    """The auth matrix's counts and failures from ``bench.auth_matrix``'s file; None when
    it did not run."""
    document = _read(path)
    if document is None or "unreadable" in document:
        return document
    matrix = document.get("matrix", {})
    cells = [cell for row in matrix.values() for cell in row.values()]
    cross = document.get("cross_gateway", [])
    return {
        "file": path.name,
        "produced": _produced(path),
        "rpcs": len(matrix),
        "callers": len(document.get("callers", {})),
        "cells": len(cells),
        "cells_as_expected": sum(1 for c in cells if c.get("ok")),
        "cross_gateway": len(cross),
        "cross_gateway_as_expected": sum(1 for c in cross if c.get("ok")),
        "failures": list(document.get("failures", [])),
    }


def fuzz_section(summary: dict | None) -> list[str]:
    lines = ["## Fuzzing every rpc", ""]
    if summary is None:
        return [*lines, "not run (no `fuzz.json`; `python -m bench.fuzz` writes it)."]
    if "unreadable" in summary:
        return [*lines, f"`fuzz.json` is unreadable: {summary['unreadable']}"]
    lines += [
        f"From `{summary['file']}` ({summary['produced']}): {summary['examples']} generated "
        f"calls per rpc and mode, seed {summary['seed']}, {summary['seconds']} s.",
        "",
        "| rpc | cases | failures |",
        "|---|---:|---:|",
    ]
    for name, row in summary["rpcs"].items():
        failed = row["failures"]
        lines.append(f"| {name} | {row['cases']:,} | {failed if not failed else f'**{failed}**'} |")
    lines += ["", f"{summary['cases']:,} cases, {summary['failures']} failures."]
    return lines


def auth_section(summary: dict | None) -> list[str]:
    lines = ["## Auth matrix", ""]
    if summary is None:
        return [*lines, "not run (no `auth_matrix.json`; `python -m bench.auth_matrix` writes it)."]
    if "unreadable" in summary:
        return [*lines, f"`auth_matrix.json` is unreadable: {summary['unreadable']}"]
    lines.append(
        f"From `{summary['file']}` ({summary['produced']}): {summary['rpcs']} rpcs by "
        f"{summary['callers']} callers, {summary['cells_as_expected']} of {summary['cells']} "
        f"cells as expected; cross-gateway cases {summary['cross_gateway_as_expected']} of "
        f"{summary['cross_gateway']} as expected; {len(summary['failures'])} failures."
    )
    lines += [f"- {failure}" for failure in summary["failures"][:20]]
    return lines


def markdown(document: dict) -> str:
    machine = document["machine"]
    build = machine.get("engine_build", {})
    commit = build.get("commit") or "unknown"
    dirty = build.get("uncommitted_changes") or []
    scale = document["scale"]
    records = document["faults"]
    failed = [r for r in records if r.get("failures")]
    lines = [
        "# Reliability: faults injected into a running engine",
        "",
        f"Run {machine['date']} on {machine['cpu_count']} cores ({machine['cpu_model']}), "
        f"{machine['memory_gib']} GiB, {machine['platform']}; Python {machine['python']}, "
        f"redis-server {machine['redis_server']}. Engine commit `{commit[:12]}`"
        + (f" with uncommitted changes in {len(dirty)} file(s)" if dirty else "")
        + f". Wall time {document['seconds']:.0f} s.",
        "",
        f"Command: `{document['command']}`",
        "",
        f"Each fault runs on a fresh redis-server and a fresh engine (`python -m engine.cli "
        f"serve --dev --redis ...`, child processes), {scale['devices']:,} devices of "
        f"`engine.population.metro` (seed {scale['seed']}) reported through the dev "
        f"reporters' channels, three gateways subscribed with their own credentials. Alerts "
        f"are centred on Beijing with inline stages "
        + ", ".join(f"{r / 1000:g} km" for r in scale["radii_m"])
        + f" ({scale['stage_s'][0]} s, {scale['stage_s'][1]} s, then 10 min); recipient "
        f"messages carry {scale['batch_devices']} devices; where the gateways are slow "
        f"they hold each message {scale['ack_delay_s']} s before acking it, so batches are "
        "unacked when the fault strikes.",
        "",
        "Redis runs with `--appendonly yes --appendfsync always --save ''`: the "
        "configuration the engine's guarantee needs (Redis answers a transaction only once "
        "it is fsynced to its append-only file, so a `kill -9` of Redis loses nothing the "
        "engine was told is written).",
        "",
        *fault_table(records),
        "",
        "- **expected**: devices the oracle (haversine over the population) puts inside "
        "the alert's last ring; **delivered**: distinct devices the gateways handled "
        "(devices within 1 m of the edge may come or not). **duplicated**: devices handled "
        "more than once; **allowed**: devices of the messages the gateways had handled but "
        "not acked (as Redis held the acks) when the fault struck, the only ones that may "
        "come twice. **lost**: expected devices never delivered; must be 0.",
        "- **serving after**: from the start of the restarted process (the engine, or "
        "redis-server) to the engine serving (its port bound; for Redis, AlertService "
        "SERVING again). **caught up after**: from that start to the last device that was "
        "due by then (the stage its timeline implied) handled by its gateway; it includes "
        "reporting the devices again where the engine had no snapshot, and the slow "
        "gateways' pace.",
        "",
        "## What each fault checks",
        "",
    ]
    for r in records:
        lines.append(f"- **{r['fault']}** (`{r['key']}`, {r['seconds']} s): {r['doc']}")
        details = r.get("details") or {}
        if details:
            shown = "; ".join(f"{k}: {v}" for k, v in details.items())
            lines.append(f"  Measured: {shown}.")
        lines += [f"  - FAILED: {failure}" for failure in r.get("failures", [])]
    lines += [
        "",
        f"{len(records) - len(failed)} of {len(records)} faults passed every check.",
        "",
        *fuzz_section(document["fuzz"]),
        "",
        *auth_section(document["auth_matrix"]),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    faults = _faults()
    docs = {
        key: " ".join((f.__doc__ or "").split()).replace("``", "`")
        for key, f, _ in faults.SCENARIOS
    }
    machine = common.machine_info()
    say(f"{args.devices:,} devices, {len(faults.SCENARIOS)} scenarios")
    started = time.monotonic()
    records = run_scenarios(args)
    for record in records:
        record["doc"] = docs[record["key"]]
    scale = faults.Scale(
        devices=args.devices,
        seed=args.seed,
        batch_devices=args.batch_devices,
        ack_delay_s=args.ack_delay,
    )
    document = {
        "command": "python -m bench.reliability"
        + "".join(f" {shlex.quote(a)}" for a in (argv if argv is not None else sys.argv[1:])),
        "machine": machine,
        "scale": {
            "devices": scale.devices,
            "seed": scale.seed,
            "radii_m": list(scale.radii_m),
            "stage_s": list(scale.stage_s),
            "batch_devices": scale.batch_devices,
            "ack_delay_s": scale.ack_delay_s,
        },
        "redis_flags": list(faults.REDIS_DURABLE),
        "seconds": round(time.monotonic() - started, 1),
        "faults": records,
        "fuzz": fuzz_summary(args.out / "fuzz.json"),
        "auth_matrix": auth_summary(args.out / "auth_matrix.json"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    report = markdown(document)
    (args.out / "reliability.json").write_text(json.dumps(document, indent=1, default=str) + "\n")
    (args.out / "reliability.md").write_text(report)
    print(report)
    return 1 if any(r.get("failures") for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
