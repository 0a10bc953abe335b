"""Stage 2 of the ``replicate`` placement: data-parallel LoRA by gradient all-reduce (PyTorch's DDP).

Every rank of this placement already holds the whole model on its device, so the only thing to share is
the adapters' gradient. ``torch.distributed._composable.replicate`` (DDP applied in place: the module keeps
its class and methods, here peft's ``disable_adapter`` for the KL teacher) registers hooks that all-reduce
(average) the gradients of the parameters that require one, in buckets overlapped with the backward. The
frozen weights get no hook and no collective, and the adapters stay plain tensors: the optimizer, clipping
and checkpoints see what one process would (DCP writes replicated tensors once and any process count
reads them back).

Why not FSDP2 here: ``fully_shard`` on the adapters alone (the frozen weights as ``ignored_params``) still
runs per-layer pre/post-forward and post-backward hooks, an all-gather and a reduce-scatter per layer, and
the optimizer step on DTensors, all host work in a step that is host-bound for small models. Measured on
the CPU (``scripts/bench_distributed.py --device cpu --model host-proxy``: SmolLM2's structure at tiny widths,
so that a step is its host overhead; 2 processes on 2 cores, gloo; ``results/distributed-bench-cpu-host-proxy``):
0.475 s a step with FSDP2 on the adapters, 0.265 s with this, 0.228 s for one process.
"""

from __future__ import annotations

import torch.nn as nn
from torch.distributed._composable.replicate import replicate

from .distributed import Dist


def replicate_for_lora(peft_model: nn.Module, d: Dist) -> nn.Module:
    """Make ``peft_model``'s training steps data-parallel over all ranks, in place; returns it.

    Every rank must hold the same weights already (the caller broadcasts the LoRA initialisation, so no
    start-up broadcast of the whole model: ``init_sync=False``). The model has no buffer that training
    changes, so none is broadcast each forward (``broadcast_buffers=False``).

    DDP is built here, by every rank together, not at the module's first forward as ``replicate`` would: with
    a KL loss that forward is the teacher's, under peft's ``disable_adapter``, which turns the adapters'
    ``requires_grad`` off, and DDP would find nothing to reduce.
    """
    replicate(peft_model, device_id=d.device, init_sync=False, broadcast_buffers=False, gradient_as_bucket_view=True)
    replicate.state(peft_model).lazy_init()
    return peft_model
