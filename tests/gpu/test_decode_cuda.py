"""The Triton decode kernel on CUDA: against an fp64 reference, in CUDA graphs, and inside ``generate``.

Run: ``python3 -m pytest -q tests/gpu/test_decode_cuda.py`` (skipped without CUDA).
Thresholds (METHOD.md): ||out - ref|| / ||ref|| < 1e-3 for fp32, < 1e-2 for bf16/fp16 inputs.
"""

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("triton")

from transformers import DynamicCache, StaticCache  # noqa: E402

import linearize  # noqa: E402
from linearize import LinearizeConfig  # noqa: E402
from linearize.modules.cache import HybridCacheLayer  # noqa: E402
from linearize.ops.ring import RingState, ring_step_torch  # noqa: E402
from linearize.ops.triton.decode import random_decode_problem, ring_step_triton  # noqa: E402

from ..ops.helpers import random_hedgehog_maps, rel_err  # noqa: E402
from ..tiny_models import cache_kw, perturb_added_weights, tiny_model  # noqa: E402

TOL = {torch.float32: 1e-3, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def as_fp64(ring: RingState) -> RingState:
    """The same ring with every float in fp64 (the reference computes on the kernel's exact inputs)."""
    return RingState(
        ring.S.double(), ring.z.double(), ring.k.double(), ring.v.double(), ring.phi_k.double(),
        ring.mask.clone(), ring.pos.clone(), window=ring.window, fold=ring.fold,
    )


def check_against_fp64(B, H, Hkv, D, F, window, dtype, *, per_q=False, filled=None, steps=20, seed=0, fold=1, **launch):
    _, ring, gamma = random_decode_problem(B, H, Hkv, D, F, window, per_q_features=per_q, dtype=dtype, filled=filled,
                                           seed=seed, fold=fold)
    ref = as_fp64(ring)
    for t in range(steps):
        inputs, _, _ = random_decode_problem(B, H, Hkv, D, F, window, per_q_features=per_q, dtype=dtype, filled=0, seed=1000 * seed + t)
        mask = (torch.arange(B, device="cuda") + t) % 4 != 0  # a different padded row every step
        mask = mask.view(B, 1)
        out = torch.full_like(inputs[0], float("nan"))
        y = ring_step_triton(*inputs, ring, window_weight=gamma, attention_mask=mask, out=out, **launch)
        y_ref = ring_step_torch(*[x.double() for x in inputs], ref, window_weight=gamma.double(), attention_mask=mask)
        torch.cuda.synchronize()
        assert torch.isfinite(y).all(), f"step {t}: unwritten or non-finite output"
        err = rel_err(y, y_ref)
        assert err < TOL[dtype], f"step {t}: y rel err {err:.2e}"
    assert rel_err(ring.S, ref.S) < 1e-4 and rel_err(ring.z, ref.z) < 1e-4
    for name in ("k", "v", "phi_k"):
        assert torch.equal(getattr(ring, name).double(), getattr(ref, name)), name
    assert torch.equal(ring.mask, ref.mask) and torch.equal(ring.pos, ref.pos)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D,F", [(64, 64), (128, 96), (256, 256)])
@pytest.mark.parametrize("window", [0, 1, 64, 128])
def test_kernel_matches_fp64_reference(dtype, D, F, window):
    """GQA (8 query heads on 2 KV heads), odd batch, padding; a full tail, so every step evicts and the ring wraps."""
    check_against_fp64(5, 8, 2, D, F, window, dtype, seed=D + window)


@pytest.mark.parametrize("window", [2, 64, 130])
@pytest.mark.parametrize("per_q", [False, True])
def test_tail_filling_up_and_per_query_features(window, per_q):
    """The tail starts short (empty slots are read and evicted as nothing), and key features per query head."""
    check_against_fp64(3, 6, 3, 64, 48, window, torch.bfloat16, per_q=per_q, filled=min(3, window - 1), steps=window + 5)


@pytest.mark.parametrize("block_d,block_w,num_warps,chunk_rows",
                         [(16, 16, 4, 0), (32, 64, 4, 0), (64, 32, 8, 0), (128, 128, 8, 0), (128, 64, 4, 32), (64, 64, 4, 16)])
def test_launch_configs_agree(block_d, block_w, num_warps, chunk_rows):
    check_against_fp64(4, 16, 16, 128, 128, 64, torch.bfloat16, steps=6, block_d=block_d, block_w=block_w, num_warps=num_warps,
                       chunk_rows=chunk_rows)


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [0, 1, 64])
@pytest.mark.parametrize("H,Hkv,D,F,chunk_rows", [(9, 3, 64, 128, 32), (4, 1, 256, 128, 16), (6, 3, 64, 48, 16)])
def test_s_in_row_chunks_matches_fp64_reference(H, Hkv, D, F, chunk_rows, window, dtype, prefetch):
    """``chunk_rows``: S streamed in row chunks (SmolLM2, Gemma 3, and F = 48 with a masked last chunk), key
    features per query head, padded rows, the ring wrapping; ``prefetch``: each chunk loaded one step ahead."""
    check_against_fp64(5, H, Hkv, D, F, window, dtype, per_q=True, steps=8, seed=D + F, chunk_rows=chunk_rows,
                       prefetch=prefetch)


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [0, 1, 64])
@pytest.mark.parametrize("H,Hkv,D,F,chunk_rows,warps", [(32, 8, 128, 128, 32, 4), (9, 3, 64, 128, 64, 4), (6, 2, 64, 48, 16, 2)])
def test_s_in_row_chunks_read_out_by_several_query_heads(H, Hkv, D, F, chunk_rows, warps, window, dtype, prefetch):
    """Key maps per KV head with S in row chunks, each chunk read out by the KV head's query heads: Llama-3.1-8B's
    heads (4 a KV head), SmolLM2's (3), and F = 48 with a masked last chunk; padded rows, the ring wrapping."""
    check_against_fp64(5, H, Hkv, D, F, window, dtype, per_q=False, steps=8, seed=D + F + H, chunk_rows=chunk_rows,
                       prefetch=prefetch, num_warps=warps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window", [0, 1, 64])
@pytest.mark.parametrize("H,Hkv,D,F,chunk_rows,warps", [(32, 8, 128, 128, 64, 2), (32, 8, 128, 128, 32, 4),
                                                        (9, 3, 64, 128, 64, 4), (6, 2, 64, 48, 16, 2)])
def test_query_heads_as_the_rows_of_dots(H, Hkv, D, F, chunk_rows, warps, window, dtype):
    """``heads_dot``: a KV head's query heads as the rows of tensor-core dots (tf32 for half inputs, fp32 FMA for
    fp32), at Llama-3.1-8B's heads (4 a KV head), SmolLM2's (3), F = 48 with a masked last chunk; padded rows,
    the ring wrapping."""
    check_against_fp64(5, H, Hkv, D, F, window, dtype, per_q=False, steps=8, seed=D + F + H, chunk_rows=chunk_rows,
                       num_warps=warps, heads_dot=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("form", ["defaults", "whole", "rows", "rows-prefetch", "heads-loop", "heads-dot"])
@pytest.mark.parametrize("fold", [4, 16])
def test_deferred_folding_matches_fp64_reference(form, fold, dtype):
    """``fold``: S written only every ``fold`` steps, the keys waiting in between read out as linear terms; over
    enough steps for two folds, in every form of the kernel: S whole and in row chunks (key maps per query head,
    the issue-5 heads), loaded a step ahead, and key maps per KV head read out by Llama-3.1-8B's 4 query heads one
    by one or as the rows of dots; and the issue-5 heads' default launch. The fp64 reference runs the same folding
    schedule."""
    kw = dict(steps=2 * fold + 6, fold=fold, seed=fold)
    if form == "defaults":  # the issue-5 heads' default launch: 16-row chunks, 32-slot window blocks, 1 warp
        check_against_fp64(5, 16, 16, 128, 128, 64, dtype, per_q=True, **kw)
    elif form == "whole":
        check_against_fp64(5, 16, 16, 128, 128, 64, dtype, per_q=True, chunk_rows=0, **kw)
    elif form.startswith("rows"):
        check_against_fp64(5, 16, 16, 128, 128, 64, dtype, per_q=True, chunk_rows=64, prefetch=form.endswith("prefetch"),
                           **kw)
    else:
        check_against_fp64(5, 32, 8, 128, 128, 64, dtype, per_q=False, chunk_rows=64, num_warps=2,
                           heads_dot=form == "heads-dot", **kw)


def test_real_model_shapes():
    """SmolLM2 (H=9, Hkv=3, D=64), Qwen2.5-0.5B (14/2, D=64), Gemma3-1B (4/1, D=256)."""
    for H, Hkv, D in ((9, 3, 64), (14, 2, 64), (4, 1, 256)):
        check_against_fp64(3, H, Hkv, D, 64, 64, torch.bfloat16, steps=4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("B,H,Hkv,D,f,per_q", [(64, 9, 3, 64, 64, True), (64, 9, 3, 64, 64, False), (5, 16, 16, 128, 64, True),
                                               (64, 4, 1, 256, 64, True), (3, 14, 2, 64, 128, True)])
def test_map_kernel_equals_the_feature_map_modules(B, H, Hkv, D, f, per_q, dtype):
    """``hedgehog_pair_triton`` against ``HedgehogFeatureMap`` in fp64 on the same inputs (views of one fused
    projection): SmolLM2 with key maps per query head and per KV head, the issue-5 shape at an odd batch,
    Gemma 3's D 256, Qwen2.5 with f 128. NaN-filled outputs would fail: every element must be written."""
    from linearize.ops.triton.feature_maps import hedgehog_pair_triton

    Hf = H if per_q else Hkv
    maps = random_hedgehog_maps(H, Hf, D, f, torch.Generator().manual_seed(H + D), D**-0.5)
    for m in maps:  # weights representable in the dtype, so that the fp64 reference sees what the kernel sees
        m.weight.data = m.weight.data.to(dtype).float()
    g = torch.Generator(device="cuda").manual_seed(B)
    qkv = torch.randn(B, 1, (H + 2 * Hkv) * D, device="cuda", generator=g).to(dtype)
    q, k, _ = qkv.view(B, 1, -1, D).split([H, Hkv, Hkv], dim=2)
    wq, wk = (m.weight.detach().to("cuda", dtype) for m in maps)
    with torch.no_grad():
        ref = [m.to("cuda", torch.float64)(x.double()) for m, x in zip(maps, (q, k))]
        mods = [m.to("cuda", dtype)(x) for m, x in zip(maps, (q, k))]
    got = hedgehog_pair_triton(q, k, wq, wk)
    torch.cuda.synchronize()
    for name, y, r, mod in zip(("phi_q", "phi_k"), got, ref, mods):
        assert torch.isfinite(y).all(), f"{name}: unwritten or non-finite"
        assert y.shape == mod.shape and y.dtype == dtype
        # the kernel and the module make the same roundings, so they agree far closer than either to fp64
        assert rel_err(y, r) < TOL[dtype], f"{name}: rel err to fp64 {rel_err(y, r):.2e}"
        assert rel_err(y, mod) <= max(2 * rel_err(mod, r), 1e-6), f"{name}: {rel_err(y, mod):.2e} vs module's {rel_err(mod, r):.2e}"


@pytest.mark.parametrize("window", [0, 1, 64])
def test_cuda_graph_replay_equals_eager(window):
    B, H, Hkv, D, F = 4, 8, 4, 128, 128
    static_in, ring, gamma = random_decode_problem(B, H, Hkv, D, F, window, filled=window // 2)
    static_mask = torch.ones(B, 1, dtype=torch.bool, device="cuda")
    static_out = torch.empty_like(static_in[0])
    # warm up (compile) on a side stream, as torch.cuda.graphs asks, on a throwaway copy of the ring
    warm = ring.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ring_step_triton(*static_in, warm, window_weight=gamma, attention_mask=static_mask, out=static_out)
    torch.cuda.current_stream().wait_stream(s)
    eager = ring.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ring_step_triton(*static_in, ring, window_weight=gamma, attention_mask=static_mask, out=static_out)
    # capture ran nothing: ring is still at its start, like eager
    assert torch.equal(ring.pos, eager.pos) and torch.equal(ring.S, eager.S)
    for t in range(2 * window + 3):
        new, _, _ = random_decode_problem(B, H, Hkv, D, F, window, filled=0, seed=50 + t)
        for dst, src in zip(static_in, new):
            dst.copy_(src)
        static_mask.copy_(((torch.arange(B, device="cuda") + t) % 3 != 0).view(B, 1))
        graph.replay()
        y_eager = ring_step_triton(*new, eager, window_weight=gamma, attention_mask=static_mask.clone())
        assert torch.equal(static_out, y_eager), f"step {t}"
    for a, b in zip((ring.S, ring.z, ring.k, ring.v, ring.phi_k, ring.mask, ring.pos), (eager.S, eager.z, eager.k, eager.v, eager.phi_k, eager.mask, eager.pos)):
        assert torch.equal(a, b)


def _model(window, dtype=torch.float32, **cfg):
    model = linearize.convert(tiny_model("llama"), LinearizeConfig(window=window, feature_dim=6, **cfg))
    perturb_added_weights(model)
    return model.cuda().to(dtype)


@pytest.mark.parametrize("feature_rope", [True, False], ids=["rope", "nope"])
@pytest.mark.parametrize("window", [0, 1, 4])
def test_model_decode_on_the_kernel_equals_full_forward(window, feature_rope):
    model = _model(window, feature_rope=feature_rope)
    ids = torch.randint(3, 96, (3, 24), device="cuda")
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        out = [model(ids[:, :5], **cache_kw(cache)).logits]
        out += [model(ids[:, t : t + 1], **cache_kw(cache)).logits for t in range(5, 24)]
    layers = [layer for layer in cache.layers if isinstance(layer, HybridCacheLayer)]
    assert layers and all(isinstance(layer.held, RingState) for layer in layers), "decode did not run on the kernel"
    torch.testing.assert_close(torch.cat(out, 1), full, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("kw", [dict(do_sample=False), dict(num_beams=3)], ids=["greedy", "beams"])
def test_generate_on_cuda_equals_reference_path(monkeypatch, kw):
    """Kernel decode (fp32) vs the PyTorch path on CUDA and on CPU: same tokens, padded batch."""
    model = _model(5)
    ids = torch.randint(3, 96, (3, 11), device="cuda")
    mask = torch.ones_like(ids)
    mask[2, :4] = 0
    args = dict(attention_mask=mask, max_new_tokens=12, min_new_tokens=12, pad_token_id=0, **kw)
    with torch.no_grad():
        fast = model.generate(ids, **args)
        monkeypatch.setenv("LINEARIZE_KERNELS", "torch")
        slow = model.generate(ids, **args)
        cpu = model.cpu().generate(ids.cpu(), **(args | dict(attention_mask=mask.cpu())))
    assert torch.equal(fast, slow) and torch.equal(fast.cpu(), cpu)


def test_bf16_generate_runs_on_the_kernel():
    model = _model(4, torch.bfloat16)
    ids = torch.randint(3, 96, (4, 9), device="cuda")
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kw(cache), max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert out.shape == (4, 17)
    assert all(isinstance(layer.held, RingState) for layer in cache.layers if isinstance(layer, HybridCacheLayer))


def _length_norm_model(window):
    """length_norm from 3 keys (so short sequences reach it), alpha random and nonzero."""
    cfg = LinearizeConfig(window=window, feature_dim=6, length_norm=True, length_norm_from=3)
    model = linearize.convert(tiny_model("llama"), cfg)
    perturb_added_weights(model)
    return model.cuda()


@pytest.mark.parametrize("window", [0, 1, 4])
def test_length_norm_decode_on_the_kernel_equals_full_forward(window):
    """Ring decode on the kernel with each row's own count of valid keys, left-padded batch."""
    model = _length_norm_model(window)
    ids = torch.randint(3, 96, (3, 24), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :9] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        out = [model(ids[:, :7], attention_mask=mask[:, :7], **cache_kw(cache)).logits]
        out += [model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], **cache_kw(cache)).logits for t in range(7, 24)]
    layers = [layer for layer in cache.layers if isinstance(layer, HybridCacheLayer)]
    assert layers and all(isinstance(layer.held, RingState) for layer in layers), "decode did not run on the kernel"
    assert all(torch.equal(layer.valid_count, mask.sum(1)) for layer in layers)
    valid = mask.bool()
    torch.testing.assert_close(torch.cat(out, 1)[valid], full[valid], rtol=2e-3, atol=2e-3)


def test_length_norm_decode_replays_in_a_cuda_graph_without_host_sync():
    """The count update is in place: graph replay gives the eager loop's and generate's tokens, and a
    step (with a padding mask) makes no host sync."""
    from benchmarks.gen_loops import run_generate, run_lean

    from linearize.modules.attention import PADDING_MASK_KWARG

    model = _length_norm_model(4)
    ids = torch.randint(3, 96, (3, 10), device="cuda")
    graphed = run_lean(model, ids, 20, cache=DynamicCache(config=model.config), graph=True, keep_tokens=True)
    eager = run_lean(model, ids, 20, cache=DynamicCache(config=model.config), graph=False, keep_tokens=True)
    gen = run_generate(model, ids, 20, pad_token_id=0, keep_tokens=True)
    assert graphed.graph and torch.equal(graphed.tokens, eager.tokens) and torch.equal(eager.tokens, gen.tokens)

    cache = DynamicCache(config=model.config)
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        model(input_ids=ids, **cache_kw(cache))
        model(input_ids=ids[:, :1], **cache_kw(cache), position_ids=torch.full((1, 1), 10, device="cuda"))  # ring from here
        torch.cuda.synchronize()
        mask = torch.ones(3, 12, dtype=torch.long, device="cuda")
        hidden = torch.randn(3, 1, 32, device="cuda")
        pe = model.model.rotary_emb(hidden, torch.full((1, 1), 11, device="cuda"))
        torch.cuda.set_sync_debug_mode("error")
        try:
            attn(hidden, pe, **cache_kw(cache), **{PADDING_MASK_KWARG: mask})
        finally:
            torch.cuda.set_sync_debug_mode(0)


def _sink_model(window, **cfg):
    """4 sink tokens, u and c random and nonzero; F = 12 + 1 unless ``feature_dim`` says otherwise."""
    cfg = {"feature_dim": 6} | cfg
    model = linearize.convert(tiny_model("llama"), LinearizeConfig(window=window, sink_tokens=4, **cfg))
    perturb_added_weights(model)
    return model.cuda()


@pytest.mark.parametrize("length_norm", [False, True], ids=["sinks", "sinks+length_norm"])
@pytest.mark.parametrize("prefill", [7, 2], ids=["prefill", "prefill<S"])
@pytest.mark.parametrize("window,f", [(0, 6), (1, 6), (4, 6), (4, 64)], ids=["w0", "w1", "w4", "w4-F129"])
def test_sink_decode_on_the_kernel_equals_full_forward(window, f, prefill, length_norm):
    """Ring decode on the kernel with each row's own sinks (the first 4 valid tokens), left-padded batch:
    row 2's sinks, and after a 2-token prefill every row's, are decode tokens. f = 64 gives the default
    F + 1 = 129 features, which the kernels pad to 256."""
    model = _sink_model(window, feature_dim=f, **(dict(length_norm=True, length_norm_from=3) if length_norm else {}))
    ids = torch.randint(3, 96, (3, 24), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :9] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        out = [model(ids[:, :prefill], attention_mask=mask[:, :prefill], **cache_kw(cache)).logits]
        out += [model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], **cache_kw(cache)).logits for t in range(prefill, 24)]
    layers = [layer for layer in cache.layers if isinstance(layer, HybridCacheLayer)]
    assert layers and all(isinstance(layer.held, RingState) for layer in layers), "decode did not run on the kernel"
    assert all(layer.held.phi_k.shape[-1] == 2 * f + 1 for layer in layers)
    assert all(torch.equal(layer.valid_count, mask.sum(1)) for layer in layers)
    valid = mask.bool()
    torch.testing.assert_close(torch.cat(out, 1)[valid], full[valid], rtol=2e-3, atol=2e-3)


def test_sink_decode_replays_in_a_cuda_graph_without_host_sync():
    """The sink ranks come from the in-place count: graph replay gives the eager loop's and generate's
    tokens (a 1-token prompt: run_lean takes 2 eager steps, so the first replay feeds the 4th token, a sink,
    and the next ones ordinary tokens), and a step makes no host sync."""
    from benchmarks.gen_loops import run_generate, run_lean

    from linearize.modules.attention import PADDING_MASK_KWARG

    model = _sink_model(4)
    ids = torch.randint(3, 96, (3, 1), device="cuda")
    graphed = run_lean(model, ids, 20, cache=DynamicCache(config=model.config), graph=True, keep_tokens=True)
    eager = run_lean(model, ids, 20, cache=DynamicCache(config=model.config), graph=False, keep_tokens=True)
    gen = run_generate(model, ids, 20, pad_token_id=0, keep_tokens=True)
    assert graphed.graph and torch.equal(graphed.tokens, eager.tokens) and torch.equal(eager.tokens, gen.tokens)

    cache = DynamicCache(config=model.config)
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        model(input_ids=ids, **cache_kw(cache))
        model(input_ids=ids[:, :1], **cache_kw(cache), position_ids=torch.full((1, 1), 1, device="cuda"))  # ring from here
        torch.cuda.synchronize()
        mask = torch.ones(3, 3, dtype=torch.long, device="cuda")
        hidden = torch.randn(3, 1, 32, device="cuda")
        pe = model.model.rotary_emb(hidden, torch.full((1, 1), 2, device="cuda"))
        torch.cuda.set_sync_debug_mode("error")
        try:
            attn(hidden, pe, **cache_kw(cache), **{PADDING_MASK_KWARG: mask})
        finally:
            torch.cuda.set_sync_debug_mode(0)


def test_sink_forward_and_gradients_on_the_kernels_equal_the_torch_path(monkeypatch):
    """F + 1 = 129 through the Triton chunk kernel, forward and backward (u, c get the kernel's dphi_q),
    against the PyTorch path on the same GPU, fp32, left-padded."""
    import linearize.pipelines.transfer as transfer_mod
    from linearize.pipelines.transfer import freeze_for_transfer, transfer_loss

    monkeypatch.setattr(transfer_mod, "autocast", lambda device: torch.autocast("cuda", enabled=False))  # fp32 both ways
    ids = torch.randint(3, 96, (3, 40), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    results = []
    for kernels in ("auto", "torch"):
        monkeypatch.setenv("LINEARIZE_KERNELS", kernels)
        model = _sink_model(8, feature_dim=64)
        with torch.no_grad():
            logits = model(ids, attention_mask=mask, use_cache=False).logits
        params = freeze_for_transfer(model)
        transfer_loss(model, ids).backward()
        grads = {n: p.grad.clone() for n, p in params.items() if n.endswith(("sink_u", "sink_c"))}
        results.append((logits, grads))
    (fast, g_fast), (slow, g_slow) = results
    valid = mask.bool()
    assert rel_err(fast[valid], slow[valid]) < 1e-3
    assert g_fast.keys() == g_slow.keys() and g_fast
    for n in g_fast:
        assert g_fast[n].abs().sum() > 0 and rel_err(g_fast[n], g_slow[n]) < 1e-2, n


def test_compiled_decode_fuses_projections_by_default():
    """On CUDA the default fuses q/k/v and gate/up in place (no memory added); an explicit False wins."""
    model = _model(4, feature_rope=False)
    with torch.no_grad():  # cuBLAS's workspace is allocated on the first GEMM and stays: before counting
        model(torch.randint(3, 96, (2, 5), device="cuda"))
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with linearize.CompiledDecode(model, compile=False) as step:
        assert step.fused is not None and any(step.fused.fused_layers)
        assert torch.cuda.memory_allocated() <= before  # (one tensor for several: no more than their blocks)
    assert linearize.CompiledDecode(model, compile=False, fuse_projections=False).fused is None


@pytest.mark.parametrize(
    "kernel,kept,fuse,maps",
    [(True, [], False, True), (True, [1], False, True), (False, [], False, True), (False, [1], False, True),
     (True, [], True, True), (True, [1], True, True), (True, [], True, False), (True, [], True, "no-rope"),
     (True, "heads", False, True), (False, "heads", False, True)],
    ids=["triton-kernel-all-linear", "triton-kernel-kept-1", "torch-step-all-linear", "torch-step-kept-1",
         "triton-kernel-all-linear-fused-proj", "triton-kernel-kept-1-fused-proj", "triton-kernel-maps-modules",
         "triton-kernel-maps-without-rope", "triton-kernel-kept-heads", "torch-step-kept-heads"],
)
def test_compiled_decode_equals_full_forward_and_replays_in_a_cuda_graph(kernel, kept, fuse, maps):
    """linearize.CompiledDecode on CUDA: the Triton decode kernel inside the compiled graph (or inductor's own
    ring step), equal to the full forward, then captured in a CUDA graph and replayed. A kept softmax layer
    decodes on a StaticCache with room to spare (its mask comes from the static layer's device count).
    ``fuse``: one GEMM for q/k/v and one for gate/up (fuse_projections); ``maps``: the Triton map kernel with RoPE
    inside (fuse_maps and fuse_rope, the default), without it ("no-rope": the model's RoPE), or the feature map
    modules. ``kept="heads"``: KV heads kept softmax inside two
    linearized layers (softmax_heads), their buffers reserved, the split-K softmax kernel on their steps."""
    from linearize.decode import reserve_kept_heads

    torch._dynamo.reset()
    heads = kept == "heads"
    model = _model(4, feature_rope=False, **({"softmax_heads": [[0, 1], [2, 0]]} if heads else {"softmax_layers": kept}))
    step = linearize.CompiledDecode(model, kernel=kernel, fuse_projections=fuse, fuse_maps=maps is not False,
                                    fuse_rope=maps is True)
    ids = torch.randint(3, 96, (3, 24), device="cuda")
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = StaticCache(config=model.config, max_cache_len=32) if kept and not heads else DynamicCache(config=model.config)
        if heads:
            reserve_kept_heads(cache, 32)
        out = [model(ids[:, :5], **cache_kw(cache)).logits[:, -1:]]
        for t in range(5, 12):
            out.append(step(ids[:, t : t + 1], torch.full((1, 1), t, device="cuda"), cache))
        torch.testing.assert_close(torch.cat(out, 1), full[:, 4:12], rtol=2e-3, atol=2e-3)
        # the same step captured: fixed input buffers, replayed for the rest of the sequence
        tok, pos = ids[:, 12:13].clone(), torch.full((1, 1), 12, device="cuda")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            warm = step(tok, pos, cache)  # (a real token: it advances the state, and is checked below)
        torch.cuda.current_stream().wait_stream(side)
        replayed = [warm]
        g = torch.cuda.CUDAGraph()
        tok.copy_(ids[:, 13:14])
        pos.fill_(13)
        with torch.cuda.graph(g):
            logits = step(tok, pos, cache)
        # capture ran the step once (token 13) without executing it; replay executes it
        for t in range(13, 24):
            tok.copy_(ids[:, t : t + 1])
            pos.fill_(t)
            g.replay()
            replayed.append(logits.clone())
    torch.testing.assert_close(torch.cat(replayed, 1), full[:, 12:24], rtol=2e-3, atol=2e-3)
