"""``stage2_loss``: stage 2 on cross-entropy, on a KL divergence to the unconverted base (distillation), or both."""

import copy
import json

import pytest
import torch

import linearize
from linearize.pipelines.config import LoraConfig, Stage2LossConfig, build_config
from linearize.pipelines.finetune import add_lora, as_teacher, kl_to_teacher, lm_loss, stage2_loss
from linearize.pipelines.results import recipe
from linearize.pipelines.run import run_conversion

from ..tiny_models import ARCHS, perturb_added_weights, tiny_model
from .tiny_run import tiny_overrides


pytestmark = pytest.mark.usefixtures("own_cache")


def _adapted(arch: str):
    """(the base, a converted copy with perturbed maps and LoRA adapters whose B is not zero)."""
    base = tiny_model(arch, num_hidden_layers=3)
    model = copy.deepcopy(base)
    # Gemma's tiny model has one global layer (1), which is all that gets converted; elsewhere keep layer 1 softmax
    keep = [] if arch == "gemma3_text" else [1]
    linearize.convert(model, linearize.LinearizeConfig(feature_dim=4, window=4, softmax_layers=keep))
    perturb_added_weights(model)
    for p in model.parameters():
        p.requires_grad_(False)
    peft_model = add_lora(model, LoraConfig(r=4))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return base, peft_model


@pytest.mark.parametrize("arch", ARCHS)
def test_the_teacher_is_the_unconverted_base_and_modes_come_back(arch):
    base, peft_model = _adapted(arch)
    ids = torch.randint(3, 96, (2, 19), generator=torch.Generator().manual_seed(0))
    want = base(input_ids=ids, use_cache=False).logits
    student = peft_model(input_ids=ids, use_cache=False).logits
    with as_teacher(peft_model):
        got = peft_model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (student - want).abs().max() > 1e-2  # the student is not the teacher: the test has teeth
    # afterwards the model is the student again, adapters and hybrid layers included
    torch.testing.assert_close(peft_model(input_ids=ids, use_cache=False).logits, student, rtol=0, atol=0)


def test_modes_come_back_when_the_teacher_pass_fails():
    _, peft_model = _adapted("llama")
    with pytest.raises(RuntimeError, match="boom"):
        with as_teacher(peft_model):
            raise RuntimeError("boom")
    modes = {m.mode for m in peft_model.modules() if hasattr(m, "transfer_outputs") or type(m).__name__ == "LinearizedAttention"}
    assert modes == {"hybrid"}


def test_kl_matches_its_definition_in_float64():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(3, 5, 11, generator=g, dtype=torch.float64), torch.randn(3, 5, 11, generator=g, dtype=torch.float64)
    for tau in (1.0, 2.0):
        p, logq = torch.softmax(t / tau, -1), torch.log_softmax(s / tau, -1)
        want = (p * (p.log() - logq)).sum(-1).mean() * tau**2
        torch.testing.assert_close(kl_to_teacher(s, t, tau).double(), want, rtol=1e-5, atol=1e-7)
    assert kl_to_teacher(s, s).abs() < 1e-6


def test_kl_in_chunks_equals_kl_at_once_with_gradients():
    g = torch.Generator().manual_seed(2)
    t = torch.randn(2, 7, 13, generator=g, dtype=torch.float64)
    s1 = torch.randn(2, 7, 13, generator=g, dtype=torch.float64, requires_grad=True)
    s2 = s1.detach().clone().requires_grad_(True)
    a, b = kl_to_teacher(s1, t, 1.5, chunk_rows=3), kl_to_teacher(s2, t, 1.5, chunk_rows=10**6)  # 14 rows: 3+3+3+3+2
    torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    a.backward()
    b.backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-5, atol=1e-9)
    with torch.no_grad():
        torch.testing.assert_close(kl_to_teacher(s1, t, 1.5, chunk_rows=3), a.detach())


def test_compiled_kl_equals_eager_kl_with_gradients():
    """compile=true's KL (each chunk's through torch.compile, checkpointed): the eager values and gradients, a
    partial last chunk included (14 rows in chunks of 4)."""
    g = torch.Generator().manual_seed(3)
    t = torch.randn(2, 7, 13, generator=g)
    s1 = torch.randn(2, 7, 13, generator=g, requires_grad=True)
    s2 = s1.detach().clone().requires_grad_(True)
    a, b = kl_to_teacher(s1, t, 1.5, chunk_rows=4, compiled=True), kl_to_teacher(s2, t, 1.5, chunk_rows=4)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    a.backward()
    b.backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-5, atol=1e-8)


def test_the_losses_it_builds():
    _, peft_model = _adapted("llama")
    ids = torch.randint(3, 96, (2, 17), generator=torch.Generator().manual_seed(0))
    assert stage2_loss(Stage2LossConfig()) is lm_loss
    ce = lm_loss(peft_model, ids)
    torch.testing.assert_close(stage2_loss(Stage2LossConfig(ce_weight=0.5))(peft_model, ids), 0.5 * ce)
    kl = stage2_loss(Stage2LossConfig(ce_weight=0, kl_weight=1))(peft_model, ids)
    with torch.no_grad(), as_teacher(peft_model):
        teacher = peft_model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(kl, kl_to_teacher(peft_model(input_ids=ids, use_cache=False).logits, teacher))
    mix = stage2_loss(Stage2LossConfig(ce_weight=1, kl_weight=2))(peft_model, ids)
    torch.testing.assert_close(mix, ce + 2 * kl)
    # gradients reach the adapters, and the teacher pass adds none
    mix.backward()
    grads = [p.grad for p in peft_model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("items,match", [
    (["stage2_loss.ce_weight=0"], "not both 0"),
    (["stage2_loss.kl_weight=-1"], "both >= 0"),
    (["stage2_loss.temperature=0"], "temperature"),
    (["convert=false", "stage1.steps=0", "stage2_loss.ce_weight=0", "stage2_loss.kl_weight=1"], "into itself"),
])
def test_bad_settings_are_one_line_errors(items, match):
    with pytest.raises(ValueError, match=match) as e:
        build_config(None, None, items)
    assert "\n" not in str(e.value)


def test_a_distilled_run_moves_toward_the_base_and_says_so(setup, tmp_path):
    model_dir, text = setup

    def run(name, *extra):
        # no attention transfer: the untrained maps leave the student far from its teacher, for LoRA to close
        cfg = build_config(None, None, tiny_overrides(text, 0, 8) + ["stage2.lr=1e-2", *extra], model=str(model_dir))
        return run_conversion(cfg, tmp_path / name, echo=lambda m: None)

    kl = run("kl", "stage2_loss.ce_weight=0", "stage2_loss.kl_weight=1")
    losses = [json.loads(line)["loss"] for line in (tmp_path / "kl" / "metrics.jsonl").read_text().splitlines()
              if json.loads(line).get("stage") == "stage2" and "loss" in json.loads(line)]
    assert len(losses) == 8 and all(v >= 0 for v in losses) and sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses
    assert kl["config"]["stage2_loss"] == {"ce_weight": 0.0, "kl_weight": 1.0, "temperature": 1.0}
    assert recipe(kl).endswith(" kl lr0.01 (0+8 steps @ 32)")  # (the learning rate is not the default 1e-4)
    both = run("both", "stage2_loss.kl_weight=0.5")
    assert " ce+0.5kl " in recipe(both)
    assert " kl" not in recipe(run("ce"))


def test_distillation_with_two_sharded_processes_equals_one(setup, tmp_path):
    """FSDP2 shards (gloo): the teacher pass (softmax modes, adapters off) runs on the sharded model as well."""
    import torch.distributed as dist

    from .test_distributed import losses, one_and_two_processes
    from .test_resume import env

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    model_dir, text = setup
    one, two = tmp_path / "one", tmp_path / "two"
    one_and_two_processes(model_dir, one, two, tiny_overrides(text, 2, 4) + [
        "stage2.batch_size=4", "stage2_loss.kl_weight=1", "stage2_loss.ce_weight=0.5"], env(tmp_path / "cache"))
    l1, l2 = losses(one, "stage2"), losses(two, "stage2")
    assert len(l1) == len(l2) == 4 and all(v > 0 for v in l1)
    torch.testing.assert_close(torch.tensor(l2), torch.tensor(l1), rtol=1e-5, atol=0)
