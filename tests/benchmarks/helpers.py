"""Running a one-kernel benchmark's --smoke mode (Triton's interpreter, tiny shapes) as a script."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_interpreted_smoke(script: str, out_dir: Path, prefix: str, timeout: int = 900, extra: tuple = ()) -> Path:
    """``python benchmarks/SCRIPT --smoke --out-dir OUT_DIR [EXTRA...]`` with TRITON_INTERPRET=1 (through
    ``tests.run_interpreted``: the interpreter sped up as in the pytest subprocesses); it must exit 0 and write
    exactly one ``PREFIX-*.json`` (returned)."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "tests.run_interpreted", str(ROOT / "benchmarks" / script), "--smoke",
                        "--out-dir", str(out_dir), *extra], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (js,) = out_dir.glob(f"{prefix}-*.json")
    return js
