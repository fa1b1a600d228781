"""The committed stubs in engine/api are what `make proto` makes from grpc/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_match_the_contract(tmp_path):
    protos = sorted(str(p.relative_to(ROOT / "grpc")) for p in (ROOT / "grpc").rglob("*.proto"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            str(ROOT / "grpc"),
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            *protos,
        ],
        check=True,
    )
    generated = sorted(tmp_path.rglob("*_pb2*.py*"))
    assert generated, "protoc wrote nothing"
    for path in generated:
        text = path.read_text().replace(
            "from tuanyuan.v1 import", "from engine.api.tuanyuan.v1 import"
        )
        committed = ROOT / "engine" / "api" / path.relative_to(tmp_path)
        assert committed.exists(), f"{committed} is missing: run make proto"
        assert committed.read_text() == text, f"{committed} is stale: run make proto"
