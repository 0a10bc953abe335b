"""Where the model's weights live in a multi-process run: ``replicate`` or ``sharded`` (``placement`` setting).

``replicate``: every rank holds the whole model on its device (stage 1 block-wise, each rank running the
frozen softmax forward up to its block; stage 2 data-parallel with DDP, which all-reduces the LoRA adapters'
gradients and nothing else (:mod:`.replicate`); rank 0 merges and exports on its device). The model must fit
one device; it is the faster choice when it does.

``sharded``: no device ever holds the whole model.

- Stage 1 is a pipeline over ranks. Rank r keeps on its device the decoder layers of its span
  ``[s_r, b_r)`` (``s_0 = 0``, ``s_r = b_{r-1}``; its trained block ``[a_r, b_r)`` ends it), the embeddings
  on rank 0, and the small buffer-only modules (rotary) everywhere; everything else is on ``meta`` (no
  memory at all, and any use of it fails loudly). Per micro-batch, rank r receives from rank r-1 the
  teacher's hidden states entering layer ``s_r`` (send/recv: NCCL on CUDA, gloo on CPU), runs its span
  (the trained layers in "transfer" mode, whose outputs are the teacher's), sends what leaves layer
  ``b_r - 1`` on to rank r+1 and trains its block on its own loss. The inputs each block sees are thus the
  ones the whole-model forward gives it, and the run equals the replicate one (tested).
- Evaluations, samples and stage 2 run on a model built on the CPU and sharded with FSDP2 per decoder
  layer straight onto the devices (:func:`.fsdp.shard_model`); every rank joins every forward.
- Export: rank 0 gathers the LoRA adapters to its CPU and merges them into a CPU copy of the model.

The CPU copies are ``from_pretrained`` loads: with the checkpoint's dtype (bf16 on GPU for our aliases and
most hub models) safetensors memory-maps them, so they are shared page cache rather than a private copy
per process; a dtype conversion (e.g. an fp32 checkpoint run in bf16) makes one private copy per process.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from .distributed import Dist
from .fsdp import local_bytes
from .transfer import span_transfer_loss

PLACEMENTS = ("auto", "replicate", "sharded")
#: with several processes ``placement=auto`` replicates a model whose weights take at most this share of each
#: device's memory (the rest is left to activations, which both placements hold alike), else shards it: at bf16,
#: models up to ~4B parameters on an 80 GB GPU, e.g. SmolLM2-135M (0.3% of it) but not Llama-3.1-8B (20%)
AUTO_REPLICATE_SHARE = 0.10


def resolve(placement: str, world: int, weight_bytes: int | None = None, device_bytes: int | None = None) -> tuple[str, str]:
    """(``replicate`` or ``sharded``, why) for a run of ``world`` processes. ``auto`` with several processes needs
    the model's ``weight_bytes`` and the smallest rank's ``device_bytes`` (see :data:`AUTO_REPLICATE_SHARE`)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"invalid placement={placement!r}: choose auto, replicate or sharded")
    if world == 1:
        return "replicate", "one process holds the whole model"
    if placement != "auto":
        return placement, f"placement={placement}"
    share = weight_bytes / device_bytes
    gb = f"the weights ({weight_bytes / 1e9:.2f} GB) take {100 * share:.1f}% of each device's {device_bytes / 1e9:.0f} GB"
    if share <= AUTO_REPLICATE_SHARE:
        return "replicate", f"placement=auto: {gb}, so every device holds them all (placement=sharded shards them)"
    return "sharded", f"placement=auto: {gb}, more than {100 * AUTO_REPLICATE_SHARE:.0f}%, so they are sharded"


def device_bytes(device: torch.device, local_world: int) -> int:
    """Memory of ``device``: a GPU's own; for the CPU, the host's RAM shared out over the processes on it."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(local_world, 1)


def stage1_spans(blocks: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Rank r's span of layers ``[s_r, b_r)``: from the end of the previous block (0 for rank 0) to the end of its own.

    Layers between two trained blocks (e.g. Gemma 3's local layers between its global ones) belong to the
    span of the later one and run there as the teacher; layers after the last block are not needed.
    """
    return [(blocks[r - 1][1] if r else 0, b) for r, (_, b) in enumerate(blocks)]


def place_span(model: nn.Module, span: tuple[int, int], device: torch.device, embeddings: bool) -> None:
    """Keep on ``device`` only decoder layers ``span`` (+ the input embeddings if ``embeddings``, + buffer-only
    modules such as rotary); move every other parameter and buffer to ``meta``, freeing its memory."""
    base = model.base_model
    layers = base.layers
    keep = [layers[i] for i in range(*span)]
    keep += [m for m in base.children() if m is not layers and not any(True for _ in m.parameters())]  # rotary
    if embeddings:
        keep.append(model.get_input_embeddings())
    kept = {id(t) for m in keep for t in [*m.parameters(), *m.buffers()]}
    on_meta: dict[int, nn.Parameter] = {}  # tied weights (head = embeddings) stay one tensor
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and id(p) not in kept and p.device.type != "meta":
                if id(p) not in on_meta:
                    on_meta[id(p)] = nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad)
                module._parameters[name] = on_meta[id(p)]
        for name, buf in list(module._buffers.items()):
            if buf is not None and id(buf) not in kept:
                module._buffers[name] = buf.to("meta")
    for m in keep:
        m.to(device)


def describe(model: nn.Module, device: torch.device) -> dict:
    """What this rank holds: decoder layers with weights here, whether it has the embeddings/head, bytes here."""
    layers = model.base_model.layers
    here = lambda m: any(p.device.type != "meta" for p in m.parameters())  # noqa: E731
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "device": str(device),
        "layers_here": [i for i, layer in enumerate(layers) if here(layer)],
        "embeddings_here": here(model.get_input_embeddings()),
        "off_meta_devices": sorted({p.device.type for p in model.parameters()} - {"meta"}),
        "bytes_here": local_bytes(model),
        "model_bytes": total,
    }


class PipelinedTransferLoss:
    """Stage-1 loss of one rank in the pipeline: receive the boundary states, run the span, send them on.

    A loss function for :func:`.trainer.train_stage` (``parallel="layers"``): every rank gets the whole
    global micro-batch of token ids (rank 0 embeds them; the others need only their shape).
    """

    def __init__(self, span: tuple[int, int], block: tuple[int, int], d: Dist, hidden_size: int, dtype: torch.dtype):
        self.span, self.block, self.d = span, block, d
        self.hidden_size, self.dtype = hidden_size, dtype

    def __call__(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        d = self.d
        if d.rank == 0:
            inputs = input_ids
        else:
            B, T = input_ids.shape
            inputs = d.recv(torch.empty(B, T, self.hidden_size, dtype=self.dtype, device=input_ids.device), d.rank - 1)
        loss, boundary = span_transfer_loss(model, inputs, self.span, self.block)
        if d.rank < d.world - 1:
            if boundary.dtype != self.dtype:
                raise RuntimeError(
                    f"rank {d.rank}: the hidden states leaving layer {self.span[1] - 1} are {boundary.dtype}, "
                    f"but the next rank expects {self.dtype} (the embeddings' dtype)"
                )
            d.send(boundary.contiguous(), d.rank + 1)
        return loss
