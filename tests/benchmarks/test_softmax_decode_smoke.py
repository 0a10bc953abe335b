"""The softmax decode benchmark on a CPU: under Triton's interpreter every row runs, agrees with the fp64
reference, and the JSON and markdown are written (no timing claims)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_smoke_rows_agree_and_files_are_written(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "softmax_decode.py"), "--smoke", "--out-dir", str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (js,) = tmp_path.glob("softmax-decode-*.json")
    rows = json.loads(js.read_text())["rows"]
    names = {row["row"] for row in rows}
    assert {"ours", "hf-sdpa-static", "sdpa-gqa-prefix"} <= names and len(rows) == 2 * len(names)
    assert all(row["rel_err"] < 1e-4 for row in rows)
    assert "| filled | row |" in js.with_suffix(".md").read_text()


def test_without_cuda_it_says_how_to_run():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "softmax_decode.py")], env=env, capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
    if "needs CUDA" not in r.stderr:
        pytest.skip("a CUDA machine: the benchmark runs for real")
    assert r.returncode != 0 and "--smoke" in r.stderr
