"""FSDP2 (``torch.distributed.fsdp.fully_shard``): every decoder layer, then the causal LM as the root.

Each rank keeps 1/world of every parameter: the frozen base weights as well as the LoRA adapters,
their gradients and their AdamW state, so the model's memory is shared out. Before a layer runs,
FSDP all-gathers its weights; after the backward it reduce-scatters (averages) the gradients of the
trainable ones only. On CUDA the gathered weights are bf16 and gradients are reduced in fp32 (the
sharded LoRA masters stay fp32); on CPU everything is fp32.

A model on the CPU is sharded straight onto the mesh's device: ``fully_shard`` moves one unit's full
weights to the GPU, keeps this rank's shard and frees the rest, so no GPU ever holds the whole model
(the sharded placement builds its models this way; see :mod:`.placement`). The replicate placement's stage 2
does not use FSDP: its ranks hold the whole model anyway (:mod:`.replicate`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from .distributed import Dist


def mixed_precision(device: torch.device) -> MixedPrecisionPolicy:
    if device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()  # fp32 compute and reduction (CPU, gloo)


def _mesh(device_type: str, world: int) -> DeviceMesh:
    return init_device_mesh(device_type, (world,))  # (over the whole world it reuses the default group)


def causal_lm(model: nn.Module) -> nn.Module:
    """The HF ``*ForCausalLM`` inside a peft wrapper (or ``model`` itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of an HF causal LM, peft-wrapped or not (``model.model.layers`` for every supported arch)."""
    return causal_lm(model).base_model.layers


def shard_model(model: nn.Module, d: Dist) -> nn.Module:
    """Shard ``model`` (peft-wrapped or not) in place over all ranks: layers as units, embeddings/norm/head in the root.

    The root is the causal LM, not the peft wrapper: HF ``generate`` (and peft's) calls the causal LM's own
    forward, which must be the one that gathers the root's weights.
    """
    mesh = _mesh(d.device.type, d.world)
    kw = {"mesh": mesh, "mp_policy": mixed_precision(d.device)}
    for layer in decoder_layers(model):
        fully_shard(layer, **kw)
    fully_shard(causal_lm(model), **kw)
    return model


def local_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers this rank holds off ``meta`` (a sharded parameter counts its local shard)."""
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        local = t.to_local() if hasattr(t, "to_local") else t
        if local.device.type != "meta":
            total += local.numel() * local.element_size()
    return total
