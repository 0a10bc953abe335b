"""How many times the fused chunk kernels compile, and what it costs, when a model's evaluation feeds them many
batch sizes and lengths (what ``linearize eval`` does: each task pads its batches to their longest document).

    python benchmarks/compile_count.py [--shapes 32x17,32x48,...] [--out-dir benchmarks/results] [--copy-to $OUT]

On CUDA: runs the forward (no gradient, a frozen window weight, as evaluation does) once per shape in a fresh
Triton cache directory, timing each call (compile included), then reads how many variants each kernel holds.
Counted against ``chunk_kernels.LENGTH_ARGS`` (2026-12-04): before it, Triton kept one variant per pattern of
the batch and length integers (== 1, divisible by 16, neither); ``tests/ops/test_triton_specialization.py``
counts the same variants on a CPU with Triton's own binder. SmolLM2's heads (9 query, 3 KV, D 64, F 128), bf16.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_SHAPES = [(32, t) for t in (17, 31, 48, 64, 77, 96, 100, 128, 129, 160, 255, 256, 300)] + [(7, 100), (1, 100), (32, 1024)]


def parse_shapes(text: str) -> list[tuple[int, int]]:
    try:
        return [tuple(int(x) for x in s.split("x")) for s in text.split(",")]  # type: ignore[misc]
    except ValueError:
        raise SystemExit(f"error: --shapes {text!r}: give BxT pairs separated by commas, e.g. 32x17,7x100") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=None, help="BxT,BxT,... (default: 16 evaluation-like shapes)")
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--copy-to", default=None)
    p.add_argument("--commit", default=None)
    a = p.parse_args(argv)
    shapes = parse_shapes(a.shapes) if a.shapes else DEFAULT_SHAPES
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-count-")  # before triton compiles anything
    import torch

    if not torch.cuda.is_available():
        print("compile_count.py times compiles on CUDA; on this machine run tests/ops/test_triton_specialization.py")
        return 0
    from benchmarks.report import environment, result_stem, save_results
    from linearize.ops.triton import chunk
    from linearize.ops.triton import chunk_kernels as K

    dev = torch.device("cuda")
    rows = []
    t_all = time.perf_counter()
    for B, T in shapes:
        g = torch.Generator(device=dev).manual_seed(0)
        q = torch.randn(B, T, 9, 64, device=dev, dtype=torch.bfloat16, generator=g)
        k, v = (torch.randn(B, T, 3, 64, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(2))
        pq = torch.rand(B, T, 9, 128, device=dev, generator=g).to(torch.bfloat16) + 0.01
        pk = torch.rand(B, T, 9, 128, device=dev, generator=g).to(torch.bfloat16) + 0.01
        gamma = torch.full((9,), 0.5, device=dev)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            chunk.hybrid_attention_triton(q, k, v, pq, pk, window=64, window_weight=gamma)
        torch.cuda.synchronize()
        rows.append({"B": B, "T": T, "first_call_s": time.perf_counter() - t0})
        print(f"B={B:3d} T={T:5d}: first call {rows[-1]['first_call_s']:.2f} s", flush=True)
    total = time.perf_counter() - t_all
    variants = {n: len(f.device_caches[dev.index or 0][0]) for n, f in vars(K).items()
                if n.endswith("_kernel") and hasattr(f, "device_caches") and f.device_caches}
    print(f"{len(shapes)} shapes in {total:.1f} s; compiled variants: {variants}")
    payload = {"environment": environment(a.commit), "shapes": rows, "total_s": total, "variants": variants,
               "length_args": list(getattr(K, "LENGTH_ARGS", ()))}
    md = [f"# Chunk-kernel compiles over evaluation-like shapes: {payload['environment'].get('device')}", "",
          f"{len(shapes)} shapes (B x T) in {total:.1f} s, first calls, fresh Triton cache; variants compiled: "
          + ", ".join(f"{k} {v}" for k, v in variants.items()), "", "| B | T | first call s |", "|---:|---:|---:|"]
    md += [f"| {r['B']} | {r['T']} | {r['first_call_s']:.2f} |" for r in rows]
    stem = result_stem("compile-count", str(payload["environment"].get("device", "cuda")))
    save_results(Path(a.out_dir), stem, payload, "\n".join(md) + "\n", a.copy_to)
    return 0


if __name__ == "__main__":
    sys.exit(main())
