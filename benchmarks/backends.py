"""The kernels a benchmark row may call, imported once and guarded: a missing one is a reason string, not a crash."""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:200] if msg else ''}"


class Backends:
    """Compiled FlexAttention (dynamic or static shapes), block masks, fla, our Triton kernels."""

    def __init__(self, device: torch.device, compile_flex: bool = True, flex_dynamic: bool = True):
        self.device = device
        self.compile_flex = compile_flex and device.type == "cuda"
        self.flex_dynamic = flex_dynamic
        self._masks: dict = {}
        self._flex: dict = {}
        self._combine: Optional[tuple] = None
        self.ceilings: Optional[dict] = None  # set by the runner after measuring them

    # --- FlexAttention -------------------------------------------------------------------------------
    def flex(self, dynamic: Optional[bool] = None) -> Callable:
        """flex_attention, compiled on CUDA (eager elsewhere: the unfused reference path)."""
        from torch.nn.attention.flex_attention import flex_attention

        if not self.compile_flex:
            return flex_attention
        dyn = self.flex_dynamic if dynamic is None else dynamic
        if dyn not in self._flex:
            self._flex[dyn] = torch.compile(flex_attention, dynamic=dyn)
        return self._flex[dyn]

    def block_mask(self, T: int, window: int):
        """Causal band of ``window`` keys, built once per (T, window) outside any timing."""
        from torch.nn.attention.flex_attention import create_block_mask

        from .composition import band_mask_mod

        key = (T, window)
        if key not in self._masks:
            self._masks[key] = create_block_mask(band_mask_mod(window), None, None, T, T, device=self.device)
        return self._masks[key]

    def glue(self, compiled: bool = True) -> tuple[Callable, Callable]:
        """The composition's PyTorch glue (combine, window_max), fused by torch.compile on CUDA."""
        from .composition import combine, window_max

        if not compiled or self.device.type != "cuda":
            return combine, window_max
        if self._combine is None:
            self._combine = (torch.compile(combine, dynamic=True), torch.compile(window_max, dynamic=True))
        return self._combine

    # --- optional packages ---------------------------------------------------------------------------
    @functools.cached_property
    def fla(self):
        """(module fla.ops.linear_attn, None) or (None, reason)."""
        if self.device.type != "cuda":
            return None, "fla needs CUDA"
        try:
            import fla.ops.linear_attn as la

            return la, None
        except Exception as e:  # ImportError, or a CUDA/Triton mismatch raised at import
            return None, _short(e)

    @functools.cached_property
    def ours_triton(self):
        """(hybrid_attention_triton, None) or (None, reason)."""
        try:
            from linearize.ops import triton as t

            fn = getattr(t, "hybrid_attention_triton", None)
            if fn is None:
                from linearize.ops.triton.chunk import hybrid_attention_triton as fn
            if self.device.type != "cuda" and not t.interpreting():
                return None, "Triton kernels need CUDA (or TRITON_INTERPRET=1)"
            return fn, None
        except Exception as e:
            return None, _short(e)

    @functools.cached_property
    def ours_triton_decode(self):
        """(ring_step_triton, None) or (None, reason)."""
        try:
            from linearize.ops import triton as t
            from linearize.ops.triton.decode import ring_step_triton

            if self.device.type != "cuda" and not t.interpreting():
                return None, "Triton kernels need CUDA (or TRITON_INTERPRET=1)"
            return ring_step_triton, None
        except Exception as e:
            return None, _short(e)


short_error = _short
