"""Shared memory of every fused chunk kernel launch, compiled ahead of time for a GPU arch on a machine
without a GPU (Triton's bundled ptxas): catches "out of resource: shared memory" before a device run.

    python scripts/check_smem.py                      # the cases below, sm_90 (H100/H200: 227 KiB a block)
    python scripts/check_smem.py --arch 80 --limit 166912   # A100 (163 KiB)
    python scripts/check_smem.py --registers          # also registers a thread and spill bytes (cuobjdump)

Registers matter as much as shared memory here: a kernel at 255 registers a thread with 8 warps fills an SM's
register file alone, so one program runs per SM, and anything over 255 spills to local memory (``STACK``).

How: ``hybrid_attention_triton`` forward + backward runs on CPU tensors with every kernel replaced by a
recorder (no kernel executes; the values are garbage), which keeps each launch's argument types, int
values and constexprs. Each distinct launch is then compiled with Triton's own specialization rules
(ints equal to 1 become constants, ints and pointers divisible by 16 get the divisibility hint, except the ints a
kernel marks ``do_not_specialize``; pointers
are taken as 16-byte aligned, as CUDA allocations are), and ``metadata.shared`` is read. A launch over the
limit is compiled again with ``num_stages=1``, the fallback ``chunk._launch`` takes on the device.
Exit status 1 if any launch stays over the limit.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

H100_SMEM = 232448  # bytes a block may use on sm_90 (the limit Triton reports there)

_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32", torch.uint8: "u8"}

# (name, B, T, H, Hkv, D, F, Hf, W, dtype): real models' heads, the benchmark shape, every dtype, T = 1
CASES = [
    ("smollm2 bf16", 2, 700, 9, 3, 64, 128, 3, 64, torch.bfloat16),
    ("gemma3 bf16", 2, 700, 4, 1, 256, 128, 1, 64, torch.bfloat16),
    ("qwen2.5 bf16", 2, 700, 14, 2, 64, 128, 2, 64, torch.bfloat16),
    ("bench bf16 D=F=128", 2, 700, 4, 2, 128, 128, 2, 64, torch.bfloat16),
    ("fp16 D=F=128", 2, 700, 4, 2, 128, 128, 2, 64, torch.float16),
    ("fp32 D=F=128", 2, 700, 4, 2, 128, 128, 2, 64, torch.float32),
    ("fp32 D=F=128 T=1", 2, 1, 4, 2, 128, 128, 2, 64, torch.float32),
    ("fp32 D=64 F=128", 2, 700, 4, 2, 64, 128, 2, 64, torch.float32),
    ("bf16 D=64 F=256", 2, 700, 4, 2, 64, 256, 2, 64, torch.bfloat16),
]


def record_launches(B, T, H, Hkv, D, F, Hf, W, dtype, config=None, gamma_grad: bool = True) -> list[dict]:
    """Every kernel launch of one forward + backward, as {kernel, args: {name: (type, int value)}, constexprs, opts}.
    ``gamma_grad=False`` freezes the window weight (the forward then skips u, and may take ``one_acc``)."""
    from linearize.ops.triton import chunk
    from linearize.ops.triton import chunk_gluon as G
    from linearize.ops.triton import chunk_kernels as K

    launches: list[dict] = []

    class Recorder:
        def __init__(self, name, fn):
            self.__name__, self.fn = name, fn

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                types = {}
                for name, a in zip(self.fn.arg_names, args):
                    if isinstance(a, torch.Tensor):
                        types[name] = ("*" + _DTYPES[a.dtype], None)
                    elif isinstance(a, bool):
                        types[name] = ("i1", int(a))
                    elif isinstance(a, int):
                        types[name] = ("i32", a)
                    elif isinstance(a, float):
                        types[name] = ("fp32", None)
                opts = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "maxnreg") if k in kwargs}
                opts.setdefault("num_stages", 3)  # Triton's default when a launch names none
                launches.append({"kernel": self.__name__, "args": types, "constexprs": kwargs, "opts": opts})

            return launch

    from tests.ops.helpers import random_inputs

    names = [n for n in dir(K) if n.endswith("_kernel")]
    saved = {n: getattr(K, n) for n in names}
    # The Gluon kernels (LaunchConfig.gluon_fwd, gluon_dq) as the launcher takes them on an H100: the CPU tensors would
    # send it to the Triton kernels (chunk_gluon.supported).
    g_names = [n for n in dir(G) if n.endswith("_kernel")]
    g_saved = (G.supported, {n: getattr(G, n) for n in g_names})
    try:
        for n in names:
            setattr(K, n, Recorder(n, saved[n]))
        if G.gluon is not None:
            G.supported = lambda q, D, F, BV, C, *_: C == G.BLOCK and max(D, F, BV) <= 128 and q.dtype != torch.float32
            for n in g_names:
                setattr(G, n, Recorder(n, g_saved[1][n]))
        ins = [t.requires_grad_(True) for t in random_inputs(B, T, H, Hkv, D, F, Hf, dtype=dtype)]
        ins[5].requires_grad_(gamma_grad)
        y, _ = chunk.hybrid_attention_triton(*ins[:5], window=W, window_weight=ins[5], config=config)
        y.float().sum().backward()
    finally:
        for n in names:
            setattr(K, n, saved[n])
        G.supported = g_saved[0]
        for n, fn in g_saved[1].items():
            setattr(G, n, fn)
    unique = {json.dumps(r, sort_keys=True): r for r in launches}
    return list(unique.values())


def compile_launch(launch: dict, arch: int, num_stages: int | None = None):
    """The launch compiled for ``arch`` with Triton's own specialization rules (see the module docstring)."""
    import triton
    from triton.backends.compiler import GPUTarget

    from linearize.ops.triton import chunk_gluon as G
    from linearize.ops.triton import chunk_kernels as K

    fn = getattr(K, launch["kernel"], None) or getattr(G, launch["kernel"])
    sig, constexprs, attrs = {}, dict(launch["constexprs"]), {}
    plain = {fn.arg_names[i] if isinstance(i, int) else i for i in fn.do_not_specialize}  # (chunk_kernels.LENGTH_ARGS)
    for name, (ty, value) in launch["args"].items():
        i = fn.arg_names.index(name)
        if name in plain:
            sig[name] = ty
            continue
        if ty == "i32" and value == 1:
            constexprs[name] = 1
            continue
        if ty.startswith("*") or (ty == "i32" and value % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
        sig[name] = ty
    for name in constexprs:
        sig[name] = "constexpr"
    sig = {n: sig[n] for n in fn.arg_names}
    source = triton.compiler.ASTSource
    if launch["kernel"] in G.__dict__:  # (a Gluon kernel: its own front end)
        from triton.experimental.gluon._runtime import GluonASTSource as source
    src = source(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()}, attrs=attrs)
    opts = dict(launch["opts"])
    if num_stages is not None:
        opts["num_stages"] = num_stages
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)


def resource_usage(kernel) -> dict[str, int]:
    """{'REG': registers a thread, 'STACK': spill bytes a thread, 'LOCAL', 'SHARED'} of a compiled kernel, read
    from its cubin by the cuobjdump that ships with Triton."""
    import os
    import re
    import subprocess
    import tempfile

    import triton

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in re.findall(r"(REG|STACK|LOCAL|SHARED):(\d+)", out)}


def check(launches: list[dict], arch: int, limit: int, kernels: set[str] | None = None, registers: bool = False) -> list[dict]:
    """Per launch: shared bytes with its stages and, if over ``limit``, with one stage (what ``_launch`` does);
    with ``registers``, also the registers a thread and spill bytes of the binary that would run."""
    rows = []
    for r in launches:
        if kernels is not None and r["kernel"] not in kernels:
            continue
        kernel = compile_launch(r, arch)
        first = kernel.metadata.shared
        one = None
        if first > limit and r["opts"]["num_stages"] > 1:
            kernel = compile_launch(r, arch, num_stages=1)
            one = kernel.metadata.shared
        used = first if one is None else one
        row = {"kernel": r["kernel"], "stages": r["opts"]["num_stages"], "warps": r["opts"].get("num_warps"),
               "constexprs": {k: v for k, v in r["constexprs"].items() if k in ("C", "BV", "GQ", "D", "F")},
               "shared": first, "shared_1_stage": one, "fits": used <= limit}
        if registers:
            use = resource_usage(kernel)
            row |= {"registers": use.get("REG"), "spill_bytes": use.get("STACK", 0) + use.get("LOCAL", 0)}
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200, 80: A100)")
    ap.add_argument("--limit", type=int, default=H100_SMEM, help="shared bytes a block may use on that GPU")
    ap.add_argument("--registers", action="store_true", help="also registers a thread and spill bytes")
    args = ap.parse_args(argv)
    bad = 0
    for name, *shape in CASES:
        rows = check(record_launches(*shape), args.arch, args.limit, registers=args.registers)
        for r in rows:
            fallback = "" if r["shared_1_stage"] is None else f" -> {r['shared_1_stage'] / 1024:.1f} KiB with 1 stage"
            flag = "" if r["fits"] else "  OVER THE LIMIT"
            regs = f", {r['registers']} registers, {r['spill_bytes']} B spilled" if args.registers else ""
            print(f"{name:22s} {r['kernel']:26s} stages {r['stages']} warps {r['warps']} {r['constexprs']}: "
                  f"{r['shared'] / 1024:.1f} KiB{fallback}{regs}{flag}", flush=True)
            bad += not r["fits"]
    print(f"sm_{args.arch}, limit {args.limit / 1024:.1f} KiB: {bad} launch(es) over the limit")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
