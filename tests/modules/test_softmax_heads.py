"""Heads kept softmax inside a converted layer (``LinearizeConfig.softmax_heads``).

The kept KV heads (and their query heads) must give the base's exact softmax output, the other heads exactly
what a fully hybrid layer with the same maps gives on them, and cached prefill / decode (ordered and ring,
padded batches) must equal the full forward. Checkpoints round-trip, attention transfer learns nothing on the
kept heads, and bad head lists fail in one line.
"""

import pytest
import torch

import linearize
from linearize import LinearizeConfig
from linearize.cli import _state_bytes
from linearize.modules.attention import LinearizedAttention
from linearize.pipelines.transfer import freeze_for_transfer, set_mode

from ..tiny_models import perturb_added_weights, tiny_model
from .cache_helpers import assert_padded_generation_equals_unpadded, cached, decode_path, ids_and_mask  # noqa: F401 (decode_path: a fixture)

# tiny models: 4 query heads in 2 KV groups (G = 2), 3 layers; layer 1 keeps KV head 0 (query heads 0, 1)
KEPT = [[1, 0]]


def converted(arch="llama", kept=KEPT, **cfg):
    cfg = {"feature_dim": 6, "window": 4, "softmax_heads": kept} | cfg
    model = linearize.convert(tiny_model(arch), LinearizeConfig(**cfg))
    perturb_added_weights(model)
    return model


def o_proj_inputs(model, ids, mask=None):
    """{layer: the attention output before o_proj [B, T, H, D]} of one forward."""
    got, hooks = {}, []
    for i, layer in enumerate(model.base_model.layers):
        a = layer.self_attn
        hooks.append(a.o_proj.register_forward_pre_hook(lambda m, args, i=i, a=a: got.__setitem__(i, args[0].unflatten(-1, (-1, a.head_dim)))))
    try:
        with torch.no_grad():
            model(ids, attention_mask=mask, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return got


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text"])
def test_kept_heads_are_the_base_softmax_and_the_rest_the_hybrid(arch):
    ids, mask = ids_and_mask(T=19)
    mixed = converted(arch, layers=[1])  # only layer 1: its input is then the same in every run
    full = linearize.convert(tiny_model(arch), LinearizeConfig(feature_dim=6, window=4, layers=[1]))
    perturb_added_weights(full)
    a, b = mixed.base_model.layers[1].self_attn, full.base_model.layers[1].self_attn
    assert isinstance(a, LinearizedAttention) and a.kept_kv_heads == [0] and a.num_hybrid_heads == 2
    assert a.window_logit.shape == (2,) and a.feature_map_q.weight.shape[0] == 2
    with torch.no_grad():  # the full layer's maps on heads 2, 3 become the mixed layer's
        for name in ("feature_map_q.weight", "feature_map_k.weight", "window_logit"):
            a.get_parameter(name).copy_(b.get_parameter(name)[2:])
    got = o_proj_inputs(mixed, ids, mask)[1]
    hybrid = o_proj_inputs(full, ids, mask)[1]
    set_mode(full, "softmax")
    base = o_proj_inputs(full, ids, mask)[1]
    valid = mask.bool()
    assert torch.allclose(got[:, :, :2][valid], base[:, :, :2][valid], atol=1e-6)
    assert torch.allclose(got[:, :, 2:][valid], hybrid[:, :, 2:][valid], atol=1e-6)
    assert not torch.allclose(got[:, :, 2:][valid], base[:, :, 2:][valid], atol=1e-3)  # the hybrid heads are not softmax


@pytest.mark.parametrize("cfg", [{}, {"feature_map_per_kv_head": True, "sink_tokens": 2}, {"length_norm": True, "length_norm_from": 3}])
def test_cached_prefill_and_decode_equal_the_full_forward(decode_path, cfg):
    model = converted(kept=[[0, 1], [1, 0]], **cfg)
    ids, mask = ids_and_mask(T=21)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
    got, cache = cached(model, ids, mask, cuts=(3, 9))
    valid = mask.bool()
    assert torch.allclose(got[valid], full[valid], atol=1e-5), (got[valid] - full[valid]).abs().max()
    layer = cache.layers[1]
    assert layer.kept_k.shape[:2] == (3, 1) and layer.kept_filled == layer.cumulative_length == 21
    assert torch.equal(layer.kept_valid[:, :21], mask.bool()) and not layer.kept_valid[:, 21:].any()


def test_padded_generation_equals_unpadded():
    assert_padded_generation_equals_unpadded(converted(), (5, 11, 8))


def test_checkpoint_round_trip(tmp_path):
    model = converted(kept=[[1, 1], [2, 0]])
    ids, _ = ids_and_mask(B=1, T=12, pads=(0,))
    model.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path).eval()
    assert again.config.linearize["softmax_heads"] == [[1, 1], [2, 0]]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_transfer_trains_only_the_hybrid_heads():
    model = converted()
    params = freeze_for_transfer(model)
    set_mode(model, "transfer")
    ids, _ = ids_and_mask(B=2, T=13, pads=(0, 0))
    model(ids)
    y_hybrid, y_soft = model.base_model.layers[1].self_attn.transfer_outputs
    H = y_hybrid.unflatten(-1, (4, -1))
    S = y_soft.unflatten(-1, (4, -1))
    assert torch.equal(H[:, :, :2], S[:, :, :2]) and not torch.allclose(H[:, :, 2:], S[:, :, 2:])
    assert all(p.shape[0] == 2 for n, p in params.items() if n.startswith("model.layers.1.") and "window_logit" in n)


def test_a_layer_with_every_head_kept_is_kept_whole():
    model = converted(kept=[[1, 0], [1, 1]])
    assert not isinstance(model.base_model.layers[1].self_attn, LinearizedAttention)
    assert isinstance(model.base_model.layers[0].self_attn, LinearizedAttention)


@pytest.mark.parametrize("kept, arch, match", [
    ([[1, 2]], "llama", "2 KV heads a layer"),
    ([[0, 1]], "gemma3_text", "does not linearize"),  # Gemma's layer 0 is a local (sliding) layer, not converted
    ([[1]], "llama", "pairs"),
])
def test_bad_head_lists_fail_in_one_line(kept, arch, match):
    with pytest.raises(ValueError, match=match) as e:
        linearize.convert(tiny_model(arch), LinearizeConfig(softmax_heads=kept))
    assert "\n" not in str(e.value)


def test_state_bytes_count_the_kept_heads_kv_cache():
    T = 100
    plain = linearize.convert(tiny_model("llama"), LinearizeConfig(feature_dim=6, window=4))
    mixed = converted()
    kv, s_plain = _state_bytes(plain, T)
    _, s_mixed = _state_bytes(mixed, T)
    a = mixed.base_model.layers[1].self_attn
    F, D = a.num_features, a.head_dim
    W = 4  # ring slots: k, v, the features of 2 feature heads (per-query-head maps) and a mask byte each
    hybrid_head = 4 * 2 * F * (D + 2) + W * (2 * D * 2 + 2 * F * 2)
    assert s_mixed == s_plain - hybrid_head + 2 * T * D * 2
    base_kv = 3 * T * 2 * 2 * D * 2  # 3 layers, 2 KV heads, k and v, bf16
    assert kv == base_kv and _state_bytes(plain, T, batch=3)[0] == 3 * base_kv


@pytest.mark.parametrize("reserve", [True, False], ids=["reserved", "growing"])
def test_compiled_decode_equals_the_full_forward(reserve):
    """Reserved and compiled, every step after the first reuses the first one's graph (the kept heads write at a
    device count); growing, the buffers double outside the step (64 slots, then 128)."""
    from transformers import DynamicCache

    from linearize.decode import reserve_kept_heads

    from ..decode_steps import greedy_steps_and_full_forward

    torch._dynamo.reset()
    model = converted(kept=[[0, 1], [1, 0]], sink_tokens=2, feature_rope=False)
    g = torch.Generator().manual_seed(0)
    B, P, N = 3, 60, 8
    ids = torch.randint(3, 96, (B, P), generator=g)
    mask = torch.ones(B, P, dtype=torch.long)
    mask[1, :3] = 0
    cache = DynamicCache(config=model.config)
    if reserve:
        reserve_kept_heads(cache, P + N)
    step = linearize.CompiledDecode(model, kernel=False, compile=reserve)  # (growing: the same step, eager)
    got, ref = greedy_steps_and_full_forward(model, step, cache, ids, mask, N, pass_mask=False, no_recompile=reserve)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    layer = cache.layers[1]
    assert layer.kept_filled == P + N and int(layer.kept_pos) == P + N
    assert layer.kept_k.shape[2] == (P + N if reserve else 128)


def test_buffers_grow_and_batch_ops_keep_the_kept_heads():
    model = converted()
    ids, mask = ids_and_mask(T=70, pads=(0, 5, 40))
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
    got, cache = cached(model, ids, mask, cuts=(30, 66))  # 64 slots, then 128 at token 67
    valid = mask.bool()
    assert torch.allclose(got[valid], full[valid], atol=1e-5)
    layer = cache.layers[1]
    assert layer.kept_k.shape[2] == 128
    layer.batch_select_indices(torch.tensor([2, 0]))
    assert layer.kept_k.shape[0] == layer.kept_valid.shape[0] == 2 and torch.equal(layer.kept_valid[0, :70], valid[2])
