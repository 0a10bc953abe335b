"""The two decode loops that ``generate.py`` times, and the largest-batch search.

* ``run_generate``: HF ``model.generate(max_new_tokens=N, min_new_tokens=N, do_sample=False)``; the prefill
  ends at the first call of a logits processor (one device sync there), the decode is the rest.
* ``run_lean``: a prefill, then one ``model(...)`` call per token with the cache and a greedy argmax.
  The step feeds its own output back (the argmax is copied into the input buffer, the position advances on
  the device), so with ``graph=True`` it is captured once in a CUDA graph and replayed: two eager steps
  first (capture warm-up, on a side stream), the capture (timed apart, not in the decode time), then
  replays. A step that cannot be captured raises ``GraphCaptureError`` (the caller reruns it eagerly).
* ``largest_batch``: doubling then bisection over a ``probe(B) -> bool``; ``probe_fits`` is the probe: a
  prefill and a few decode steps in a cache sized for the whole run, OOM caught.

Caches: ``make_cache("static", ...)`` is transformers' ``StaticCache`` sized for the whole run (the base
model's capturable cache); ``"dynamic"`` is the ``DynamicCache`` that ``generate`` builds, in which a
linearized layer installs its ``HybridCacheLayer`` (the ring state, updated in place by the Triton kernel),
with the KV buffers of any heads it keeps softmax (``LinearizeConfig.softmax_heads``) sized for the whole run.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from linearize.decode import kept_heads_short
from linearize.models import cache_kwarg


class GraphCaptureError(RuntimeError):
    """The decode step could not be captured in a CUDA graph."""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def short_error(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def error_tail(e: BaseException, lines: int = 60) -> str:
    """The end of the formatted exception, chained causes included (where the real error usually is)."""
    import traceback

    text = "".join(traceback.format_exception(e)).rstrip().splitlines()
    return "\n".join(text[-lines:])


def is_oom(e: BaseException) -> bool:
    msg = str(e)
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in msg.lower() or "CUBLAS_STATUS_ALLOC_FAILED" in msg


def free_memory(device: torch.device) -> None:
    """Drop what an aborted run left (exception frames hold tensors) and give cached blocks back."""
    gc.collect()
    if device.type == "cuda":
        try:
            torch.cuda.synchronize(device)
        except Exception:
            pass
        torch.cuda.empty_cache()


def make_cache(model, kind: str, max_len: int):
    from transformers import DynamicCache, StaticCache

    if kind == "static":
        return StaticCache(config=model.config, max_cache_len=max_len)  # (kept heads sized alike: hybrid_cache_layer)
    if kind == "dynamic":
        from linearize.decode import reserve_kept_heads

        cache = DynamicCache(config=model.config)
        reserve_kept_heads(cache, max_len)  # heads kept softmax (softmax_heads): whole buffers, as a static cache's
        return cache
    raise ValueError(f"cache kind must be 'static' or 'dynamic'; got {kind!r}")


@dataclass
class LoopResult:
    loop: str  # "generate", "lean" or "compiled" (the lean loop with a compiled step)
    generated: int  # new tokens per sequence (the requested N unless cut by a deadline)
    prefill_s: float  # the prompt's forward (generate: with its set-up) up to the first token
    decode_s: float  # the decode forwards after the prefill (lean+graph: eager steps + replays, no capture)
    decode_steps: int  # forwards timed in decode_s
    graph: bool = False
    capture_s: float | None = None
    cut: bool = False  # stopped by the deadline before N tokens
    steady_s: float | None = None  # the replays alone (lean + graph), else decode_s: what a longer run costs per step
    steady_steps: int = 0
    tokens: torch.Tensor | None = field(default=None, repr=False)  # [B, generated] on the CPU, if kept
    profile: dict | None = None  # profile_kernels' summary of extra eager steps, if asked

    @property
    def step_s(self) -> float | None:
        return self.decode_s / self.decode_steps if self.decode_steps else None

    @property
    def steady_step_s(self) -> float | None:
        if self.steady_s is not None and self.steady_steps:
            return self.steady_s / self.steady_steps
        return self.step_s


def run_lean(
    model,
    ids: torch.Tensor,
    new_tokens: int,
    *,
    cache,
    graph: bool = False,
    deadline: float | None = None,
    keep_tokens: bool = False,
    eager_steps: int = 2,
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    profile_steps: int = 0,
    prefill_chunk: int | None = None,
    grow_to: int | None = None,
) -> LoopResult:
    """Greedy decoding of ``new_tokens`` tokens after the prompt ``ids`` [B, P], one forward per token.
    ``forward(tok [B, 1], pos [1, 1]) -> logits [B, 1, V]`` replaces the model's call in the decode steps
    (a compiled step: ``linearize.CompiledDecode``, or ``torch.compile`` of the base model's forward);
    the prefill is always the model's eager forward.

    No attention mask is passed (the prompts have no padding), so no step reads device values on the host.
    ``deadline`` (time.monotonic) stops the decode early (``cut``); the check costs no sync.
    ``profile_steps``: then that many more steps, eager (not replayed), under the CUDA profiler
    (``profile_kernels``); the cache must have room for them. ``prefill_chunk``: prefill the prompt that many
    tokens a forward (``prefill_spans``), continuing the cache, instead of in one. ``grow_to``: after the
    prefill, grow the cache's full-attention DynamicCache layers to that many tokens (``grow_kv_layers``) and
    decode from there (a memory probe: the tokens then mean nothing).
    """
    device = ids.device
    B, P = ids.shape
    steps = max(new_tokens - 1, 0)
    name = "lean" if forward is None else "compiled"
    kw = cache_kwarg()
    forward = forward or kept_softmax_step(model, cache)
    out = torch.zeros(B, new_tokens, dtype=torch.long, device=device) if keep_tokens else None
    with torch.no_grad():
        sync(device)
        t0 = time.perf_counter()
        for a, b in prefill_spans(P, prefill_chunk):
            logits = model(input_ids=ids[:, a:b], **{kw: cache}, use_cache=True,
                           position_ids=torch.arange(a, b, device=device)[None], logits_to_keep=1).logits
        tok = logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
        del logits
        start = grow_to if grow_to is not None and grow_kv_layers(cache, grow_to) else P
        sync(device)
        prefill_s = time.perf_counter() - t0

        tok_buf = tok.clone()
        pos = torch.full((1, 1), start, dtype=torch.long, device=device)
        idx = torch.ones(1, dtype=torch.long, device=device)
        if out is not None:
            out[:, :1] = tok

        def step():
            if forward is not None:
                lg = forward(tok_buf, pos)
            else:
                lg = model(input_ids=tok_buf, **{kw: cache}, use_cache=True, position_ids=pos, logits_to_keep=1).logits
            nxt = lg[:, -1].argmax(-1, keepdim=True)
            tok_buf.copy_(nxt)
            pos.add_(1)
            if out is not None:
                out.index_copy_(1, idx, nxt)
                idx.add_(1)

        done, decode_s, capture_s, cut = 0, 0.0, None, False
        first = 0  # steps before the timed loop below (the eager warm-up of a capture)
        g = None
        if graph and device.type == "cuda" and steps > eager_steps:
            short = kept_heads_short(cache, start + steps + profile_steps)
            if short:
                raise GraphCaptureError(short)
            t1 = time.perf_counter()
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # warm-up before capture, as torch.cuda.graphs asks
                for _ in range(eager_steps):
                    step()
            torch.cuda.current_stream(device).wait_stream(side)
            sync(device)
            done = first = eager_steps
            decode_s += time.perf_counter() - t1
            t2 = time.perf_counter()
            g = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(g):
                    step()
            except Exception as e:
                raise GraphCaptureError(short_error(e)) from None
            sync(device)
            capture_s = time.perf_counter() - t2
        t3 = time.perf_counter()
        run = g.replay if g is not None else step
        while done < steps:
            run()
            done += 1
            if deadline is not None and time.monotonic() > deadline and done < steps:
                cut = True
                break
        sync(device)
        steady_s = time.perf_counter() - t3
        decode_s += steady_s
        del g
        prof = profile_kernels(step, profile_steps, device) if profile_steps else None
    tokens = out[:, : done + 1].cpu() if out is not None else None
    return LoopResult(name, done + 1, prefill_s, decode_s, done, graph=capture_s is not None, capture_s=capture_s,
                      cut=cut, steady_s=steady_s, steady_steps=done - first, tokens=tokens, profile=prof)


def grow_kv_layers(cache, length: int) -> int:
    """Grow each full-attention layer of a ``DynamicCache`` to ``length`` tokens in place (zeros after what it
    holds), one layer at a time: the memory that cache holds at token ``length``, without the steps to get there
    (it grows by concatenation, a new tensor a step). Sliding-window and linearized layers are bounded and left
    as they are. Returns how many layers grew."""
    from transformers.cache_utils import DynamicLayer

    grown = 0
    for layer in getattr(cache, "layers", ()):
        if type(layer) is not DynamicLayer or not layer.is_initialized or layer.keys.dim() != 4:
            continue
        have = layer.keys.shape[-2]
        if have >= length:
            continue
        for name in ("keys", "values"):
            old = getattr(layer, name)
            new = old.new_zeros(*old.shape[:-2], length, old.shape[-1])
            new[..., :have, :] = old
            setattr(layer, name, new)
            del old  # before the next allocation: one layer's tensor extra at a time
        grown += 1
    return grown


def prefill_spans(P: int, chunk: int | None) -> list[tuple[int, int]]:
    """[a, b) spans of a P-token prompt, ``chunk`` tokens each (None: one span), none of one token: a one-token
    forward is a decode step, which a model with kept softmax layers on a static cache refuses."""
    if not chunk or chunk >= P:
        return [(0, P)]
    chunk = max(chunk, 2)
    cuts = list(range(0, P, chunk)) + [P]
    if cuts[-1] - cuts[-2] == 1:
        del cuts[-2]
    return list(zip(cuts[:-1], cuts[1:]))


def profile_kernels(step: Callable[[], None], steps: int, device: torch.device, top: int = 25) -> dict:
    """GPU time and launches per step by kernel, over ``steps`` eager calls of ``step`` under torch.profiler
    (CUDA activity only). A graph replays the same kernels; the sum of their times against the replayed step
    time says how much of a step is kernels and how much is the gaps between them. On a CPU: the ops' self
    CPU time (a dry run of this code)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    step()
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
        sync(device)
    rows = []
    for e in prof.key_averages():
        us = (getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)) if cuda else e.self_cpu_time_total
        if us > 0:
            rows.append({"kernel": e.key[:140], "launches_per_step": e.count / steps, "us_per_step": us / steps})
    rows.sort(key=lambda r: -r["us_per_step"])
    return {"steps": steps, "kernel_us_per_step": sum(r["us_per_step"] for r in rows),
            "launches_per_step": sum(r["launches_per_step"] for r in rows), "top": rows[:top]}


def kept_softmax_step(model, cache) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """The eager decode step of a linearized model that keeps softmax layers on a static cache: through
    ``linearize.CompiledDecode(compile=False)``, which gives the kept layers their mask (the plain forward is
    refused there: transformers would skip that mask beside our layers). None for every other model/cache."""
    from transformers import StaticCache

    from linearize.convert import kept_softmax_layers

    if not isinstance(cache, StaticCache) or not kept_softmax_layers(model):
        return None
    import linearize

    step = linearize.CompiledDecode(model, compile=False)
    return lambda t, p: step(t, p, cache)


def run_generate(
    model,
    ids: torch.Tensor,
    new_tokens: int,
    *,
    pad_token_id: int,
    max_time: float | None = None,
    keep_tokens: bool = False,
    cache=None,
) -> LoopResult:
    """HF ``generate``, greedy, exactly ``new_tokens`` tokens (EOS suppressed by min_new_tokens), with a
    2D attention mask of ones as a user would pass. ``max_time`` (seconds) cuts it (``cut``). ``cache``: a
    fresh cache to pass in (to inspect it afterwards); None lets ``generate`` build its DynamicCache."""
    from transformers import LogitsProcessor, LogitsProcessorList

    device = ids.device

    class FirstCall(LogitsProcessor):
        """Time of the first logits processor call: the prompt's forward is done (one sync)."""

        t: float | None = None

        def __call__(self, input_ids, scores):
            if self.t is None:
                sync(device)
                self.t = time.perf_counter()
            return scores

    clock = FirstCall()
    with torch.no_grad():
        sync(device)
        t0 = time.perf_counter()
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, num_beams=1, pad_token_id=pad_token_id, logits_processor=LogitsProcessorList([clock]),
            max_time=max_time, use_cache=True, **({} if cache is None else {cache_kwarg(): cache}),
        )
        sync(device)
        t_end = time.perf_counter()
    generated = out.shape[1] - ids.shape[1]
    return LoopResult("generate", generated, clock.t - t0, t_end - clock.t, max(generated - 1, 0),
                      cut=generated < new_tokens, tokens=out[:, ids.shape[1]:].cpu() if keep_tokens else None)


#: tokens a forward of the largest-batch probe's prefill: the memory at token N is the cache's and one decode
#: step's, not the transients of a 128-token forward over every row at once (SmolLM2: its MLP's [B, 128, 3072]
#: activations; Qwen2.5-0.5B's [B, 128, 9728] are ~2.5 MB a row, 40% of a 3-head layout's 6 MiB cache)
FIT_PREFILL_CHUNK = 16


def probe_fits(model, B: int, prompt_len: int, new_tokens: int, cache_kind: str, vocab: int, device: torch.device,
               steps: int = 3, seed: int = 0, prefill_chunk: int | None = FIT_PREFILL_CHUNK) -> tuple[bool, int | None, str | None]:
    """Whether batch ``B`` fits: a prefill (``prefill_chunk`` tokens a forward, for both models) and ``steps``
    decode steps in a cache sized for ``prompt_len + new_tokens`` tokens, so memory at token N is what this
    touches: a static cache is allocated whole at the prefill; the ring state never grows after the first decode
    step; a DynamicCache's full-attention layers are grown after the prefill to the length the last step extends
    (``grow_kv_layers``; an upper bound on what fits, since a real run's growth by concatenation can also
    fragment memory). Returns (fits, peak bytes, error)."""
    err = peak = cache = ids = None
    try:
        g = torch.Generator(device="cpu").manual_seed(seed)
        ids = torch.randint(3, vocab, (B, prompt_len), generator=g).to(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        cache = make_cache(model, cache_kind, prompt_len + new_tokens)
        grow_to = max(prompt_len, prompt_len + new_tokens - 1 - steps) if cache_kind == "dynamic" else None
        run_lean(model, ids, steps + 1, cache=cache, prefill_chunk=prefill_chunk, grow_to=grow_to)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    except Exception as e:  # noqa: BLE001 - OOM is the answer we look for; anything else is reported
        err = "OOM" if is_oom(e) else short_error(e)
    # Unreferenced before empty_cache: a failed probe's partly allocated cache (a StaticCache allocates its layers
    # at the prefill) kept its segments reserved past empty_cache, and the next, smaller probe split them and ran
    # out among their leftovers. On the H100 (2026-12-05) the 8B base fit 64 sequences at 52 GiB of 79, and every
    # probe after the first OOM failed, down to 65.
    cache = ids = None
    free_memory(device)
    return (err is None, peak if err is None else None, err)


def largest_batch(probe: Callable[[int], bool], *, start: int, max_batch: int, time_cap_s: float,
                  resolution: float = 0.03, clock: Callable[[], float] = time.monotonic) -> dict:
    """The largest B with ``probe(B)`` true: double from ``start`` (or halve while it fails) to bracket it,
    then bisect until the bracket is within ``resolution`` (relative) or 1. Stops at ``time_cap_s`` or
    ``max_batch``. Returns {"largest", "smallest_failing", "probes": [[B, ok], ...], "stopped"}."""
    t0 = clock()
    probes: list[list] = []
    lo, hi = 0, None

    def test(b: int) -> bool:
        ok = bool(probe(b))
        probes.append([b, ok])
        return ok

    def out_of_time() -> bool:
        return clock() - t0 > time_cap_s

    b = max(1, min(start, max_batch))
    stopped = "converged"
    while True:  # bracket
        ok = test(b)
        if ok:
            lo = b
            if hi is not None:
                break
            if b >= max_batch:
                stopped = "max batch"
                break
            b = min(2 * b, max_batch)
        else:
            hi = b
            if lo or b == 1:
                break
            b = max(1, b // 2)
        if out_of_time():
            stopped = "time cap"
            break
    while stopped == "converged" and hi is not None and hi - lo > max(1, int(resolution * lo)):  # bisect
        if out_of_time():
            stopped = "time cap"
            break
        mid = (lo + hi) // 2
        if test(mid):
            lo = mid
        else:
            hi = mid
    return {"largest": lo, "smallest_failing": hi, "probes": probes, "stopped": stopped, "seconds": clock() - t0}
