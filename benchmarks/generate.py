"""Generation speed and memory (issue 6, item 4): the base model against the linearized one, whole models.

One command on a GPU prints a table and writes JSON + markdown under benchmarks/results/ (the exact device
command, with the wheel install and the GGUF staging, is in benchmarks/README.md):

    python benchmarks/generate.py                      # SmolLM2-135M, batch 1/16/64/256, 128 + 4096 tokens
    python benchmarks/generate.py --quick              # 1024 generated tokens
    python benchmarks/generate.py --tokens 16384 --batches 64 --loops lean    # the >= 10x goal
    python benchmarks/generate.py --checkpoint runs/smol/model                 # a trained linearized model
    python benchmarks/generate.py --smoke              # CPU, tiny random model: lean tokens == generate's

Models. base: ``linearize.models.load(--model)`` in bf16, SDPA attention, transformers' KV caches.
basek (only if asked, ``--models ours,base,basek``): the same base with its one-token attention on
linearize's softmax decode kernel (``linearize.modules.softmax_decode``: GQA without repeat_kv, a static
cache read only as far as it is filled). Not a baseline of the goals: it shows how much of a speed-up the
kernel would give the base alone, since a linearized model's kept softmax layers use that kernel.
linearized: the same weights through ``linearize.convert`` (``--set key=value`` sets LinearizeConfig fields;
default window 64, Hedgehog F=128 per query head), with its feature maps as initialised: untrained,
which costs the same per token as trained ones, so speed and memory hold but the text is not meaningful.
``--checkpoint DIR`` takes a converted (trained) model instead. On CUDA every linearized layer decodes on
the fp32 ring state, updated in place by the Triton kernel (the "decode path" column checks it).

Rows. For each batch B in --batches: a 128-token prompt (random token ids, seeded, the same for both
models, no padding), then N = --tokens new tokens, greedy. Two decode loops per model:
  * generate: ``model.generate(max_new_tokens=N, min_new_tokens=N, do_sample=False)``, as a user calls it
    (base: DynamicCache; linearized: HybridCacheLayer in the DynamicCache generate builds);
  * lean: the model's forward once per token with the cache and an argmax (benchmarks/gen_loops.py),
    captured in a CUDA graph and replayed (--no-graphs: eager). Base: StaticCache sized prompt + N (which
    is capturable; SDPA then reads all prompt + N slots, masked, every step: the static cache's price).
    Linearized: the DynamicCache/ring, capturable when every layer is linearized.
Measured per row: prefill ms (the prompt's forward; for generate up to the first logits processor call,
set-up included), decode tokens/s = B (N - 1) / decode seconds (the N - 1 forwards after the prefill,
CUDA-synchronized; CUDA-graph capture is timed apart and excluded), step ms, peak memory
(torch.cuda.max_memory_allocated after reset_peak_memory_stats, weights included; the other model is moved
to the CPU meanwhile). Each row first runs its loop on a few tokens (compiles kernels, estimates the row).
The headline compares each model's fastest loop at --headline-batch (64); the table has both loops.

Largest batch that fits at N tokens, per model: doubling from --fit-start, then bisection to 3%, each
probe a prefill (16 tokens a forward) plus 3 decode steps in a cache sized for prompt + N tokens (the lean
loop's caches: the static KV cache is allocated whole; the ring state does not grow after the first step),
so the memory of token N is reached; torch.cuda.OutOfMemoryError is caught. --fit-time-s caps each search
(after a warm-up probe at batch 2, which compiles the chunked prefill's kernels outside that cap).
The base is also probed on a DynamicCache grown to token N after the prefill: its decode steps then need no
mask, so transformers' SDPA runs GQA natively, where a static cache's masked multi-token forwards expand the
keys of the whole cache per layer (repeat_kv). The goal compares against the base's larger result.

The floor of a decode step (benchmarks/gen_floor.py evaluates it from the model's modules). Bytes, with
e = bytes of the model dtype (2, bf16), L_s / L_h the softmax / linearized layers, T the keys a base
step attends to (prompt + i at step i, its own included; min(T, window) on a sliding layer):
    bytes = P e                                       weights read once (P params; tied embeddings once,
                                                      an untied input embedding only at the B rows)
          + sum_{L_s} B (T + 1) 2 Hkv D e             the KV cache read, the new k, v written
          + sum_{L_h} [ 2 * 4 B H' (F D + F)          the fp32 state S, z read and written
                      + B (W - 1) 2 Hkv D e           the window tail's keys and values read
                      + B H' F e                      the evicted key's features read
                      + B (2 Hkv D + H' F) e ]        the new k, v, phi_k written into the ring
          + B V e                                     the logits written
(activations between kernels, a few B x hidden vectors a layer, are not counted). FLOPs = 2 B (matmul
params, feature maps included) + sum_{L_s} 4 B H D T + sum_{L_h} B H (4 D W + 4 F D + 3 F).
floor of a run = max(bytes / copy bandwidth, FLOPs / matmul rate), bytes and FLOPs summed over its N - 1
steps, both rates measured in the run (1 GiB device copy; 8192^3 bf16 matmul); "floor ms" is that over
N - 1 and "x floor" = decode seconds / floor. For SmolLM2-135M (30 layers, H 9, Hkv 3, D 64; linearized
H' 9, F 128, W 64) a step at batch 64 reads 270 MB of weights, plus 1.15 GB of state read and written
(linearized) or 3.2 GB of KV at the mean T of a 4096-token run: bytes, not FLOPs, set the floor.

Budget. Rows run in this order: lean at --headline-batch, lean at the other batches, the largest-batch
searches, generate at --headline-batch, generate at the others. No row starts after --budget-s (default
420 s, counted from the start, model loading included); a row whose estimate (from its warm-up) does not
fit in what is left is skipped, and a running row stops at the deadline (marked "cut", not comparable).
Results are written after every row. Skipped rows say so; run them in a later call (--batches, --loops,
--models, --no-fit).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `linearize` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

import torch  # noqa: E402

from benchmarks.gen_floor import ModelShape, decode_run_cost, model_shape, state_bytes_per_sequence  # noqa: E402
from linearize.models import cache_kwarg  # noqa: E402
from benchmarks.gen_loops import (  # noqa: E402
    GraphCaptureError, LoopResult, error_tail, free_memory, is_oom, largest_batch, make_cache, probe_fits, run_generate,
    run_lean, short_error,
)
from benchmarks.gen_report import largest_fits, print_report, profile_text, write_report  # noqa: E402
from benchmarks.random_model import random_model  # noqa: E402
from benchmarks.report import ROOT, environment, result_stem  # noqa: E402

GIB = 2**30
LABELS = {"base": "base (SDPA, HF KV cache)", "ours": "linearized (ring state, Triton decode)",
          "basek": "base, its attention on linearize's softmax decode kernel (not a baseline: what the kernel alone gives)"}


@dataclass
class Subject:
    """One model under test and how its lean loop runs."""

    key: str  # "base", "ours", or "basek" (the base model, its decode attention on our softmax kernel)
    model: torch.nn.Module
    shape: ModelShape
    lean_cache: str  # "static" (base; linearized with kept full-attention layers) or "dynamic" (HybridCacheLayer inside)
    capturable: str | None = None  # None, or why the lean step is not captured
    compiled: object = None  # the compiled decode step, built on the first "compiled" row (one per model)

    @property
    def label(self) -> str:
        return LABELS[self.key]


@dataclass
class Context:
    args: argparse.Namespace
    device: torch.device
    deadline: float
    vocab: int
    pad_token_id: int
    ceilings: dict | None


# ---- models ------------------------------------------------------------------------------------------


def parse_settings(pairs: list[str]) -> dict:
    """``--set key=value`` pairs for LinearizeConfig; values are JSON where they parse (true, 16, [0, 1])."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"--set takes key=value; got {pair!r}")
        k, v = pair.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def subjects_for(base, ours, device: torch.device, models: list[str]) -> dict[str, Subject]:
    """Wrap the two models. Kept full-attention softmax layers decode on a StaticCache, as the base does,
    through ``linearize.CompiledDecode`` (eager in the lean loop), and stay capturable; kept sliding-window
    layers (Gemma's) grow a DynamicCache by concatenation (new shapes every step): not capturable."""
    out = {}
    if "base" in models:
        out["base"] = Subject("base", base, model_shape(base), "static")
    if "basek" in models:
        out["basek"] = Subject("basek", base, model_shape(base), "static")
    if "ours" in models:
        from linearize.convert import kept_softmax_layers

        shape = model_shape(ours)
        # whole layers kept softmax (heads kept inside a linearized layer live in its own cache layer)
        kept = [ours.base_model.layers[i].self_attn for i in kept_softmax_layers(ours)]
        if any(getattr(a, "sliding_window", None) for a in kept):
            out["ours"] = Subject("ours", ours, shape, "dynamic", "sliding-window layers kept softmax (DynamicCache concatenates)")
        else:
            out["ours"] = Subject("ours", ours, shape, "static" if kept else "dynamic")
    return out


def load_real(args) -> tuple[dict, dict]:
    """The base model and its linearized twin (converted here, or --checkpoint), on the CPU in --dtype."""
    import linearize
    from linearize.models import load
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, args.dtype)
    want_base = bool({"base", "basek"} & set(args.models.split(",")))
    init = "cuda" if torch.cuda.is_available() else None  # where random weights are drawn (random_model)
    if args.model.endswith(".json"):
        # The architecture alone, with seeded random weights: a step costs the same whatever the weights
        # hold (the token counts are fixed by min_new_tokens), and no GGUF has to travel to the device.
        # (No base unless a row needs it: an 8B model's twin is 16 GB of host memory and its initialization.)
        base, tok = (random_model(args.model, dtype, args.seed, init).eval() if want_base else None), None
    else:
        base, tok = load(args.model, dtype=dtype)
    info = {"model": args.model, "dtype": args.dtype}
    if tok is None:
        info["weights"] = "random (config only): speed and memory, not text"
    if args.checkpoint:
        ours = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=dtype).eval()
        info["linearized"] = f"checkpoint {args.checkpoint}"
        info["linearize_config"] = getattr(ours.config, "linearize", None)
    else:
        ours = random_model(args.model, dtype, args.seed, init).eval() if tok is None else load(args.model, dtype=dtype)[0]
        cfg = linearize.LinearizeConfig(**parse_settings(args.set))
        ours = linearize.convert(ours, cfg)
        info["linearized"] = "converted here; feature maps untrained (speed and memory only: the text is not meaningful)"
        info["linearize_config"] = cfg.to_dict()
    info["params"] = sum(p.numel() for p in (base if base is not None else ours).parameters())
    src = tok if tok is not None else ours.config
    pad = src.pad_token_id if src.pad_token_id is not None else (src.eos_token_id if src.eos_token_id is not None else 0)
    pad = pad[0] if isinstance(pad, list) else pad
    info["pad_token_id"] = pad
    return {k: m for k, m in (("base", base), ("ours", ours)) if m is not None}, info


def activate(subjects: dict[str, Subject], key: str, device: torch.device) -> None:
    """Only the model under test on the device, so that peak memory and the largest batch are its own."""
    if device.type != "cuda":
        return
    for k, s in subjects.items():
        if k != key:
            s.model.to("cpu")
    free_memory(device)
    subjects[key].model.to(device)


def decode_path(cache, kernel: bool = True) -> str | None:
    """Where the linearized layers decoded: on the ring state with the Triton kernel ("ring kernel"), on the
    ring state with the PyTorch ring step (a CPU run, or ``CompiledDecode(kernel=False)``: inductor's fusion),
    or on the ordered state's PyTorch step."""
    from linearize.modules.cache import HybridCacheLayer
    from linearize.ops.ring import RingState

    layers = [layer for layer in getattr(cache, "layers", []) if isinstance(layer, HybridCacheLayer)]
    if not layers:
        return None
    rings = [layer.held for layer in layers if isinstance(layer.held, RingState)]
    if len(rings) == len(layers):
        return "ring kernel" if kernel and rings[0].S.is_cuda else "ring, torch step"
    return f"torch step ({len(layers) - len(rings)}/{len(layers)} layers)"


# ---- rows --------------------------------------------------------------------------------------------


def prompt_ids(ctx: Context, B: int) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(ctx.args.seed)
    return torch.randint(3, ctx.vocab, (B, ctx.args.prompt_len), generator=g).to(ctx.device)


def run_loop(subj: Subject, loop: str, ids: torch.Tensor, n: int, ctx: Context, *, graph: bool, total: int,
             deadline: float | None, keep_tokens: bool = False, profile_steps: int = 0) -> tuple[LoopResult, str | None]:
    """One run of ``loop`` for ``n`` new tokens; a lean cache is sized for ``total`` new tokens (the row's N,
    so a warm-up costs per step what the row does). Returns the result and the linearized decode path."""
    if subj.key == "basek":  # every layer's one-token attention on the softmax decode kernel, captures included
        from linearize.modules.softmax_decode import softmax_decode_kernel

        with softmax_decode_kernel(subj.model):
            res, _ = _run_loop(subj, loop, ids, n, ctx, graph=graph, total=total, deadline=deadline, keep_tokens=keep_tokens,
                               profile_steps=profile_steps)
        return res, "softmax kernel" if ctx.device.type == "cuda" else None
    return _run_loop(subj, loop, ids, n, ctx, graph=graph, total=total, deadline=deadline, keep_tokens=keep_tokens,
                     profile_steps=profile_steps)


def _run_loop(subj: Subject, loop: str, ids: torch.Tensor, n: int, ctx: Context, *, graph: bool, total: int,
              deadline: float | None, keep_tokens: bool = False, profile_steps: int = 0) -> tuple[LoopResult, str | None]:
    from linearize.convert import kept_softmax_layers

    if loop in ("lean", "compiled"):
        # Sized the same for the warm-up (which may profile --profile-steps more steps) and the timed run: a
        # static cache of another length is another shape, and the compiled step would recompile inside the
        # timed run (H200, 2026-12-03: 40 s of inductor counted as decode time, 5,321 instead of ~27,000 tok/s).
        cache = make_cache(subj.model, subj.lean_cache, ids.shape[1] + total + ctx.args.profile_steps)
        forward = compiled_forward(subj, cache, ctx) if loop == "compiled" else None
        res = run_lean(subj.model, ids, n, cache=cache, graph=graph, deadline=deadline, keep_tokens=keep_tokens, forward=forward,
                       profile_steps=profile_steps)
        kernel = not (loop == "compiled" and ctx.args.compile_torch_step)
        path = decode_path(cache, kernel=kernel)
        if path == "ring kernel" and loop == "compiled" and getattr(subj.compiled, "fuse_maps", False):
            from linearize.decode import fusable_map_layers

            maps = len(fusable_map_layers(subj.model))
            path += f", map kernel {maps}/{subj.shape.hybrid_layers}" if maps else ""
            rope = len(fusable_map_layers(subj.model, rope=True)) if getattr(subj.compiled, "fuse_rope", False) else 0
            path += f" (RoPE inside {rope})" if rope else ""
        projections = getattr(subj.compiled, "fused", None) if loop == "compiled" else None
        if path and projections is not None and any(projections.fused_layers):
            path += ", fused projections"
        if path and kernel and ctx.device.type == "cuda" and kept_softmax_layers(subj.model):
            path += " + softmax kernel"  # CompiledDecode's kept layers (the lean loop's eager step too)
        return res, path
    max_time = None if deadline is None else max(deadline - time.monotonic(), 1.0)
    # the linearized model gets the DynamicCache generate would build, so that its decode path can be read
    cache = make_cache(subj.model, "dynamic", 0) if subj.key == "ours" else None
    res = run_generate(subj.model, ids, n, pad_token_id=ctx.pad_token_id, max_time=max_time, keep_tokens=keep_tokens,
                       cache=cache)
    return res, decode_path(cache)


def compile_options(args) -> dict:
    """``--compile-mode`` for both models' ``torch.compile`` (e.g. max-autotune-no-cudagraphs: inductor tunes
    its own GEMM templates for the decode's small M; the lean loop captures the graph itself), or ``--inductor``'s
    config entries as its ``options`` (torch.compile takes one or the other)."""
    entries = getattr(args, "inductor", None) or []
    if entries and args.compile_mode:
        raise SystemExit("--inductor and --compile-mode cannot be combined (torch.compile takes mode or options)")
    if args.compile_mode:
        return {"mode": args.compile_mode}
    return {"options": inductor_options(entries)} if entries else {}


def inductor_options(entries: list[str]) -> dict:
    """``KEY=VALUE`` strings -> inductor config entries (values as Python literals, else strings), each key checked
    against ``torch._inductor.config`` so that a typo fails before the model loads."""
    import ast

    import torch._inductor.config as inductor_config

    known = inductor_config.get_config_copy()
    out = {}
    for entry in entries:
        key, sep, raw = entry.partition("=")
        if not sep or not key:
            raise SystemExit(f"--inductor takes KEY=VALUE (e.g. triton.multi_kernel=1); got {entry!r}")
        if key not in known:
            raise SystemExit(f"--inductor: {key!r} is not an inductor config entry (torch._inductor.config)")
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key] = raw
    return out


def compiled_forward(subj: Subject, cache, ctx: Context):
    """The decode step compiled once per model (dynamic=False: each batch size compiles its own graph, in
    the row's warm-up run): ``linearize.CompiledDecode`` for ours (the Triton kernel inside the graph
    unless --compile-torch-step), ``torch.compile`` of the forward with its StaticCache for the base."""
    if subj.compiled is None:
        import linearize

        if subj.key == "ours":
            maps = {k: v for k, v in (("fuse_maps", ctx.args.fuse_maps), ("fuse_rope", ctx.args.fuse_rope)) if v is not None}
            subj.compiled = linearize.CompiledDecode(subj.model, kernel=not ctx.args.compile_torch_step,
                                                     fuse_projections=ctx.args.fuse_projections, **maps,
                                                     **compile_options(ctx.args))
        else:
            model, kw = subj.model, cache_kwarg()
            subj.compiled = torch.compile(
                lambda t, p, c: model(input_ids=t, **{kw: c}, use_cache=True, position_ids=p, logits_to_keep=1).logits,
                dynamic=False, **compile_options(ctx.args))
    fn = subj.compiled
    return lambda t, p: fn(t, p, cache)


def decode_row(subj: Subject, loop: str, B: int, ctx: Context) -> dict:
    a, dev = ctx.args, ctx.device
    N = a.tokens
    r = {"section": "decode", "model": subj.key, "label": subj.label, "loop": loop, "batch": B,
         "prompt": a.prompt_len, "new_tokens": N}
    left = ctx.deadline - time.monotonic()
    if left <= 0:
        r["error"] = "skipped: --budget-s reached"
        return r
    graph = loop in ("lean", "compiled") and a.graphs and dev.type == "cuda"
    if graph and subj.capturable:
        r["graph_error"], graph = subj.capturable, False
    ids = prompt_ids(ctx, B)
    warm_n = min(N, a.warmup_tokens)
    res = path = None
    try:
        w = None
        try:
            # (the profile, if asked, comes from the warm-up run: the row's own run stays a plain timing)
            prof = a.profile_steps if loop in ("lean", "compiled") and B == a.headline_batch else 0
            w, _ = run_loop(subj, loop, ids, warm_n, ctx, graph=graph, total=N, deadline=None, profile_steps=prof)
        except GraphCaptureError as e:
            r["graph_error"], graph = str(e), False
        free_memory(dev)  # outside the except: its traceback holds the failed run's tensors
        if w is None:
            w, _ = run_loop(subj, loop, ids, warm_n, ctx, graph=False, total=N, deadline=None)
            free_memory(dev)
        est = (w.steady_step_s or 0.0) * (N - 1)
        r["estimate_s"] = est
        left = ctx.deadline - time.monotonic()
        if est > left:
            r["error"] = f"skipped: estimated {est:.0f} s > {max(left, 0):.0f} s left of --budget-s"
        else:
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            res, path = run_loop(subj, loop, ids, N, ctx, graph=graph, total=N, deadline=ctx.deadline)
            if dev.type == "cuda":
                r["peak_gib"] = torch.cuda.max_memory_allocated(dev) / GIB
    except Exception as e:  # noqa: BLE001 - a failed row is a row with its error
        r["error"] = "OOM" if is_oom(e) else short_error(e)
        if not is_oom(e):  # the first line alone did not say what failed (inductor's errors, 2026-12-03)
            r["traceback"] = error_tail(e)
            print(f"{loop} {subj.key} B={B}: {r['traceback']}", file=sys.stderr, flush=True)
    if res is None:
        del ids
        free_memory(dev)
        return r
    del ids
    free_memory(dev)
    fill_decode_metrics(r, res, subj.shape, ctx)
    if path:
        r["decode_path"] = path
    if w is not None and w.profile:
        r["profile"] = w.profile
        print(profile_text(r), flush=True)
    return r


def fill_decode_metrics(r: dict, res: LoopResult, shape: ModelShape, ctx: Context) -> None:
    B, P = r["batch"], r["prompt"]
    r.update(generated=res.generated, cut=res.cut, graph=res.graph, capture_s=res.capture_s,
             prefill_ms=res.prefill_s * 1e3, decode_s=res.decode_s, decode_steps=res.decode_steps)
    if res.cut:
        r["note"] = f"cut at {res.generated}/{r['new_tokens']} tokens by --budget-s: not comparable"
    if not res.decode_steps or res.decode_s <= 0:
        return
    r["tok_s"] = B * res.decode_steps / res.decode_s
    r["step_ms"] = res.decode_s / res.decode_steps * 1e3
    if res.graph and res.steady_steps:
        # the replays alone, and what the eager steps before the capture cost: seconds there mean the step
        # compiled (or recompiled) inside the timed run, which the row's tokens/s then carries
        r["steady_step_ms"] = res.steady_s / res.steady_steps * 1e3
        r["warm_steps_s"] = res.decode_s - res.steady_s
        if r["warm_steps_s"] > max(1.0, 0.1 * res.decode_s):
            r["note"] = (r.get("note", "") + "; " if r.get("note") else "") + (
                f"its first eager steps took {r['warm_steps_s']:.1f} s (a compile inside the timed run?); "
                f"the replays alone: {r['steady_step_ms']:.3f} ms a step")
    r["cache_gib"] = B * state_bytes_per_sequence(shape, P + res.generated) / GIB
    cost = decode_run_cost(shape, B, P, res.generated)
    r["bytes_per_step"] = cost.bytes / cost.steps
    r["bytes_parts_per_step"] = {k: v / cost.steps for k, v in cost.parts.items()}
    r["flops_per_step"] = cost.flops / cost.steps
    if ctx.ceilings:
        floor = cost.floor_s(ctx.ceilings["copy_gbps"], ctx.ceilings.get("matmul_bf16_tflops"))
        r["floor_step_ms"] = floor / cost.steps * 1e3
        r["x_floor"] = res.decode_s / floor


def fit_row(subj: Subject, ctx: Context, cache: str | None = None) -> dict:
    """The largest batch of ``subj`` on its lean loop's cache, or on ``cache`` ("static" / "dynamic")."""
    a, dev = ctx.args, ctx.device
    cache = cache or subj.lean_cache
    r = {"section": "fit", "model": subj.key, "label": subj.label, "cache": cache,
         "prompt": a.prompt_len, "new_tokens": a.tokens}
    if dev.type != "cuda":
        r["error"] = "needs CUDA (memory limits)"
        return r
    cap = min(a.fit_time_s, ctx.deadline - time.monotonic())
    if cap <= 1:
        r["error"] = "skipped: --budget-s reached"
        return r
    details = []

    def probe(B: int) -> bool:
        t0 = time.monotonic()
        ok, peak, err = probe_fits(subj.model, B, a.prompt_len, a.tokens, cache, ctx.vocab, dev, seed=a.seed)
        s = time.monotonic() - t0  # (a slow probe, not memory, is what stops a search at its time cap)
        details.append({"batch": B, "fits": ok, "peak_gib": None if peak is None else peak / GIB, "error": err, "seconds": s})
        print(f"  fit {subj.key:4s} {cache:7s} B={B:6d} " + (f"fits, peak {peak / GIB:.1f} GiB" if ok else f"fails: {err}")
              + f" ({s:.1f} s)", flush=True)
        return ok

    # A warm-up probe at batch 2 first, outside the search's time: the 16-token chunked prefill compiles its own
    # kernel variants, which the rows' one-forward prefill did not (heads3 on Qwen: two probes in a 70 s cap)
    t0 = time.monotonic()
    probe_fits(subj.model, 2, a.prompt_len, a.tokens, cache, ctx.vocab, dev, seed=a.seed)
    r["warmup_s"] = time.monotonic() - t0
    print(f"  fit {subj.key:4s} {cache:7s} warm-up at B=2: {r['warmup_s']:.1f} s (not counted)", flush=True)
    cap = min(a.fit_time_s, ctx.deadline - time.monotonic())
    if cap <= 1:
        r["error"] = "skipped: --budget-s reached (after the warm-up probe)"
        return r
    res = largest_batch(probe, start=a.fit_start, max_batch=a.fit_max_batch, time_cap_s=cap)
    r.update(largest=res["largest"], smallest_failing=res["smallest_failing"], stopped=res["stopped"],
             seconds=res["seconds"], probes=details,
             state_gib_per_seq=state_bytes_per_sequence(subj.shape, a.prompt_len + a.tokens) / GIB)
    errs = {d["error"] for d in details if d["error"] and d["error"] != "OOM"}
    if errs:
        r["note"] = "failures other than OOM: " + "; ".join(sorted(errs))
    return r


# ---- plan and summary ----------------------------------------------------------------------------------


def plan(args) -> list[tuple]:
    """(kind, loop, batch, model) in priority order; see the module docstring."""
    batches = [int(b) for b in args.batches.split(",") if b]
    head = [b for b in batches if b == args.headline_batch]
    order = head + [b for b in batches if b != args.headline_batch]
    models = [m for m in ("ours", "base", "basek") if m in args.models.split(",")]
    loops = [loop for loop in ("lean", "compiled", "generate") if loop in args.loops.split(",")]
    tasks = []
    for loop in ("lean", "compiled"):
        if loop in loops:
            tasks += [("decode", loop, b, m) for b in order for m in models]
    if args.fit:  # the base also on a DynamicCache: no mask at its decode steps, so GQA without repeat_kv
        tasks += [t for m in models for t in [("fit", None, None, m)] + ([("fit", "dynamic", None, m)] if m == "base" else [])]
    if "generate" in loops:
        tasks += [("decode", "generate", b, m) for b in order for m in models]
    return tasks


def _best(rows: list[dict], model: str, B: int):
    ok = [r for r in rows if r["section"] == "decode" and r["model"] == model and r["batch"] == B
          and r.get("tok_s") and not r.get("cut")]
    return max(ok, key=lambda r: r["tok_s"]) if ok else None


def loop_name(r: dict) -> str:
    return r["loop"] + (" + CUDA graph" if r.get("graph") else "")


def goals(rows: list[dict], args) -> list[str]:
    """Issue 6's decode goals, from this run's numbers only."""
    out = []
    ok = lambda c: "met" if c else "MISSED"  # noqa: E731
    N, Bh = args.tokens, args.headline_batch
    o, b = _best(rows, "ours", Bh), _best(rows, "base", Bh)
    if o and b:
        ratio = o["tok_s"] / b["tok_s"]
        goal = {4096: 3, 16384: 10}.get(N)
        line = (f"decode tokens/s at batch {Bh} x {N} new tokens: linearized {o['tok_s']:.0f} ({loop_name(o)}) vs "
                f"base {b['tok_s']:.0f} ({loop_name(b)}): {ratio:.2f}x")
        out.append(line + (f" (goal >= {goal}x): {ok(ratio >= goal)}" if goal else " (the goals are at 4096 and 16384 tokens)"))
        for loop in ("lean", "compiled", "generate"):
            pair = [next((r for r in rows if r["section"] == "decode" and r["model"] == m and r["batch"] == Bh
                          and r["loop"] == loop and r.get("tok_s") and not r.get("cut")), None) for m in ("ours", "base")]
            if all(pair):
                out.append(f"  same loop ({loop}): linearized {pair[0]['tok_s']:.0f} vs base {pair[1]['tok_s']:.0f} tokens/s: "
                           f"{pair[0]['tok_s'] / pair[1]['tok_s']:.2f}x")
    k = _best(rows, "basek", Bh)
    if o and b and k:
        out.append(f"  for scale, not a goal: the base on linearize's softmax decode kernel {k['tok_s']:.0f} tokens/s "
                   f"({k['tok_s'] / b['tok_s']:.2f}x the base); linearized {o['tok_s'] / k['tok_s']:.2f}x that")
    fits = largest_fits(rows)
    if "ours" in fits and "base" in fits:
        fo, fb = fits["ours"], fits["base"]
        ratio = fo["largest"] / fb["largest"]
        bound = lambda r: "" if r["stopped"] == "converged" else ">= "  # noqa: E731
        others = [f"{r['cache']} {bound(r)}{r['largest']}" for r in rows
                  if r["section"] == "fit" and r["model"] == "base" and r.get("largest") and r is not fb]
        line = (f"largest batch at {N} new tokens: linearized {bound(fo)}{fo['largest']} ({fo['cache']} cache), "
                f"base {bound(fb)}{fb['largest']} ({fb['cache']} cache" + "".join(f"; {o}" for o in others) + "): "
                f"{'>= ' if fo['stopped'] != 'converged' else ''}{ratio:.1f}x")
        out.append(line + (f" (goal >= 8x): {ok(ratio >= 8)}" if N == 4096 else " (the goal is at 4096 tokens)"))
    if o and o.get("x_floor"):
        out.append(f"linearized step at batch {Bh}: {o['step_ms']:.3f} ms vs floor {o['floor_step_ms']:.3f} ms: "
                   f"{o['x_floor']:.2f}x the floor (goal <= 1.5x): {ok(o['x_floor'] <= 1.5)}")
    if b and b.get("x_floor"):
        out.append(f"  base step at batch {Bh}: {b['step_ms']:.3f} ms vs floor {b['floor_step_ms']:.3f} ms: {b['x_floor']:.2f}x")
    return out


# ---- driver ------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny random model, few tokens: lean tokens == generate's")
    p.add_argument("--quick", action="store_true", help="1024 new tokens (unless --tokens is given)")
    p.add_argument("--model", default="smollm2-135m",
                   help="alias, .gguf, HF dir or hub id (linearize.models.load); or a config.json: random weights "
                        "(e.g. benchmarks/configs/smollm2-135m.json; same cost per token, no weights to carry)")
    p.add_argument("--checkpoint", default=None, help="a converted (trained) linearized model dir, instead of converting here")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="LinearizeConfig field for the conversion")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--tokens", type=int, default=None, help="new tokens per sequence (default 4096; --quick 1024)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--batches", default="1,16,64,256")
    p.add_argument("--headline-batch", type=int, default=64)
    p.add_argument("--models", default="ours,base",
                   help="ours, base; and basek: the base with its one-token attention on linearize's softmax decode "
                        "kernel (what the kernel gives without linearizing; not the baseline of the goals)")
    p.add_argument("--loops", default="lean,generate",
                   help="lean, compiled (the lean loop with a torch.compile'd step; compiles per batch size) and generate")
    p.add_argument("--compile-torch-step", action="store_true",
                   help="compiled loop: the PyTorch ring step inside the graph (inductor fuses it) instead of the Triton kernel")
    p.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                   help="compiled loop: an inductor config entry for both models' torch.compile (its options), e.g. "
                        "triton.multi_kernel=1 or triton.persistent_reductions=False; repeatable; not with --compile-mode")
    p.add_argument("--blas", default=None, choices=["cublas", "cublaslt"],
                   help="torch.backends.cuda.preferred_blas_library for both models' GEMMs (default: torch's)")
    p.add_argument("--compile-mode", default=None, choices=["default", "max-autotune-no-cudagraphs"],
                   help="compiled loop: torch.compile's mode for both models (the modes with CUDA graphs would nest in the loop's own capture)")
    p.add_argument("--fuse-maps", action=argparse.BooleanOptionalAction, default=None,
                   help="compiled loop, ours: both Hedgehog maps of a layer in one Triton launch "
                        "(linearize.ops.triton.feature_maps) instead of the modules; default: CompiledDecode's (on)")
    p.add_argument("--fuse-rope", action=argparse.BooleanOptionalAction, default=None,
                   help="compiled loop, ours, with --fuse-maps: RoPE on q and k inside that launch "
                        "(rope_hedgehog_pair_triton) instead of the model's RoPE; default: CompiledDecode's (on)")
    p.add_argument("--fuse-projections", action=argparse.BooleanOptionalAction, default=None,
                   help="compiled loop, ours: one GEMM for q/k/v and one for gate/up a layer (the weights moved into one tensor each; "
                        "linearize.modules.fused_projections); default: CompiledDecode's (on CUDA)")
    p.add_argument("--no-graphs", dest="graphs", action="store_false", help="lean loop eager, no CUDA graph")
    p.add_argument("--profile-steps", type=int, default=0,
                   help="lean/compiled rows at --headline-batch: profile this many extra eager steps of the warm-up "
                        "run (GPU time and launches per kernel, in the log and the JSON)")
    p.add_argument("--no-fit", dest="fit", action="store_false", help="skip the largest-batch searches")
    p.add_argument("--fit-start", type=int, default=64)
    p.add_argument("--fit-max-batch", type=int, default=65536)
    p.add_argument("--fit-time-s", type=float, default=60, help="cap of each largest-batch search")
    p.add_argument("--warmup-tokens", type=int, default=16, help="tokens of each row's warm-up run")
    p.add_argument("--budget-s", type=float, default=420, help="no row starts (and running rows stop) after this")
    p.add_argument("--out-dir", default=None, help="default benchmarks/results (the smoke run writes nothing unless given)")
    p.add_argument("--copy-to", default=None, help="also copy the JSON and markdown here (e.g. $OUT on the device)")
    p.add_argument("--commit", default=None, help="git commit to stamp when the checkout has no .git")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.tokens is None:
        args.tokens = 12 if args.smoke else (1024 if args.quick else 4096)
    if args.tokens < 2:
        p.error("--tokens must be >= 2 (one from the prefill, then decode steps)")
    return args


def environment_stamp(commit: str | None) -> dict:
    import transformers

    env = environment(commit)
    env["transformers"] = transformers.__version__
    return env


def run(args, device: torch.device, models: dict, info: dict, t_start: float | None = None) -> list[dict]:
    """Every planned row on ``device``, results written after each; returns the rows. A CPU device runs the
    same logic (the smoke test), with wall-clock numbers that mean nothing and no memory figures."""
    from benchmarks.timing import measure_ceilings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # generate's per-call notices would bury the table
    t_start = time.monotonic() if t_start is None else t_start
    env = environment_stamp(args.commit)
    ceilings = measure_ceilings(device=device.type)
    print(f"device {env['device']}; torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}; "
          f"commit {env['git']['commit']}", flush=True)
    print(f"ceilings: copy {ceilings['copy_gbps']:.0f} GB/s, bf16 matmul {ceilings['matmul_bf16_tflops']:.0f} TFLOP/s", flush=True)
    subjects = subjects_for(models.get("base"), models.get("ours"), device, args.models.split(","))
    ctx = Context(args, device, t_start + args.budget_s, models[next(iter(models))].config.vocab_size,
                  info.get("pad_token_id", 0), ceilings)
    info = info | {"layers": {k: {"hybrid": s.shape.hybrid_layers, "total": len(s.model.base_model.layers)} for k, s in subjects.items()},
                   "weight_bytes": {k: s.shape.weight_bytes for k, s in subjects.items()}}
    rows: list[dict] = []
    out_dir = Path(args.out_dir) if args.out_dir else (None if args.smoke else ROOT / "benchmarks" / "results")
    stem = result_stem("generate", env["device"])
    payload = {"environment": env, "ceilings": ceilings, "models": info, "rows": rows, "command": " ".join(sys.argv),
               "args": vars(args)}

    def save():
        payload["elapsed_s"] = time.monotonic() - t_start
        payload["goals"] = goals(rows, args)
        if out_dir is not None:
            write_report(out_dir, stem, payload, args.copy_to)

    active = None
    for kind, loop, B, key in plan(args):
        if key not in subjects:
            continue
        if key != active:
            activate(subjects, key, device)
            active = key
        r = decode_row(subjects[key], loop, B, ctx) if kind == "decode" else fit_row(subjects[key], ctx, loop)
        rows.append(r)
        print(row_line(r), flush=True)
        save()
    print()
    print_report(payload)
    save()
    if out_dir is not None:
        print(f"\nwrote {out_dir}/{stem}.json and .md" + (f" (copied to {args.copy_to})" if args.copy_to else ""))
    print(f"{time.monotonic() - t_start:.0f} s in all")
    return rows


def row_line(r: dict) -> str:
    if r["section"] == "fit":
        return (f"fit    {r['model']:4s} {r['cache']:7s} " + (f"largest {r['largest']} (first failing {r['smallest_failing']}, {r['stopped']}, "
                f"{r['seconds']:.0f} s)" if "largest" in r else r.get("error", "")))
    s = f"{r['loop']:8s} {r['model']:4s} B={r['batch']:<4d} "
    if r.get("tok_s"):
        s += (f"{r['tok_s']:10.0f} tok/s  step {r['step_ms']:.3f} ms" + (f" ({r['x_floor']:.2f}x floor)" if r.get("x_floor") else "")
              + f"  prefill {r['prefill_ms']:.1f} ms" + (f"  peak {r['peak_gib']:.2f} GiB" if r.get("peak_gib") else "")
              + ("  graph" if r.get("graph") else ""))
    for k in ("error", "graph_error", "note"):
        if r.get(k):
            s += f"  [{k}: {r[k]}]"
    return s


def smoke(args) -> int:
    """CPU, a tiny random llama and its linearized twin: the lean loop's greedy tokens equal generate's
    (both models), then the whole driver on the tiny models (wall-clock numbers, no claims)."""
    sys.path.insert(0, str(ROOT))
    import linearize
    from tests.tiny_models import perturb_added_weights, tiny_model

    t_start = time.monotonic()
    device = torch.device("cpu")
    base = tiny_model("llama", seed=args.seed)
    cfg = linearize.LinearizeConfig(**({"window": 4, "feature_dim": 6} | parse_settings(args.set)))
    ours = linearize.convert(tiny_model("llama", seed=args.seed), cfg)
    perturb_added_weights(ours)
    models = {"base": base, "ours": ours}
    subjects = subjects_for(base, ours, device, ["base", "ours", "basek"])
    ctx = Context(args, device, float("inf"), base.config.vocab_size, 0, None)
    failures = []
    ids = prompt_ids(ctx, 3)
    n = args.tokens
    for key, subj in subjects.items():
        lean, _ = run_loop(subj, "lean", ids, n, ctx, graph=False, total=n, deadline=None, keep_tokens=True)
        gen, _ = run_loop(subj, "generate", ids, n, ctx, graph=False, total=n, deadline=None, keep_tokens=True)
        same = lean.tokens.shape == gen.tokens.shape and torch.equal(lean.tokens, gen.tokens)
        print(f"{key}: lean {tuple(lean.tokens.shape)} vs generate {tuple(gen.tokens.shape)} greedy tokens: "
              + ("equal" if same else "DIFFERENT"))
        if not same:
            failures.append(f"{key}: lean loop tokens differ from generate's\n{lean.tokens}\n{gen.tokens}")
        if "compiled" in args.loops.split(","):
            comp, _ = run_loop(subj, "compiled", ids, n, ctx, graph=False, total=n, deadline=None, keep_tokens=True)
            same = torch.equal(comp.tokens, gen.tokens)
            print(f"{key}: compiled step vs generate greedy tokens: " + ("equal" if same else "DIFFERENT"))
            if not same:
                failures.append(f"{key}: compiled loop tokens differ from generate's\n{comp.tokens}\n{gen.tokens}")
    info = {"model": "tiny random llama (tests/tiny_models.py)", "dtype": "float32",
            "linearized": "converted here; random feature maps", "pad_token_id": 0}
    rows = run(args, device, models, info, t_start)
    bad = [r for r in rows if r.get("error") and not (r["section"] == "fit" and "needs CUDA" in r["error"])]
    failures += [f"row {r['loop']} {r['model']} B={r['batch']}: {r['error']}" for r in bad]
    if failures:
        print("\nSMOKE FAILED:\n  " + "\n  ".join(failures))
        return 1
    print("\nsmoke OK: the lean loop's greedy tokens equal generate's for both models; every row ran")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        if args.batches == "1,16,64,256":
            args.batches = "1,3"
        if args.headline_batch == 64:
            args.headline_batch = int(args.batches.split(",")[-1])
        if args.prompt_len == 128:
            args.prompt_len = 16
        return smoke(args)
    if not torch.cuda.is_available():
        raise SystemExit("the benchmark needs CUDA; use --smoke on a CPU machine")
    if args.blas:
        # the decode's GEMMs are M = batch (skinny, weight-bound); cuBLASLt's heuristics pick other kernels for them
        torch.backends.cuda.preferred_blas_library(args.blas)
    t_start = time.monotonic()
    models, info = load_real(args)
    print(f"loaded {args.model} {'twice' if len(models) == 2 else 'once'} ({info['params'] / 1e6:.0f}M parameters, {args.dtype}) in "
          f"{time.monotonic() - t_start:.0f} s; linearized: {info['linearized']}", flush=True)
    run(args, torch.device("cuda"), models, info, t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
