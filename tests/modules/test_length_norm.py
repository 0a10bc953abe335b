"""Length normalization of the linear part (``LinearizeConfig.length_norm``).

The module scales phi_q by (L0 / max(n_i, L0)) ** alpha_h, n_i the valid keys older than the window.
Checked against a plain reference (counts by brute force, ``hybrid_attention_reference`` on the scaled
phi_q, fp64), and cached prefill / decode (ordered and ring) against the full forward, padded batches.
"""

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, DynamicCache

import linearize
import linearize.modules.attention as attention_mod
from linearize import LinearizeConfig
from linearize.convert import CheckpointError
from linearize.modules.attention import PADDING_MASK_KWARG
from linearize.modules.cache import HybridCacheLayer
from linearize.modules.length_norm import length_scale, linear_key_counts
from linearize.ops import hybrid_attention_reference
from linearize.pipelines.config import build_config, config_from_dict
from linearize.ops.ring import RingState
from linearize.pipelines.transfer import freeze_for_transfer, transfer_loss

from ..ops.helpers import left_pad_mask
from ..tiny_models import cache_kw, perturb_added_weights, tiny_model
from .cache_helpers import assert_padded_generation_equals_unpadded, brute_counts, cached, decode_path, ids_and_mask  # noqa: F401 (decode_path: a fixture)

L0 = 3  # small, so that the tiny sequences here reach past it


def converted(window=4, dtype=torch.float32, arch="llama", **cfg):
    cfg = {"feature_dim": 6, "window": window, "length_norm": True, "length_norm_from": L0} | cfg
    model = linearize.convert(tiny_model(arch), LinearizeConfig(**cfg)).to(dtype)
    perturb_added_weights(model)  # alpha too: random, nonzero
    return model


def alphas(model):
    return [layer.length_alpha for layer in linearize.linearized_layers(model)]


# -- the pure functions ---------------------------------------------------------------------------------
@pytest.mark.parametrize("window", [0, 1, 2, 5, 40])
def test_counts_of_a_sequence_and_of_its_pieces(window):
    """Counts in one call equal brute force; so do counts continued from (seen, tail) at every cut."""
    T = 33
    mask = left_pad_mask(3, T, [0, 4, 20])
    mask[0, 9] = False
    want = brute_counts(mask, window)
    assert torch.equal(linear_key_counts(mask, window), want)
    for cut in (1, 7, 30):
        L = min(max(window - 1, 0), cut)
        tail = mask[:, cut - L : cut]
        got = linear_key_counts(mask[:, cut:], window, seen=mask[:, :cut].sum(1), tail=tail)
        assert torch.equal(got, want[:, cut:]), f"cut {cut}"


def test_scale_is_the_power_law_and_one_at_alpha_zero():
    counts = torch.tensor([[0, 1, 3, 4, 10, 1000]])
    alpha = torch.tensor([0.0, 0.5, -0.3], dtype=torch.float64)
    s = length_scale(counts, alpha, L0, torch.float64)
    assert s.shape == (1, 6, 3, 1)
    want = (L0 / counts.clamp(min=L0).double()).unsqueeze(-1) ** alpha
    torch.testing.assert_close(s[..., 0], want, rtol=1e-12, atol=0)
    assert torch.equal(s[..., 0, 0], torch.ones(1, 6, dtype=torch.float64))


# -- the module against a plain reference ---------------------------------------------------------------
def module_and_reference(model, ids, mask):
    """Layer 0's forward on random hidden states, and the same from hybrid_attention_reference (fp64)."""
    layer = linearize.linearized_layers(model)[0]
    B, T = ids.shape
    h = torch.randn(B, T, model.config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    pos = torch.arange(T).expand(B, T)
    emb = model.model.rotary_emb(h, pos)
    kw = {} if mask is None else {PADDING_MASK_KWARG: mask}
    with torch.no_grad():
        got, _ = layer(h, emb, None, **kw)
        q, k, v = layer.qkv(h, emb)
        n = brute_counts(mask if mask is not None else torch.ones(B, T), layer.window).double()
        s = (L0 / n.clamp(min=L0)).unsqueeze(-1) ** layer.length_alpha.double()  # [B, T, H]
        phi_q = layer.feature_map_q(q) * s.unsqueeze(-1)
        y = hybrid_attention_reference(
            q, k, v, phi_q, layer.feature_map_k(k), window=layer.window, window_weight=layer.window_weight.double(),
            scale=layer.scaling, attention_mask=mask,
        )
        want = layer.o_proj(y.reshape(B, T, -1))
    return got, want


@pytest.mark.parametrize(
    "window,T,pads",
    [(4, 23, None), (0, 19, None), (16, 9, None), (1, 17, (0, 4, 11)), (5, 29, (0, 6, 13)), (0, 15, (2, 0, 9))],
    ids=["odd-T", "window0", "T<window", "window1-padded", "padded", "window0-padded"],
)
def test_module_forward_equals_scaled_reference(window, T, pads):
    model = converted(window, torch.float64, chunk_size=8)
    assert all((a != 0).all() for a in alphas(model))
    ids, mask = ids_and_mask(3, T, pads or (0, 0, 0))
    got, want = module_and_reference(model, ids, mask.bool() if pads else None)
    valid = mask.bool() if pads else torch.ones_like(mask, dtype=torch.bool)
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-10, atol=1e-10)


def test_scaling_changes_the_output():
    """The reference check above means something only if alpha moves the output."""
    model = converted(4, torch.float64)
    ids, mask = ids_and_mask()
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
        for a in alphas(model):
            a.zero_()
        after = model(ids, attention_mask=mask).logits
    assert (before - after)[mask.bool()].abs().max() > 1e-3


@pytest.mark.parametrize("window", [0, 4])
def test_alpha_zero_is_exactly_the_plain_recipe(window):
    plain = linearize.convert(tiny_model("llama"), LinearizeConfig(feature_dim=6, window=window))
    perturb_added_weights(plain)
    normed = linearize.convert(tiny_model("llama"), LinearizeConfig(feature_dim=6, window=window, length_norm=True, length_norm_from=L0))
    missing, unexpected = normed.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.endswith("length_alpha") for k in missing)
    assert all(torch.equal(a, torch.zeros_like(a)) for a in alphas(normed))  # initialised to 0
    assert not any("length_alpha" in n for n, _ in plain.named_parameters())
    ids, mask = ids_and_mask()
    with torch.no_grad():
        assert torch.equal(normed(ids, attention_mask=mask).logits, plain(ids, attention_mask=mask).logits)
        outs = []
        for model in (plain, normed):
            cache = DynamicCache(config=model.config)
            out = [model(ids[:, :13], attention_mask=mask[:, :13], **cache_kw(cache)).logits]
            out += [model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], **cache_kw(cache)).logits for t in range(13, 21)]
            outs.append(torch.cat(out, 1))
    assert torch.equal(outs[0], outs[1])


# -- cached prefill and decode equal the full forward ---------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-10)], ids=["fp32", "fp64"])
@pytest.mark.parametrize("window", [0, 1, 4])
@pytest.mark.parametrize("cuts", [(9,), (6, 14)], ids=["prefill", "prefill-in-2"])
def test_cached_decode_equals_full_forward(decode_path, dtype, tol, window, cuts):
    model = converted(window, dtype)
    ids, mask = ids_and_mask()
    with torch.no_grad():
        full = model(ids, attention_mask=mask, use_cache=False).logits
    got, cache = cached(model, ids, mask, cuts)
    valid = mask.bool()
    torch.testing.assert_close(got[valid], full[valid], rtol=tol, atol=tol)
    layers = [layer for layer in cache.layers if isinstance(layer, HybridCacheLayer)]
    assert all(torch.equal(layer.valid_count, mask.sum(1)) for layer in layers)
    if decode_path == "ring" and window >= 2:
        assert all(isinstance(layer.held, RingState) for layer in layers)


def test_ring_decode_then_prefill_again(monkeypatch):
    """prefill -> ring decode -> a prefill (the ring hands back) -> ring decode, padded."""
    monkeypatch.setattr(attention_mod, "ring_kernel_serves", lambda *a: True)
    model = converted(5)
    ids, mask = ids_and_mask(T=30)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, use_cache=False).logits
    got, _ = cached(model, ids, mask, (8, 9, 10, 11, 18))
    torch.testing.assert_close(got[mask.bool()], full[mask.bool()], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kw", [dict(num_beams=3), dict(do_sample=False)], ids=["beams", "greedy"])
def test_generate_ring_equals_ordered(monkeypatch, kw):
    """Padded batch; beam search repeats and reorders the counts with the state."""
    model = converted(3)
    ids, mask = ids_and_mask(B=3, T=9, pads=(0, 3, 5), seed=4)
    args = dict(attention_mask=mask, max_new_tokens=8, min_new_tokens=8, pad_token_id=0, **kw)
    with torch.no_grad():
        ordered = model.generate(ids, **args)
        monkeypatch.setattr(attention_mod, "ring_kernel_serves", lambda *a: True)
        ring = model.generate(ids, **args)
    assert torch.equal(ring, ordered)


def test_padded_batched_generation_equals_unpadded():
    """Each row's counts are its own: a left-padded batch generates what each prompt does alone."""
    assert_padded_generation_equals_unpadded(converted(3), (7, 12, 3))


def test_counts_follow_the_layer_ops(monkeypatch):
    """batch_select / repeat_interleave / offload + prefetch / reset carry valid_count with the state."""
    monkeypatch.setattr(attention_mod, "ring_kernel_serves", lambda *a: True)
    model = converted(4)
    ids, mask = ids_and_mask(T=12)
    layer = next(layer for layer in cached(model, ids, mask, (5,))[1].layers if isinstance(layer, HybridCacheLayer))
    counts = mask.sum(1)
    layer.batch_select_indices(torch.tensor([True, False, True]))
    assert torch.equal(layer.valid_count, counts[[0, 2]])
    layer.batch_repeat_interleave(2)
    assert torch.equal(layer.valid_count, counts[[0, 0, 2, 2]])
    layer.offload()
    layer.prefetch()
    assert torch.equal(layer.valid_count, counts[[0, 0, 2, 2]])
    layer.reset()
    assert layer.valid_count is None


def test_a_cache_filled_without_counts_is_refused():
    plain = linearize.convert(tiny_model("llama"), LinearizeConfig(feature_dim=6, window=4))
    model = converted(4)
    ids, _ = ids_and_mask()
    cache = DynamicCache(config=plain.config)
    with torch.no_grad():
        plain(ids[:, :5], **cache_kw(cache))
        with pytest.raises(RuntimeError, match="length_norm"):
            model(ids[:, 5:6], **cache_kw(cache))


# -- training, saving, settings -------------------------------------------------------------------------
def test_transfer_trains_alpha():
    model = converted(2)
    params = freeze_for_transfer(model)
    names = [n for n in params if n.endswith("length_alpha")]
    assert len(names) == len(linearize.linearized_layers(model))
    ids, _ = ids_and_mask(T=16)
    transfer_loss(model, ids).backward()
    for n in names:
        assert params[n].grad is not None and params[n].grad.abs().sum() > 0, n


def test_save_load_round_trip(tmp_path):
    model = converted(4, arch="qwen3")
    ids, mask = ids_and_mask()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.linearize["length_norm"] is True and loaded.config.linearize["length_norm_from"] == L0
    for a, b in zip(alphas(model), alphas(loaded)):
        assert torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)


def test_a_checkpoint_without_alpha_is_refused(tmp_path):
    model = linearize.convert(tiny_model("llama"), LinearizeConfig(feature_dim=6, window=4))
    model.config.linearize["length_norm"] = True  # as if saved by a model that had it
    model.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="length_alpha"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_lora_leaves_alpha_alone():
    peft = pytest.importorskip("peft")
    model = converted(3)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and not any("length_alpha" in n for n in trainable)


@pytest.mark.parametrize(
    "kw", [dict(length_norm_from=0), dict(length_norm_from=-4), dict(length_norm_from=2.5), dict(length_norm_from=True),
           dict(length_norm_from="256"), dict(length_norm="yes")],
)
def test_bad_settings_are_one_line_errors(kw):
    with pytest.raises(ValueError, match=f"LinearizeConfig.{next(iter(kw))}") as e:
        LinearizeConfig(**kw)
    assert "\n" not in str(e.value)


def test_settings_round_trip_through_overrides_yaml_and_the_ablation_file(tmp_path):
    cfg = build_config(None, None, ["linearize.length_norm=true", "linearize.length_norm_from=128"])
    assert cfg.linearize.length_norm is True and cfg.linearize.length_norm_from == 128
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg
    f = tmp_path / "c.yaml"
    f.write_text("linearize: {length_norm: true, length_norm_from: 64}\n")
    assert build_config(None, f).linearize == LinearizeConfig(length_norm=True, length_norm_from=64)
    with pytest.raises(ValueError, match="--set linearize.length_norm_from=0: invalid LinearizeConfig.length_norm_from"):
        build_config(None, None, ["linearize.length_norm_from=0"])
    root = Path(__file__).resolve().parents[2]
    plain = build_config("full", root / "configs/ablations/smollm2-plain.yaml")
    normed = build_config("full", root / "configs/ablations/smollm2-lennorm.yaml")
    assert normed.linearize == LinearizeConfig(**(plain.linearize.to_dict() | {"length_norm": True, "length_norm_from": 256}))
    assert dataclasses.replace(normed, linearize=plain.linearize) == plain  # nothing else differs
