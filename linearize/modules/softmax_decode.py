"""The kept softmax layers' decode step on the Triton kernel, through transformers' attention interface.

A kept layer is the base model's own attention module; it calls ``ALL_ATTENTION_FUNCTIONS[config.
_attn_implementation]``. ``decode_attention_forward`` is registered there as ``"linearize_decode"``: it
sends one-token steps on CUDA to ``linearize.ops.triton.softmax_decode`` (GQA without ``repeat_kv``, and
only the filled part of a static cache is read) and everything else to transformers' SDPA function, so
the name can stay set for prefill too. ``softmax_decode_kernel(model)`` sets it for the span of a decode
(``linearize.CompiledDecode``), on the configs of the layers named, if they use SDPA.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "linearize_decode"


def _device_ok(query: torch.Tensor) -> bool:
    """Triton serves here: CUDA, triton importable, ``LINEARIZE_KERNELS`` not ``torch`` (tests patch this
    to run the kernel on CPU under Triton's interpreter)."""
    from ..ops import use_triton

    return use_triton(query, query)


def kernel_serves(query: torch.Tensor, key: torch.Tensor, attention_mask, dropout: float, kwargs: dict) -> bool:
    """One token a sequence where Triton serves (``_device_ok``), a plain causal softmax (no sliding
    window, soft-capping, sinks or position bias), and no mask or a boolean ``[B or 1, 1, 1, L]`` one."""
    if query.shape[2] != 1 or dropout or not _device_ok(query):
        return False
    if any(kwargs.get(name) is not None for name in ("sliding_window", "softcap", "s_aux", "position_bias")):
        return False
    if query.shape[1] % key.shape[1] or query.dtype != key.dtype:
        return False
    if attention_mask is None:
        return True
    return (
        torch.is_tensor(attention_mask)
        and attention_mask.dtype == torch.bool
        and attention_mask.dim() == 4
        and attention_mask.shape[1] == attention_mask.shape[2] == 1
        and attention_mask.shape[0] in (1, query.shape[0])  # (1: one mask broadcast over the batch)
        and attention_mask.shape[3] == key.shape[2]
    )


def decode_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention-function signature: query [B, H, T, D], key/value [B, Hkv, L, D] ->
    ([B, T, H, D], None)."""
    if kernel_serves(query, key, attention_mask, dropout, kwargs):
        from ..ops.triton.softmax_decode import softmax_decode_triton

        mask = None if attention_mask is None else attention_mask[:, 0, 0, :].expand(query.shape[0], -1)
        return softmax_decode_triton(query, key, value, mask, scale=scaling), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


AttentionInterface.register(NAME, decode_attention_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)  # its masks are SDPA's wherever it falls back


def _configs(model, layers) -> list:
    mods = model.base_model.layers
    seen, out = set(), []
    for i in layers:
        cfg = mods[i].self_attn.config
        if id(cfg) not in seen:
            seen.add(id(cfg))
            out.append(cfg)
    return out


@contextmanager
def softmax_decode_kernel(model, layers=None):
    """Within the block, the configs of the decoder layers ``layers`` (default: all) name
    ``decode_attention_forward`` where they said SDPA; restored on exit. Layers that share a config (every
    layer of most models) all switch; linearized layers do not read it while they decode."""
    layers = range(len(model.base_model.layers)) if layers is None else layers
    configs = [cfg for cfg in _configs(model, layers) if cfg._attn_implementation == "sdpa"]
    for cfg in configs:
        cfg._attn_implementation = NAME
    try:
        yield
    finally:
        for cfg in configs:
            cfg._attn_implementation = "sdpa"
