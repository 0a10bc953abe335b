"""The softmax decode benchmark on a CPU: under Triton's interpreter every row runs, agrees with the fp64
reference, and the JSON and markdown are written (no timing claims)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.benchmarks.helpers import run_interpreted_smoke

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_smoke_rows_agree_and_files_are_written(tmp_path):
    js = run_interpreted_smoke("softmax_decode.py", tmp_path, "softmax-decode", timeout=600)
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
