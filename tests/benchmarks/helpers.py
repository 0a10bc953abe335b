"""Running a one-kernel benchmark's --smoke mode (Triton's interpreter, tiny shapes) as a script."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_interpreted(script: str, *args: str, timeout: int = 900) -> str:
    """``python benchmarks/SCRIPT ARGS...`` with TRITON_INTERPRET=1 (through ``tests.run_interpreted``: the
    interpreter sped up as in the pytest subprocesses); it must exit 0. -> its stdout."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "tests.run_interpreted", str(ROOT / "benchmarks" / script), *args],
                       env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def run_interpreted_smoke(script: str, out_dir: Path, prefix: str, timeout: int = 900, extra: tuple = ()) -> Path:
    """``run_interpreted(SCRIPT, --smoke, --out-dir OUT_DIR, EXTRA...)``; it must write exactly one
    ``PREFIX-*.json`` (returned)."""
    run_interpreted(script, "--smoke", "--out-dir", str(out_dir), *extra, timeout=timeout)
    (js,) = out_dir.glob(f"{prefix}-*.json")
    return js
