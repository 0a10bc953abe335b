"""One decode token of plain softmax attention over a KV cache, with grouped KV heads: the reference.

The kept softmax layers of a linearized model (``LinearizeConfig.softmax_layers``) decode with this math;
``linearize.ops.triton.softmax_decode`` is its fused twin. Layout is transformers' attention-interface
layout, so that neither side transposes:

    q [B, H, 1, D], k/v [B, Hkv, L, D] (the cache's buffers), key_mask [B, L] bool (True: attend) or None
    -> y [B, 1, H, D]

Query head h reads KV head h // (H / Hkv). A row whose keys are all masked has no softmax; decode never
makes one (the new token is a valid key of its own query), and here it gives zeros.
"""

from __future__ import annotations

import torch

from .common import default_scale


def check_decode_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None) -> tuple[int, int, int, int, int]:
    """(B, H, Hkv, L, D), or a one-line ValueError naming the bad shape."""
    if q.dim() != 4 or q.shape[2] != 1:
        raise ValueError(f"q must be [B, H, 1, D] (one decode token); got {tuple(q.shape)}")
    B, H, _, D = q.shape
    if k.dim() != 4 or k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k and v must both be [B={B}, Hkv, L, D={D}]; got {tuple(k.shape)} and {tuple(v.shape)}")
    Hkv, L = k.shape[1], k.shape[2]
    if H % Hkv:
        raise ValueError(f"{H} query heads do not group over {Hkv} KV heads")
    if key_mask is not None and (key_mask.dtype != torch.bool or key_mask.shape != (B, L)):
        raise ValueError(f"key_mask must be a bool [B, L] = [{B}, {L}]; got {key_mask.dtype} {tuple(key_mask.shape)}")
    return B, H, Hkv, L, D


def softmax_decode_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None, *, scale: float | None = None
) -> torch.Tensor:
    """y [B, 1, H, D] in q's dtype, computed in float32 (float64 for float64 inputs)."""
    B, H, Hkv, L, D = check_decode_inputs(q, k, v, key_mask)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg = q.to(acc).reshape(B, Hkv, H // Hkv, D)
    s = torch.einsum("bjgd,bjld->bjgl", qg, k.to(acc)) * default_scale(scale, D)
    if key_mask is not None:
        s = s.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # an all-masked row: zeros, not NaN
    y = torch.einsum("bjgl,bjld->bjgd", p, v.to(acc))
    return y.reshape(B, 1, H, D).to(q.dtype)
