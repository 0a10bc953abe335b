"""Stage 1, attention transfer: train only the feature maps and window weights (and the length exponents
of ``length_norm``, the sink feature's u and c of ``sink_tokens``) so that each layer's hybrid output
matches its softmax output (MSE, summed over layers), every layer fed the teacher's inputs."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..convert import linearized_layers
from ..modules.attention import LinearizedAttention

#: parameter-name parts that attention transfer trains
TRANSFER_MARKERS = ("feature_map_q", "feature_map_k", "window_logit", "length_alpha", "sink_u", "sink_c")


def transfer_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if any(m in n.split(".") for m in TRANSFER_MARKERS)}


def freeze_for_transfer(model: nn.Module) -> dict[str, nn.Parameter]:
    """Freeze everything but the transfer parameters; return those."""
    params = transfer_parameters(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    return params


def set_mode(model: nn.Module, mode: str, layers: list[LinearizedAttention] | None = None) -> None:
    for layer in layers if layers is not None else linearized_layers(model):
        if mode not in LinearizedAttention.MODES:
            raise ValueError(f"unknown mode {mode!r}")
        layer.mode = mode


class _PassThrough(nn.Module):
    """Stands for a decoder layer that runs elsewhere (an earlier block, another rank): hands its input on."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


@contextmanager
def only_layers(model: nn.Module, start: int, end: int) -> Iterator[None]:
    """Run the decoder on layers ``start..end-1`` only, and make it return what leaves layer ``end - 1``.

    Inside, ``model.base_model(inputs_embeds=h)`` takes ``h`` [B, T, hidden] as the hidden states entering
    layer ``start`` (``input_ids`` as usual when ``start == 0``); HF still builds the masks and the rotary
    embeddings. The layers before ``start`` are stand-ins that pass their input on, so every layer keeps its
    index (Gemma 3 picks each layer's mask and rotary kind by it); the layers from ``end`` on are left out and
    the final norm is skipped, so ``last_hidden_state`` is the hidden states at the block boundary.
    """
    base = model.base_model
    full, norm = base.layers, getattr(base, "norm", None)
    skip = _PassThrough()
    base.layers = nn.ModuleList([skip] * start + list(full)[start:end])
    if norm is not None:
        base.norm = nn.Identity()
    try:
        yield
    finally:
        base.layers = full
        if norm is not None:
            base.norm = norm


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def transfer_loss(model: nn.Module, input_ids: torch.Tensor, block: tuple[int, int] | None = None) -> torch.Tensor:
    """Sum over the trained layers of MSE(hybrid, softmax) before o_proj.

    ``block=(a, b)`` trains decoder layers a..b-1 only: earlier layers run their softmax (cheap, and
    exactly the teacher's inputs at the block boundary), later layers are not run at all.
    """
    end = len(model.base_model.layers) if block is None else block[1]
    return span_transfer_loss(model, input_ids, (0, end), block or (0, end))[0]


def span_transfer_loss(
    model: nn.Module, inputs: torch.Tensor, span: tuple[int, int], block: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The transfer loss of the linearized layers in ``block=(a, b)``, run on layers ``span=(s, b)`` only (s <= a).

    ``inputs``: token ids [B, T] when ``s == 0``, else the teacher's hidden states [B, T, hidden] entering
    layer ``s``. Layers s..a-1 run their softmax; the trained ones run in "transfer" mode, whose layer
    outputs are the teacher's (the hybrid output only feeds the loss). Returns ``(loss, boundary)``:
    ``boundary`` [B, T, hidden] (no graph) is the teacher's hidden states leaving layer b-1, the inputs of
    the next block; so blocks chained span after span give each block exactly its whole-model inputs.
    """
    s, end = span
    a, b = block
    if not s <= a < b == end:
        raise ValueError(f"block {block} must end the span {span} and start inside it")
    layers = linearized_layers(model)
    trained = [l for l in layers if a <= l.layer_idx < b]
    if not trained:
        raise ValueError(f"no linearized layer in block {block}")
    set_mode(model, "softmax", [l for l in layers if s <= l.layer_idx < a])
    set_mode(model, "transfer", trained)
    given = {"input_ids": inputs} if inputs.dtype in (torch.int32, torch.int64) else {"inputs_embeds": inputs}
    try:
        with only_layers(model, s, end), autocast(inputs.device):
            boundary = model.base_model(**given, use_cache=False).last_hidden_state
        loss = sum(F.mse_loss(l.transfer_outputs[0].float(), l.transfer_outputs[1].float()) for l in trained)
    finally:
        for l in trained:
            l.transfer_outputs = None
        set_mode(model, "hybrid")
    return loss, boundary.detach()
