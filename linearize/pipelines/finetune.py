"""Stage 2, LoRA: low-rank adapters on q/k/v/o (peft), next-token cross-entropy."""

from __future__ import annotations

import torch
import torch.nn as nn

from .config import LoraConfig
from .transfer import autocast


def add_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Wrap ``model`` with peft LoRA adapters; only the adapters are trainable."""
    import peft

    lora = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.targets), bias="none")
    return peft.get_peft_model(model, lora)


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def lm_loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with autocast(input_ids.device):
        return model(input_ids=input_ids, labels=input_ids, use_cache=False).loss.float()
