"""The ring decode kernel's launch sweep on a CPU: under Triton's interpreter every config, fused and unfused,
agrees with the default launch on the same ring, and the JSON and markdown are written (no timing claims)."""

import importlib.util
import json

import pytest

from tests.benchmarks.helpers import run_interpreted_smoke


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_smoke_sweep_agrees_and_files_are_written(tmp_path):
    js = run_interpreted_smoke("tune_decode.py", tmp_path, "tune-decode")
    rows = json.loads(js.read_text())["rows"]
    configs = [row for row in rows if "fused" in row]
    assert {row["fused"] for row in configs} == {True, False} and sum(row["default"] for row in configs) == 2
    assert all(row["rel_err"] < 1e-4 and row["ms"] > 0 for row in configs)
    assert any(row["row"] == "maps outside (torch)" for row in rows)
    assert "best fused" in js.with_suffix(".md").read_text()
