"""Sweep the chunk kernels' LaunchConfig on one shape, each config in its own process (an illegal memory
access poisons the CUDA context), and report pass / error / crash per config against the float64 chunked path.

    python scripts/sweep_launch_configs.py --out results/gpu-tests/sweep.json [--dtype bf16] [--D 128] [--T 999] [--jobs 6]
    python scripts/sweep_launch_configs.py --one C,BV,num_warps,nseg ...   # one config (used by the sweep)

Why: issue 5's `test_segments_and_value_blocks` hit "an illegal memory access" in fwd_kernel with
LaunchConfig(C=64, BV=32, num_warps=4, nseg=5) at bf16 D=F=128 T=999, while the same config passes under
TRITON_INTERPRET=1. The sweep says which of BV / num_warps / nseg / C the failure follows. With
--sanitize, failing configs run again under compute-sanitizer (memcheck) when it is on PATH or in
/usr/local/cuda/bin, and its first report lines are kept.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one(cfg: str, dtype: str, D: int, T: int, backward: bool) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from linearize.ops import hybrid_attention_chunked
    from linearize.ops.triton import chunk
    from linearize.ops.triton.chunk import LaunchConfig, hybrid_attention_triton
    from tests.ops.helpers import random_inputs, rel_err

    chunk.POISON_OUTPUTS = True
    C, BV, nw, nseg = (int(x) for x in cfg.split(","))
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    B, H = 2, 4
    ins64 = [t.cuda() for t in random_inputs(B, T, H, H, D, D, H, dtype=torch.float64, seed=1)]
    ins = [t.to(dt).requires_grad_(True) for t in ins64[:5]] + [ins64[5].float().requires_grad_(True)]
    ref = [t.detach().double().requires_grad_(True) for t in ins]
    lc = LaunchConfig(C=C, BV=BV, num_warps=nw, nseg=nseg)
    y, st = hybrid_attention_triton(*ins[:5], window=64, window_weight=ins[5], config=lc, output_final_state=True)
    torch.cuda.synchronize()
    yr, sr = hybrid_attention_chunked(*ref[:5], window=64, window_weight=ref[5], output_final_state=True)
    res = {"y": rel_err(y, yr), "S": rel_err(st.S, sr.S), "nan": bool(torch.isnan(y).any())}
    if backward:
        dy = torch.randn(y.shape, dtype=torch.float64, device="cuda")
        g = torch.autograd.grad(y, ins, dy.to(dt), materialize_grads=True)
        torch.cuda.synchronize()
        gr = torch.autograd.grad(yr, ref, dy, materialize_grads=True)
        res["grads"] = {n: rel_err(a, b) for n, a, b in zip("q k v pq pk gamma".split(), g, gr)}
    return res


def _sanitizer() -> str | None:
    return shutil.which("compute-sanitizer") or next((p for p in ("/usr/local/cuda/bin/compute-sanitizer",) if os.path.exists(p)), None)


def run_child(cfg: str, a: argparse.Namespace, sanitize: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--one", cfg, "--dtype", a.dtype, "--D", str(a.D), "--T", str(a.T)] + (["--backward"] if a.backward else [])
    if sanitize:
        cmd = [_sanitizer(), "--tool", "memcheck", "--print-limit", "5"] + cmd
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{os.environ.get('PYTHONPATH', '')}")
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"config": cfg, "status": "timeout"}
    out = {"config": cfg, "rc": p.returncode}
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line:
        out |= {"status": "ok", **json.loads(line[len("RESULT "):])}
    else:
        err = [ln for ln in (p.stderr + p.stdout).splitlines() if ln.strip()]
        out |= {"status": "crash", "error": next((ln for ln in reversed(err) if "Error" in ln or "error" in ln), err[-1] if err else "")[:300]}
    if sanitize:
        out["sanitizer"] = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.startswith("=========")][:40]
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", default=None)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--T", type=int, default=999)
    ap.add_argument("--backward", action="store_true")
    ap.add_argument("--jobs", type=int, default=6)
    ap.add_argument("--timeout", type=int, default=300)
    ap.add_argument("--sanitize", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    if a.one:
        print("RESULT " + json.dumps(one(a.one, a.dtype, a.D, a.T, a.backward)), flush=True)
        return 0
    cfgs = [f"{C},{BV},{nw},{ns}" for C, BV, nw, ns in itertools.product((32, 64), (32, 64, 128), (4, 8), (1, 5))]
    results = []
    with ThreadPoolExecutor(a.jobs) as ex:  # printed as they finish: a sweep cut at a deadline keeps what it found
        for r in ex.map(lambda c: run_child(c, a), cfgs):
            print(json.dumps(r), flush=True)
            results.append(r)
    if a.sanitize and _sanitizer():
        bad = [r["config"] for r in results if r.get("status") != "ok"][:2]
        for c in bad:
            results.append(run_child(c, a, sanitize=True) | {"sanitized": True})
            print(json.dumps(results[-1]), flush=True)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"dtype": a.dtype, "D": a.D, "T": a.T, "backward": a.backward, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
