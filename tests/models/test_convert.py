"""convert() on tiny random models of every supported architecture: exactness, decode, generation, I/O."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

import linearize
from linearize import LinearizeConfig
from linearize.modules.cache import HybridCacheLayer

from ..tiny_models import ARCHS, cache_kw, perturb_added_weights, tiny_model

pytestmark = pytest.mark.parametrize("arch", ARCHS)


def converted(arch, **cfg):
    model = linearize.convert(tiny_model(arch), LinearizeConfig(**({"feature_dim": 6} | cfg)))
    perturb_added_weights(model)
    return model


def ids_batch(B=2, T=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 96, (B, T), generator=g)


def test_window_covering_sequence_reproduces_base_logits(arch):
    model = tiny_model(arch)
    ids = ids_batch(T=24)
    with torch.no_grad():
        base = model(ids).logits
        linearize.convert(model, LinearizeConfig(window=24))
        perturb_added_weights(model)  # feature maps and gamma must not matter when nothing is linear
        lin = model(ids).logits
    torch.testing.assert_close(lin, base, rtol=1e-5, atol=1e-5)


def test_small_window_changes_logits(arch):
    model = tiny_model(arch)
    ids = ids_batch(T=24)
    with torch.no_grad():
        base = model(ids).logits
        lin = linearize.convert(model, LinearizeConfig(window=2))(ids).logits
    assert torch.isfinite(lin).all() and (lin - base).abs().max() > 1e-3


def test_keeps_projection_objects_and_names(arch):
    model = tiny_model(arch)
    before = {n: m for n, m in model.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))}
    linearize.convert(model)
    after = {n: m for n, m in model.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))}
    assert before.keys() == after.keys() and all(before[n] is after[n] for n in before)


@pytest.mark.parametrize("window", [0, 1, 4])
def test_step_decode_equals_full_forward(arch, window):
    model = converted(arch, window=window)
    ids = ids_batch(T=23)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        out = [model(ids[:, :1], **cache_kw(cache), use_cache=True).logits]
        for t in range(1, ids.shape[1]):
            out.append(model(ids[:, t : t + 1], **cache_kw(cache), use_cache=True).logits)
    torch.testing.assert_close(torch.cat(out, 1), full, rtol=1e-4, atol=1e-4)
    hybrid = [layer for layer in cache.layers if isinstance(layer, HybridCacheLayer)]
    assert len(hybrid) == len(linearize.linearized_layers(model))
    assert all(layer.state.tail_len == max(window - 1, 0) for layer in hybrid)
    assert cache.get_seq_length() == ids.shape[1]


@pytest.mark.parametrize("feature_rope", [True, False], ids=["rope", "nope"])
def test_chunked_prefill_then_decode_equals_full_forward(arch, feature_rope):
    model = converted(arch, window=5, feature_rope=feature_rope)
    ids = ids_batch(T=30)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        out = [model(ids[:, :11], **cache_kw(cache)).logits, model(ids[:, 11:17], **cache_kw(cache)).logits]
        for t in range(17, 30):
            out.append(model(ids[:, t : t + 1], **cache_kw(cache)).logits)
    torch.testing.assert_close(torch.cat(out, 1), full, rtol=1e-4, atol=1e-4)


def test_padded_batched_greedy_generation_equals_unpadded(arch):
    model = converted(arch, window=3)
    prompts = [ids_batch(1, n, seed=n)[0] for n in (7, 12, 3)]
    L = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), L, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, L - len(p) :], mask[i, L - len(p) :] = p, 1
    kw = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, **kw)
        for i, p in enumerate(prompts):
            single = model.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), **kw)
            assert torch.equal(batched[i, L:], single[0, len(p) :]), f"sequence {i}"


def test_save_load_round_trip_is_exact(arch, tmp_path):
    model = converted(arch, window=4, feature_map="t2r")
    ids = ids_batch(T=16)
    model.save_pretrained(tmp_path)
    cfg = AutoConfig.from_pretrained(tmp_path)
    assert cfg.model_type == f"linearized_{arch}" and cfg.linearize["window"] == 4
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    assert (tmp_path / "model.safetensors").exists()


def test_peft_lora_targets_the_kept_projections(arch):
    peft = pytest.importorskip("peft")
    model = converted(arch, window=3)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    wrapped = [n for n, m in lora.named_modules() if n.endswith("self_attn.q_proj") and hasattr(m, "lora_A")]
    assert len(wrapped) == model.config.num_hidden_layers
    with torch.no_grad():
        assert torch.isfinite(lora(ids_batch(T=9)).logits).all()


def test_transfer_mode_returns_teacher_and_pairs(arch):
    model = tiny_model(arch)
    ids = ids_batch(T=15)
    with torch.no_grad():
        base = model(ids, use_cache=False).logits
        linearize.convert(model, LinearizeConfig(window=2))
        layers = linearize.linearized_layers(model)
        for layer in layers:
            layer.mode = "transfer"
        teacher = model(ids, use_cache=False).logits
    torch.testing.assert_close(teacher, base, rtol=1e-5, atol=1e-5)  # layers feed on the teacher's outputs
    for layer in layers:
        hybrid, soft = layer.transfer_outputs
        assert hybrid.shape == soft.shape == (2, 15, layer.num_heads * layer.head_dim)
        assert (hybrid - soft).abs().max() > 0


def test_window_weight_starts_at_point_one(arch):
    model = linearize.convert(tiny_model(arch))
    for layer in linearize.linearized_layers(model):
        torch.testing.assert_close(layer.window_weight, torch.full((layer.num_heads,), 0.1))


def test_kept_softmax_layers_on_a_static_cache_are_refused(arch):
    """transformers skips the decode mask unless every cache layer is compileable; ours are not, so a kept
    softmax layer on a StaticLayer read the empty slots when decoding (6e-2 off the full forward, 2026-12-03).
    Refused in one line; a dynamic cache decodes such a model exactly (so does CompiledDecode, which passes its
    own mask: tests/test_decode.py), and a fully linearized model takes a static cache (every slot is ours)."""
    from transformers import StaticCache

    base = tiny_model(arch)
    n = base.config.num_hidden_layers
    ids = torch.randint(3, base.config.vocab_size, (2, 10))
    lm = linearize.convert(base, LinearizeConfig(window=4, feature_dim=8, softmax_layers=[0], convert_sliding_layers=True))
    perturb_added_weights(lm)
    lm.eval()
    with torch.no_grad():
        full = lm(ids).logits
        static = StaticCache(config=lm.config, max_cache_len=16)
        pre = lm(ids[:, :6], **cache_kw(static), use_cache=True).logits  # a prefill's mask is built: exact
        torch.testing.assert_close(pre, full[:, :6], rtol=1e-4, atol=1e-4)
        with pytest.raises(ValueError, match="layer 0 is kept softmax .* dynamic cache"):
            lm(ids[:, 6:7], **cache_kw(static), use_cache=True, position_ids=torch.full((2, 1), 6))
        cache = DynamicCache(config=lm.config)
        lm(ids[:, :6], **cache_kw(cache), use_cache=True)
        for t in range(6, 10):
            lg = lm(ids[:, t : t + 1], **cache_kw(cache), use_cache=True, position_ids=torch.full((2, 1), t)).logits
            torch.testing.assert_close(lg[:, 0], full[:, t], rtol=1e-4, atol=1e-4)
        all_lin = linearize.convert(tiny_model(arch), LinearizeConfig(window=4, feature_dim=8, convert_sliding_layers=True)).eval()
        static = StaticCache(config=all_lin.config, max_cache_len=16)
        all_lin(ids[:, :6], **cache_kw(static), use_cache=True)
        assert sum(isinstance(layer, HybridCacheLayer) for layer in static.layers) == n
