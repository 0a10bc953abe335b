"""The whole conversion pipeline on a tiny model: both stages, export, reload, generate, errors."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import linearize
from linearize.pipelines.config import build_config
from linearize.pipelines.run import RunError, run_conversion
from linearize.pipelines.trainer import NonFiniteLossError

from .tiny_run import tiny_overrides


pytestmark = pytest.mark.usefixtures("own_cache")


def test_both_stages_export_reload_generate(setup, tmp_path):
    model_dir, text = setup
    cfg = build_config(None, None, tiny_overrides(text), model=str(model_dir))
    report = run_conversion(cfg, tmp_path / "run", echo=lambda m: None)
    out = tmp_path / "run"
    for name in ("report.md", "report.json", "metrics.jsonl", "plots/loss_stage1.png", "plots/loss_stage2.png", "model/config.json"):
        assert (out / name).exists(), name
    assert set(report["evals"]) == {"base", "swapped", "stage1", "stage2"}
    assert report["stages"]["stage1"]["steps"] == 6 and report["stages"]["stage2"]["steps"] == 4
    # stage 1 trains only the added weights: feature maps (4 q + 4 k heads, 8x4 each) and 4 window logits, per layer
    assert report["stages"]["stage1"]["trainable_params"] == 2 * (4 * 8 * 4 * 2 + 4)
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2, 3, 4, 5, 6, 1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(l["loss"])) for l in lines)

    model = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    tok = AutoTokenizer.from_pretrained(out / "model")
    assert linearize.is_linearized(model) and not any("lora" in n for n, _ in model.named_parameters())
    ids = tok("the sea sails", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 6
    md = (out / "report.md").read_text()
    assert "after attention transfer" in md and "Samples" in md


def test_stage1_reduces_transfer_loss(setup, tmp_path):
    model_dir, text = setup
    over = tiny_overrides(text, steps1=30, steps2=0, every=30) + ["stage1.lr=3e-2"]
    run_conversion(build_config(None, None, over, model=str(model_dir)), tmp_path / "run", echo=lambda m: None)
    losses = [json.loads(l)["loss"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


def test_existing_run_needs_resume_and_same_settings(setup, tmp_path):
    model_dir, text = setup
    cfg = build_config(None, None, tiny_overrides(text, 2, 0), model=str(model_dir))
    run_conversion(cfg, tmp_path / "run", echo=lambda m: None)
    with pytest.raises(RunError, match="--resume"):
        run_conversion(cfg, tmp_path / "run", echo=lambda m: None)
    other = build_config(None, None, tiny_overrides(text, 3, 0), model=str(model_dir))
    with pytest.raises(RunError, match="settings differ"):
        run_conversion(other, tmp_path / "run", resume=True, echo=lambda m: None)


def test_sequence_longer_than_model_takes(setup, tmp_path):
    model_dir, text = setup
    cfg = build_config(None, None, tiny_overrides(text) + ["data.seq_len=4096"], model=str(model_dir))
    with pytest.raises(RunError, match="longer than the model takes"):
        run_conversion(cfg, tmp_path / "run", echo=lambda m: None)


def test_nan_loss_stops_with_clear_error(setup, tmp_path):
    model_dir, text = setup
    # lr=1e30 sends t2r weights to ~1e30 after one step: phi_q.phi_k overflows and the loss is NaN
    over = tiny_overrides(text, 4, 0) + ["stage1.lr=1e30", "stage1.max_grad_norm=0", "linearize.feature_map=t2r", "checkpoint_every=1"]
    cfg = build_config(None, None, over, model=str(model_dir))
    with pytest.raises(NonFiniteLossError, match="lower stage1.lr") as e:
        run_conversion(cfg, tmp_path / "run", echo=lambda m: None)
    assert "\n" not in str(e.value)
    # the last good checkpoint (after step 1, before the NaN) is kept and loads
    from linearize.pipelines.checkpoint import CheckpointManager

    last = CheckpointManager(tmp_path / "run" / "checkpoints").latest()
    assert last.stage == "stage1" and last.step >= 1
    assert all(bool(torch.isfinite(w).all()) for w in last.load_weights().values())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"preset": "gpu-huge"}, "unknown preset"),
        ({"overrides": ["stage1.lrr=1"]}, "unknown config key 'stage1.lrr'"),
        ({"overrides": ["nonsense"]}, "key=value"),
        ({"overrides": ["stage1.scheduler=linear"]}, "scheduler"),
        ({"overrides": ["linearize.window=-3"]}, "window"),
    ],
)
def test_bad_settings_are_one_line_errors(kwargs, match):
    with pytest.raises(ValueError, match=match) as e:
        build_config(kwargs.get("preset"), None, kwargs.get("overrides"))
    assert "\n" not in str(e.value)


def test_unreadable_data_file(setup, tmp_path):
    model_dir, _ = setup
    cfg = build_config(None, None, tiny_overrides(tmp_path / "missing.txt"), model=str(model_dir))
    with pytest.raises((FileNotFoundError, ValueError, RuntimeError), match="missing.txt"):
        run_conversion(cfg, tmp_path / "run", echo=lambda m: None)


def test_block_wise_transfer_loss_equals_full_model_per_layer():
    """Each layer is fed the teacher's inputs, so training a block sees exactly the per-layer losses of the full run."""
    from linearize.pipelines.transfer import transfer_loss

    from ..tiny_models import perturb_added_weights, tiny_model

    model = linearize.convert(tiny_model("llama"), linearize.LinearizeConfig(window=3, feature_dim=4))
    perturb_added_weights(model)
    ids = torch.randint(3, 96, (2, 24))
    with torch.no_grad():
        full = transfer_loss(model, ids)
        blocks = [transfer_loss(model, ids, block=(i, i + 1)) for i in range(3)]
        two = transfer_loss(model, ids, block=(1, 3))
    torch.testing.assert_close(sum(blocks), full)
    torch.testing.assert_close(two, blocks[1] + blocks[2])


def test_block_wise_run_trains_only_its_block(setup, tmp_path):
    model_dir, text = setup
    over = tiny_overrides(text, steps1=3, steps2=0, every=3) + ["transfer_block=[1, 2]"]
    report = run_conversion(build_config(None, None, over, model=str(model_dir)), tmp_path / "run", echo=lambda m: None)
    assert report["stages"]["stage1"]["trainable_params"] == 4 * 8 * 4 * 2 + 4  # layer 1 only


def test_length_norm_run_trains_saves_and_exports_alpha(setup, tmp_path):
    """Stage 1 trains length_alpha (4 per layer more); stage1_final holds it; the export keeps it unchanged
    by the LoRA merge; the exported model reloads with it."""
    from safetensors.torch import load_file

    model_dir, text = setup
    over = tiny_overrides(text, steps1=4, steps2=2, every=4) + ["linearize.length_norm=true", "linearize.length_norm_from=4"]
    report = run_conversion(build_config(None, None, over, model=str(model_dir)), tmp_path / "run", echo=lambda m: None)
    assert report["stages"]["stage1"]["trainable_params"] == 2 * (4 * 8 * 4 * 2 + 4 + 4)
    stage1 = load_file(tmp_path / "run" / "stage1_final.safetensors")
    trained = {k: v for k, v in stage1.items() if k.endswith("length_alpha")}
    assert len(trained) == 2 and all(v.abs().max() > 0 for v in trained.values())
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model").eval()
    assert model.config.linearize["length_norm"] is True
    exported = {n: p for n, p in model.named_parameters() if n.endswith("length_alpha")}
    assert exported.keys() == trained.keys()
    for k in trained:
        torch.testing.assert_close(exported[k].float(), trained[k].float(), rtol=0, atol=0)
    assert "length normalization from 4 keys" in (tmp_path / "run" / "report.md").read_text()


def test_sink_run_trains_saves_and_exports_u_and_c(setup, tmp_path):
    """Stage 1 trains sink_u [4, 8] and sink_c [4] per layer; stage1_final holds them; the export keeps
    them unchanged by the LoRA merge; the exported model reloads with them."""
    from safetensors.torch import load_file

    model_dir, text = setup
    over = tiny_overrides(text, steps1=4, steps2=2, every=4) + ["linearize.sink_tokens=2"]
    report = run_conversion(build_config(None, None, over, model=str(model_dir)), tmp_path / "run", echo=lambda m: None)
    assert report["stages"]["stage1"]["trainable_params"] == 2 * (4 * 8 * 4 * 2 + 4 + 4 * 8 + 4)
    stage1 = load_file(tmp_path / "run" / "stage1_final.safetensors")
    trained = {k: v for k, v in stage1.items() if k.endswith(("sink_u", "sink_c"))}
    assert len(trained) == 4 and all(v.abs().max() > 0 for v in trained.values())
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model").eval()
    assert model.config.linearize["sink_tokens"] == 2
    exported = {n: p for n, p in model.named_parameters() if n.endswith(("sink_u", "sink_c"))}
    assert exported.keys() == trained.keys()
    for k in trained:
        torch.testing.assert_close(exported[k].float(), trained[k].float(), rtol=0, atol=0)
    assert "2 sink tokens" in (tmp_path / "run" / "report.md").read_text()
