"""Stage 1, attention transfer: train only the feature maps and window weights so that each layer's
hybrid output matches its softmax output (MSE, summed over layers), every layer fed the teacher's inputs."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..convert import linearized_layers
from ..modules.attention import LinearizedAttention

#: parameter-name parts that attention transfer trains
TRANSFER_MARKERS = ("feature_map_q", "feature_map_k", "window_logit")


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


@contextmanager
def only_first_layers(model: nn.Module, n: int) -> Iterator[None]:
    """Run the decoder on its first ``n`` layers only (block-wise transfer needs nothing after the block)."""
    base = model.base_model
    full = base.layers
    base.layers = nn.ModuleList(list(full)[:n])
    try:
        yield
    finally:
        base.layers = full


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def transfer_loss(model: nn.Module, input_ids: torch.Tensor, block: tuple[int, int] | None = None) -> torch.Tensor:
    """Sum over the trained layers of MSE(hybrid, softmax) before o_proj.

    ``block=(a, b)`` trains decoder layers a..b-1 only: earlier layers run their softmax (cheap, and
    exactly the teacher's inputs at the block boundary), later layers are not run at all.
    """
    layers = linearized_layers(model)
    if block is None:
        trained = layers
        n_run = len(model.base_model.layers)
    else:
        a, b = block
        trained = [l for l in layers if a <= l.layer_idx < b]
        n_run = b
        set_mode(model, "softmax", [l for l in layers if l.layer_idx < a])
    if not trained:
        raise ValueError(f"no linearized layer in block {block}")
    set_mode(model, "transfer", trained)
    try:
        with only_first_layers(model, n_run), autocast(input_ids.device):
            model.base_model(input_ids=input_ids, use_cache=False)
        loss = sum(F.mse_loss(l.transfer_outputs[0].float(), l.transfer_outputs[1].float()) for l in trained)
    finally:
        for l in trained:
            l.transfer_outputs = None
        set_mode(model, "hybrid")
    return loss
