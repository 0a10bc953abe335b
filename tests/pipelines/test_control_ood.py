"""The softmax control (``convert=false``: stage-2 LoRA only, no conversion) and out-of-domain perplexity."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import linearize
from linearize.pipelines.config import build_config
from linearize.pipelines.run import RunError, run_conversion

from .tiny_run import tiny_overrides


pytestmark = pytest.mark.usefixtures("own_cache")


def test_control_trains_lora_on_the_softmax_model(setup_ood, tmp_path):
    model_dir, text, _ = setup_ood
    over = tiny_overrides(text, steps1=0, steps2=4) + ["convert=false"]
    report = run_conversion(build_config(None, None, over, model=str(model_dir)), tmp_path / "run", echo=lambda m: None)
    assert set(report["evals"]) == {"base", "stage2"}  # no swapped / stage-1 model exists
    assert list(report["stages"]) == ["stage2"] and report["stages"]["stage2"]["steps"] == 4
    assert report["convert"] is False and report["linearize"] is None
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {l["stage"] for l in lines} == {"stage2"}
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert not linearize.is_linearized(exported) and not any("lora" in n for n, _ in exported.named_parameters())
    # the merged LoRA moved the attention projections (lr 1e-3, 4 steps), and nothing else
    base = load_file(model_dir / "model.safetensors")
    new = {n: p.detach() for n, p in exported.named_parameters()}
    moved = {n for n in base if n in new and not torch.equal(base[n], new[n])}
    assert moved and all(n.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "o_proj") for n in moved)
    assert "softmax, not converted" in (tmp_path / "run" / "report.md").read_text()


def test_control_and_linearized_runs_see_the_same_stage2_batches(setup_ood, tmp_path):
    """Same data, same order: the control differs from a linearized run only by the conversion."""
    model_dir, text, _ = setup_ood
    ctl = run_conversion(build_config(None, None, tiny_overrides(text, 0, 3) + ["convert=false"], model=str(model_dir)),
                         tmp_path / "ctl", echo=lambda m: None)
    lin = run_conversion(build_config(None, None, tiny_overrides(text, 0, 3), model=str(model_dir)), tmp_path / "lin", echo=lambda m: None)
    assert ctl["stages"]["stage2"]["tokens"] == lin["stages"]["stage2"]["tokens"]
    assert ctl["evals"]["base"] == lin["evals"]["base"]  # same validation rows


@pytest.mark.parametrize("extra,match", [
    (["stage1.steps=3"], "stage1.steps=0"),
    (["stage1.steps=0", "stage2.steps=0"], "stage2.steps > 0"),
    (["stage1.steps=0", "transfer_block=[0, 1]"], "transfer_block"),
    (["stage1.steps=0", "convert=maybe"], "convert"),
])
def test_control_bad_settings_are_one_line_errors(extra, match):
    with pytest.raises(ValueError, match=match) as e:
        build_config(None, None, ["convert=false", *extra])
    assert "\n" not in str(e.value)


def test_out_of_domain_perplexity_for_every_model(setup_ood, tmp_path):
    model_dir, text, other = setup_ood
    over = tiny_overrides(text, steps1=2, steps2=2) + [f"data.eval_ood_source={other}"]
    report = run_conversion(build_config(None, None, over, model=str(model_dir)), tmp_path / "run", echo=lambda m: None)
    assert set(report["evals_ood"]) == set(report["evals"]) == {"base", "swapped", "stage1", "stage2"}
    for key, e in report["evals_ood"].items():
        assert e["tokens"] > 0 and e["ppl"] > 1 and e["ppl"] != report["evals"][key]["ppl"]
    md = (tmp_path / "run" / "report.md").read_text()
    assert "out of domain" in md and str(other) in md
    # resumed after the end: nothing is evaluated again, the same numbers come back
    again = run_conversion(build_config(None, None, over, model=str(model_dir)), tmp_path / "run", resume=True, echo=lambda m: None)
    assert again["evals_ood"] == report["evals_ood"]


def test_out_of_domain_text_must_not_be_training_text(setup_ood, tmp_path):
    model_dir, text, other = setup_ood
    over = tiny_overrides(text) + [f"data.source={text}+{other}", f"data.eval_ood_source={other}"]
    with pytest.raises(RunError, match="shares") as e:
        run_conversion(build_config(None, None, over, model=str(model_dir)), tmp_path / "run", echo=lambda m: None)
    assert "\n" not in str(e.value)


def test_control_with_two_processes_equals_one(setup_ood, tmp_path):
    """FSDP2 stage 2 on the unconverted model (the rebuild after sharding skips the conversion)."""
    import torch.distributed as dist

    from .test_distributed import losses, one_and_two_processes
    from .test_resume import env

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    model_dir, text, _ = setup_ood
    one, two = tmp_path / "one", tmp_path / "two"
    one_and_two_processes(model_dir, one, two, tiny_overrides(text, 0, 4) + ["convert=false", "stage2.batch_size=4", "stage2.grad_accum=2"],
                          env(tmp_path / "cache"))
    l1, l2 = losses(one, "stage2"), losses(two, "stage2")
    assert len(l1) == len(l2) == 4
    torch.testing.assert_close(torch.tensor(l2), torch.tensor(l1), rtol=1e-5, atol=0)
    m1, m2 = load_file(one / "model" / "model.safetensors"), load_file(two / "model" / "model.safetensors")
    assert m1.keys() == m2.keys() and not any("feature_map" in k for k in m1)
    for k in m1:
        torch.testing.assert_close(m2[k], m1[k], rtol=1e-4, atol=1e-6)
    r2 = json.loads((two / "report.json").read_text())
    assert r2["environment"]["processes"] == 2 and r2["linearize"] is None and set(r2["evals"]) == {"base", "stage2"}
