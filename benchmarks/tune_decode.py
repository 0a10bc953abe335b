"""Launch sweep of the ring decode kernel (``ring_step_triton``) at real models' decode shapes, with the
Hedgehog maps fused into the kernel or computed outside, every row timed inside a CUDA graph.

    python benchmarks/tune_decode.py                       # smollm2, smollm2-kvmaps, issue5 presets
    python benchmarks/tune_decode.py --presets smollm2 --quick
    TRITON_INTERPRET=1 python benchmarks/tune_decode.py --smoke     # CPU: every config runs and agrees

Why: in a compiled SmolLM2 decode step (B 64) the ring kernel took 39 µs a layer unfused and 67 µs with the
maps fused (H200, 2026-12-03), against about 10 µs of state traffic. This table says which launch (value
block BD, warps, window block BW) is fastest per shape, and whether fusing the maps pays once the maps'
own kernels are counted.

Rows per preset:
  * ``unfused BD.. w.. BW..``: the kernel reading phi_q, phi_k computed beforehand;
  * ``fused BD.. w.. BW..``: the kernel computing them from q, k and the Hedgehog weights;
  * ``maps outside (torch)``: the maps of q and k as ``HedgehogFeatureMap`` computes them (einsum, two
    softmaxes, cat), the work the fused kernel absorbs; unfused total = kernel + this row (an eager bound:
    inductor fuses part of it into neighbouring kernels in a compiled step).
Timing: ``benchmarks.timing.time_graph`` over enough independent rings that no replay finds its state in L2
(a layer's state is cold in a real step: the other layers' states pass through L2 in between).
Floor: ``costs.hybrid_decode_cost`` bytes (S and z read and written in fp32, the window's keys and values,
the step's inputs and outputs) over the copy bandwidth measured in the same run.
Each config's output is checked against the default unfused launch on the same ring (rel err).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

import torch  # noqa: E402

from benchmarks.report import add_kernel_bench_args, require_interpreter_or_cuda, save_kernel_bench  # noqa: E402


@dataclass(frozen=True)
class Shape:
    B: int
    H: int
    Hkv: int
    D: int
    F: int  # features a head (Hedgehog: 2 x feature_dim)
    Hf: int  # key feature heads (H, or Hkv with per-KV-head key maps)
    window: int = 64


PRESETS = {
    "smollm2": Shape(64, 9, 3, 64, 128, 9),
    "smollm2-kvmaps": Shape(64, 9, 3, 64, 128, 3),
    "issue5": Shape(64, 16, 16, 128, 128, 16),
    "gemma3": Shape(64, 4, 1, 256, 128, 4),
    "qwen2.5": Shape(64, 14, 2, 64, 128, 14),
    "smoke": Shape(3, 4, 2, 16, 8, 4, window=5),
}


def problem(s: Shape, device, dtype, seed: int):
    """(q, k, v, phi_q, phi_k), a full ring, gamma, Hedgehog weights (Wq [H,D,F/2], Wk [Hf,D,F/2]) and the
    feature maps of q and k under those weights (so fused and unfused rows compute the same thing)."""
    from linearize.ops.triton.decode import random_decode_problem

    (q, k, v, _, _), ring, gamma = random_decode_problem(
        s.B, s.H, s.Hkv, s.D, s.F, s.window, per_q_features=s.Hf == s.H, dtype=dtype, device=device, seed=seed)
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    wq = (torch.randn(s.H, s.D, s.F // 2, generator=g) * s.D**-0.5).to(device, dtype)
    wk = (torch.randn(s.Hf, s.D, s.F // 2, generator=g) * s.D**-0.5).to(device, dtype)
    return (q, k, v), ring, gamma, (wq, wk)


def hedgehog(x, w, heads: int):
    """x [B,1,Hx,D] -> [B,1,heads,F] with W [heads,D,F/2]; x's head j serves heads j*G..(j+1)*G-1."""
    if x.shape[2] != heads:
        x = x.repeat_interleave(heads // x.shape[2], dim=2)
    u = torch.einsum("bthd,hdf->bthf", x, w).float()
    return torch.cat([torch.softmax(u, -1), torch.softmax(-u, -1)], -1).to(x.dtype)


def configs(s: Shape, quick: bool):
    from linearize.ops.ring import ring_slots
    from linearize.ops.triton.decode import _pow2, default_block_d, default_block_w, default_num_warps

    bd0 = default_block_d(s.B, s.Hf, s.D)
    w0 = default_num_warps(_pow2(s.F), bd0)
    bw0 = default_block_w(ring_slots(s.window), s.D)
    out = [(False, bd0, w0, bw0), (True, bd0, w0, bw0)]
    if quick:
        bds, ws, bws = [16, 32, _pow2(s.D)], [2, 4, 8], [bw0]
    else:
        bds, ws, bws = [16, 32, 64, 128], [1, 2, 4, 8], sorted({16, 32, bw0})
    for fused, bd, w, bw in itertools.product([False, True], bds, ws, bws):
        if bd <= _pow2(s.D) and bw <= _pow2(s.window) and (fused, bd, w, bw) not in out:
            out.append((fused, bd, w, bw))
    return out


def run(args) -> dict:
    from benchmarks import costs
    from benchmarks.report import environment
    from benchmarks.timing import measure_ceilings, rotation_sets, time_eager, time_graph
    from linearize.ops.triton.decode import ring_step_triton

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    env = environment(args.commit)
    ceilings = measure_ceilings(device=device.type)
    print(f"device {env['device']}; torch {env['torch']}, triton {env['triton']}; copy {ceilings['copy_gbps']:.0f} GB/s", flush=True)
    rows = []
    for name in args.presets.split(","):
        s = PRESETS[name]
        cost = costs.hybrid_decode_cost(s.B, s.H, s.Hkv, s.D, s.F, s.Hf, s.window)
        floor_ms = cost.bytes / (ceilings["copy_gbps"] * 1e9) * 1e3
        n_sets = 1 if args.smoke else rotation_sets(cost.bytes)
        sets = [problem(s, device, dtype, seed) for seed in range(n_sets)]
        maps = [(hedgehog(q, wq, s.H), hedgehog(k, wk, s.Hf)) for (q, k, _), _, _, (wq, wk) in sets]
        outs = [torch.empty_like(x[0]) for x, *_ in sets]
        print(f"\n{name}: {asdict(s)}; {n_sets} rotating rings; floor {floor_ms * 1e3:.1f} us ({cost.bytes / 1e6:.1f} MB)", flush=True)

        def step(i, fused, bd, w, bw, ring=None):
            (q, k, v), r, gamma, (wq, wk) = sets[i]
            pq, pk = maps[i]
            return ring_step_triton(q, k, v, pq, pk, ring if ring is not None else r, window_weight=gamma, out=outs[i],
                                    block_d=bd, block_w=bw, num_warps=w, hedgehog=(q, k, wq, wk) if fused else None)

        ring0, cfgs = sets[0][1].clone(), configs(s, args.quick)  # a snapshot: timing advances the rings
        ref = step(0, *cfgs[0], ring=ring0.clone()).double().clone()
        for fused, bd, w, bw in cfgs:
            r = {"preset": name, "shape": asdict(s), "row": f"{'fused' if fused else 'unfused'} BD{bd} w{w} BW{bw}",
                 "fused": fused, "BD": bd, "warps": w, "BW": bw, "default": (bd, w, bw) == cfgs[0][1:], "floor_ms": floor_ms}
            try:
                y = step(0, fused, bd, w, bw, ring=ring0.clone()).double()
                r["rel_err"] = float(((y - ref).norm() / ref.norm()).item())
                fns = [lambda i=i: step(i, fused, bd, w, bw) for i in range(n_sets)]
                r["ms"] = time_eager(fns[0], rep_ms=1) if args.smoke else time_graph(fns, rep_ms=args.rep_ms)
                r["pct_floor"] = 100 * floor_ms / r["ms"]
            except Exception as ex:  # noqa: BLE001 - a failed config is a row with its error
                r["error"] = f"{type(ex).__name__}: {str(ex).splitlines()[0][:200] if str(ex) else ''}"
            rows.append(r)
            print(line(r), flush=True)
        fns = [lambda i=i: hedgehog(sets[i][0][0], sets[i][3][0], s.H) + 0 * hedgehog(sets[i][0][1], sets[i][3][1], s.Hf).sum()
               for i in range(n_sets)]
        r = {"preset": name, "shape": asdict(s), "row": "maps outside (torch)", "floor_ms": floor_ms}
        r["ms"] = time_eager(fns[0], rep_ms=1) if args.smoke else time_graph(fns, rep_ms=args.rep_ms)
        rows.append(r)
        print(line(r), flush=True)
    return {"environment": env, "ceilings": ceilings, "args": vars(args), "command": " ".join(sys.argv), "rows": rows}


def line(r: dict) -> str:
    if r.get("error"):
        return f"  {r['row']:28s} ERROR {r['error']}"
    tail = f"  {r['pct_floor']:5.1f}% floor  err {r['rel_err']:.1e}" + ("  (default)" if r.get("default") else "") if "rel_err" in r else ""
    return f"  {r['row']:28s} {r['ms'] * 1e3:8.1f} us{tail}"


def best(rows: list[dict], preset: str, fused: bool) -> dict | None:
    ok = [r for r in rows if r["preset"] == preset and r.get("fused") is fused and "ms" in r]
    return min(ok, key=lambda r: r["ms"]) if ok else None


def markdown(p: dict) -> str:
    from benchmarks.report import header_lines

    md = [f"# Ring decode kernel launch sweep: {p['environment']['device']}", ""] + header_lines(p["environment"], p["ceilings"], True)
    md += ["", f"Command: `{p['command']}`", ""]
    for preset in dict.fromkeys(r["preset"] for r in p["rows"]):
        rs = [r for r in p["rows"] if r["preset"] == preset]
        md += [f"## {preset}: {rs[0]['shape']}", "", f"floor {rs[0]['floor_ms'] * 1e3:.1f} µs", ""]
        maps = next((r for r in rs if r["row"].startswith("maps")), None)
        for fused in (False, True):
            b = best(p["rows"], preset, fused)
            if b:
                md.append(f"- best {'fused' if fused else 'unfused'}: {b['row']}, {b['ms'] * 1e3:.1f} µs ({b['pct_floor']:.0f}% of floor)")
        if maps:
            md.append(f"- maps outside (torch, eager bound): {maps['ms'] * 1e3:.1f} µs")
        md += ["", "| row | µs | % floor | rel err | |", "|---|---:|---:|---:|---|"]
        for r in sorted((r for r in rs if "ms" in r or r.get("error")), key=lambda r: r.get("ms", 1e9)):
            if r.get("error"):
                md.append(f"| {r['row']} | - | - | - | {r['error']} |")
            elif "rel_err" in r:
                md.append(f"| {r['row']} | {r['ms'] * 1e3:.1f} | {r['pct_floor']:.0f} | {r['rel_err']:.1e} | {'default' if r['default'] else ''} |")
            else:
                md.append(f"| {r['row']} | {r['ms'] * 1e3:.1f} | | | |")
        md.append("")
    return "\n".join(md) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="smollm2,smollm2-kvmaps,issue5", help=f"comma list of {sorted(PRESETS)}")
    p.add_argument("--quick", action="store_true", help="a smaller sweep (BD 16/32/D, warps 2/4/8, the default BW)")
    p.add_argument("--rep-ms", type=float, default=50)
    add_kernel_bench_args(p, "CPU under TRITON_INTERPRET=1, a tiny shape, fp32")
    args = p.parse_args(argv)
    require_interpreter_or_cuda(args, "the sweep")
    if args.smoke:
        args.presets, args.quick = "smoke", True
    unknown = set(args.presets.split(",")) - set(PRESETS)
    if unknown:
        raise SystemExit(f"unknown preset(s) {sorted(unknown)}; choose from {sorted(PRESETS)}")
    payload = run(args)
    tol = 1e-4 if args.smoke else 2e-2
    bad = [r for r in payload["rows"] if r.get("error") or r.get("rel_err", 0) > tol]
    save_kernel_bench(args, "tune-decode", payload, markdown(payload))
    if bad:
        print("configs that failed or disagree with the default launch:\n  " + "\n".join(line(r) for r in bad))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
