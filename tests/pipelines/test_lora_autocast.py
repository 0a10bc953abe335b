"""Stage 2's autocast lets peft's adapters take their bf16 input as it is: same loss and gradients, fewer copies.

CUDA's bf16 autocast is played by the CPU's (``finetune.autocast`` patched), on a bf16 model with fp32 adapters,
as the pipeline trains on CUDA.
"""

from __future__ import annotations

import peft
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from linearize import LinearizeConfig, convert
from linearize.pipelines import finetune
from linearize.pipelines.config import LoraConfig, Stage2LossConfig
from tests.ops.helpers import CountOps


def bf16_lora_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg)
    convert(model, LinearizeConfig(window=4, feature_dim=8, chunk_size=8))
    model.to(torch.bfloat16)
    for p in model.parameters():
        p.requires_grad_(False)
    model = finetune.add_lora(model, LoraConfig(r=4))
    with torch.no_grad():  # B starts at zero: give the adapters a say in the output
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


def adapters(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]


def run(model, loss_fn, ids):
    with CountOps() as count:
        loss = loss_fn(model, ids)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, count.ops


@pytest.mark.parametrize("loss_cfg", [Stage2LossConfig(), Stage2LossConfig(ce_weight=0.5, kl_weight=1.0)], ids=["ce", "ce+kl"])
def test_same_loss_and_grads_fewer_copies(monkeypatch, loss_cfg):
    monkeypatch.setattr(finetune, "autocast", lambda device: torch.autocast("cpu", dtype=torch.bfloat16))
    ids = torch.randint(0, 97, (2, 21), generator=torch.Generator().manual_seed(1))
    model = bf16_lora_model()
    assert {p.dtype for n, p in model.named_parameters() if p.requires_grad} == {torch.float32}  # fp32 masters
    n_adapters = len(adapters(model))
    loss_fn = finetune.stage2_loss(loss_cfg)

    ours = run(model, loss_fn, ids)
    model.zero_grad(set_to_none=True)
    # the reference: peft's own casting left on (as before)
    from contextlib import nullcontext

    monkeypatch.setattr("peft.helpers.disable_input_dtype_casting", lambda model, active=True: nullcontext())
    ref = run(model, loss_fn, ids)

    assert torch.isfinite(ours[0]) and torch.equal(ours[0], ref[0])
    assert ours[1].keys() == ref[1].keys() and len(ours[1]) == 2 * n_adapters
    for n in ref[1]:
        assert torch.equal(ours[1][n], ref[1][n]), n
    assert any(g.abs().sum() > 0 for g in ours[1].values())
    # each adapter's forward skips the fp32 copy of its input and autocast's bf16 copy of that (the KL's teacher
    # runs with the adapters disabled)
    assert ref[2]["_to_copy"] - ours[2]["_to_copy"] >= 2 * n_adapters
    # and the flags are restored afterwards
    assert all(getattr(m, "cast_input_dtype_enabled", True) for m in adapters(model))


def test_without_autocast_peft_still_casts(monkeypatch):
    """On the CPU (no autocast) a bf16 base with fp32 adapters needs peft's cast: it stays on."""
    model = bf16_lora_model()
    seen = []
    first = adapters(model)[0]
    first.register_forward_pre_hook(lambda m, args: seen.append(getattr(m, "cast_input_dtype_enabled", True)))
    ids = torch.randint(0, 97, (1, 9))
    loss = finetune.lm_loss(model, ids)
    assert seen == [True] and torch.isfinite(loss)
