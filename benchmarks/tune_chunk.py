"""Pick the launch table of the fused chunk kernels: time forward and forward+backward for a few block shapes.

    python benchmarks/tune_chunk.py [--T 16384] [--B 4] [--H 16] [--D 128] [--F 128] [--out FILE.json]
    python benchmarks/tune_chunk.py --T 2048 --nseg 0,8,16,32 --shapes default,64x64x4x2   # segments per sequence

``--intra 32x4,16x4`` also runs each shape with the backward's intra kernels (bwd_dq, bwd_dk) on blocks of C_intra
rows at that many warps (``LaunchConfig.C_intra`` / ``warps_intra``): fewer registers a program, so more programs an SM.

``--forms one-pass,split,fold,split+fold`` runs each of those in each form: the forward in two passes
(``LaunchConfig.split_forward``: a walk writes each chunk's running sums, then one program a block of C_intra
queries does the rest) and the backward without its running-sum walks (``fold_backward``).

``--skip`` also runs each config with ``LaunchConfig.skip_empty``: the window, near-linear and intra-backward loops
split by block distance so that a block pair's window or linear part that holds no pair of positions is neither
loaded nor computed (same outputs; fewer products, more loop code).

``--blocks fwd64x8,dq64x8+dk32x4,dk64x8+split3`` also runs each split + fold config with some intra kernels on their
own blocks (``LaunchConfig.C_fwd`` / ``C_dk``; ``dq`` sets ``C_intra``, bwd_dq's): blocks of 64 rows let Hopper's
wgmma serve them, blocks of 32 issue mma.sync only. A kernel an item does not name keeps the config's blocks.
``split2`` / ``split3``: bwd_dk's gradients over two or three launches (``LaunchConfig.dk_launches``).

``--local`` also runs each split + fold config with ``LaunchConfig.local_sums``: the chunk-sum walks start each
segment from zero and write its total, so the two segment-sum passes do not run; the block kernels add the prefix.

``--walk 0,32`` (0: none) also runs each split + fold config with its chunk-sum walks on [64, 64] / [32, 32] tiles of the
state, or on [F, BV] (``LaunchConfig.walk_tile``: F split across programs too, 4 warps; the training default is 64); with ``--nseg 1`` that is one walk over the
whole sequence, with no segment-sum pass and no prefix.

``--walk-opts pairs,s3,pairs+s4,r168`` also runs each split + fold config with its walks two chunks a step
(``LaunchConfig.walk_pairs``) and / or that many pipeline stages (``walk_stages``), or its block kernels capped at
that many registers a thread (``maxnreg``: 168 lets three programs share an SM at 4 warps); ``g`` / ``gd``: the
window weight's gradient formed in bwd_dq (``dgamma_in_dq``: no u written or read) / and delta too (``delta_in_dq``: no
bwd_delta pass); ``ov`` / ``noov``: the backward's gradient-sum walk on a side stream beside bwd_dq (``overlap``, the
training default) or not; ``gl128`` / ``gl64``: the split forward's block kernel in Gluon (Hopper's wgmma, blocks of 64
rows, ``LaunchConfig.gluon_fwd``) on value blocks of 128 / 64 columns; ``gdq`` / ``gdk``: bwd_dq / bwd_dk in Gluon
(``gluon_dq`` / ``gluon_dk``; ``gdk2`` / ``gdk3``: bwd_dk's other forms, ``gluon_dk`` 2 and 3); ``nogl``: the
Triton block kernels (the training default takes Gluon's on sm_90);
``w128``: the
chunk-sum walks capped at that many registers a thread (``walk_maxnreg``: with ``ov``, so that two walk programs and
one bwd_dq program fit an SM together).

``--nseg`` sweeps the number of segments each sequence is cut into (0 = the default: about 8 programs an SM,
at least 4 chunks a segment, ``chunk._segments``): more segments mean shorter sequential walks in the running-sum kernels (latency) against a
larger segment-prefix buffer ([nseg, B, H', F, D] fp32, written, summed and read once more).

Times with ``triton.testing.do_bench`` (median of repeats, warm-up excluded); every config is first
checked against the default one (relative error of y and of every gradient < 1e-2) so a fast wrong config
cannot win.
Also prints a per-kernel breakdown of the default config (and the fastest; ``--profile-all``: every config) from the
torch profiler.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import time_graph  # noqa: E402
from linearize.ops.triton.chunk import LaunchConfig, default_config, hybrid_attention_triton  # noqa: E402


ALL_SHAPES = [(64, 64, 4, 2), (64, 64, 8, 2), (64, 128, 4, 2), (64, 128, 8, 3), (64, 128, 4, 3), (32, 128, 4, 2), (32, 128, 8, 2)]


def label(cfg: LaunchConfig) -> str:
    return (f"C={cfg.C:3d} BV={cfg.BV:3d} warps={cfg.num_warps} stages={cfg.num_stages} nseg={cfg.nseg or 'auto'}"
            + (" one_acc" if cfg.one_acc else "")
            + (f" intra={cfg.C_intra}x{cfg.warps_intra or cfg.num_warps}" if cfg.C_intra else "")
            + (" split" if cfg.split_forward else "") + (" fold" if cfg.fold_backward else "")
            + (" skip" if cfg.skip_empty else "")
            + (f" fwd={cfg.C_fwd}x{cfg.warps_fwd}" if cfg.C_fwd else "") + (f" dk={cfg.C_dk}x{cfg.warps_dk}" if cfg.C_dk else "")
            + (f" dk_launches={cfg.dk_launches}" if cfg.dk_launches > 1 else "")
            + (" local" if cfg.local_sums else "") + (f" walk={cfg.walk_tile}" if cfg.walk_tile else "")
            + (" pairs" if cfg.walk_pairs else "") + (f" walk_stages={cfg.walk_stages}" if cfg.walk_stages else "")
            + (f" maxnreg={cfg.maxnreg}" if cfg.maxnreg else "")
            + (" dgamma_in_dq" if cfg.dgamma_in_dq else "") + (" delta_in_dq" if cfg.delta_in_dq else "")
            + (" overlap" if cfg.overlap else "") + (f" walk_maxnreg={cfg.walk_maxnreg}" if cfg.walk_maxnreg else "")
            + (f" gluon_fwd={cfg.gluon_fwd}" if cfg.gluon_fwd else "") + (" gluon_dq" if cfg.gluon_dq else "")
            + (f" gluon_dk={cfg.gluon_dk}" if cfg.gluon_dk else ""))


FORMS = {"one-pass": (False, False), "split": (True, False), "fold": (False, True), "split+fold": (True, True)}


def candidates(base: LaunchConfig, shapes: str, nsegs: list[int], one_acc: bool = False,
               intra: list[tuple[int, int]] = (), forms: list[str] = ("one-pass",),
               skip: bool = False, blocks: list[dict[str, tuple[int, int]]] = (),
               intra_only: bool = False, local: bool = False, walks: list[int] = (),
               walk_opts: list[dict] = ()) -> list[LaunchConfig]:
    """The default config first (the reference of the error check), then every (shape, nseg) pair once.
    ``intra_only``: each shape with the ``intra`` blocks only, not also on its own C (blocks of 128 rows spill).
    ``local``: each split + fold config also with ``local_sums``; ``walks``: also with each of those ``walk_tile``s (0:
    None); ``walk_opts``: also with each of those walk_pairs / walk_stages settings (``parse_walk_opts``)."""
    if shapes == "all":
        picked = [(base.C, base.BV, base.num_warps, base.num_stages)] + ALL_SHAPES
    else:
        picked = []
        for item in shapes.split(","):
            if item == "default":
                picked.append((base.C, base.BV, base.num_warps, base.num_stages))
            else:
                try:
                    C, BV, w, st = (int(x) for x in item.split("x"))
                except ValueError:
                    raise SystemExit(f"--shapes: {item!r} is neither 'default' nor CxBVxWARPSxSTAGES (e.g. 64x64x4x2)") from None
                picked.append((C, BV, w, st))
    out = [base]
    for C, BV, w, st in picked:
        for n in nsegs:
            for oa in (False, True) if one_acc else (False,):
                own_blocks = [x for x in intra if C % x[0] == 0 and x[0] <= C]
                for ci, wi in ([] if intra_only and own_blocks else [(None, None)]) + own_blocks:
                    for form in forms:
                        if form not in FORMS:
                            raise SystemExit(f"--forms: {form!r} is not one of {', '.join(FORMS)}")
                        sp, fo = FORMS[form]
                        if oa and sp:
                            continue
                        sf = sp and fo  # (blocks, local, walks and walk_opts change split + fold's kernels only)
                        variants = list(itertools.product(
                            [{}] + list(blocks if sf else ()),
                            (False, True) if local and sf else (base.local_sums and sf,),
                            [base.walk_tile] + [t or None for t in (walks if sf else ())],
                            [{}] + list(walk_opts if sf else ())))
                        for sk in (False, True) if skip else (base.skip_empty,):  # without --skip: the default's
                            cfg = LaunchConfig(C=C, BV=BV, num_warps=w, num_stages=st, nseg=n or None, one_acc=oa,
                                               C_intra=ci, warps_intra=wi, split_forward=sp, fold_backward=fo,
                                               skip_empty=sk)
                            for own, lo, wt, wo in variants:
                                walk = dict(walk_pairs=base.walk_pairs, walk_stages=base.walk_stages,
                                            maxnreg=base.maxnreg, walk_maxnreg=base.walk_maxnreg,
                                            overlap=base.overlap and fo,  # (overlap needs the folded backward)
                                            # (the Gluon kernels replace the split forward's / folded backward's)
                                            gluon_fwd=base.gluon_fwd if sp else None, gluon_dq=base.gluon_dq and fo,
                                            gluon_dk=base.gluon_dk if fo else 0) | wo
                                c = dataclasses.replace(with_blocks(cfg, own), local_sums=lo, walk_tile=wt, **walk)
                                if effective(c) not in map(effective, out):
                                    out.append(c)
    return out


def effective(cfg: LaunchConfig) -> tuple:
    """What a config launches: two configs that spell the same blocks differently (C_fwd None or equal to C_intra)
    are one candidate."""
    import dataclasses

    plain = dataclasses.replace(cfg, C_intra=None, warps_intra=None, C_fwd=None, warps_fwd=None, C_dk=None,
                                warps_dk=None)
    return plain, cfg.blocks("fwd"), cfg.blocks("dq"), cfg.blocks("dk")


def with_blocks(cfg: LaunchConfig, own: dict[str, tuple[int, int]]) -> LaunchConfig:
    """``cfg`` with the intra kernels ``own`` names ('fwd', 'dq', 'dk' -> (rows, warps)) on those blocks; the others
    keep the blocks they had in ``cfg``."""
    import dataclasses

    if not own:
        return cfg
    fwd, dq, dk = (own.get(k, cfg.blocks(k)) for k in ("fwd", "dq", "dk"))
    return dataclasses.replace(cfg, C_intra=dq[0], warps_intra=dq[1], C_fwd=fwd[0], warps_fwd=fwd[1], C_dk=dk[0],
                               warps_dk=dk[1], dk_launches=own.get("dk_launches", cfg.dk_launches))


def parse_blocks(text: str) -> list[dict[str, tuple[int, int]]]:
    """'fwd64x8,dq64x8+dk32x4+split2' -> [{'fwd': (64, 8)}, {'dq': (64, 8), 'dk': (32, 4), 'dk_launches': 2}]."""
    import re

    out = []
    for item in filter(None, text.split(",")):
        own = {}
        for part in item.split("+"):
            if part in ("split2", "split3"):
                own["dk_launches"] = int(part[-1])
                continue
            m = re.fullmatch(r"(fwd|dq|dk)(\d+)x(\d+)", part)
            if m is None:
                raise SystemExit(f"--blocks: {part!r} is neither fwd|dq|dk ROWSxWARPS (e.g. fwd64x8) nor split2|split3")
            own[m[1]] = (int(m[2]), int(m[3]))
        out.append(own)
    return out


def parse_walk_opts(text: str) -> list[dict]:
    """'pairs,s3,pairs+s4,r168,g,gd' -> [{'walk_pairs': True}, {'walk_stages': 3}, {'walk_pairs': True, 'walk_stages':
    4}, {'maxnreg': 168}, {'dgamma_in_dq': True}, {'dgamma_in_dq': True, 'delta_in_dq': True}] (rN: the block
    kernels' register cap, ``LaunchConfig.maxnreg``; wN: the chunk-sum walks', ``walk_maxnreg``; g / gd: the window
    weight's gradient / and delta in bwd_dq (gd turns ``overlap`` off: its walk would read delta before bwd_dq forms
    it); ov / noov: ``overlap`` on / off; gl128 / gl64: ``gluon_fwd``; gdq / gdk: ``gluon_dq`` / ``gluon_dk`` (gdk:
    form 1; gdk2 / gdk3: forms 2 and 3); nogl: none of the three)."""
    out = []
    for item in filter(None, text.split(",")):
        opts = {}
        for part in item.split("+"):
            if part == "pairs":
                opts["walk_pairs"] = True
            elif part in ("s1", "s2", "s3", "s4"):
                opts["walk_stages"] = int(part[1])
            elif part.startswith("r") and part[1:].isdigit():
                opts["maxnreg"] = int(part[1:])
            elif part.startswith("w") and part[1:].isdigit():
                opts["walk_maxnreg"] = int(part[1:])
            elif part in ("g", "gd"):
                opts |= {"dgamma_in_dq": True, "delta_in_dq": part == "gd"}
                if part == "gd":  # (overlap's walk would read delta before bwd_dq forms it)
                    opts["overlap"] = False
            elif part in ("ov", "noov"):
                opts["overlap"] = part == "ov"
            elif part in ("gl64", "gl128"):
                opts["gluon_fwd"] = int(part[2:])
            elif part == "gdq":
                opts["gluon_dq"] = True
            elif part in ("gdk", "gdk2", "gdk3"):  # (gluon_dk's form: gdk is 1, three launches)
                opts["gluon_dk"] = int(part[3:] or 1)
            elif part == "nogl":  # (the Triton kernels: the training default takes Gluon's on sm_90)
                opts |= {"gluon_fwd": None, "gluon_dq": False, "gluon_dk": 0}
            else:
                raise SystemExit(f"--walk-opts: {part!r} is none of pairs, s1..s4 (the walks' pipeline stages), "
                                 "rN (the block kernels' register cap), wN (the walks'), g / gd (dgamma / and delta "
                                 "in bwd_dq), ov / noov (overlap on / off), gl64 / gl128 (the Gluon forward), gdq / gdk (the Gluon bwd_dq / bwd_dk; "
                                 "gdk2 / gdk3 its other forms), "
                                 "nogl (no Gluon kernel)")
        out.append(opts)
    return out


def parse_intra(text: str) -> list[tuple[int, int]]:
    """'32x4,16x2' -> [(32, 4), (16, 2)] (C_intra, warps_intra)."""
    out = []
    for item in filter(None, text.split(",")):
        try:
            ci, w = (int(x) for x in item.split("x"))
        except ValueError:
            raise SystemExit(f"--intra: {item!r} is not C_INTRAxWARPS (e.g. 32x4)") from None
        out.append((ci, w))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=16384)
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--Hkv", type=int, default=None)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--F", type=int, default=128)
    ap.add_argument("--W", type=int, default=64)
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile-all", action="store_true",
                    help="print the per-kernel profile of every config that ran (default: the default's and the fastest's)")
    ap.add_argument("--graph", action="store_true",
                    help="also time forward+backward replayed in a CUDA graph (short T, where launches dominate)")
    ap.add_argument("--one-acc", action="store_true",
                    help="also each config with one_acc (the forward's one-accumulator form; its forward rows only: "
                         "with the window weight trained, forward+backward keeps two accumulators)")
    ap.add_argument("--intra", default="",
                    help="comma list of C_INTRAxWARPS: also each shape with the backward's intra kernels on those blocks")
    ap.add_argument("--intra-only", action="store_true",
                    help="each shape with the --intra blocks only, not also on blocks of its own C")
    ap.add_argument("--forms", default="one-pass",
                    help="comma list of one-pass, split (split_forward), fold (fold_backward), split+fold")
    ap.add_argument("--skip", action="store_true",
                    help="also each config with skip_empty (block pairs' empty window / linear parts not computed)")
    ap.add_argument("--blocks", default="",
                    help="comma list of '+'-joined items, fwd|dq|dk ROWSxWARPS (a kernel's blocks) or split2|split3 (bwd_dk's "
                         "gradients over 2 or 3 launches): also each split + fold config with those options")
    ap.add_argument("--local", action="store_true",
                    help="also each split + fold config with local_sums (chunk-sum walks from zero, no segment-sum passes)")
    ap.add_argument("--walk", default="",
                    help="comma list of tiles (16, 32, 64; 0: [F, BV], no tile): also each split + fold config with its "
                         "chunk-sum walks on [tile, tile] state tiles (walk_tile; with --nseg 1, one walk over the whole sequence)")
    ap.add_argument("--walk-opts", default="",
                    help="comma list of '+'-joined items, pairs (walk_pairs: two chunks a walk step), s1..s4 (the walks' "
                         "pipeline stages), rN (maxnreg: the block kernels' register cap), wN (walk_maxnreg: the walks'), "
                         "g (dgamma_in_dq) or gd (dgamma_in_dq + delta_in_dq) or ov / noov (overlap on / off) or "
                         "gl128 / gl64 (gluon_fwd: the split forward's block kernel in Gluon) or gdq / gdk (gluon_dq / "
                         "gluon_dk: bwd_dq / bwd_dk in Gluon) or nogl (the Triton block kernels): also "
                         "each split + fold "
                         "config with those")
    ap.add_argument("--nseg", default="0", help="comma list of segments per sequence; 0 = the default (auto)")
    ap.add_argument("--shapes", default="all",
                    help="'all' (default + 7 block shapes), or a comma list of 'default' and CxBVxWARPSxSTAGES")
    a = ap.parse_args()
    import triton.testing

    B, T, H, D, F = a.B, a.T, a.H, a.D, a.F
    Hkv = a.Hkv or H
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(B, T, H, D, device=dev, dtype=dt, generator=g)
    k = torch.randn(B, T, Hkv, D, device=dev, dtype=dt, generator=g)
    v = torch.randn(B, T, Hkv, D, device=dev, dtype=dt, generator=g)
    pq = torch.softmax(torch.randn(B, T, H, F, device=dev, generator=g), -1).to(dt)
    pk = torch.softmax(torch.randn(B, T, Hkv, F, device=dev, generator=g), -1).to(dt)
    gamma = torch.full((H,), 0.3, device=dev)
    dy = torch.randn(B, T, H, D, device=dev, dtype=dt, generator=g)
    leaves = [t.requires_grad_(True) for t in (q, k, v, pq, pk, gamma)]

    def fwd(cfg):
        with torch.no_grad():
            return hybrid_attention_triton(q, k, v, pq, pk, window=a.W, window_weight=gamma, config=cfg)[0]

    def fwd_bwd(cfg):
        y, _ = hybrid_attention_triton(q, k, v, pq, pk, window=a.W, window_weight=gamma, config=cfg)
        return torch.autograd.grad(y, leaves, dy)

    base = default_config(D, F, training=True)  # the launch forward+backward runs (fwd is timed in it too)
    import time

    # First call = compile (the on-disk Triton cache is per user; point TRITON_CACHE_DIR at an empty
    # folder to measure a cold start).
    t0 = time.perf_counter()
    y0 = fwd(base)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    g0 = fwd_bwd(base)
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    print(f"first call (compile + run): forward {t1 - t0:.1f} s, then forward+backward {t2 - t1:.1f} s", flush=True)
    rows = []
    intra = parse_intra(a.intra)
    cands = candidates(base, a.shapes, [int(x) for x in a.nseg.split(",")], a.one_acc, intra, a.forms.split(","),
                       a.skip, parse_blocks(a.blocks), a.intra_only, a.local, [int(x) for x in a.walk.split(",") if x],
                       parse_walk_opts(a.walk_opts))

    def rel(x, ref):
        return ((x.float() - ref.float()).norm() / ref.float().norm()).item()

    for cfg in cands:
        try:
            err = max([rel(fwd(cfg), y0)] + [rel(x, ref) for x, ref in zip(fwd_bwd(cfg), g0)])
            if not err < 1e-2:
                rows.append(dict(cfg=cfg.__dict__, error=f"mismatch {err:.2e}"))
                continue
            f = triton.testing.do_bench(lambda: fwd(cfg), warmup=50, rep=300, return_mode="median")
            fb = triton.testing.do_bench(lambda: fwd_bwd(cfg), warmup=50, rep=300, return_mode="median")
            row = dict(cfg=cfg.__dict__, fwd_ms=f, fwd_bwd_ms=fb)
            extra = ""
            if a.graph:
                row["fwd_bwd_graph_ms"] = time_graph([lambda: fwd_bwd(cfg)])
                extra = f"  graph {row['fwd_bwd_graph_ms']:7.3f} ms"
            rows.append(row)
            print(f"{label(cfg)}: fwd {f:7.3f} ms  fwd+bwd {fb:7.3f} ms{extra}", flush=True)
        except Exception as e:  # noqa: BLE001 - a config that does not compile (shared memory) is a row, not a crash
            rows.append(dict(cfg=cfg.__dict__, error=f"{type(e).__name__}: {str(e)[:200]}"))
            print(f"{label(cfg)}: {type(e).__name__}", flush=True)

    ok = [r for r in rows if "fwd_bwd_ms" in r]
    best = min(ok, key=lambda r: r["fwd_bwd_ms"]) if ok else None
    print("best fwd+bwd:", best)
    bestf = min(ok, key=lambda r: r["fwd_ms"]) if ok else None
    print("best fwd:", bestf)

    from torch.profiler import ProfilerActivity, profile

    # Per-kernel time of the default and of the fastest config: where a change of launch moved the time.
    fastest = LaunchConfig(**best["cfg"]) if best else base
    profiled = [base] + ([fastest] if fastest != base else [])
    if a.profile_all:  # (every row that ran, for where each change of launch moved the time)
        profiled += [c for c in (LaunchConfig(**r["cfg"]) for r in ok) if c not in profiled]
    for cfg in profiled:
        fwd_bwd(cfg)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fwd_bwd(cfg)
            torch.cuda.synchronize()
        print(f"profile, 5 x forward+backward, {label(cfg)}")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))
    if a.out:
        Path(a.out).write_text(json.dumps(dict(shape=dict(B=B, T=T, H=H, Hkv=Hkv, D=D, F=F, W=a.W), device=torch.cuda.get_device_name(), rows=rows), indent=1))


if __name__ == "__main__":
    main()
