"""The ring decode kernel's launch sweep on a CPU: under Triton's interpreter every config, fused and unfused,
agrees with the default launch on the same ring, and the JSON and markdown are written (no timing claims)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_smoke_sweep_agrees_and_files_are_written(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tune_decode.py"), "--smoke", "--out-dir", str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (js,) = tmp_path.glob("tune-decode-*.json")
    rows = json.loads(js.read_text())["rows"]
    configs = [row for row in rows if "fused" in row]
    assert {row["fused"] for row in configs} == {True, False} and sum(row["default"] for row in configs) == 2
    assert all(row["rel_err"] < 1e-4 and row["ms"] > 0 for row in configs)
    assert any(row["row"] == "maps outside (torch)" for row in rows)
    assert "best fused" in js.with_suffix(".md").read_text()
