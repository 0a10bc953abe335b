"""``compile=true``: the training stages run each decoder layer through ``torch.compile`` (regional compilation).

Why: a small model's training step is bound by the host launching kernels. SmolLM2-135M's stage-2 step at
8 x 1024 tokens made ~7.6K launches on the H200, with the GPU busy 21% of the step
(``benchmarks/results/train-step-h200-20261123``): the adapters' matmuls and adds, the norms, RoPE, the casts and
the residual adds each launch on their own. Inductor fuses that glue into a few kernels a layer. The hybrid
attention and the Hedgehog map kernels stay opaque custom ops (``linearize::hybrid_chunk_v4``,
``linearize::hedgehog_pair``), launched as they are.

One compiled function serves every layer of the same structure: the layers' parameters are graph inputs, not
constants (dynamo's inlined built-in modules), so a 30-layer model compiles a handful of graphs, not 30: one per
mode a step runs (stage 1's transfer mode; stage 2's student, and its softmax teacher under a KL loss), per grad
mode, and per distinct layer kind (a kept softmax layer, Gemma 3's sliding and global layers). The compilation is
undone when the stage ends, so evaluations at other lengths and generation run eagerly, as without it.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn

#: Recompiles allowed for one compiled frame. Every decoder layer shares the frame (the layers' shared forward), so
#: its variants add up across layer kinds and modes (above); dynamo's default of 8 would drop the rest to eager.
RECOMPILE_LIMIT = 64


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers, through any wrapper (peft, DDP): transformers' checkpointable layers."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


@contextmanager
def compiled_layers(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Inside, every decoder layer of ``model`` runs compiled (``nn.Module.compile``: its state dict and
    parameters are untouched); yields how many. Compilation happens on each graph's first call."""
    layers = decoder_layers(model) if enabled else []
    if enabled and not layers:
        raise ValueError(f"compile=true: found no decoder layer in {type(model).__name__} to compile")
    for layer in layers:
        layer.compile(dynamic=False)
    try:
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            yield len(layers)
    finally:
        for layer in layers:
            layer._compiled_call_impl = None
