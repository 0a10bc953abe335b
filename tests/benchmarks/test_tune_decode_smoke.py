"""The ring decode kernel's launch sweep on a CPU: under Triton's interpreter every ring config agrees with the
default launch on the same ring, the map kernel agrees with the PyTorch maps (eager and compiled), the RoPE + maps
kernel with RoPE then the maps, and the JSON and markdown are written (no timing claims)."""

import importlib.util
import json

import pytest

from tests.benchmarks.helpers import run_interpreted_smoke


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_smoke_sweep_agrees_and_files_are_written(tmp_path):
    js = run_interpreted_smoke("tune_decode.py", tmp_path, "tune-decode")
    rows = json.loads(js.read_text())["rows"]
    configs = [row for row in rows if row.get("kind") == "ring"]
    assert len(configs) > 1 and sum(row["default"] for row in configs) == 1
    assert {row["fold"] for row in configs} == {1, 3}  # the ring with deferred folding too
    assert all(row["rel_err"] < 1e-4 and row["ms"] > 0 for row in configs)
    assert {row["FC"] for row in configs} == {0, 16, 32}  # S whole, and streamed in row chunks
    assert {row["prefetch"] for row in configs if row["FC"]} == {False, True} and not any(r["prefetch"] for r in configs if not r["FC"])
    assert {row["heads_dot"] for row in configs if row["FC"]} == {False, True}  # the query heads as dot rows
    assert not any(r["heads_dot"] for r in configs if not r["FC"] or r["prefetch"])
    maps = {row["row"]: row for row in rows if row.get("kind") == "maps"}
    assert set(maps) == {"maps: triton (1 launch)", "maps: torch eager", "maps: torch compiled",
                         "rope+maps: triton BR16 w4", "rope: inductor, maps: triton"}  # (the default launch)
    assert all(row["rel_err"] < 1e-5 and row["ms"] > 0 for row in maps.values())  # RoPE's against RoPE then the maps
    md = js.with_suffix(".md").read_text()
    assert "best ring launch" in md and "maps: triton (1 launch)" in md


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_a_spent_budget_skips_rows_and_still_writes_the_files(tmp_path):
    """``--budget-s``: past it no row is timed, each is kept as skipped, and the JSON and markdown are written (a
    device call's timeout had cut a sweep before it wrote anything)."""
    js = run_interpreted_smoke("tune_decode.py", tmp_path, "tune-decode", extra=("--budget-s", "0"))
    rows = json.loads(js.read_text())["rows"]
    assert {row["kind"] for row in rows} == {"ring", "maps"}
    assert all(row["skipped"] == "--budget-s 0 spent" and "ms" not in row for row in rows)
    md = js.with_suffix(".md").read_text()
    assert f"- {len(rows)} rows not timed: --budget-s 0 spent" in md


def test_match_keeps_the_default_and_the_rows_it_finds():
    """``--match``: the default launch always (the reference of every row's error), then the rows whose label the
    regex finds; at the 8B's heads with key maps per KV head the quick sweep has row chunks with and without H."""
    from benchmarks.tune_decode import PRESETS, configs, row_label, select

    cfgs = configs(PRESETS["llama8b-kvmaps"], quick=True)
    picked = select(cfgs, r"w[24] .*FC(32|64)( H)?$")
    labels = [row_label(*c) for c in picked]
    assert picked[0] == cfgs[0] and labels[0] == "BD128 w2 BW16 FC64 H"  # the default since 2026-12-06 (dots, window block 16)
    assert all(" P" not in x and ("FC32" in x or "FC64" in x) for x in labels[1:])
    assert {x.endswith(" H") for x in labels[1:]} == {False, True}
    assert select(cfgs, None) == cfgs
