"""LinearizeConfig.feature_rope=False: the feature maps read q and k before RoPE (a position-free linear
part). Prefill in pieces and step decode against the full forward: tests/models/test_convert.py."""

import pytest
import torch

import linearize
from linearize import LinearizeConfig

from ..models.test_convert import converted, ids_batch
from ..tiny_models import ARCHS


def test_config_checks_the_value():
    with pytest.raises(ValueError, match="feature_rope"):
        LinearizeConfig(feature_rope="no")
    assert LinearizeConfig().feature_rope is True  # LoLCATs' recipe stays the default
    assert LinearizeConfig.from_dict({"feature_rope": False}).feature_rope is False


@pytest.mark.parametrize("arch", ARCHS)
def test_features_read_q_and_k_before_rope(arch):
    """Same hidden states at positions 0.. and 100..: q, k rotate, the maps' inputs do not."""
    model = converted(arch, window=4, feature_rope=False)
    layer = linearize.linearized_layers(model)[0]
    emb_fn = model.model.rotary_emb
    rotary = (lambda x, pos: emb_fn(x, pos, "full_attention")) if arch == "gemma3_text" else emb_fn
    h = torch.randn(1, 5, model.config.hidden_size)
    outs = []
    for start in (0, 100):
        pos = torch.arange(start, start + 5)[None]
        emb = rotary(h, pos)
        outs.append(layer.project(h, emb))
    (q0, k0, _, fq0, fk0), (q1, k1, _, fq1, fk1) = outs
    assert not torch.allclose(q0, q1) and not torch.allclose(k0, k1)
    torch.testing.assert_close(fq0, fq1, rtol=0, atol=0)
    torch.testing.assert_close(fk0, fk1, rtol=0, atol=0)
    on = linearize.linearized_layers(converted(arch, window=4))[0]
    q, k, _, fq, fk = on.project(h, rotary(h, torch.arange(100, 105)[None]))
    assert fq is q and fk is k


@pytest.mark.parametrize("arch", ARCHS)
def test_changes_the_output(arch):
    ids = ids_batch(T=16)
    with torch.no_grad():
        a = converted(arch, window=4).forward(ids, use_cache=False).logits
        b = converted(arch, window=4, feature_rope=False).forward(ids, use_cache=False).logits
    assert not torch.allclose(a, b, atol=1e-4)


def test_attention_transfer_trains_the_maps_through_it():
    """Transfer mode: the hybrid output (features of pre-RoPE q, k) gets a gradient into the maps."""
    model = converted("llama", window=4, feature_rope=False)
    layers = linearize.linearized_layers(model)
    for layer in layers:
        layer.mode = "transfer"
    model(ids_batch(T=12), use_cache=False)
    loss = sum(((a - b) ** 2).mean() for a, b in (layer.transfer_outputs for layer in layers))
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "feature_map" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_cli_override_and_the_ablation_row_differ_from_plain_only_there():
    import dataclasses
    from pathlib import Path

    from linearize.pipelines.config import build_config

    assert build_config(None, None, ["linearize.feature_rope=false"]).linearize.feature_rope is False
    root = Path(__file__).resolve().parents[2]
    plain = build_config("full", root / "configs/ablations/smollm2-plain.yaml")
    nope = build_config("full", root / "configs/ablations/smollm2-nope.yaml")
    assert nope.linearize == LinearizeConfig(**(plain.linearize.to_dict() | {"feature_rope": False}))
    assert dataclasses.replace(nope, linearize=plain.linearize) == plain  # nothing else differs


def test_results_table_names_the_recipe():
    from linearize.pipelines.results import recipe

    report = {"config": {"data": {"seq_len": 1024}}, "stages": {"stage1": {"steps": 200}, "stage2": {"steps": 200}},
              "linearize": LinearizeConfig(feature_rope=False).to_dict()}
    assert recipe(report) == "w64 hedgehog/f64 nope (200+200 steps @ 1024)"
    report["linearize"] = LinearizeConfig().to_dict()
    assert "nope" not in recipe(report)
