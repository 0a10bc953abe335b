"""``compile=true``: the training stages run the decoder layers through torch.compile; the run is the same run."""

import json

import pytest
import torch
from safetensors.torch import load_file

from linearize.pipelines.compile import compiled_layers, decoder_layers
from linearize.pipelines.config import build_config
from linearize.pipelines.run import RunError, run_conversion

from .tiny_run import tiny_overrides

pytestmark = pytest.mark.usefixtures("own_cache")


def _losses(out):
    return [(l["stage"], l["loss"]) for l in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def test_compiled_run_equals_eager_run(setup, tmp_path):
    """Both stages (stage 2 on KL + CE, so the softmax teacher runs through the compiled layers too): the same
    losses step for step and the same exported weights; every layer compiled, no graph break, and the layers run
    eagerly again after each stage."""
    from torch._dynamo.utils import counters

    model_dir, text = setup
    over = tiny_overrides(text, steps1=4, steps2=3, every=10) + ["stage2_loss.kl_weight=1.0", "stage2_loss.ce_weight=0.3"]
    runs = {}
    for flag in ("false", "true"):
        torch._dynamo.reset()
        counters.clear()
        lines = []
        cfg = build_config(None, None, over + [f"compile={flag}"], model=str(model_dir))
        run_conversion(cfg, tmp_path / flag, echo=lines.append)
        runs[flag] = (_losses(tmp_path / flag), load_file(tmp_path / flag / "model" / "model.safetensors"))
        report = json.loads((tmp_path / flag / "report.json").read_text())
        assert report["environment"]["compiled_layers"] is (flag == "true")
        assert ("compiled decoder layers" in (tmp_path / flag / "report.md").read_text()) is (flag == "true")
        if flag == "true":
            assert any("compile=true" in l for l in lines)
            assert counters["stats"]["unique_graphs"] >= 3  # stage 1; stage 2's student and teacher
            assert not counters["graph_break"], dict(counters["graph_break"])
    # compile may change on resume (it gives the same run), as the placement may; other settings may not
    resumed = build_config(None, None, over + ["compile=true"], model=str(model_dir))
    run_conversion(resumed, tmp_path / "false", echo=lambda m: None, resume=True)
    with pytest.raises(RunError, match="settings differ"):
        run_conversion(build_config(None, None, over + ["compile=true", "stage2.lr=0.5"], model=str(model_dir)),
                       tmp_path / "false", echo=lambda m: None, resume=True)
    (eager, w_eager), (comp, w_comp) = runs["false"], runs["true"]
    assert [s for s, _ in comp] == [s for s, _ in eager] == ["stage1"] * 4 + ["stage2"] * 3
    for (_, a), (_, b) in zip(comp, eager):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-7)
    assert w_comp.keys() == w_eager.keys()
    for k in w_eager:
        torch.testing.assert_close(w_comp[k], w_eager[k], rtol=1e-4, atol=1e-6)


def test_compiled_layers_context():
    from tests.tiny_models import tiny_model

    model = tiny_model("llama")
    layers = decoder_layers(model)
    assert layers == list(model.model.layers)
    with compiled_layers(model) as n:
        assert n == 3 and all(l._compiled_call_impl is not None for l in layers)
    assert all(l._compiled_call_impl is None for l in layers)
    with compiled_layers(model, enabled=False) as n:
        assert n == 0 and all(l._compiled_call_impl is None for l in layers)
    with pytest.raises(ValueError, match="no decoder layer"):
        with compiled_layers(torch.nn.Linear(2, 2)):
            pass


RETRIEVAL = {"softmax_layers": [2], "softmax_heads": [[0, 1]], "feature_map_per_kv_head": True, "sink_tokens": 2,
             "feature_rope": False, "length_norm": True}


@pytest.mark.parametrize("model_type,layout", [("gemma3_text", {}), ("llama", RETRIEVAL)], ids=["gemma3", "llama-retrieval"])
def test_compiled_stage2_step_on_other_layouts(model_type, layout):
    """Gemma 3 (sliding and global layers: two layer kinds in one compiled frame; q/k norms), and a layout of the
    issue-6 conversions (a kept softmax layer, a kept KV head, key maps per KV head, sink tokens, length
    normalization): a stage-2 step on KL + CE equals the eager step, with no graph break."""
    import linearize
    from tests.tiny_models import perturb_added_weights, tiny_model

    from .compile_helpers import eager_and_compiled, stage_setup

    model = linearize.convert(tiny_model(model_type), linearize.LinearizeConfig(feature_dim=6, window=4, **layout))
    perturb_added_weights(model)
    ids = torch.randint(3, 96, (2, 29), generator=torch.Generator().manual_seed(0))
    (l0, g0), (l1, g1) = eager_and_compiled(*stage_setup(model, 2), ids)
    assert l1.item() == pytest.approx(l0.item(), rel=1e-5)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6)
