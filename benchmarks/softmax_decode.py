"""One decode token of softmax attention over a static KV cache: linearize's split-K kernel against what
transformers runs, at the shapes of a linearized model's kept softmax layers.

    python benchmarks/softmax_decode.py                    # SmolLM2-135M's layer: B 64, 9 on 3 heads, D 64, 4224 slots
    python benchmarks/softmax_decode.py --heads 14 --kv-heads 2      # Qwen2.5-0.5B's
    python benchmarks/softmax_decode.py --smoke            # CPU, Triton's interpreter, tiny shapes: every row runs and agrees

Rows, for each fill level ``n`` (slots in use of a static cache of ``L``; the rest masked, as a decode at
step n - prompt sees it):
  * ours                 ``linearize.ops.triton.softmax_decode`` with its default launch (reads the mask, then
                         only the blocks with a True);
  * ours BN=.. w=.. s=.. the same with other launches (block of keys, warps, splits): the tuning table;
  * ours branchy/bounded the two loops (``bounded``: the mask's last True found first, then a loop without the
                         per-block branch, which lets Triton pipeline the loads), and bounded launches;
  * hf-sdpa-static       transformers' ``sdpa_attention_forward`` as a kept layer calls it on a StaticCache:
                         repeat_kv (a copy of the cache per query head) and SDPA over all L slots with the mask;
  * sdpa-gqa-prefix      SDPA with enable_gqa on the first n slots, no mask: the best a dense kernel does when
                         the host knows n (not capturable in one CUDA graph for every step: a bound, not a path).
Bytes (the floor): the keys and values read, B Hkv n D 2 e, plus the mask B L, q and y; FLOPs 4 B H n D.
floor ms = bytes / the copy bandwidth measured in the run (read + write GB/s, the METHOD.md convention);
"% floor" = floor / the graph time. Timing: ``benchmarks.timing.time_graph`` (the step replayed in a CUDA
graph, as a decode step runs in ``generate``), and ``time_eager`` beside it (do_bench median, cold L2: a
microsecond-scale step there is bound by the host's launch path, the custom op's dispatch included, which
a graph removes). Each row's output is first checked against ``softmax_decode_reference`` in fp64.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

import torch  # noqa: E402

from benchmarks.report import add_kernel_bench_args, require_interpreter_or_cuda, save_kernel_bench  # noqa: E402
LAUNCHES = [(32, 4, None), (64, 4, None), (64, 8, None), (128, 8, None), (64, 4, 2), (64, 4, 16)]
BOUNDED_LAUNCHES = [(64, 4, 2), (64, 4, 16), (128, 8, None), (32, 4, None)]


def problem(B, H, Hkv, L, D, n, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(B, 1, H, D, generator=g).to(device, dtype).transpose(1, 2)  # as transformers hands it over
    k = torch.randn(B, Hkv, L, D, generator=g).to(device, dtype)
    v = torch.randn(B, Hkv, L, D, generator=g).to(device, dtype)
    mask = (torch.arange(L, device=device) < n)[None].expand(B, L).contiguous()
    return q, k, v, mask


def rows_for(args, n: int, device, dtype) -> tuple[list, tuple]:
    """[(name, zero-arg step)] for one fill level (every step returns y [B, 1, H, D]) and its inputs."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from linearize.ops.triton.softmax_decode import softmax_decode_triton

    B, H, Hkv, L, D = args.batch, args.heads, args.kv_heads, args.cache, args.head_dim
    q, k, v, mask = problem(B, H, Hkv, L, D, n, dtype, device)
    mask4 = mask[:, None, None, :]
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, H // Hkv
    out = [("ours", lambda: softmax_decode_triton(q, k, v, mask))]
    for bn, w, s in LAUNCHES:
        out.append((f"ours BN={bn} w={w} s={s or 'auto'}",
                    lambda bn=bn, w=w, s=s: softmax_decode_triton(q, k, v, mask, block_n=bn, num_warps=w, splits=s)))
    for bounded in (False, True):  # both loops, whichever is the default
        out.append((f"ours {'bounded' if bounded else 'branchy'}", lambda b=bounded: softmax_decode_triton(q, k, v, mask, bounded=b)))
    for bn, w, s in BOUNDED_LAUNCHES:
        out.append((f"ours bounded BN={bn} w={w} s={s or 'auto'}", lambda bn=bn, w=w, s=s: softmax_decode_triton(
            q, k, v, mask, block_n=bn, num_warps=w, splits=s, bounded=True)))
    out.append(("hf-sdpa-static", lambda: sdpa_attention_forward(module, q, k, v, mask4, scaling=D**-0.5)[0]))
    kp, vp = k[:, :, :n], v[:, :, :n]
    out.append(("sdpa-gqa-prefix", lambda: torch.nn.functional.scaled_dot_product_attention(
        q, kp, vp, enable_gqa=True, scale=D**-0.5).transpose(1, 2)))
    return out, (q, k, v, mask)


def run(args) -> dict:
    from benchmarks.report import environment
    from benchmarks.timing import measure_ceilings, time_eager, time_graph
    from linearize.ops.softmax_decode import softmax_decode_reference

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    env = environment(args.commit)
    ceilings = measure_ceilings(device=device.type)
    e = torch.empty((), dtype=dtype).element_size()
    B, H, Hkv, L, D = args.batch, args.heads, args.kv_heads, args.cache, args.head_dim
    print(f"device {env['device']}; torch {env['torch']}, triton {env['triton']}; copy {ceilings['copy_gbps']:.0f} GB/s", flush=True)
    print(f"B {B}, {H} query on {Hkv} KV heads, D {D}, static cache {L} slots, {args.dtype}", flush=True)
    rows = []
    for n in [int(x) for x in args.filled.split(",")]:
        steps, (q, k, v, mask) = rows_for(args, n, device, dtype)
        ref = softmax_decode_reference(q.double(), k.double(), v.double(), mask, scale=D**-0.5)
        nbytes = B * Hkv * n * D * 2 * e + B * L + 2 * B * H * D * e
        flops = 4 * B * H * n * D
        floor_ms = nbytes / (ceilings["copy_gbps"] * 1e9) * 1e3
        for name, fn in steps:
            r = {"filled": n, "row": name}
            try:
                y = fn()
                r["rel_err"] = float(((y.double() - ref).norm() / ref.norm()).item())
                eager = time_eager(fn, rep_ms=args.rep_ms)
                ms = time_graph([fn], rep_ms=args.rep_ms) if device.type == "cuda" else eager
                r |= {"ms": ms, "eager_ms": eager, "gbps": nbytes / ms / 1e6, "tflops": flops / ms / 1e9, "floor_ms": floor_ms,
                      "pct_floor": 100 * floor_ms / ms}
            except Exception as ex:  # noqa: BLE001 - a failed row is a row with its error
                r["error"] = f"{type(ex).__name__}: {str(ex).splitlines()[0][:200] if str(ex) else ''}"
            rows.append(r)
            print(line(r), flush=True)
        del steps, q, k, v, mask, ref
    return {"environment": env, "ceilings": ceilings, "args": vars(args), "command": " ".join(sys.argv),
            "shape": {"B": B, "H": H, "Hkv": Hkv, "L": L, "D": D, "dtype": args.dtype}, "rows": rows}


def line(r: dict) -> str:
    if r.get("error"):
        return f"n={r['filled']:<6d} {r['row']:26s} ERROR {r['error']}"
    return (f"n={r['filled']:<6d} {r['row']:26s} {r['ms'] * 1e3:9.1f} us graph {r['eager_ms'] * 1e3:7.1f} us eager  {r['gbps']:7.0f} GB/s  {r['pct_floor']:5.1f}% floor  "
            f"err {r['rel_err']:.1e}")


def markdown(p: dict) -> str:
    from benchmarks.report import header_lines

    s = p["shape"]
    md = [f"# Softmax decode step: {p['environment']['device']}", ""] + header_lines(p["environment"], p["ceilings"], True)
    md += [f"- B {s['B']}, {s['H']} query heads on {s['Hkv']} KV heads, D {s['D']}, a static cache of {s['L']} slots, {s['dtype']}",
           "", f"Command: `{p['command']}`", "",
           "| filled | row | µs (graph) | µs (eager) | GB/s | % floor | rel err | note |", "|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in p["rows"]:
        if r.get("error"):
            md.append(f"| {r['filled']} | {r['row']} | - | - | - | - | - | {r['error']} |")
        else:
            md.append(f"| {r['filled']} | {r['row']} | {r['ms'] * 1e3:.1f} | {r['eager_ms'] * 1e3:.1f} | {r['gbps']:.0f} | {r['pct_floor']:.1f} | {r['rel_err']:.1e} | |")
    md += ["", "GB/s and % floor from the graph time. Bytes: keys and values read (B Hkv n D 2 e) + the mask (B L) + q and y; floor = bytes / copy bandwidth "
           "(read + write, measured here). hf-sdpa-static is what a kept layer runs through transformers on a StaticCache; "
           "sdpa-gqa-prefix needs the fill level on the host (a bound, not a capturable path)."]
    return "\n".join(md) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--cache", type=int, default=4224, help="static cache slots (prompt 128 + 4096 new tokens)")
    p.add_argument("--filled", default="256,1024,2176,4224", help="fill levels (2176: the mean of a 4096-token run)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--rep-ms", type=float, default=100)
    add_kernel_bench_args(p, "CPU under TRITON_INTERPRET=1, tiny shapes: every row runs and agrees")
    args = p.parse_args(argv)
    require_interpreter_or_cuda(args, "the benchmark")
    if args.smoke:
        args.batch, args.heads, args.kv_heads, args.head_dim, args.cache, args.filled = 2, 6, 2, 16, 200, "37,200"
        args.dtype, args.rep_ms = "float32", 1
    payload = run(args)
    bad = [r for r in payload["rows"] if r.get("error") or r["rel_err"] > (1e-4 if args.dtype == "float32" else 2e-2)]
    save_kernel_bench(args, "softmax-decode", payload, markdown(payload))
    if bad:
        print("rows that failed or disagree with the reference:\n  " + "\n  ".join(line(r) for r in bad))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
