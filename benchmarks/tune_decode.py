"""Launch sweep of the ring decode kernel (``ring_step_triton``) at real models' decode shapes, and the cost of
the Hedgehog maps beside it (the Triton map kernel against the maps as PyTorch and inductor compute them), every
row timed inside a CUDA graph.

    python benchmarks/tune_decode.py                       # smollm2, smollm2-kvmaps, issue5 presets
    python benchmarks/tune_decode.py --presets smollm2 --quick
    python benchmarks/tune_decode.py --presets issue5 --quick --fold 1,8,16,32   # deferred folding (RingState.fold)
    TRITON_INTERPRET=1 python benchmarks/tune_decode.py --smoke     # CPU: every config runs and agrees

Why: a compiled SmolLM2 decode step (B 64, H200) spends ~17.5 us a layer in the ring kernel against ~9 us
of state traffic, and 12.5 us a layer in the six kernels of the two feature maps. This table says which
launch (value block BD, warps, window block BW) is fastest per shape, and what the maps cost each way.

Rows per preset:
  * ``BD.. w.. BW.. [FC..] [P] [H]``: the ring kernel reading phi_q, phi_k computed beforehand (FC: S streamed in
    chunks of that many rows; P: each chunk loaded one step ahead, the first before the window part; H: the query
    heads of a feature head as the rows of tensor-core dots, ``heads_dot``; ``fold P``: the ring with deferred
    folding, S written every P-th step, each row timed over many steps so the folding ones count at their share);
  * ``maps: triton (1 launch)``: ``hedgehog_pair_triton``, both maps of the step in one kernel (what
    ``CompiledDecode(fuse_maps=True)`` runs);
  * ``maps: torch eager`` / ``maps: torch compiled``: ``HedgehogFeatureMap`` on q and k, eagerly and through
    ``torch.compile`` (inductor: a permuted copy, a batched GEMM per map, softmax reductions; in a compiled
    step some of its pointwise work fuses into neighbouring kernels);
  * ``rope+maps: triton BR.. w..``: ``rope_hedgehog_pair_triton``, RoPE on q and k and both maps in one launch
    (what ``CompiledDecode`` runs by default), at its default launch, and with ``--rope-sweep`` at every
    rows-a-program x warps; ``rope: inductor, maps: triton``: the two launches it replaced (RoPE compiled by
    inductor, then the map kernel). RoPE at one position for the batch (cos, sin [1, 1, D]), as a decode step has it.
Timing: ``benchmarks.timing.time_graph`` over enough independent rings that no replay finds its state in L2
(a layer's state is cold in a real step: the other layers' states pass through L2 in between).
Floor: ``costs.hybrid_decode_cost`` bytes (S and z read and written in fp32, the window's keys and values,
the step's inputs and outputs) over the copy bandwidth measured in the same run.
Each ring config's output is checked against the default launch on the same ring, and the map kernel's
against the PyTorch maps (rel err).
"""

from __future__ import annotations

import argparse
import itertools
import re
import sys
import time
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
    "qwen2.5-kvmaps": Shape(64, 14, 2, 64, 128, 2),  # key maps per KV head: 7 query heads a program
    "llama8b": Shape(64, 32, 8, 128, 128, 32),  # Llama-3.1-8B's heads (LoLCATs' layout: key maps per query head)
    "llama8b-kvmaps": Shape(64, 32, 8, 128, 128, 8),  # the same with key maps per KV head (4 query heads each)
    # the same without a window (pure linear attention: no ring part), to tell the window's share of the kernel
    "llama8b-kvmaps-nowindow": Shape(64, 32, 8, 128, 128, 8, window=0),
    "smoke": Shape(3, 4, 2, 16, 24, 2, window=5),  # key maps per KV head: every launch form has rows
}


def problem(s: Shape, device, dtype, seed: int, fold: int = 1):
    """(q, k, v), a full ring, gamma and Hedgehog maps (query [H heads], key [Hf heads]; F = 2 f) with random
    weights, whose features of q and k the ring rows read."""
    from linearize.modules.feature_maps import HedgehogFeatureMap
    from linearize.ops.triton.decode import random_decode_problem

    (q, k, v, _, _), ring, gamma = random_decode_problem(
        s.B, s.H, s.Hkv, s.D, s.F, s.window, per_q_features=s.Hf == s.H, dtype=dtype, device=device, seed=seed,
        fold=fold)

    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    maps = []
    for heads in (s.H, s.Hf):
        fm = HedgehogFeatureMap(heads, s.D, s.F // 2).requires_grad_(False)
        fm.weight.copy_(torch.randn(fm.weight.shape, generator=g) * s.D**-0.5)
        maps.append(fm.to(device, dtype))
    return (q, k, v), ring, gamma, tuple(maps)


def configs(s: Shape, quick: bool):
    """(BD, warps, BW, FC, prefetch, heads_dot) launches, the default first. FC > 0: S streamed in row chunks (with
    key maps per KV head, read out by each of the program's query heads); each chunked launch also with its chunks
    loaded one step ahead (prefetch), and, where one feature head serves several query heads, with those heads as
    the rows of tensor-core dots (heads_dot; not with prefetch, which spills there)."""
    from linearize.ops.ring import ring_slots
    from linearize.ops.triton.decode import (
        _pow2, default_block_d, default_block_w, default_chunk_rows, default_heads_dot, default_num_warps,
        default_prefetch,
    )

    bd0 = default_block_d(s.B, s.Hf, s.D)
    fc0 = default_chunk_rows(s.F, s.D, bd0, s.Hf == s.H)
    several = s.Hf < s.H
    hd0 = default_heads_dot(fc0, several)
    w0 = default_num_warps(_pow2(s.F), bd0, fc0, hd0)
    bw0 = default_block_w(ring_slots(s.window), s.D, hd0, fc0)
    out = [(bd0, w0, bw0, fc0, default_prefetch(fc0, bd0, w0), hd0)]
    if quick:
        bds, ws, bws = [16, 32, _pow2(s.D)], [2, 4, 8], [bw0]
        if bd0 // 2 >= 16:
            bds.append(bd0 // 2)
    else:
        bds, ws, bws = [16, 32, 64, 128], [1, 2, 4, 8], sorted({8, 16, 32, bw0})
    fcs = [0] + [fc for fc in (16, 32, 64) if fc <= _pow2(s.F)]
    for bd, w, bw, fc, pf, hd in itertools.product(bds, ws, bws, fcs, (False, True), (False, True)):
        cfg = (bd, w, bw, fc, pf, hd)
        if bd > _pow2(s.D) or bw > _pow2(s.window) or cfg in out or (pf and not fc):
            continue
        if hd and not (fc and several and min(bd, _pow2(s.D)) >= 16 and not pf):
            continue
        if fc and quick and bd not in (bd0, bd0 // 2):  # quick: chunks only at the default value block and half
            continue
        out.append(cfg)
    return out


def run(args) -> dict:
    from benchmarks import costs
    from benchmarks.report import environment
    from benchmarks.timing import measure_ceilings, rotation_sets, time_eager, time_graph
    from linearize.ops.triton.decode import ring_step_triton
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from linearize.ops.triton.feature_maps import (
        ROPE_BLOCK_ROWS, ROPE_NUM_WARPS, hedgehog_pair_triton, rope_hedgehog_pair_triton,
    )

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    env = environment(args.commit)
    ceilings = measure_ceilings(device=device.type)
    print(f"device {env['device']}; torch {env['torch']}, triton {env['triton']}; copy {ceilings['copy_gbps']:.0f} GB/s", flush=True)
    rows = []
    t0 = time.monotonic()

    def out_of_budget(r: dict) -> bool:
        """Past ``--budget-s``: the row is kept as skipped, so that a call's timeout still leaves the files."""
        if args.budget_s is not None and time.monotonic() - t0 > args.budget_s:
            r["skipped"] = f"--budget-s {args.budget_s:g} spent"
            rows.append(r)
            return True
        return False

    for name in args.presets.split(","):
        s = PRESETS[name]
        cost = costs.hybrid_decode_cost(s.B, s.H, s.Hkv, s.D, s.F, s.Hf, s.window)
        floor_ms = cost.bytes / (ceilings["copy_gbps"] * 1e9) * 1e3
        n_sets = 1 if args.smoke else rotation_sets(cost.bytes)
        print(f"\n{name}: {asdict(s)}; {n_sets} rotating rings; floor {floor_ms * 1e3:.1f} us ({cost.bytes / 1e6:.1f} MB)", flush=True)
        ref = None
        for fold in folds(args.fold, s.window):
            sets = [problem(s, device, dtype, seed, fold) for seed in range(n_sets)]
            with torch.no_grad():
                phis = [(fq(q), fk(k)) for (q, k, _), _, _, (fq, fk) in sets]
            outs = [torch.empty_like(x[0]) for x, *_ in sets]

            def step(i, bd, w, bw, fc, pf, hd, ring=None):
                (q, k, v), r, gamma, _ = sets[i]
                pq, pk = phis[i]
                return ring_step_triton(q, k, v, pq, pk, ring if ring is not None else r, window_weight=gamma,
                                        out=outs[i], block_d=bd, block_w=bw, num_warps=w, chunk_rows=fc, prefetch=pf,
                                        heads_dot=hd)

            def timed(fns):
                return time_eager(fns[0], rep_ms=1) if args.smoke else time_graph(fns, rep_ms=args.rep_ms)

            ring0, cfgs = sets[0][1].clone(), configs(s, args.quick)  # a snapshot: timing advances the rings
            cfgs = select(cfgs, args.match)
            if ref is None:  # the default launch at the first fold: every row's first step must agree with it
                ref = step(0, *cfgs[0], ring=ring0.clone()).double().clone()
            for cfg in cfgs:
                bd, w, bw, fc, pf, hd = cfg
                r = {"preset": name, "shape": asdict(s), "row": row_label(*cfg, fold=fold),
                     "kind": "ring", "BD": bd, "warps": w, "BW": bw, "FC": fc, "prefetch": pf, "heads_dot": hd,
                     "fold": fold, "default": cfg == cfgs[0] and fold == 1, "floor_ms": floor_ms}
                if out_of_budget(r):
                    continue
                try:
                    y = step(0, *cfg, ring=ring0.clone()).double()
                    r["rel_err"] = float(((y - ref).norm() / ref.norm()).item())
                    r["ms"] = timed([lambda i=i: step(i, *cfg) for i in range(n_sets)])
                    r["pct_floor"] = 100 * floor_ms / r["ms"]
                except Exception as ex:  # noqa: BLE001 - a failed config is a row with its error
                    r["error"] = error_text(ex)
                rows.append(r)
                print(line(r), flush=True)

        def torch_maps(i):
            (q, k, _), _, _, (fq, fk) = sets[i]
            return fq(q), fk(k)

        def triton_maps(i):
            (q, k, _), _, _, (fq, fk) = sets[i]
            return hedgehog_pair_triton(q, k, fq.weight, fk.weight)

        # (set 0's maps baked into the graph; every set's q, k go through it)
        compiled = torch.compile(lambda a, b, fq=sets[0][3][0], fk=sets[0][3][1]: (fq(a), fk(b)), fullgraph=True, dynamic=False)
        with torch.no_grad():
            variants = [("maps: triton (1 launch)", triton_maps), ("maps: torch eager", torch_maps),
                        ("maps: torch compiled", lambda i: compiled(*sets[i][0][:2]))]
            cos, sin = rope_rows(s, device, dtype)
            rope_compiled = torch.compile(lambda a, b: apply_rotary_pos_emb(a, b, cos, sin, unsqueeze_dim=2), fullgraph=True,
                                          dynamic=False)

            def rope_then_maps(i):
                (q, k, _), _, _, (fq, fk) = sets[i]
                return hedgehog_pair_triton(*rope_compiled(q, k), fq.weight, fk.weight)

            def rope_maps(br, w):
                def fn(i):
                    (q, k, _), _, _, (fq, fk) = sets[i]
                    return rope_hedgehog_pair_triton(q, k, cos, sin, fq.weight, fk.weight, block_rows=br, num_warps=w)[2:]
                return fn

            default = (ROPE_BLOCK_ROWS, ROPE_NUM_WARPS)
            launches = [default] + ([(br, w) for br in (16, 32, 64) for w in (1, 2, 4, 8) if (br, w) != default]
                                    if args.rope_sweep else [])
            variants += [(f"rope+maps: triton BR{br} w{w}", rope_maps(br, w)) for br, w in launches]
            variants.append(("rope: inductor, maps: triton", rope_then_maps))
            (q0, k0, _), _, _, (fq0, fk0) = sets[0]
            rope_ref = tuple(m(x) for m, x in zip((fq0, fk0), apply_rotary_pos_emb(q0, k0, cos, sin, unsqueeze_dim=2)))
            for row, fn in variants:
                r = {"preset": name, "shape": asdict(s), "row": row, "kind": "maps", "floor_ms": floor_ms}
                want = rope_ref if row.startswith("rope") else phis[0]
                if out_of_budget(r):
                    continue
                try:
                    got = fn(0)
                    r["rel_err"] = max(float(((a.double() - b.double()).norm() / b.double().norm()).item())
                                       for a, b in zip(got, want))
                    r["ms"] = timed([lambda i=i: fn(i) for i in range(n_sets)])
                except Exception as ex:  # noqa: BLE001
                    r["error"] = error_text(ex)
                rows.append(r)
                print(line(r), flush=True)
    return {"environment": env, "ceilings": ceilings, "args": vars(args), "command": " ".join(sys.argv), "rows": rows}


def rope_rows(s: Shape, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [1, 1, D] at one position (Llama's inverse frequencies, base 500000), as transformers' rotary
    embedding gives a decode step whose batch shares its position."""
    inv = 1.0 / (500000.0 ** (torch.arange(0, s.D, 2, dtype=torch.float32) / s.D))
    emb = torch.cat([1234.0 * inv] * 2).view(1, 1, s.D)
    return emb.cos().to(device, dtype), emb.sin().to(device, dtype)


def row_label(bd, w, bw, fc, pf, hd, fold: int = 1) -> str:
    """A ring launch's row name: ``BD128 w2 BW32 FC64 [P] [H] [fold 16]``."""
    return (f"BD{bd} w{w} BW{bw}" + (f" FC{fc}" if fc else "") + (" P" if pf else "") + (" H" if hd else "")
            + (f" fold {fold}" if fold > 1 else ""))


def folds(spec: str, window: int) -> list[int]:
    """``--fold``'s periods for a preset (1 alone where there is no ring: window <= 1)."""
    out = [int(x) for x in spec.split(",")]
    if any(f < 1 for f in out):
        raise SystemExit(f"--fold takes periods >= 1; got {spec!r}")
    return out if window >= 2 else [1]


def select(cfgs: list[tuple], pattern: str | None) -> list[tuple]:
    """The default launch (first) and the others whose row label ``pattern`` (a regex) finds; all without one."""
    if not pattern:
        return cfgs
    return cfgs[:1] + [c for c in cfgs[1:] if re.search(pattern, row_label(*c))]


def error_text(ex: Exception) -> str:
    """A failed row's error: the exception's type and the first line of its message."""
    return f"{type(ex).__name__}: {str(ex).splitlines()[0][:200] if str(ex) else ''}"


def line(r: dict) -> str:
    if r.get("error"):
        return f"  {r['row']:28s} ERROR {r['error']}"
    tail = f"  {r['pct_floor']:5.1f}% floor" if "pct_floor" in r else " " * 13
    tail += f"  err {r['rel_err']:.1e}" + ("  (default)" if r.get("default") else "") if "rel_err" in r else ""
    return f"  {r['row']:28s} {r['ms'] * 1e3:8.1f} us{tail}"


def best(rows: list[dict], preset: str) -> dict | None:
    ok = [r for r in rows if r["preset"] == preset and r.get("kind") == "ring" and "ms" in r]
    return min(ok, key=lambda r: r["ms"]) if ok else None


def markdown(p: dict) -> str:
    from benchmarks.report import header_lines

    md = [f"# Ring decode kernel launch sweep and feature maps: {p['environment']['device']}", ""]
    md += header_lines(p["environment"], p["ceilings"], True) + ["", f"Command: `{p['command']}`", ""]
    for preset in dict.fromkeys(r["preset"] for r in p["rows"]):
        rs = [r for r in p["rows"] if r["preset"] == preset]
        md += [f"## {preset}: {rs[0]['shape']}", "", f"floor {rs[0]['floor_ms'] * 1e3:.1f} µs", ""]
        b = best(p["rows"], preset)
        if b:
            md.append(f"- best ring launch: {b['row']}, {b['ms'] * 1e3:.1f} µs ({b['pct_floor']:.0f}% of floor)")
        for r in rs:
            if r.get("kind") == "maps" and "ms" in r:
                md.append(f"- {r['row']}: {r['ms'] * 1e3:.1f} µs (rel err {r['rel_err']:.1e} against the PyTorch maps)")
        skipped = sum(1 for r in rs if r.get("skipped"))
        if skipped:
            md.append(f"- {skipped} rows not timed: {next(r['skipped'] for r in rs if r.get('skipped'))}")
        md += ["", "| row | µs | % floor | rel err | |", "|---|---:|---:|---:|---|"]
        for r in sorted((r for r in rs if "ms" in r or r.get("error")), key=lambda r: r.get("ms", 1e9)):
            if r.get("error"):
                md.append(f"| {r['row']} | - | - | - | {r['error']} |")
            else:
                pct = f"{r['pct_floor']:.0f}" if "pct_floor" in r else ""
                md.append(f"| {r['row']} | {r['ms'] * 1e3:.1f} | {pct} | {r['rel_err']:.1e} | {'default' if r.get('default') else ''} |")
        md.append("")
    return "\n".join(md) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="smollm2,smollm2-kvmaps,issue5", help=f"comma list of {sorted(PRESETS)}")
    p.add_argument("--quick", action="store_true", help="a smaller sweep (BD 16/32/D, warps 2/4/8, the default BW)")
    p.add_argument("--rep-ms", type=float, default=50)
    p.add_argument("--fold", default="1",
                   help="comma list of deferred-folding periods (RingState.fold: S written every P-th step), e.g. 1,16")
    p.add_argument("--budget-s", type=float, default=None,
                   help="time no new row after this many seconds (the rest are listed as skipped), so that a run cut "
                        "short by a device call's limit still writes its files")
    p.add_argument("--rope-sweep", action="store_true",
                   help="time the RoPE + maps kernel at every rows-a-program (16, 32, 64) x warps (1, 2, 4, 8)")
    p.add_argument("--match", default=None,
                   help="a regex: time only the ring rows whose label it finds (and the default), e.g. 'w[24] .*FC64'")
    add_kernel_bench_args(p, "CPU under TRITON_INTERPRET=1, a tiny shape, fp32")
    args = p.parse_args(argv)
    require_interpreter_or_cuda(args, "the sweep")
    if args.smoke:
        args.presets, args.quick, args.fold = "smoke", True, "1,3"
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
