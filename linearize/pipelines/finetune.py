"""Stage 2, LoRA: low-rank adapters on q/k/v/o (peft), trained on next-token cross-entropy, on a KL divergence
to the unconverted base (distillation), or on both (``Stage2LossConfig``)."""

from __future__ import annotations

import functools
from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from ..convert import linearized_layers
from .config import LoraConfig, Stage2LossConfig
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


@contextmanager
def lora_autocast(model: nn.Module, device: torch.device) -> Iterator[None]:
    """``autocast(device)``; where that is on (CUDA), peft's adapters take their bf16 input as it is.

    By default peft casts an adapter's input to the dtype of its weights (fp32 masters) and autocast casts it
    straight back to bf16 for the matmul: two copies of the activation an adapter in the forward, two more in
    the backward, and a bf16 copy kept for the backward beside the one the base layer keeps. Without the
    round trip the values are the same (bf16 -> fp32 -> bf16 is exact), with fewer launches in a step that
    is host-bound for small models, and less memory.
    """
    from peft.helpers import disable_input_dtype_casting

    with autocast(device):
        with disable_input_dtype_casting(model, active=torch.is_autocast_enabled(device.type)):
            yield


def lm_loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with lora_autocast(model, input_ids.device):
        return model(input_ids=input_ids, labels=input_ids, use_cache=False).loss.float()


@contextmanager
def as_teacher(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as the base it was converted from: every linearized layer in softmax mode (the base's own
    projections, which LoRA does not touch once disabled) and peft's adapters off. Modes are restored after."""
    layers = linearized_layers(model)
    modes = [layer.mode for layer in layers]
    disable = getattr(model, "disable_adapter", None)
    try:
        for layer in layers:
            layer.mode = "softmax"
        with disable() if disable is not None else nullcontext():
            yield
    finally:
        for layer, mode in zip(layers, modes):
            layer.mode = mode


def _kl_sum(s_NV: torch.Tensor, t_NV: torch.Tensor, temperature: float) -> torch.Tensor:
    s = F.log_softmax(s_NV.float() / temperature, dim=-1)
    t = F.log_softmax(t_NV.float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="sum")


@functools.cache
def _kl_sum_compiled() -> Callable:
    """``_kl_sum`` through torch.compile (``compile=true``): the casts, log-softmaxes and KL over a chunk's [rows, V]
    fp32 tensors fused into few passes (each unfused pass over SmolLM2's 1024 x 49K chunk moves ~200 MB). Built on
    first use: importing dynamo takes seconds."""
    return torch.compile(_kl_sum, dynamic=False)


def kl_to_teacher(student_BTV: torch.Tensor, teacher_BTV: torch.Tensor, temperature: float = 1.0,
                  chunk_rows: int = 1024, compiled: bool = False) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) between next-token distributions, in fp32, times
    ``temperature**2`` so that gradients keep their scale across temperatures.

    Computed ``chunk_rows`` positions at a time under activation checkpointing: the fp32 log-probabilities
    of a [B*T, V] batch would otherwise be kept for the backward (Gemma 3's 262K vocabulary at 8 x 1024
    tokens: 8.6 GB each); this way one chunk's exist at a time, recomputed in the backward. ``compiled``: each chunk's
    KL through torch.compile (the same values)."""
    kl_sum = _kl_sum_compiled() if compiled else _kl_sum
    V = student_BTV.shape[-1]
    s, t = student_BTV.reshape(-1, V), teacher_BTV.reshape(-1, V)
    total = student_BTV.new_zeros((), dtype=torch.float32)
    for i in range(0, s.shape[0], chunk_rows):
        part = (s[i:i + chunk_rows], t[i:i + chunk_rows], temperature)
        if torch.is_grad_enabled() and s.requires_grad:
            total = total + torch.utils.checkpoint.checkpoint(kl_sum, *part, use_reentrant=False)
        else:
            total = total + kl_sum(*part)
    return total / s.shape[0] * temperature**2


def stage2_loss(cfg: Stage2LossConfig, compiled: bool = False) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """The stage-2 loss function ``(model, input_ids [B, T]) -> scalar`` that ``cfg`` names; ``compiled``
    (``compile=true``): its KL term through torch.compile."""
    cfg.validate()
    if cfg.kl_weight == 0:
        if cfg.ce_weight == 1:
            return lm_loss
        return lambda model, input_ids: cfg.ce_weight * lm_loss(model, input_ids)

    def loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        with lora_autocast(model, input_ids.device):
            with torch.no_grad(), as_teacher(model):
                teacher = model(input_ids=input_ids, use_cache=False).logits
            out = model(input_ids=input_ids, labels=input_ids if cfg.ce_weight else None, use_cache=False)
        total = cfg.kl_weight * kl_to_teacher(out.logits, teacher, cfg.temperature, compiled=compiled)
        if cfg.ce_weight:
            total = total + cfg.ce_weight * out.loss.float()
        return total

    return loss
