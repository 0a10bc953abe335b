"""Launch the ring decode kernel a few times at a ``tune_decode`` preset, for a profiler to read (Nsight Compute).

    ncu --clock-control none -k regex:_decode_kernel -s 8 -c 8 --set full \\
        python benchmarks/profile_decode.py --preset llama8b-kvmaps --fold 8
    TRITON_INTERPRET=1 python benchmarks/profile_decode.py --preset smoke --steps 2   # CPU: it runs

Why: a timing says how far a launch is from its floor, not where its time goes. This runs ``--warmup`` steps (the
compile, and ``ncu -s`` skips them), then ``--steps`` more of the same launch on one ring (``--fold`` steps cover
one folding step). The launch is the default one unless ``--launch BD,warps,BW,FC,prefetch,heads_dot`` (as
``tune_decode``'s rows) names another. It prints the launch and the mean step time (eager, not in a CUDA graph:
a profiler's own overhead makes that number a sanity check only).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

import torch  # noqa: E402

from benchmarks.tune_decode import PRESETS, configs, problem, row_label  # noqa: E402


def parse_launch(text: str) -> tuple:
    """``BD,warps,BW,FC,prefetch,heads_dot`` (ints, the last two 0 or 1) -> a ``tune_decode`` config tuple."""
    parts = text.split(",")
    if len(parts) != 6 or not all(p.strip().isdigit() for p in parts):
        raise SystemExit(f"--launch takes six ints BD,warps,BW,FC,prefetch,heads_dot; got {text!r}")
    bd, w, bw, fc, pf, hd = (int(p) for p in parts)
    return bd, w, bw, fc, bool(pf), bool(hd)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama8b-kvmaps", choices=sorted(PRESETS))
    p.add_argument("--fold", type=int, default=1, help="the ring's deferred-folding period (RingState.fold)")
    p.add_argument("--launch", default=None, help="BD,warps,BW,FC,prefetch,heads_dot (default: the default launch)")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--steps", type=int, default=8)
    args = p.parse_args(argv)
    from linearize.ops.triton.decode import ring_step_triton

    interpret = not torch.cuda.is_available()
    device = torch.device("cpu" if interpret else "cuda")
    dtype = torch.float32 if interpret else torch.bfloat16
    s = PRESETS[args.preset]
    cfg = parse_launch(args.launch) if args.launch else configs(s, quick=True)[0]
    (q, k, v), ring, gamma, (fq, fk) = problem(s, device, dtype, seed=0, fold=args.fold)
    with torch.no_grad():
        pq, pk = fq(q), fk(k)
    out = torch.empty_like(q)
    bd, w, bw, fc, pf, hd = cfg

    def step():
        ring_step_triton(q, k, v, pq, pk, ring, window_weight=gamma, out=out, block_d=bd, block_w=bw, num_warps=w,
                         chunk_rows=fc, prefetch=pf, heads_dot=hd)

    for _ in range(args.warmup):
        step()
    if not interpret:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if not interpret:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / max(args.steps, 1)
    print(f"{args.preset} {row_label(*cfg, fold=args.fold)}: {args.steps} steps, {dt * 1e6:.1f} us a step (eager; "
          f"y finite: {bool(torch.isfinite(out).all())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
