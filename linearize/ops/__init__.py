"""Pure functions for the hybrid (sliding-window softmax + linear) attention. No nn.Module here.

Three implementations of one definition (see ``reference.py``):
  * ``hybrid_attention_reference``: quadratic, for tests;
  * ``hybrid_attention_chunked``: linear memory, differentiable, takes and returns a ``HybridState``;
  * ``hybrid_attention_step``: one decode token against a ``HybridState``.
``hybrid_attention`` (and ``hybrid_attention_stateful``, which also takes and returns a state) is the
public entry point: on CUDA it runs the fused Triton kernels (``linearize.ops.triton``), elsewhere the
chunked PyTorch path. ``LINEARIZE_KERNELS=torch`` forces the PyTorch path everywhere.
"""

from __future__ import annotations

import os

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
    "hybrid_attention_stateful",
    "hybrid_attention_step",
    "use_triton",
]


def use_triton(q: torch.Tensor, phi_q: torch.Tensor) -> bool:
    """Whether the fused kernels serve these inputs: CUDA, triton importable, D and F <= 256, half/fp32."""
    if not q.is_cuda or os.environ.get("LINEARIZE_KERNELS", "auto") == "torch":
        return False
    from . import triton as tri

    return (
        tri.available()
        and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and q.shape[-1] <= 256
        and phi_q.shape[-1] <= 256
    )


def hybrid_attention_stateful(
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
    initial_state: HybridState | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, HybridState | None]:
    """``hybrid_attention`` that continues from ``initial_state`` and can return the final state (prefill
    in pieces, the prompt of ``generate``). Same arguments as ``hybrid_attention_chunked``. The Triton path
    treats the initial state as a constant; a state that requires grad takes the PyTorch path."""
    args = dict(
        window=window, window_weight=window_weight, scale=scale, attention_mask=attention_mask,
        initial_state=initial_state, output_final_state=output_final_state,
    )
    state_grad = initial_state is not None and any(t.requires_grad for t in initial_state)
    if use_triton(q, phi_q) and not state_grad:
        from .triton.chunk import hybrid_attention_triton

        return hybrid_attention_triton(q, k, v, phi_q, phi_k, **args)
    return hybrid_attention_chunked(q, k, v, phi_q, phi_k, chunk_size=chunk_size, **args)


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
    y, _ = hybrid_attention_stateful(
        q, k, v, phi_q, phi_k, window=window, window_weight=window_weight, scale=scale, attention_mask=attention_mask
    )
    return y
