"""One training step of a converted model, eager and with compiled decoder layers (``compile=true``): the
comparison the CPU, interpreter and GPU tests of ``linearize.pipelines.compile`` share."""

from __future__ import annotations

import torch


def stage_setup(model, stage: int):
    """(model, trained parameters, loss function) as the pipeline trains ``stage``: 1 the transfer parameters on
    the transfer loss; 2 LoRA (B moved off zero, so the adapters matter) on KL + 0.3 CE, so the softmax teacher
    runs through the compiled layers too."""
    from linearize.pipelines.config import LoraConfig, Stage2LossConfig
    from linearize.pipelines.finetune import add_lora, lora_parameters, stage2_loss
    from linearize.pipelines.transfer import freeze_for_transfer, transfer_loss

    if stage == 1:
        return model, freeze_for_transfer(model), transfer_loss
    for p in model.parameters():
        p.requires_grad_(False)
    model = add_lora(model, LoraConfig())
    params = lora_parameters(model)
    with torch.no_grad():
        for name, p in params.items():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    return model, params, stage2_loss(Stage2LossConfig(kl_weight=1.0, ce_weight=0.3))


def eager_and_compiled(model, params, loss_fn, ids):
    """[(loss, {name: grad}) eager, the same compiled]; asserts the compiled step made graphs and broke none."""
    from torch._dynamo.utils import counters

    from linearize.pipelines.compile import compiled_layers

    model.train()
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        model.zero_grad()
        with compiled_layers(model, compiled):
            loss = loss_fn(model, ids)
            loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in params.items()}))
        if compiled:
            assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"], dict(counters["graph_break"])
    return results
