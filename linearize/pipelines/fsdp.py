"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for stage 2: every decoder layer, then the root.

Each rank keeps 1/world of every parameter: the frozen base weights as well as the LoRA adapters,
their gradients and their AdamW state, so the model's memory is shared out. Before a layer runs,
FSDP all-gathers its weights; after the backward it reduce-scatters (averages) the gradients of the
trainable ones only. On CUDA the gathered weights are bf16 and gradients are reduced in fp32 (the
sharded LoRA masters stay fp32); on CPU everything is fp32.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from .distributed import Dist


def mixed_precision(device: torch.device) -> MixedPrecisionPolicy:
    if device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()  # fp32 compute and reduction (CPU, gloo)


def decoder_layers(peft_model: nn.Module) -> nn.ModuleList:
    """The decoder layers under a peft-wrapped HF causal LM (``model.model.layers`` for every supported arch)."""
    return peft_model.get_base_model().base_model.layers


def shard_for_lora(peft_model: nn.Module, d: Dist) -> nn.Module:
    """Shard ``peft_model`` in place over all ranks (layers as units, embeddings and head in the root unit)."""
    mesh = init_device_mesh(d.device.type, (d.world,))
    mp = mixed_precision(d.device)
    for layer in decoder_layers(peft_model):
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(peft_model, mesh=mesh, mp_policy=mp)
    return peft_model
