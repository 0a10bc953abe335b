"""Stage 2, LoRA: low-rank adapters on q/k/v/o (peft), next-token cross-entropy."""

from __future__ import annotations

import torch
import torch.nn as nn

from .config import LoraConfig
from .transfer import autocast


def lora_layers(model: nn.Module, cfg: LoraConfig) -> list[int] | None:
    """The decoder layers ``cfg.layers`` names (None: all of them)."""
    if cfg.layers == "all":
        return None
    n = model.config.num_hidden_layers
    if cfg.layers == "linearized":
        from ..convert import linearized_layers

        idx = sorted(m.layer_idx for m in linearized_layers(model))
        if not idx:
            raise ValueError("lora.layers=linearized, but the model has no linearized layer: convert it first, or use all")
        return idx
    bad = [i for i in cfg.layers if i >= n]
    if bad:
        raise ValueError(f"lora.layers {bad} are out of range: the model has {n} layers (0..{n - 1})")
    return sorted(set(cfg.layers))


def add_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Wrap ``model`` with peft LoRA adapters on ``cfg.targets`` in the layers ``cfg.layers`` names; only the
    adapters are trainable."""
    import peft

    layers = lora_layers(model, cfg)
    where = {} if layers is None else {"layers_to_transform": layers, "layers_pattern": "layers"}
    lora = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.targets),
                           bias="none", **where)
    return peft.get_peft_model(model, lora)


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def lm_loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with autocast(input_ids.device):
        return model(input_ids=input_ids, labels=input_ids, use_cache=False).loss.float()
