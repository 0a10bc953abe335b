"""Hybrid attention benchmark (issue 5, item 4): ours against SDPA, FlexAttention, fla and their composition.

One command on a GPU prints a table and writes JSON + markdown under benchmarks/results/ (see
benchmarks/README.md for the exact command, which also installs the carried fla-core wheel):

    python benchmarks/attention.py                 # everything, < ~8 min on an H100 (--budget-s stops it early)
    python benchmarks/attention.py --quick         # T in {2K, 16K}, decode at 16K, no B=1 / model rows
    python benchmarks/attention.py --only ours,sdpa-cudnn --groups main
    python benchmarks/attention.py --smoke         # CPU, tiny shapes: every runnable row against the reference

Shapes. main: B=4, H=16, D=F=128, T in {1K, 2K, 4K, 8K, 16K}; b1: B=1, H=32, D=F=128, T in {4K, 16K};
model (T=4K, B=4, F=128, one key feature map per query head as the library's default): SmolLM2-135M
(H=9, Hkv=3, D=64), Gemma3 (H=4, Hkv=1, D=256), Qwen2.5-0.5B (H=14, Hkv=2, D=64). Window 64, bf16.
decode: B=64, H=16, D=F=128, fp32 state; SDPA against KV caches of 1K, 4K and 16K keys.

Rows (``--only`` keys): ours (linearize.ops.hybrid_attention; the note says where it dispatched), ours-triton
(hybrid_attention_triton called directly, --full), ours-chunked (the PyTorch chunked path), sdpa-cudnn and
sdpa-flash (causal), flex-window (compiled FlexAttention, window-64 block mask built once outside timing),
fla-linear (fla chunk_linear_attn, normalized), comp-cumsum (d), comp-lse (d with a sharp-LSE window
max, forward+backward only) and comp-ones (d', --full), the composition of benchmarks/composition.py
(its docstring derives it; the best of them is "composition (d)" in the targets). Model rows run ours and SDPA only unless --full
(each new head shape costs FlexAttention compiles and fla autotuning, tens of seconds each).
Forward: no autograd graph. Forward+backward: y = f(inputs), then torch.autograd.grad(y, inputs, dy) with
one fixed random dy; inputs = q, k, v, phi_q, phi_k and the window weight for ours and (d); q, k, v for
SDPA/Flex; phi_q, phi_k, v for fla.

Timing (the device tool's METHOD.md). Every implementation is called once first (compile, autotune: the
"first s" column), then timed by triton.testing.do_bench, median, which flushes L2 before each call
(so no input rotation is needed there). For T <= --graph-max-T (2K) and for decode, also one CUDA graph
per row, captured over several input sets when one set fits twice in L2 (50 MB), replayed; its median per
call is "graph ms". The two ceilings are measured in the same run: device-to-device copy of 1 GiB
(bytes read + written) and an 8192^3 bf16 matmul on random data.

FLOPs (matmul work, 2 per multiply-add; exp, max, divide not counted) and fewest bytes (each input read
once, each output written once; bf16 = 2 bytes, fp32 = 4), per forward; forward+backward = 3x both
(each forward product has two backward products; the forward reads inputs I and writes y, the backward
reads I, y and dy and writes dI: 3|I| + 3|y|). With P_w = sum_i min(i+1, w) the window (query, key)
pairs of a head and P_c = T(T+1)/2 the causal pairs:
    hybrid (ours, d):  FLOPs = B H (4 D P_w + (4 F D + 4 F) T)
                       bytes = 2 B T (H D + 2 Hkv D + H F + Hf F + H D)
    SDPA causal:       FLOPs = 4 B H D P_c,  bytes = 2 B T (2 H D + 2 Hkv D)
    Flex window:       FLOPs = 4 B H D P_w,  bytes = as SDPA
    linear (fla):      FLOPs = B H (4 F D + 4 F) T,  bytes = 2 B T (H F + Hf F + Hkv D + H D)
    decode, ours:      FLOPs = B H (4 D w + 4 F D + 3 F)
                       bytes = B [8 Hf (F D + F)                  S, z read and written (fp32)
                                  + 2 (2 Hkv (w-1) D + Hf F)       tail k, v and the evicted phi_k read
                                  + 2 (H D + 2 Hkv D + H F + Hf F)  new q, k, v, phi_q, phi_k read
                                  + 2 (2 Hkv D + Hf F + H D)]       k, v, phi_k into the ring, y written
                       (the issue's floor counts S alone: 8 B Hf F D bytes = 44 us at 3.0 TB/s)
    decode, linear:    FLOPs = B H (4 F D + 3 F), bytes = B [8 H (F D + F) + 2 (H F + H F + H D + H D)]
                       (fla numerator only: without the z terms)
    decode, SDPA:      FLOPs = 4 B H D L, bytes = 2 B (2 Hkv L D + 2 H D) for a cache of L keys
floor = max(FLOPs / matmul ceiling, bytes / copy ceiling); "% floor" = floor / measured (eager).

Correctness. Before timing each head shape, every row runs at B=1, T=--check-T (1000) and is compared,
output and every gradient, with linearize.ops.hybrid_attention_reference in fp32 on the same bf16 inputs
(the function the row computes: the hybrid; phi = 0 for the window; window = T for causal SDPA; window = 0
for normalized linear attention); "err" is the largest relative error, BAD above 1e-2 (bf16). Decode rows
are checked against the reference's last token after a chunked prefill. Any failure (OOM, missing
package, compile error) becomes a row with the error, never a crash.
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `linearize` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

import torch  # noqa: E402

from benchmarks import costs  # noqa: E402
from benchmarks.backends import Backends, short_error  # noqa: E402
from benchmarks.decode import DecodeCase, all_decode_rows, check_decode_row  # noqa: E402
from benchmarks.prefill import Case, all_rows, make_inputs, reference, to_bthd  # noqa: E402
from benchmarks.report import ROOT, decode_lines, environment, header_lines, prefill_lines, result_stem, write_results  # noqa: E402

MODEL_ROWS = ("ours", "ours-triton", "ours-chunked", "sdpa-cudnn", "sdpa-flash")
FULL_ONLY_ROWS = ("ours-triton", "comp-ones")  # ours dispatches to the Triton kernel already
TOL = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-4}


def prefill_cases(quick: bool) -> dict[str, list[Case]]:
    Ts = (2048, 16384) if quick else (1024, 2048, 4096, 8192, 16384)
    main = [Case(f"B4 H16 T{T}", 4, T, 16, 16, 128, 128, 16) for T in Ts]
    b1 = [Case(f"B1 H32 T{T}", 1, T, 32, 32, 128, 128, 32, group="b1") for T in (4096, 16384)]
    model = [
        Case("SmolLM2-135M H9/3 D64 B4 T4096", 4, 4096, 9, 3, 64, 128, 9, group="model"),
        Case("Gemma3 H4/1 D256 B4 T4096", 4, 4096, 4, 1, 256, 128, 4, group="model"),
        Case("Qwen2.5-0.5B H14/2 D64 B4 T4096", 4, 4096, 14, 2, 64, 128, 14, group="model"),
    ]
    return {"main": main, "b1": [] if quick else b1, "model": [] if quick else model}


def decode_cases(quick: bool) -> list[int]:
    return [16384] if quick else [1024, 4096, 16384]


def smoke_cases() -> list[Case]:
    return [
        Case("smoke B2 T50 H4/2 D16 F8 Hf4 w8", 2, 50, 4, 2, 16, 8, 4, window=8),
        Case("smoke B1 T37 H3/1 D8 F6 Hf1 w5", 1, 37, 3, 1, 8, 6, 1, window=5),
    ]


# ---- running one row -----------------------------------------------------------------------------


def make_call(fn, I, row, mode):
    """The closure that is timed: forward under no_grad, or forward + autograd.grad to the row's inputs."""
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return fn(I)
        return call
    params = I.get(row.params)
    dy = I.dy if row.layout == "bthd" else I.dyh

    def call():
        return torch.autograd.grad(fn(I), params, dy)
    return call


def _cleanup(device, collect: bool = False) -> None:
    """Free cached GPU memory between rows; ``collect`` also breaks reference cycles (after an exception,
    whose traceback frames hold tensors). gc.collect is slow with transformers imported: not every row."""
    if collect:
        gc.collect()
    if device.type == "cuda":
        try:
            torch.cuda.synchronize()
        except Exception:  # a sticky error: nothing to do but report it on the next row
            pass
        torch.cuda.empty_cache()


def build_first(row, be, case, mode, I, device):
    """The first builder whose first call works: (fn, call, variant note, first-call seconds) or raises."""
    errors = []
    for note, builder in row.builders:
        try:
            fn = builder(be, case, mode)
            call = make_call(fn, I, row, mode)
            t0 = time.perf_counter()
            call()
            if device.type == "cuda":
                torch.cuda.synchronize()
            first = time.perf_counter() - t0
            if errors:
                note = f"{note} (after {'; '.join(errors)})"
            return fn, call, note, first
        except Exception as e:
            errors.append(f"{note}: {short_error(e)}" if note else short_error(e))
            _cleanup(device, collect=True)
    raise RuntimeError("; ".join(errors))


def measure_prefill(row, be, case, mode, sets, args, deadline) -> dict:
    from benchmarks.timing import time_eager, time_graph

    r = {"section": "prefill", "case": case.name, "group": case.group, "mode": mode, "row": row.key, "label": row.label,
         "shape": dict(B=case.B, T=case.T, H=case.H, Hkv=case.Hkv, D=case.D, F=case.F, Hf=case.Hf, window=case.window)}
    if time.monotonic() > deadline:
        r["error"] = "skipped: --budget-s reached"
        return r
    why = row.available(be)
    if why:
        r["error"] = f"unavailable: {why}"
        return r
    try:
        fn, call, r["variant"], r["first_call_s"] = build_first(row, be, case, mode, sets[0], be.device)
        timed(r, lambda: time_eager(call, args.warmup_ms, args.rep_ms), args.repeat)
    except Exception as e:
        r["error"] = short_error(e)
        _cleanup(be.device, collect=True)
        return r
    if row.key == "ours":
        r["variant"] = "dispatches to " + ours_dispatch(sets[0])
    if args.graphs and case.T <= args.graph_max_T:
        try:
            r["graph_ms"] = time_graph([make_call(fn, I, row, mode) for I in sets], args.rep_ms)
            r["graph_sets"] = len(sets)
        except Exception as e:
            r["graph_error"] = short_error(e)
            _cleanup(be.device, collect=True)
    fill_metrics(r, row.cost(case, mode), be.ceilings)
    return r


def ours_dispatch(I) -> str:
    """Which path linearize.ops.hybrid_attention takes for these inputs."""
    try:
        from linearize.ops import use_triton
    except ImportError:
        return "hybrid_attention_chunked"
    return "hybrid_attention_triton" if use_triton(I.q, I.phi_q) else "hybrid_attention_chunked"


def timed(r: dict, measure, repeat: int) -> None:
    """r["ms"] = the median of ``repeat`` medians; with repeat > 1 also their spread (max - min) / median."""
    ms = sorted(measure() for _ in range(max(1, repeat)))
    r["ms"] = ms[len(ms) // 2]
    if len(ms) > 1:
        r["ms_repeats"] = ms
        r["spread"] = (ms[-1] - ms[0]) / r["ms"]


def fill_metrics(r: dict, cost: costs.Cost, ceilings: dict | None) -> None:
    r["flops"], r["bytes"] = cost.flops, cost.bytes
    ms = r.get("ms")
    if ms:
        r["tflops"] = cost.flops / (ms * 1e-3) / 1e12
        r["gbps"] = cost.bytes / (ms * 1e-3) / 1e9
    if ceilings:
        r["floor_ms"] = cost.floor_ms(ceilings["matmul_bf16_tflops"], ceilings["copy_gbps"])
        if ms:
            r["frac_floor"] = r["floor_ms"] / ms
        if r.get("graph_ms"):
            r["graph_frac_floor"] = r["floor_ms"] / r["graph_ms"]


# ---- correctness ----------------------------------------------------------------------------------


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("nan")
    nb = b.norm()
    return (a - b).norm().item() if nb == 0 else ((a - b).norm() / nb).item()


def check_row(row, be, case, mode, I, refs, dtype, ref_dtype) -> dict:
    """Output and gradients of one row vs the reference, on input set I (which requires grad for fwdbwd)."""
    if row.kind not in refs:
        refs[row.kind] = reference(row.kind, case, I, ref_dtype, grad=mode == "fwdbwd")
    y_ref, g_ref = refs[row.kind]
    fn, _, variant, first = build_first(row, be, case, mode, I, be.device)
    if mode == "fwd":
        with torch.no_grad():
            y = fn(I)
        grads = {}
    else:
        y = fn(I)
        params = I.get(row.params)
        dy = I.dy if row.layout == "bthd" else I.dyh
        gs = torch.autograd.grad(y, params, dy)
        grads = dict(to_bthd(n, g) for n, g in zip(row.params, gs))
    if row.layout == "bhtd":
        y = y.transpose(1, 2)
    errs = {"y": rel_err(y, y_ref)}
    for name, g in grads.items():
        if g_ref.get(name) is not None:
            errs["d" + name] = rel_err(g, g_ref[name])
    worst = max(errs.values(), key=lambda e: math.inf if math.isnan(e) else e)
    return {"errs": errs, "err": worst, "ok": not math.isnan(worst) and worst < TOL[dtype], "first_call_s": first, "variant": variant}


def run_checks(rows, be, case, modes, dtype, ref_dtype, seed, device, deadline=math.inf) -> dict:
    """{(row, mode): result} for every available row at the check shape ``case`` (until ``deadline``)."""
    out = {}
    for mode in modes:
        I = make_inputs(case, device, dtype, seed, grad=mode == "fwdbwd")
        refs: dict = {}
        for row in rows:
            if row.available(be) or (device.type != "cuda" and row.cuda_only) or mode not in row.modes:
                continue
            if time.monotonic() > deadline:
                break
            if device.type != "cuda" and mode == "fwdbwd" and row.meta.get("cpu_fwd_only"):
                continue
            try:
                out[(row.key, mode)] = check_row(row, be, case, mode, I, refs, dtype, ref_dtype)
            except Exception as e:
                out[(row.key, mode)] = {"error": short_error(e), "ok": False, "err": None}
                _cleanup(device, collect=True)
        del I, refs
        _cleanup(device)
    return out


# ---- decode -----------------------------------------------------------------------------------------


def measure_decode(row, be, dc: DecodeCase, args, deadline, device, dtype=torch.bfloat16) -> dict:
    from benchmarks.timing import time_eager, time_graph

    r = {"section": "decode", "case": dc.name, "group": "decode", "mode": "decode", "row": row.key, "label": row.label,
         "shape": dict(dc.__dict__)}
    if time.monotonic() > deadline:
        r["error"] = "skipped: --budget-s reached"
        return r
    why = row.available(be)
    if why:
        r["error"] = f"unavailable: {why}"
        return r
    try:
        step = row.build(be, dc, device, dtype, args.seed)
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        r["first_call_s"] = time.perf_counter() - t0
        timed(r, lambda: time_eager(step, args.warmup_ms, args.rep_ms), args.repeat)
    except Exception as e:
        r["error"] = short_error(e)
        _cleanup(device, collect=True)
        return r
    if args.graphs:
        try:
            r["graph_ms"] = time_graph([step], args.rep_ms)
        except Exception as e:
            r["graph_error"] = short_error(e)
            _cleanup(device, collect=True)
    fill_metrics(r, row.cost(dc), be.ceilings)
    if row.key.startswith("ours") and be.ceilings:
        sb = costs.hybrid_decode_state_floor_bytes(dc.B, dc.Hf, dc.D, dc.F)
        r["state_floor_ms"] = sb / (be.ceilings["copy_gbps"] * 1e9) * 1e3
    _cleanup(device)
    return r


# ---- targets ------------------------------------------------------------------------------------------


def _find(rows, case, mode, key, field="ms"):
    for r in rows:
        if r["case"] == case and r["mode"] == mode and r["row"] == key and r.get(field):
            return r[field]
    return None


def _best(rows, case, mode, keys, field="ms"):
    vals = [v for v in (_find(rows, case, mode, k, field) for k in keys) if v]
    return min(vals) if vals else None


def targets(rows: list[dict]) -> list[str]:
    """Issue 5's targets, from this run's numbers only."""
    out = []
    ok = lambda c: "met" if c else "MISSED"  # noqa: E731
    ours_keys = ("ours", "ours-triton")
    c16, c2 = "B4 H16 T16384", "B4 H16 T2048"
    ours16 = _best(rows, c16, "fwdbwd", ours_keys)
    if ours16:
        out.append(f"fwd+bwd T=16K: ours {ours16:.2f} ms (target <= 5.8 ms): {ok(ours16 <= 5.8)}")
        cud = _find(rows, c16, "fwdbwd", "sdpa-cudnn")
        if cud:
            out.append(f"  vs cuDNN SDPA causal {cud:.2f} ms: {cud / ours16:.1f}x (target >= 5x): {ok(cud / ours16 >= 5)}")
        comp = _best(rows, c16, "fwdbwd", ("comp-cumsum", "comp-lse", "comp-ones"))
        if comp:
            out.append(f"  vs composition (d) {comp:.2f} ms: {comp / ours16:.1f}x (target >= 1.5x): {ok(comp / ours16 >= 1.5)}")
        floor = _find(rows, c16, "fwdbwd", "ours", "floor_ms") or _find(rows, c16, "fwdbwd", "ours-triton", "floor_ms")
        if floor:
            out.append(f"  floor {floor:.2f} ms: {100 * floor / ours16:.0f}% of it (target >= 60%): {ok(floor / ours16 >= 0.6)}")
    ours2 = _best(rows, c2, "fwdbwd", ours_keys)
    cud2 = _find(rows, c2, "fwdbwd", "sdpa-cudnn")
    if ours2 and cud2:
        out.append(f"fwd+bwd T=2K: ours {ours2:.3f} ms vs cuDNN SDPA {cud2:.3f} ms (target: no slower): {ok(ours2 <= cud2)}")
        og, cg = _best(rows, c2, "fwdbwd", ours_keys, "graph_ms"), _find(rows, c2, "fwdbwd", "sdpa-cudnn", "graph_ms")
        if og and cg:
            out.append(f"  CUDA graphs: ours {og:.3f} ms vs cuDNN SDPA {cg:.3f} ms: {ok(og <= cg)}")
    dec = [r for r in rows if r["section"] == "decode"]

    def best_time(r):  # a decode step is meant to run inside a CUDA graph: prefer the graph timing
        return (r["graph_ms"], "graph") if r.get("graph_ms") else ((r["ms"], "eager") if r.get("ms") else (None, None))

    ours = [best_time(r) for r in dec if r["row"] in ("ours", "ours-triton-decode") and best_time(r)[0]]
    if ours:
        name = dec[0]["case"].split(" KV cache")[0]
        od, how = min(ours)
        sf = next((r["state_floor_ms"] for r in dec if r.get("state_floor_ms")), None)
        if sf:
            out.append(f"decode ({name}): ours {od * 1e3:.1f} us ({how}) vs the S-only floor {sf * 1e3:.1f} us: "
                       f"{od / sf:.2f}x (target <= 1.3x): {ok(od <= 1.3 * sf)}")
        lin = [best_time(r) for r in dec if r["row"] == "torch-linear" and best_time(r)[0]]
        if lin:
            t, h = lin[0]
            out.append(f"  vs plain torch step {t * 1e3:.1f} us ({h}): {t / od:.1f}x (target >= 3x): {ok(t / od >= 3)}")
        s16 = [best_time(r) for r in dec if r["row"].startswith("sdpa") and r["shape"].get("cache_len") == 16384 and best_time(r)[0]]
        if s16:
            t, h = min(s16)
            out.append(f"  vs best SDPA decode at 16K {t * 1e3:.1f} us ({h}): {t / od:.0f}x (target >= 40x): {ok(t / od >= 40)}")
    return out


# ---- main ------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, correctness only (no timing)")
    p.add_argument("--quick", action="store_true", help="T in {2K,16K}, decode at 16K only, no b1/model groups")
    p.add_argument("--full", action="store_true", help="also comp-ones, and every row on the model shapes")
    p.add_argument("--only", default="", help="comma-separated row keys (see the docstring)")
    p.add_argument("--groups", default="main,decode,b1,model", help="which groups to run, in this order")
    p.add_argument("--modes", default="fwd,fwdbwd")
    p.add_argument("--no-graphs", dest="graphs", action="store_false")
    p.add_argument("--graph-max-T", type=int, default=2048)
    p.add_argument("--no-check", dest="check", action="store_false")
    p.add_argument("--check-T", type=int, default=1000)
    p.add_argument("--budget-s", type=float, default=420, help="stop starting new rows after this many seconds")
    p.add_argument("--rep-ms", type=float, default=100)
    p.add_argument("--repeat", type=int, default=1, help="time each row this many times (spread in the JSON and notes)")
    p.add_argument("--warmup-ms", type=float, default=25)
    p.add_argument("--flex-static", action="store_true", help="compile FlexAttention per shape (default: dynamic shapes)")
    p.add_argument("--out-dir", default=None, help="default benchmarks/results (the smoke run writes nothing unless given)")
    p.add_argument("--copy-to", default=None, help="also copy the JSON and markdown here (e.g. $OUT on the device)")
    p.add_argument("--commit", default=None, help="git commit to stamp when the checkout has no .git")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _only(args) -> list[str]:
    only = [s for s in args.only.split(",") if s]
    known = {r.key for r in all_rows()} | {r.key for r in all_decode_rows()}
    bad = [k for k in only if k not in known]
    if bad:
        raise SystemExit(f"unknown row key(s) {bad}; choose from {sorted(known)}")
    return only


def select_rows(args, group: str):
    only = _only(args)
    rows = all_rows()
    if only:
        return [r for r in rows if r.key in only]
    if not args.full:
        rows = [r for r in rows if r.key not in FULL_ONLY_ROWS]
        if group == "model":
            rows = [r for r in rows if r.key in MODEL_ROWS]
    return rows


def select_decode_rows(args):
    only = _only(args)
    rows = all_decode_rows()
    return [r for r in rows if not only or r.key in only]


def smoke(args) -> int:
    """CPU: every row that can run here agrees with the reference (fp32 vs fp64), decode rows too."""
    torch.manual_seed(args.seed)
    device = torch.device("cpu")
    be = Backends(device, compile_flex=False)
    be.ceilings = None
    env = environment(args.commit)
    results, failures = [], []
    rows = [r for r in all_rows() if not r.cuda_only]
    for case in smoke_cases():
        checks = run_checks(rows, be, case, ["fwd", "fwdbwd"], torch.float32, torch.float64, args.seed, device)
        for row in rows:
            for mode in row.modes:
                c = checks.get((row.key, mode))
                r = {"section": "prefill", "case": case.name, "mode": mode, "row": row.key, "label": row.label}
                if c is None:
                    r["error"] = "not run here: " + (row.available(be) or ("CUDA only" if row.cuda_only else "no CPU backward"))
                else:
                    r.update(check_err=c.get("err"), check_ok=c["ok"], check_errs=c.get("errs"), error=c.get("error"))
                    if not c["ok"]:
                        failures.append(f"{case.name} {mode} {row.key}: {c.get('error') or c.get('errs')}")
                fill_metrics(r, row.cost(case, mode), None)
                results.append(r)
    dc = DecodeCase(B=2, H=4, Hkv=2, D=16, F=8, Hf=4, window=8, cache_len=40)
    for row in all_decode_rows():
        r = {"section": "decode", "case": "smoke decode", "mode": "decode", "row": row.key, "label": row.label}
        if row.cuda_only or row.available(be):
            r["error"] = "not run here: " + (row.available(be) or "CUDA only")
        else:
            try:
                row.build(be, dc, device, torch.float32, args.seed)()  # the timed closure runs
                err = check_decode_row(row, be, device, torch.float32, torch.float64)
                r.update(check_err=err, check_ok=err < TOL[torch.float32])
                if not r["check_ok"]:
                    failures.append(f"decode {row.key}: err {err:.2e}")
            except Exception as e:
                r.update(error=short_error(e), check_ok=False)
                failures.append(f"decode {row.key}: {short_error(e)}")
        fill_metrics(r, row.cost(dc), None)
        results.append(r)
    for line in header_lines(env, None, False):
        print(line)
    for mode in ("fwd", "fwdbwd"):
        print(f"\n== smoke, {mode} (CPU: correctness only, no timing) ==")
        print("\n".join(prefill_lines(results, mode, False)))
    print("\n== smoke, decode ==")
    print("\n".join(decode_lines(results, False)))
    if args.out_dir:
        payload = {"environment": env, "ceilings": None, "rows": results, "command": " ".join(sys.argv), "smoke": True}
        write_results(Path(args.out_dir), "attention-smoke", payload, [], args.copy_to)
    if failures:
        print("\nSMOKE FAILED:\n  " + "\n  ".join(failures))
        return 1
    print("\nsmoke OK: every row that runs on this machine matches the reference")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        return smoke(args)
    if not torch.cuda.is_available():
        raise SystemExit("the benchmark needs CUDA; use --smoke on a CPU machine")
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 references stay fp32
    torch.backends.cudnn.allow_tf32 = False
    import torch._dynamo.config as dcfg

    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(dcfg, name):
            setattr(dcfg, name, max(getattr(dcfg, name), 256))
    return run(args, torch.device("cuda"), prefill_cases(args.quick), decode_cases(args.quick))


DECODE_CHECK = dict(B=2, T=150, H=16, Hkv=16, D=128, F=128, window=64)


def run(args, device, cases: dict, decode_lens: list, decode_base: DecodeCase = DecodeCase(),
        dtype=torch.bfloat16, ref_dtype=torch.float32, decode_check: dict = DECODE_CHECK) -> int:
    """The whole benchmark on ``device``; a CPU device only dry-runs the logic (tests), with no claims."""
    from benchmarks.timing import measure_ceilings, rotation_sets

    t_start = time.monotonic()
    deadline = t_start + args.budget_s
    be = Backends(device, compile_flex=True, flex_dynamic=not args.flex_static)
    env = environment(args.commit)
    env["fla_import"] = "ok" if be.fla[0] is not None else be.fla[1]
    env["ours_triton"] = "ok" if be.ours_triton[0] is not None else be.ours_triton[1]
    env["ours_triton_decode"] = "ok" if be.ours_triton_decode[0] is not None else be.ours_triton_decode[1]
    for line in header_lines(env, None, False):
        print(line, flush=True)
    be.ceilings = measure_ceilings(device=device.type)
    print(f"ceilings: copy {be.ceilings['copy_gbps']:.0f} GB/s, bf16 matmul {be.ceilings['matmul_bf16_tflops']:.0f} TFLOP/s", flush=True)

    out_dir = Path(args.out_dir) if args.out_dir else ROOT / "benchmarks" / "results"
    stem = result_stem("attention", env["device"])
    results: list[dict] = []
    payload = {"environment": env, "ceilings": be.ceilings, "rows": results, "command": " ".join(sys.argv),
               "args": vars(args)}

    def save(summary=()):
        payload["elapsed_s"] = time.monotonic() - t_start
        write_results(out_dir, stem, payload, list(summary), args.copy_to)

    tol = TOL[dtype]
    modes = [m for m in args.modes.split(",") if m]
    checks: dict = {}
    shown_cold: set = set()  # the check's cold first-call times go on the first case of each head shape
    for group in [g for g in args.groups.split(",") if g]:
        if group == "decode":
            for cache_len in decode_lens:
                for row in select_decode_rows(args):
                    if not row.uses_cache and cache_len != decode_lens[0]:
                        continue  # our state does not depend on the context length: time it once
                    if device.type != "cuda" and row.cuda_only:
                        continue
                    dc = DecodeCase(**(decode_base.__dict__ | {"cache_len": cache_len if row.uses_cache else 0}))
                    r = measure_decode(row, be, dc, args, deadline, device, dtype)
                    if args.check and time.monotonic() < deadline and not r.get("error"):
                        try:
                            err = check_decode_row(row, be, device, dtype, ref_dtype, **decode_check)
                            r.update(check_err=err, check_ok=err < tol)
                        except Exception as e:
                            r["check_error"] = short_error(e)
                    results.append(r)
                    print(f"{r['case']:40s} {row.key:22s} " + (f"{r['ms'] * 1e3:9.1f} us" if r.get("ms") else "")
                          + (f" graph {r['graph_ms'] * 1e3:8.1f} us" if r.get("graph_ms") else "") + f" {r.get('error', '')}", flush=True)
            save()
            continue
        if group not in cases:
            raise SystemExit(f"unknown group {group!r}; choose from main, decode, b1, model")
        rows = [r for r in select_rows(args, group) if device.type == "cuda" or not r.cuda_only]
        if not rows:
            continue
        for case in cases[group]:
            if args.check and case.heads_key() not in checks and time.monotonic() < deadline:
                cc = case.with_(B=1, T=min(args.check_T, case.T), name=case.name + " (check)")
                t0 = time.monotonic()
                checks[case.heads_key()] = run_checks(rows, be, cc, modes, dtype, ref_dtype, args.seed + 1, device, deadline)
                print(f"checked {case.name} head shape at T={cc.T} in {time.monotonic() - t0:.0f} s: "
                      + ", ".join(f"{k}/{m} {v['err']:.1e}" if v.get("err") is not None else f"{k}/{m} {v.get('error')}"
                                  for (k, m), v in checks[case.heads_key()].items()), flush=True)
            n_sets = rotation_sets(case.input_bytes()) if args.graphs and case.T <= args.graph_max_T else 1
            for mode in modes:
                try:
                    sets = [make_inputs(case, device, dtype, args.seed + i, grad=mode == "fwdbwd") for i in range(n_sets)]
                except Exception as e:
                    for row in rows:
                        results.append({"section": "prefill", "case": case.name, "group": group, "mode": mode, "row": row.key,
                                        "label": row.label, "error": f"inputs: {short_error(e)}"})
                    _cleanup(device, collect=True)
                    continue
                for row in rows:
                    if mode not in row.modes:
                        continue
                    r = measure_prefill(row, be, case, mode, sets, args, deadline)
                    c = checks.get(case.heads_key(), {}).get((row.key, mode))
                    if c:
                        r.update(check_err=c.get("err"), check_ok=c["ok"], check_errs=c.get("errs"), check_error=c.get("error"),
                                 cold_first_call_s=c.get("first_call_s") if case.heads_key() not in shown_cold else None)
                    results.append(r)
                    print(f"{case.name:34s} {mode:6s} {row.key:13s} " + (f"{r['ms']:9.3f} ms" if r.get("ms") else "")
                          + (f" graph {r['graph_ms']:8.3f}" if r.get("graph_ms") else "")
                          + (f" first {r['first_call_s']:.1f}s" if r.get("first_call_s") else "") + f" {r.get('error', '')}", flush=True)
                    _cleanup(device)
                del sets
                _cleanup(device, collect=True)
            shown_cold.add(case.heads_key())
            save()
    summary = targets(results)
    print()
    for line in header_lines(env, be.ceilings, False):
        print(line)
    for mode, title in (("fwd", "forward"), ("fwdbwd", "forward + backward")):
        lines = prefill_lines(results, mode, False)
        if lines:
            print(f"\n== {title} ==")
            print("\n".join(lines))
    dl = decode_lines(results, False)
    if dl:
        print("\n== decode (one token) ==")
        print("\n".join(dl))
    if summary:
        print("\n== targets (issue 5) ==")
        print("\n".join(summary))
    save(summary)
    print(f"\nwrote {out_dir}/{stem}.json and .md" + (f" (copied to {args.copy_to})" if args.copy_to else "")
          + f"; {time.monotonic() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
