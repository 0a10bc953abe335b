"""Pure functions for the hybrid (sliding-window softmax + linear) attention. No nn.Module here.

Three implementations of one definition (see ``reference.py``):
  * ``hybrid_attention_reference``: quadratic, for tests;
  * ``hybrid_attention_chunked``: linear memory, differentiable, takes and returns a ``HybridState``;
  * ``hybrid_attention_step``: one decode token against a ``HybridState``.
``hybrid_attention`` is the public entry point and picks the fastest available implementation.
"""

from __future__ import annotations

import torch

from .chunked import hybrid_attention_chunked
from .recurrent import hybrid_attention_step
from .reference import hybrid_attention_reference
from .state import HybridState

__all__ = [
    "HybridState",
    "hybrid_attention",
    "hybrid_attention_chunked",
    "hybrid_attention_reference",
    "hybrid_attention_step",
]


def hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    *,
    window: int,
    window_weight: float | torch.Tensor,
    scale: float | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Hybrid attention, q [B,T,H,D], k/v [B,T,Hkv,D], phi_q [B,T,H,F], phi_k [B,T,Hkv|H,F] -> [B,T,H,D].

    ``window`` recent keys get exact softmax (weighted by ``window_weight``), older keys get the linear
    attention ``phi_q . phi_k``, and both share one normalizer. ``window=0`` is causal linear attention;
    ``window >= T`` is causal softmax attention. Accumulates in fp32, returns q's dtype.
    """
    y, _ = hybrid_attention_chunked(
        q, k, v, phi_q, phi_k, window=window, window_weight=window_weight, scale=scale, attention_mask=attention_mask
    )
    return y
