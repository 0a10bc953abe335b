"""Decode rows: one new token for a batch of sequences, against our state or a KV cache.

Ours keeps an fp32 state S [B,H',F,D], z [B,H',F] plus a ring of the last ``window`` keys
(``linearize.ops.ring``), updated in place so a step can be captured in a CUDA graph:
  * ours                : ``linearize.ops.ring.ring_step`` (dispatches to the Triton kernel on CUDA)
  * ours-triton-decode  : ``ring_step_triton`` called directly, with a fixed output buffer
  * ours-ring-torch     : ``ring_step_torch``, the same in-place step in plain PyTorch
  * ours-step-torch     : ``hybrid_attention_step``, the allocating PyTorch step on a ``HybridState``
Baselines: a plain torch einsum linear-attention update + readout (no window), fla's
``fused_recurrent_linear_attn`` (numerator only: normalize=False has no denominator), and SDPA with one
query against a KV cache of ``cache_len`` keys (flash, cuDNN and memory-efficient backends).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as Fn

from . import costs
from .backends import Backends
from .prefill import feature_like


@dataclass(frozen=True)
class DecodeCase:
    B: int = 64
    H: int = 16
    Hkv: int = 16
    D: int = 128
    F: int = 128
    Hf: int = 16
    window: int = 64
    cache_len: int = 0  # SDPA rows only

    @property
    def name(self) -> str:
        base = f"decode B{self.B} H{self.H} D{self.D} F{self.F}"
        return base + (f" KV cache {self.cache_len}" if self.cache_len else "")


@dataclass
class DecodeRow:
    key: str
    label: str
    build: Callable  # (Backends, DecodeCase, device, dtype, seed) -> zero-arg step closure
    cost: Callable[[DecodeCase], costs.Cost]
    uses_cache: bool = False
    available: Callable[[Backends], Optional[str]] = lambda be: None
    cuda_only: bool = False


def _rng(device, seed):
    return torch.Generator(device=device).manual_seed(seed)


def step_inputs(c: DecodeCase, device, dtype, gen):
    q = torch.randn(c.B, 1, c.H, c.D, generator=gen, device=device).to(dtype)
    k = torch.randn(c.B, 1, c.Hkv, c.D, generator=gen, device=device).to(dtype)
    v = torch.randn(c.B, 1, c.Hkv, c.D, generator=gen, device=device).to(dtype)
    pq = feature_like((c.B, 1, c.H, c.F), gen, device, dtype)
    pk = feature_like((c.B, 1, c.Hf, c.F), gen, device, dtype)
    return q, k, v, pq, pk


def random_state(c: DecodeCase, device, dtype, gen):
    """A HybridState with a full tail (window - 1 keys) and random positive sums, as after a long prompt."""
    from linearize.ops import HybridState

    L = c.window - 1
    return HybridState(
        S=torch.randn(c.B, c.Hf, c.F, c.D, generator=gen, device=device) * 4,
        z=torch.rand(c.B, c.Hf, c.F, generator=gen, device=device) * 4 + 1,
        k=torch.randn(c.B, L, c.Hkv, c.D, generator=gen, device=device).to(dtype),
        v=torch.randn(c.B, L, c.Hkv, c.D, generator=gen, device=device).to(dtype),
        phi_k=feature_like((c.B, L, c.Hf, c.F), gen, device, dtype),
        mask=torch.ones(c.B, L, dtype=torch.bool, device=device),
    )


def _gamma(c, device, gen):
    return torch.rand(c.H, generator=gen, device=device) * 0.9 + 0.05


def _ours_ring(kind: str):
    def build(be, c, device, dtype, seed):
        from linearize.ops.ring import ring_from_state, ring_step, ring_step_torch

        g = _rng(device, seed)
        x = step_inputs(c, device, dtype, g)
        ring = ring_from_state(random_state(c, device, dtype, g), c.window)
        gamma = _gamma(c, device, g)
        if kind == "dispatch":
            return lambda: ring_step(*x, ring, window_weight=gamma)
        if kind == "torch":
            return lambda: ring_step_torch(*x, ring, window_weight=gamma)
        fn, why = be.ours_triton_decode
        if fn is None:
            raise RuntimeError(why)
        out = torch.empty_like(x[0])
        return lambda: fn(*x, ring, window_weight=gamma, out=out)

    return build


def _ours_step_torch(be, c, device, dtype, seed):
    from linearize.ops import hybrid_attention_step

    g = _rng(device, seed)
    x = step_inputs(c, device, dtype, g)
    state = random_state(c, device, dtype, g)
    gamma = _gamma(c, device, g)
    return lambda: hybrid_attention_step(*x, state, window=c.window, window_weight=gamma)[0]


def linear_step(S, z, pq, pk, v):
    """In-place S += pk v^T, z += pk; y = pq S / pq z. S [B,H,F,D] fp32, z [B,H,F]; pq/pk [B,H,F], v [B,H,D]."""
    pk32 = pk.float()
    S.add_(torch.einsum("bhf,bhd->bhfd", pk32, v.float()))
    z.add_(pk32)
    pq32 = pq.float()
    num = torch.einsum("bhf,bhfd->bhd", pq32, S)
    den = torch.einsum("bhf,bhf->bh", pq32, z)
    return (num / den.unsqueeze(-1)).to(v.dtype)


def _torch_linear(be, c, device, dtype, seed):
    g = _rng(device, seed)
    q, k, v, pq, pk = step_inputs(c.__class__(**(c.__dict__ | {"Hkv": c.H, "Hf": c.H})), device, dtype, g)
    S = torch.randn(c.B, c.H, c.F, c.D, generator=g, device=device) * 4
    z = torch.rand(c.B, c.H, c.F, generator=g, device=device) * 4 + 1
    pq, pk, v = pq[:, 0], pk[:, 0], v[:, 0]
    return lambda: linear_step(S, z, pq, pk, v)


def _fla_recurrent(be, c, device, dtype, seed):
    la, why = be.fla
    if la is None:
        raise RuntimeError(why)
    g = _rng(device, seed)
    q, k, v, pq, pk = step_inputs(c.__class__(**(c.__dict__ | {"Hkv": c.H, "Hf": c.H})), device, dtype, g)
    S = torch.randn(c.B, c.H, c.F, c.D, generator=g, device=device) * 4
    return lambda: la.fused_recurrent_linear_attn(pq, pk, v, scale=1.0, initial_state=S, output_final_state=True, normalize=False)[0]


def _sdpa_decode(backend_name: str):
    def build(be, c, device, dtype, seed):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, backend_name)
        g = _rng(device, seed)
        q = torch.randn(c.B, c.H, 1, c.D, generator=g, device=device).to(dtype)
        K = torch.randn(c.B, c.Hkv, c.cache_len, c.D, generator=g, device=device).to(dtype)
        V = torch.randn(c.B, c.Hkv, c.cache_len, c.D, generator=g, device=device).to(dtype)
        gqa = c.H != c.Hkv

        def f():
            with sdpa_kernel([backend]):
                return Fn.scaled_dot_product_attention(q, K, V, enable_gqa=gqa) if gqa else Fn.scaled_dot_product_attention(q, K, V)

        return f

    return build


def _hyb_cost(c):
    return costs.hybrid_decode_cost(c.B, c.H, c.Hkv, c.D, c.F, c.Hf, c.window)


def all_decode_rows() -> list[DecodeRow]:
    lin = lambda c: costs.linear_decode_cost(c.B, c.H, c.H, c.D, c.F, c.H, with_z=True)  # noqa: E731
    num_only = lambda c: costs.linear_decode_cost(c.B, c.H, c.H, c.D, c.F, c.H, with_z=False)  # noqa: E731
    sdpa = lambda c: costs.sdpa_decode_cost(c.B, c.H, c.Hkv, c.D, c.cache_len)  # noqa: E731
    return [
        DecodeRow("ours", "ours: ring_step (dispatch)", _ours_ring("dispatch"), _hyb_cost),
        DecodeRow("ours-triton-decode", "ours: ring_step_triton", _ours_ring("triton"), _hyb_cost,
                  available=lambda be: be.ours_triton_decode[1]),
        DecodeRow("ours-ring-torch", "ours: ring_step_torch (PyTorch, in place)", _ours_ring("torch"), _hyb_cost),
        DecodeRow("ours-step-torch", "ours: hybrid_attention_step (PyTorch, allocating)", _ours_step_torch, _hyb_cost),
        DecodeRow("torch-linear", "torch einsum linear update + readout (no window)", _torch_linear, lin),
        DecodeRow("fla-recurrent", "fla fused_recurrent_linear_attn (numerator only)", _fla_recurrent, num_only,
                  available=lambda be: be.fla[1], cuda_only=True),
        DecodeRow("sdpa-decode-flash", "SDPA decode, flash", _sdpa_decode("FLASH_ATTENTION"), sdpa, uses_cache=True, cuda_only=True),
        DecodeRow("sdpa-decode-cudnn", "SDPA decode, cuDNN", _sdpa_decode("CUDNN_ATTENTION"), sdpa, uses_cache=True, cuda_only=True),
        DecodeRow("sdpa-decode-efficient", "SDPA decode, mem-efficient", _sdpa_decode("EFFICIENT_ATTENTION"), sdpa,
                  uses_cache=True, cuda_only=True),
    ]


# ---- correctness: each step against the quadratic reference on a short sequence -------------------


def check_decode_row(row: DecodeRow, be: Backends, device, dtype, ref_dtype, B=2, T=150, H=4, Hkv=2, D=16, F=8, window=16, seed=0):
    """Relative error of the row's output for token T-1 after T-1 tokens of context, vs the reference.

    Hybrid rows: state = chunked prefill of T-1 tokens, then one step. Linear rows: S, z summed directly,
    reference with window = 0 (fla: numerator only). SDPA: the KV cache holds all T keys, window = T.
    """
    from linearize.ops import hybrid_attention_chunked, hybrid_attention_reference, hybrid_attention_step
    from linearize.ops.ring import ring_from_state, ring_step, ring_step_torch

    g = torch.Generator(device=device).manual_seed(seed)
    Hf = H  # one key feature map per query head, the library's default
    if row.key in ("torch-linear", "fla-recurrent"):
        Hkv = H
    q = torch.randn(B, T, H, D, generator=g, device=device).to(dtype)
    k = torch.randn(B, T, Hkv, D, generator=g, device=device).to(dtype)
    v = torch.randn(B, T, Hkv, D, generator=g, device=device).to(dtype)
    pq = feature_like((B, T, H, F), g, device, dtype)
    pk = feature_like((B, T, Hf, F), g, device, dtype)
    gamma = torch.rand(H, generator=g, device=device) * 0.9 + 0.05
    up = [t.to(ref_dtype) for t in (q, k, v, pq, pk)]
    last = [t[:, -1:] for t in (q, k, v, pq, pk)]
    key = row.key
    if key in ("ours", "ours-triton-decode", "ours-ring-torch", "ours-step-torch"):
        ref = hybrid_attention_reference(*up, window=window, window_weight=gamma.to(ref_dtype))[:, -1:]
        _, st = hybrid_attention_chunked(*(t[:, :-1] for t in (q, k, v, pq, pk)), window=window, window_weight=gamma,
                                         output_final_state=True)
        if key == "ours-step-torch":
            y = hybrid_attention_step(*last, st, window=window, window_weight=gamma)[0]
        else:
            ring = ring_from_state(st, window)
            if key == "ours":
                y = ring_step(*last, ring, window_weight=gamma)
            elif key == "ours-ring-torch":
                y = ring_step_torch(*last, ring, window_weight=gamma)
            else:
                fn, why = be.ours_triton_decode
                if fn is None:
                    raise RuntimeError(why)
                y = fn(*last, ring, window_weight=gamma)
    elif key in ("torch-linear", "fla-recurrent"):
        S = torch.einsum("bthf,bthd->bhfd", up[4][:, :-1], up[2][:, :-1]).float()
        z = up[4][:, :-1].sum(1).float()
        if key == "torch-linear":
            ref = hybrid_attention_reference(*up, window=0, window_weight=1.0)[:, -1:]
            y = linear_step(S, z, last[3][:, 0], last[4][:, 0], last[2][:, 0]).unsqueeze(1)
        else:
            la, why = be.fla
            if la is None:
                raise RuntimeError(why)
            Sr = torch.einsum("bthf,bthd->bhfd", up[4], up[2])
            ref = torch.einsum("bhf,bhfd->bhd", up[3][:, -1], Sr).unsqueeze(1)
            y = la.fused_recurrent_linear_attn(last[3], last[4], last[2], scale=1.0, initial_state=S,
                                               output_final_state=True, normalize=False)[0]
    else:
        ref = hybrid_attention_reference(*up, window=T, window_weight=1.0)[:, -1:]
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = {"sdpa-decode-flash": "FLASH_ATTENTION", "sdpa-decode-cudnn": "CUDNN_ATTENTION",
                   "sdpa-decode-efficient": "EFFICIENT_ATTENTION"}[key]
        with sdpa_kernel([getattr(SDPBackend, backend)]):
            kw = {"enable_gqa": True} if H != Hkv else {}
            y = Fn.scaled_dot_product_attention(q[:, -1:].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **kw)
        y = y.transpose(1, 2)
    a, b = y.double(), ref.double()
    return ((a - b).norm() / b.norm()).item()
