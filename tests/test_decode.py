"""CompiledDecode on CPU (inductor): equals the full forward, one graph for every step, clear refusals."""

import pytest
import torch
from transformers import DynamicCache, StaticCache

import linearize
from linearize import CompiledDecode, LinearizeConfig
from linearize.modules.cache import DecodeMode

from .decode_steps import greedy_steps_and_full_forward
from .tiny_models import cache_kw, perturb_added_weights, tiny_model


def _model(arch, **cfg):
    model = linearize.convert(tiny_model(arch), LinearizeConfig(**({"feature_dim": 6, "window": 4} | cfg)))
    perturb_added_weights(model)
    return model


@pytest.mark.parametrize("arch,cfg", [("llama", {}), ("gemma3_text", {"convert_sliding_layers": True, "feature_rope": False}),
                                      ("llama", {"length_norm": True, "length_norm_from": 2, "sink_tokens": 2}),
                                      ("llama", {"softmax_layers": [0, 2], "sink_tokens": 2, "feature_rope": False}),
                                      ("qwen2", {"softmax_layers": [1]})],
                         ids=["llama", "gemma3-nope", "llama-lennorm-sink", "llama-kept-0-2", "qwen2-kept-1"])
def test_compiled_steps_equal_the_full_forward_without_recompiling(arch, cfg):
    """Kept softmax layers decode on a StaticCache (sized with room to spare: the unused slots must stay
    masked), and the left padding reaches them through the 2D mask."""
    torch._dynamo.reset()
    model = _model(arch, **cfg)
    g = torch.Generator().manual_seed(0)
    B, P, N = 3, 9, 5
    ids = torch.randint(3, 96, (B, P), generator=g)
    mask = torch.ones(B, P, dtype=torch.long)
    mask[1, :3] = 0  # a left-padded row: the prefill masks it into the state
    step = CompiledDecode(model, kernel=False)
    kept = bool(cfg.get("softmax_layers"))
    cache = StaticCache(config=model.config, max_cache_len=P + N + 3) if kept else DynamicCache(config=model.config)
    # every token after the first runs the graph the first one compiled
    got, ref = greedy_steps_and_full_forward(model, step, cache, ids, mask, N, pass_mask=kept)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert int(cache.get_seq_length()) == P + N
    if kept:  # a second run on a new cache, unpadded and without a mask: the first run's padding must not leak
        cache2 = StaticCache(config=model.config, max_cache_len=P + N + 3)
        with torch.no_grad():
            logits = model(input_ids=ids, **cache_kw(cache2), use_cache=True).logits[:, -1:]
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            with torch._dynamo.config.patch(error_on_recompile=True):
                got2 = step(nxt, torch.full((B, 1), P), cache2)
            ref2 = model(input_ids=torch.cat([ids, nxt], 1)).logits[:, -1:]
        torch.testing.assert_close(got2, ref2, rtol=1e-4, atol=1e-4)
    assert (DecodeMode.ring, DecodeMode.kernel, DecodeMode.count_outside) == (False, True, False)  # restored


def test_refusals_are_one_line_and_actionable():
    gemma = _model("gemma3_text")  # its sliding layers stay softmax by default
    with pytest.raises(ValueError, match=r"layers \[0, 2\] are sliding-window softmax"):
        CompiledDecode(gemma, compile=False)
    with pytest.raises(ValueError, match="has no linearized layer"):
        CompiledDecode(tiny_model("llama"), compile=False)
    kept = _model("llama", softmax_layers=[1])
    step = CompiledDecode(kept, compile=False)
    tok, pos = torch.ones(2, 1, dtype=torch.long), torch.full((1, 1), 4)
    dynamic = DynamicCache(config=kept.config)  # prefilled, but the kept layer's cache grows
    with torch.no_grad():
        kept(input_ids=torch.ones(2, 4, dtype=torch.long), **cache_kw(dynamic), use_cache=True)
    with pytest.raises(ValueError, match="run the prompt through the model first|StaticCache"):
        step(tok, pos, dynamic)
    with pytest.raises(ValueError, match="run the prompt through the model first|StaticCache"):
        step(tok, pos, StaticCache(config=kept.config, max_cache_len=8))  # static, but never prefilled
    model = _model("llama")
    step = CompiledDecode(model, compile=False)
    cache = DynamicCache(config=model.config)
    with pytest.raises(ValueError, match="run the prompt through the model first"):
        step(torch.ones(2, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="prefill eagerly"):
        step(torch.ones(2, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long), cache)


def test_the_kernel_dispatch_traces_in_one_graph(monkeypatch):
    """On CUDA the compiled step decides kernel or torch inside the traced code (``ring_kernel_serves``).
    Dynamo 2.11 refused importlib's find_spec there (H200, 2026-12-03; the CPU's torch traces it), so the
    check must be a constant lookup: find_spec is made to fail, and the check still traces in one graph."""
    import importlib.util

    from linearize.ops import triton as tri

    want = tri.available()
    monkeypatch.setattr(importlib.util, "find_spec", lambda *a, **k: (_ for _ in ()).throw(AssertionError("looked up per call")))

    @torch.compile(fullgraph=True, backend="eager")
    def f(x):
        return x + 1 if tri.available() else x - 1

    x = torch.randn(3)
    assert torch.equal(f(x), x + 1 if want else x - 1)


def test_a_static_cache_prefilled_in_pieces_equals_the_full_forward():
    """Kept softmax layers on a StaticCache, prompt prefilled in two forwards: transformers sizes every mask from
    the first cache layer (ours), which must then give the static cache's length, not its own count."""
    model = _model("llama", softmax_layers=[1])
    ids = torch.randint(3, 96, (2, 21), generator=torch.Generator().manual_seed(0))
    cache = StaticCache(config=model.config, max_cache_len=30)
    with torch.no_grad():
        a = model(input_ids=ids[:, :13], **cache_kw(cache), use_cache=True).logits
        b = model(input_ids=ids[:, 13:], **cache_kw(cache), use_cache=True, position_ids=torch.arange(13, 21)[None]).logits
        full = model(input_ids=ids).logits
    torch.testing.assert_close(torch.cat([a, b], 1), full, rtol=1e-5, atol=1e-5)


def test_steps_pass_the_cache_by_the_installed_transformers_keyword():
    """transformers 5.24 renamed a forward's ``past_key_values`` to ``cache`` (the old name warns, and goes in
    5.40): CompiledDecode and the benchmark loops pass it by whichever name the installed version takes."""
    import inspect
    import warnings

    from transformers import LlamaForCausalLM

    from benchmarks.gen_loops import make_cache, run_lean
    from linearize.models import cache_kwarg

    assert cache_kwarg() in inspect.signature(LlamaForCausalLM.forward).parameters
    model = linearize.convert(tiny_model("llama"), LinearizeConfig(feature_dim=6, window=4))
    ids = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*", category=FutureWarning)
        run_lean(model, ids, 3, cache=make_cache(model, "dynamic", 10), forward=None)
        cache = DynamicCache(config=model.config)
        model(input_ids=ids, use_cache=True, **{cache_kwarg(): cache})
        step = CompiledDecode(model, compile=False)
        assert step(ids[:, -1:], torch.full((1, 1), 7), cache).shape[:2] == (2, 1)
