"""The attention benchmark on a CPU: its smoke run (every runnable row vs the reference) and a dry run of
the GPU driver on tiny shapes (timing there is CPU wall clock and means nothing; the logic is what runs)."""

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def test_script_entry_point():
    """``python benchmarks/attention.py`` (as a script, not a package) parses its arguments."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "attention.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--smoke" in proc.stdout and "FLOPs" in proc.stdout


def test_smoke_rows_match_reference(tmp_path, capsys):
    from benchmarks import attention as A

    assert A.main(["--smoke", "--out-dir", str(tmp_path)]) == 0
    assert "smoke OK" in capsys.readouterr().out
    rows = json.loads((tmp_path / "attention-smoke.json").read_text())["rows"]
    checked = {(r["row"], r["mode"]) for r in rows if r.get("check_ok")}
    # the implementations that always run on a CPU, both modes, and the decode steps
    for key in ("ours", "ours-chunked", "comp-cumsum", "comp-ones"):
        assert (key, "fwd") in checked and (key, "fwdbwd") in checked, key
    assert ("flex-window", "fwd") in checked
    for key in ("ours", "ours-ring-torch", "ours-step-torch", "torch-linear"):
        assert (key, "decode") in checked, key


def test_driver_dry_run_on_cpu(tmp_path):
    from benchmarks import attention as A
    from benchmarks.decode import DecodeCase
    from benchmarks.prefill import Case

    args = A.parse_args(["--out-dir", str(tmp_path), "--check-T", "30", "--only", "ours,ours-chunked,ours-ring-torch,torch-linear"])
    cases = {"main": [Case("B4 H16 T16384", 1, 45, 4, 2, 16, 8, 4, window=8)], "b1": [], "model": []}
    rc = A.run(args, torch.device("cpu"), cases, [32], DecodeCase(B=2, H=4, Hkv=4, D=16, F=8, Hf=4, window=8),
               dtype=torch.float32, ref_dtype=torch.float64, decode_check=dict(B=1, T=20, H=4, Hkv=2, D=16, F=8, window=8))
    assert rc == 0
    (jpath,) = tmp_path.glob("attention-cpu-*.json")
    assert jpath.with_suffix(".md").exists()
    payload = json.loads(jpath.read_text())
    rows = {(r["row"], r["mode"]): r for r in payload["rows"]}
    assert set(rows) == {(k, m) for k in ("ours", "ours-chunked") for m in ("fwd", "fwdbwd")} | {
        ("ours", "decode"), ("ours-ring-torch", "decode"), ("torch-linear", "decode")}
    for r in rows.values():
        assert r.get("ms", 0) > 0 and r["flops"] > 0 and r["bytes"] > 0 and r["check_ok"], r
        assert "CUDA graphs need CUDA" in r["graph_error"]
    assert payload["ceilings"]["copy_gbps"] > 0
