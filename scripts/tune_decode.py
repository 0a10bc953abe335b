"""Time the Triton decode step over launch configurations, on the GPU (one command, prints a table).

    python3 scripts/tune_decode.py                  # B=64, H=16, D=F=128, bf16, windows 64 and 0 + real models (~3 min)
    python3 scripts/tune_decode.py --quick          # the default configuration only

Each row is the median over replays of a CUDA graph of ``--steps`` decode steps (the step's cost does not
depend on the ring position), so launch gaps are out of the numbers. Bytes per step (the floor's count):
    S read + written:    2 * B * H' * F * D * 4
    ring k, v read:      2 * B * (window - 1) * Hkv * D * e       (e = bytes per element of the model dtype)
    small terms (q, phi_q, y, z, the new key) are counted too but are < 1 %.
``floor_us`` = bytes / copy bandwidth (``--bw``, 3.0e12 B/s measured for device-to-device copies on H100).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from linearize.ops.ring import ring_step_torch  # noqa: E402
from linearize.ops.triton.decode import default_block_d, default_num_warps, random_decode_problem, ring_step_triton  # noqa: E402


def step_bytes(B, H, Hkv, Hf, D, F, window, e) -> int:
    s = 2 * B * Hf * F * D * 4 + 2 * B * Hf * F * 4
    ring = 2 * B * max(window - 1, 0) * Hkv * D * e
    small = B * H * (D + F) * e + B * H * D * e + B * Hkv * (2 * D) * e + B * Hf * F * e
    return s + ring + small


def time_graph(fn, steps: int, replays: int) -> float:
    """Median microseconds per step over replays of a graph of ``steps`` calls of ``fn``."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(steps):
            fn()
    for _ in range(3):
        g.replay()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / steps)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--replays", type=int, default=30)
    ap.add_argument("--bw", type=float, default=3.0e12)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    e = torch.finfo(dtype).bits // 8
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}")
    print("floor_us: S, z, ring k/v and the small tensors at --bw; S_floor_us: S read + written only (the issue's 44 us)")
    print(f"{'shape':<34} {'config (BD,BW,warps)':<22} {'us':>8} {'floor_us':>9} {'x floor':>8} {'S_floor':>8} {'GB/s':>7}")

    shapes = [("bench B64 H16 D128 F128 w64", 64, 16, 16, 128, 128, 64), ("bench B64 H16 D128 F128 w0", 64, 16, 16, 128, 128, 0)]
    if not args.quick:
        shapes += [
            ("smollm2 B64 H9/3 D64 F64 w64", 64, 9, 3, 64, 64, 64),
            ("qwen2.5-0.5b B64 H14/2 D64 F64 w64", 64, 14, 2, 64, 64, 64),
            ("gemma3-1b B64 H4/1 D256 F128 w64", 64, 4, 1, 256, 128, 64),
        ]
    for name, B, H, Hkv, D, F, window in shapes:
        inputs, ring, gamma = random_decode_problem(B, H, Hkv, D, F, window, dtype=dtype)
        nbytes = step_bytes(B, H, Hkv, Hkv, D, F, window, e)
        floor = nbytes / args.bw * 1e6
        s_floor = 2 * B * Hkv * F * D * 4 / args.bw * 1e6
        out = torch.empty_like(inputs[0])
        bd0 = default_block_d(B, Hkv, D)
        nw0 = default_num_warps(1 << (F - 1).bit_length(), bd0)
        configs = [(None, None, None)]
        if not args.quick and name.startswith("bench"):
            configs += list(itertools.product([16, 32, 64, 128], [16, 32, 64] if window else [16], [2, 4, 8]))
        rows = []
        for bd, bw, nw in configs:
            if bd is not None and bd > D:
                continue
            try:
                us = time_graph(lambda: ring_step_triton(*inputs, ring, window_weight=gamma, out=out, block_d=bd, block_w=bw, num_warps=nw), args.steps, args.replays)
            except Exception as exc:  # a config that does not compile (registers, shared memory)
                print(f"{name:<34} {str((bd, bw, nw)):<22} failed: {type(exc).__name__}: {str(exc)[:60]}")
                continue
            label = f"default BD={bd0} w={nw0}" if bd is None else str((bd, bw, nw))
            rows.append((us, label))

        def show(us, label):
            print(f"{name:<34} {label:<22} {us:8.1f} {floor:9.1f} {us / floor:8.2f} {s_floor:8.1f} {nbytes / us / 1e3:7.0f}")

        for us, label in [r for r in rows if r[1].startswith("default")] + sorted(r for r in rows if not r[1].startswith("default"))[:8]:
            show(us, label)
        if name.startswith("bench"):
            show(time_graph(lambda: ring_step_torch(*inputs, ring, window_weight=gamma), args.steps, max(5, args.replays // 3)), "plain torch ring step")


if __name__ == "__main__":
    main()
