"""Snapshot write and load times at scale, uncompressed beside lz4.

``python -m bench.snapshot --devices 10000000`` fills an index with a seeded metro
population, writes a snapshot with each compression, loads each into an empty index,
and prints one JSON line per compression (also written to bench/results/snapshot.json).
Load times include mapping the file, dropping expired rows and the bulk upsert; the
page cache is warm (the file was just written), as after a quick restart.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

from engine import population
from engine.index import LocationIndex
from engine.snapshot import load_snapshot, write_snapshot

NOW = 1_800_000_000.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dir", type=Path, default=None, help="folder for the files")
    parser.add_argument("--out", type=Path, default=Path("bench/results/snapshot.json"))
    args = parser.parse_args()

    columns = population.metro(args.devices, seed=args.seed)
    index = LocationIndex(clock=lambda: NOW)
    started = time.perf_counter()
    index.upsert(columns["device_id"], columns["lat"], columns["lng"], columns["gateway"], NOW)
    build_s = time.perf_counter() - started
    del columns
    gc.collect()

    results = []
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        for compression in (None, "lz4"):
            path = Path(folder) / f"snapshot-{compression or 'none'}.arrow"
            written = write_snapshot(index, path, now=NOW + 60, compression=compression)
            fresh = LocationIndex(clock=lambda: NOW + 120)
            loaded = load_snapshot(fresh, path, now=NOW + 120)
            assert loaded.loaded == written.devices == args.devices
            result = {
                "devices": args.devices,
                "compression": compression or "none",
                "first_build_s": round(build_s, 3),
                "write_s": round(written.seconds, 3),
                "bytes": written.bytes,
                "load_s": round(loaded.seconds, 3),
            }
            print(json.dumps(result), flush=True)
            results.append(result)
            del fresh
            gc.collect()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
