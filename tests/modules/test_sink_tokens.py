"""The attention-sink feature of the linear part (``LinearizeConfig.sink_tokens``).

The module appends exp(q . u_h + c_h) to phi_q and 1 on each row's first S valid keys (0 elsewhere) to
phi_k. Checked against a plain reference (sinks found by a loop, ``hybrid_attention_reference`` on the
extended features, fp64), and cached prefill / decode (ordered and ring) against the full forward,
padded batches, prefills that end before the S-th valid token, together with ``length_norm``.
"""

import dataclasses
import math
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
from linearize.modules.sink import EXPONENT_CAP, sink_keys, sink_query_feature
from linearize.ops import hybrid_attention_reference
from linearize.ops.ring import RingState
from linearize.pipelines.config import build_config, config_from_dict
from linearize.pipelines.transfer import freeze_for_transfer, transfer_loss

from ..ops.helpers import left_pad_mask
from ..tiny_models import cache_kw, perturb_added_weights, tiny_model
from .cache_helpers import assert_padded_generation_equals_unpadded, brute_counts, cached, decode_path, ids_and_mask  # noqa: F401 (decode_path: a fixture)

S = 4
L0 = 3  # length_norm_from, when combined: small, so that the tiny sequences reach past it


def converted(window=4, dtype=torch.float32, arch="llama", **cfg):
    cfg = {"feature_dim": 6, "window": window, "sink_tokens": S} | cfg
    model = linearize.convert(tiny_model(arch), LinearizeConfig(**cfg)).to(dtype)
    perturb_added_weights(model)  # u and c too: random, nonzero
    return model


def sink_params(model):
    return [(layer.sink_u, layer.sink_c) for layer in linearize.linearized_layers(model)]


def brute_sinks(mask: torch.Tensor, sinks: int) -> torch.Tensor:
    """is_sink[b, j]: key j is valid and at most ``sinks`` valid keys of row b end at j, by a loop."""
    B, T = mask.shape
    out = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        seen = 0
        for j in range(T):
            if mask[b, j]:
                seen += 1
                out[b, j] = seen <= sinks
    return out


# -- the pure functions ---------------------------------------------------------------------------------
@pytest.mark.parametrize("sinks", [1, 3, 4, 40])
def test_sink_keys_of_a_sequence_and_of_its_pieces(sinks):
    """In one call equal to brute force; so are the sinks continued from the count seen at every cut."""
    T = 23
    mask = left_pad_mask(4, T, [0, 2, 9, 21])
    mask[0, 1] = False  # a hole among the first tokens
    want = brute_sinks(mask, sinks)
    assert torch.equal(sink_keys(mask, sinks), want)
    for cut in (1, 3, 10, 22):
        got = sink_keys(mask[:, cut:], sinks, seen=mask[:, :cut].sum(1))
        assert torch.equal(got, want[:, cut:]), f"cut {cut}"


def test_query_feature_is_the_capped_exponential():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64)
    u = torch.randn(3, 4, generator=g, dtype=torch.float64)
    c = torch.tensor([0.0, -2.0, 100.0], dtype=torch.float64)  # the last head is capped everywhere
    got = sink_query_feature(q, u, c, torch.float64)
    want = torch.exp((torch.einsum("bthd,hd->bth", q, u) + c).clamp(max=EXPONENT_CAP)).unsqueeze(-1)
    assert got.shape == (2, 5, 3, 1)
    torch.testing.assert_close(got, want, rtol=1e-14, atol=0)
    assert torch.equal(got[..., 2, 0], torch.full((2, 5), math.exp(EXPONENT_CAP), dtype=torch.float64))
    # fp16 would overflow at exp(30): a lower cap keeps the feature finite (inf * 0 would poison the sums)
    assert torch.isfinite(sink_query_feature(q.half(), u, c, torch.float16)).all()


# -- the module against a plain reference ---------------------------------------------------------------
def module_and_reference(model, T, mask):
    """Layer 0's forward on random hidden states, and the same from hybrid_attention_reference (fp64)
    with the sink feature (and length_norm's scaling, when on) built by brute force."""
    layer = linearize.linearized_layers(model)[0]
    B = 3
    h = torch.randn(B, T, model.config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    emb = model.model.rotary_emb(h, torch.arange(T).expand(B, T))
    kw = {} if mask is None else {PADDING_MASK_KWARG: mask}
    valid = mask if mask is not None else torch.ones(B, T, dtype=torch.bool)
    with torch.no_grad():
        got, _ = layer(h, emb, None, **kw)
        q, k, v = layer.qkv(h, emb)
        phi_q, phi_k = layer.feature_map_q(q), layer.feature_map_k(k)
        if layer.length_alpha is not None:
            n = brute_counts(valid, layer.window).double()
            phi_q = phi_q * ((L0 / n.clamp(min=L0)).unsqueeze(-1) ** layer.length_alpha.double()).unsqueeze(-1)
        e = torch.einsum("bthd,hd->bth", q, layer.sink_u.double()) + layer.sink_c.double()
        extra_q = torch.exp(e.clamp(max=30.0)).unsqueeze(-1)
        extra_k = brute_sinks(valid, layer.sink_tokens).double()[:, :, None, None].expand(B, T, phi_k.shape[2], 1)
        y = hybrid_attention_reference(
            q, k, v, torch.cat([phi_q, extra_q], -1), torch.cat([phi_k, extra_k], -1), window=layer.window,
            window_weight=layer.window_weight.double(), scale=layer.scaling, attention_mask=mask,
        )
        want = layer.o_proj(y.reshape(B, T, -1))
    return got, want


@pytest.mark.parametrize("length_norm", [False, True], ids=["sinks", "sinks+length_norm"])
@pytest.mark.parametrize(
    "window,T,pads,sinks",
    [(4, 23, None, S), (0, 19, None, S), (16, 9, None, S), (1, 17, (0, 4, 11), S), (5, 29, (0, 6, 13), S),
     (0, 15, (2, 0, 9), S), (3, 11, (0, 3, 8), 30), (2, 13, None, 1)],
    ids=["odd-T", "window0", "T<window", "window1-padded", "padded", "window0-padded", "S>T-padded", "S1"],
)
def test_module_forward_equals_reference(window, T, pads, sinks, length_norm):
    extra = dict(length_norm=True, length_norm_from=L0) if length_norm else {}
    model = converted(window, torch.float64, chunk_size=8, sink_tokens=sinks, **extra)
    assert all((u != 0).any() and (c != 0).all() for u, c in sink_params(model))
    _, mask = ids_and_mask(3, T, pads or (0, 0, 0))
    got, want = module_and_reference(model, T, mask.bool() if pads else None)
    valid = mask.bool() if pads else torch.ones_like(mask, dtype=torch.bool)
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-10, atol=1e-10)


def test_sinks_change_the_output_only_once_they_leave_the_window():
    """The reference check means something only if u, c move the output; and the linear part sees only
    keys older than the window, so while a query's window still holds its row's sinks the sink feature
    cannot act on it: its output is exactly that of the same weights without the feature."""
    window, T = 6, 17
    sinked = converted(window, torch.float64)
    plain = linearize.convert(tiny_model("llama"), LinearizeConfig(feature_dim=6, window=window)).double()
    missing, unexpected = plain.load_state_dict(sinked.state_dict(), strict=False)
    assert not missing and unexpected and all(k.endswith(("sink_u", "sink_c")) for k in unexpected)
    ids, mask = ids_and_mask(T=T, pads=(0, 3, 9))
    with torch.no_grad():
        a, b = sinked(ids, attention_mask=mask).logits, plain(ids, attention_mask=mask).logits
    # a query whose linear set holds no valid key yet; every nonempty one here holds a sink (the row's oldest)
    empty = brute_counts(mask, window) == 0
    assert torch.equal(a[empty], b[empty])
    assert (a - b)[mask.bool() & ~empty].abs().max() > 1e-3


def test_sink_tokens_zero_is_exactly_the_plain_model():
    plain = linearize.convert(tiny_model("llama"), LinearizeConfig(feature_dim=6, window=4))
    zero = linearize.convert(tiny_model("llama"), LinearizeConfig(feature_dim=6, window=4, sink_tokens=0))
    perturb_added_weights(plain)
    perturb_added_weights(zero)
    assert plain.state_dict().keys() == zero.state_dict().keys()
    assert not any("sink" in n for n, _ in zero.named_parameters())
    ids, mask = ids_and_mask()
    with torch.no_grad():
        assert torch.equal(zero(ids, attention_mask=mask).logits, plain(ids, attention_mask=mask).logits)


# -- cached prefill and decode equal the full forward ---------------------------------------------------
def check_cached_equals_full(model, tol, ring):
    ids, mask = ids_and_mask()
    with torch.no_grad():
        full = model(ids, attention_mask=mask, use_cache=False).logits
    for cuts in ((9,), (6, 14), (2,)):
        got, cache = cached(model, ids, mask, cuts)
        valid = mask.bool()
        torch.testing.assert_close(got[valid], full[valid], rtol=tol, atol=tol, msg=lambda m: f"cuts {cuts}: {m}")
        layers = [layer for layer in cache.layers if isinstance(layer, HybridCacheLayer)]
        assert all(torch.equal(layer.valid_count, mask.sum(1)) for layer in layers)
        if ring and model.config.linearize["window"] >= 2:
            assert all(isinstance(layer.held, RingState) for layer in layers)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-10)], ids=["fp32", "fp64"])
@pytest.mark.parametrize("window", [0, 1, 4])
def test_cached_decode_equals_full_forward(decode_path, dtype, tol, window):
    """A prefill (cut at 9), a prefill in 2 pieces (6, 14) and one shorter than S (2), then decode. Left
    padding (0, 5, 12) puts row 2's sinks in the decode steps after the cut at 9, and every row's after 2."""
    check_cached_equals_full(converted(window, dtype), tol, decode_path == "ring")


def test_cached_decode_with_length_norm_equals_full_forward(decode_path):
    model = converted(4, length_norm=True, length_norm_from=L0)
    check_cached_equals_full(model, 1e-4, decode_path == "ring")


def test_ring_decode_then_prefill_again(monkeypatch):
    """prefill (shorter than S) -> ring decode -> a prefill (the ring hands back) -> ring decode, padded."""
    monkeypatch.setattr(attention_mod, "ring_kernel_serves", lambda *a: True)
    model = converted(5)
    ids, mask = ids_and_mask(T=30)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, use_cache=False).logits
    got, _ = cached(model, ids, mask, (2, 3, 4, 11, 18))
    torch.testing.assert_close(got[mask.bool()], full[mask.bool()], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kw", [dict(num_beams=3), dict(do_sample=False)], ids=["beams", "greedy"])
def test_generate_ring_equals_ordered(monkeypatch, kw):
    model = converted(3)
    ids, mask = ids_and_mask(B=3, T=9, pads=(0, 3, 7), seed=4)
    args = dict(attention_mask=mask, max_new_tokens=8, min_new_tokens=8, pad_token_id=0, **kw)
    with torch.no_grad():
        ordered = model.generate(ids, **args)
        monkeypatch.setattr(attention_mod, "ring_kernel_serves", lambda *a: True)
        ring = model.generate(ids, **args)
    assert torch.equal(ring, ordered)


def test_padded_batched_generation_equals_unpadded():
    """Each row's sinks are its own first tokens: a left-padded batch generates what each prompt does alone
    (the 2-token prompt's sinks include 2 generated tokens)."""
    assert_padded_generation_equals_unpadded(converted(3), (7, 12, 2))


def test_a_cache_filled_without_counts_is_refused():
    plain = linearize.convert(tiny_model("llama"), LinearizeConfig(feature_dim=6, window=4))
    model = converted(4)
    ids, _ = ids_and_mask()
    cache = DynamicCache(config=plain.config)
    with torch.no_grad():
        plain(ids[:, :5], **cache_kw(cache))
        with pytest.raises(RuntimeError, match="sink_tokens"):
            model(ids[:, 5:6], **cache_kw(cache))


# -- training, saving, settings -------------------------------------------------------------------------
def test_transfer_trains_u_and_c():
    model = converted(2, sink_tokens=2)
    params = freeze_for_transfer(model)
    names = [n for n in params if n.endswith(("sink_u", "sink_c"))]
    assert len(names) == 2 * len(linearize.linearized_layers(model))
    ids, _ = ids_and_mask(T=16)
    transfer_loss(model, ids).backward()
    for n in names:
        assert params[n].grad is not None and params[n].grad.abs().sum() > 0, n


def test_save_load_round_trip(tmp_path):
    model = converted(4, arch="qwen3", length_norm=True, length_norm_from=L0)
    ids, mask = ids_and_mask()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.linearize["sink_tokens"] == S
    for (u, c), (u2, c2) in zip(sink_params(model), sink_params(loaded)):
        assert torch.equal(u, u2) and torch.equal(c, c2)
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)


def test_a_checkpoint_without_u_and_c_is_refused(tmp_path):
    model = linearize.convert(tiny_model("llama"), LinearizeConfig(feature_dim=6, window=4))
    model.config.linearize["sink_tokens"] = S  # as if saved by a model that had it
    model.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="sink_"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_lora_leaves_u_and_c_alone():
    peft = pytest.importorskip("peft")
    model = converted(3)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and not any("sink" in n for n in trainable)


@pytest.mark.parametrize("kw", [dict(sink_tokens=-1), dict(sink_tokens=2.5), dict(sink_tokens=True), dict(sink_tokens="4")])
def test_bad_settings_are_one_line_errors(kw):
    with pytest.raises(ValueError, match="LinearizeConfig.sink_tokens") as e:
        LinearizeConfig(**kw)
    assert "\n" not in str(e.value)


def test_too_many_features_for_the_kernels_is_a_one_line_error():
    """hedgehog with f = 128 has F = 256 features, the kernels' most: the sink's would be the 257th."""
    with pytest.raises(ValueError, match="257 > 256") as e:
        linearize.convert(tiny_model("llama"), LinearizeConfig(feature_dim=128, sink_tokens=4))
    assert "\n" not in str(e.value)
    linearize.convert(tiny_model("llama"), LinearizeConfig(feature_dim=127, sink_tokens=4))  # 255 + 1 fits


def test_settings_round_trip_through_overrides_yaml_and_the_ablation_file(tmp_path):
    cfg = build_config(None, None, ["linearize.sink_tokens=4"])
    assert cfg.linearize.sink_tokens == 4
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg
    f = tmp_path / "c.yaml"
    f.write_text("linearize: {sink_tokens: 2}\n")
    assert build_config(None, f).linearize == LinearizeConfig(sink_tokens=2)
    with pytest.raises(ValueError, match="--set linearize.sink_tokens=-1: invalid LinearizeConfig.sink_tokens"):
        build_config(None, None, ["linearize.sink_tokens=-1"])
    root = Path(__file__).resolve().parents[2]
    plain = build_config("full", root / "configs/ablations/smollm2-plain.yaml")
    sinked = build_config("full", root / "configs/ablations/smollm2-sink4.yaml")
    assert sinked.linearize == LinearizeConfig(**(plain.linearize.to_dict() | {"sink_tokens": 4}))
    assert dataclasses.replace(sinked, linearize=plain.linearize) == plain  # nothing else differs


def test_the_state_holds_one_more_feature():
    """The ops see F + 1 features: the module says so, and the cached state is that wide."""
    model = converted(4)
    layer = linearize.linearized_layers(model)[0]
    F = layer.feature_map_q.output_dim
    assert layer.num_features == F + 1 and f"F={F + 1}" in repr(layer)
    ids, mask = ids_and_mask(T=9)
    _, cache = cached(model, ids, mask, (9,))
    held = [layer.held for layer in cache.layers if isinstance(layer, HybridCacheLayer)]
    assert held and all(st.S.shape[-2] == F + 1 and st.phi_k.shape[-1] == F + 1 for st in held)
