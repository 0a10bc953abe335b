"""Prefill (training-shaped) rows: each implementation as a function of one input set, plus its reference.

A ``Row`` knows its layout ([B,T,H,D] like the model, or heads-first [B,H,T,D] for SDPA/Flex), which
inputs it differentiates, which function it computes (``kind``, for the FLOP/byte count and the
reference), and one or more builders tried in order (e.g. FlexAttention compiled with dynamic shapes,
then static; SDPA with native GQA, then with K/V repeated).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as Fn

from . import costs
from .backends import Backends
from .composition import (
    fla_linear_fn, flex_window_fn, hybrid_composition, sharp_lse_max_fn, torch_linear_fn, torch_window_fn,
)


@dataclass(frozen=True)
class Case:
    """One shape. ``Hf`` = key feature heads (the library's default is one key map per query head)."""

    name: str
    B: int
    T: int
    H: int
    Hkv: int
    D: int
    F: int
    Hf: int
    window: int = 64
    group: str = "main"

    @property
    def G(self) -> int:
        return self.H // self.Hkv

    def heads_key(self) -> tuple:
        """Cases with one heads_key share compiled kernels and one correctness check."""
        return (self.H, self.Hkv, self.D, self.F, self.Hf, self.window)

    def input_bytes(self) -> int:
        return costs.BF16 * self.B * self.T * (self.H * self.D + 2 * self.Hkv * self.D + self.H * self.F + self.Hf * self.F)

    def with_(self, **kw) -> "Case":
        d = self.__dict__ | kw
        return Case(**d)


@dataclass
class Inputs:
    """One input set in both layouts; every tensor is a leaf that requires grad when ``grad``."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    phi_q: torch.Tensor
    phi_k: torch.Tensor
    gamma: torch.Tensor
    qh: torch.Tensor
    kh: torch.Tensor
    vh: torch.Tensor
    dy: torch.Tensor
    dyh: torch.Tensor

    def get(self, names) -> list[torch.Tensor]:
        return [getattr(self, n) for n in names]


def feature_like(shape, gen, device, dtype) -> torch.Tensor:
    """Positive features shaped like Hedgehog's: [softmax(x), softmax(-x)] over F/2 each (F even)."""
    *lead, F = shape
    x = torch.randn(*lead, F // 2, generator=gen, device=device)
    return torch.cat([torch.softmax(x, -1), torch.softmax(-x, -1)], -1).to(dtype)


def make_inputs(case: Case, device, dtype, seed: int, grad: bool) -> Inputs:
    gen = torch.Generator(device=device).manual_seed(seed)

    def rn(*shape):
        return torch.randn(*shape, generator=gen, device=device).to(dtype)

    B, T, H, Hkv, D, F, Hf = case.B, case.T, case.H, case.Hkv, case.D, case.F, case.Hf
    q, k, v = rn(B, T, H, D), rn(B, T, Hkv, D), rn(B, T, Hkv, D)
    pq, pk = feature_like((B, T, H, F), gen, device, dtype), feature_like((B, T, Hf, F), gen, device, dtype)
    gamma = torch.rand(H, generator=gen, device=device) * 0.9 + 0.05
    dy = rn(B, T, H, D)
    heads = [x.transpose(1, 2).contiguous() for x in (q, k, v)]
    ts = [q, k, v, pq, pk, gamma, *heads]
    if grad:
        for t in ts:
            t.requires_grad_(True)
    return Inputs(*ts, dy=dy, dyh=dy.transpose(1, 2).contiguous())


HYBRID_PARAMS = ("q", "k", "v", "phi_q", "phi_k", "gamma")
HEADS_PARAMS = ("qh", "kh", "vh")
LINEAR_PARAMS = ("phi_q", "phi_k", "v")

Builder = Callable[[Backends, Case, str], Callable[[Inputs], torch.Tensor]]


@dataclass
class Row:
    key: str
    label: str
    kind: str  # hybrid | causal | window | linear
    layout: str  # bthd | bhtd
    params: tuple
    builders: list  # [(note, Builder)]
    available: Callable[[Backends], Optional[str]] = lambda be: None
    cuda_only: bool = False
    meta: dict = field(default_factory=dict)
    modes: tuple = ("fwd", "fwdbwd")  # comp-lse differs from comp-cumsum only under autograd

    def cost(self, c: Case, mode: str) -> costs.Cost:
        if self.kind == "hybrid":
            return costs.hybrid_cost(c.B, c.T, c.H, c.Hkv, c.D, c.F, c.Hf, c.window, mode)
        if self.kind == "causal":
            return costs.softmax_cost(c.B, c.T, c.H, c.Hkv, c.D, costs.causal_pairs(c.T), mode)
        if self.kind == "window":
            return costs.softmax_cost(c.B, c.T, c.H, c.Hkv, c.D, costs.window_pairs(c.T, c.window), mode)
        if self.kind == "linear":
            return costs.linear_cost(c.B, c.T, c.H, c.Hkv, c.D, c.F, c.Hf, mode)
        raise ValueError(self.kind)


# ---- builders --------------------------------------------------------------------------------------


def _ours(be, c, mode):
    from linearize.ops import hybrid_attention

    return lambda I: hybrid_attention(I.q, I.k, I.v, I.phi_q, I.phi_k, window=c.window, window_weight=I.gamma)


def _ours_triton(be, c, mode):
    fn, why = be.ours_triton
    if fn is None:
        raise RuntimeError(why)
    return lambda I: fn(I.q, I.k, I.v, I.phi_q, I.phi_k, window=c.window, window_weight=I.gamma)[0]


def _ours_chunked(be, c, mode):
    from linearize.ops import hybrid_attention_chunked

    return lambda I: hybrid_attention_chunked(I.q, I.k, I.v, I.phi_q, I.phi_k, window=c.window, window_weight=I.gamma)[0]


def _sdpa(backend_name: str, repeat_kv: bool) -> Builder:
    def build(be, c, mode):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, backend_name)
        gqa = c.G > 1

        def f(I):
            k, v = I.kh, I.vh
            if gqa and repeat_kv:
                k, v = k.repeat_interleave(c.G, dim=1), v.repeat_interleave(c.G, dim=1)
            with sdpa_kernel([backend]):
                if gqa and not repeat_kv:
                    return Fn.scaled_dot_product_attention(I.qh, k, v, is_causal=True, enable_gqa=True)
                return Fn.scaled_dot_product_attention(I.qh, k, v, is_causal=True)

        return f

    return build


def _flex(dynamic: bool) -> Builder:
    def build(be, c, mode):
        flex = be.flex(dynamic)
        bm = be.block_mask(c.T, c.window)
        gqa = c.G > 1
        return lambda I: flex(I.qh, I.kh, I.vh, block_mask=bm, enable_gqa=gqa)

    return build


def _fla_linear(be, c, mode):
    la, why = be.fla
    if la is None:
        raise RuntimeError(why)

    def f(I):
        pk = I.phi_k.repeat_interleave(c.H // c.Hf, dim=2) if c.Hf != c.H else I.phi_k
        v = I.v.repeat_interleave(c.G, dim=2) if c.G > 1 else I.v
        return la.chunk_linear_attn(I.phi_q, pk, v, scale=1.0, normalize=True)[0]

    return f


def _composition(den: str, dynamic: bool, m_path: str = "argmax", glue_compiled: bool = True) -> Builder:
    def build(be, c, mode):
        comb, wmax = be.glue(glue_compiled)
        if be.device.type == "cuda":
            la, why = be.fla
            if la is None:
                raise RuntimeError(why)
            bm, flex = be.block_mask(c.T, c.window), be.flex(dynamic)
            wf, lf = flex_window_fn(bm, flex), fla_linear_fn
            if m_path == "lse":
                wmax = sharp_lse_max_fn(bm, flex)
        else:  # CPU: Flex's eager path has no backward there; a dense PyTorch window instead
            if m_path == "lse":
                raise RuntimeError("the sharp-LSE max needs FlexAttention's backward (CUDA)")
            wf = torch_window_fn(c.window) if mode == "fwdbwd" else flex_window_fn(be.block_mask(c.T, c.window), be.flex())
            lf = torch_linear_fn
        return lambda I: hybrid_composition(
            I.q, I.k, I.v, I.phi_q, I.phi_k, window=c.window, window_weight=I.gamma,
            window_fn=wf, linear_fn=lf, den=den, combine_fn=comb, max_fn=wmax,
        )

    return build


def _composition_variants(den: str, m_path: str = "argmax") -> list:
    return [
        ("flex dynamic shapes", _composition(den, True, m_path)),
        ("flex dynamic shapes, glue eager", _composition(den, True, m_path, glue_compiled=False)),
        ("flex static shapes", _composition(den, False, m_path)),
    ]


def _need_fla(be):
    return None if be.device.type != "cuda" else be.fla[1]


def all_rows() -> list[Row]:
    flex_builders = [("flex dynamic shapes", _flex(True)), ("flex static shapes", _flex(False))]
    return [
        Row("ours", "ours: linearize.ops.hybrid_attention", "hybrid", "bthd", HYBRID_PARAMS, [("", _ours)]),
        Row("ours-triton", "ours: hybrid_attention_triton", "hybrid", "bthd", HYBRID_PARAMS, [("", _ours_triton)],
            available=lambda be: be.ours_triton[1]),
        Row("ours-chunked", "ours: chunked PyTorch", "hybrid", "bthd", HYBRID_PARAMS, [("", _ours_chunked)]),
        Row("sdpa-cudnn", "(a) SDPA causal, cuDNN", "causal", "bhtd", HEADS_PARAMS,
            [("", _sdpa("CUDNN_ATTENTION", False)), ("K/V repeated", _sdpa("CUDNN_ATTENTION", True))], cuda_only=True),
        Row("sdpa-flash", "(a) SDPA causal, flash", "causal", "bhtd", HEADS_PARAMS,
            [("", _sdpa("FLASH_ATTENTION", False)), ("K/V repeated", _sdpa("FLASH_ATTENTION", True))], cuda_only=True),
        Row("flex-window", "(b) FlexAttention, window-64 block mask", "window", "bhtd", HEADS_PARAMS, flex_builders,
            meta={"cpu_fwd_only": True}),
        Row("fla-linear", "(c) fla chunk_linear_attn (normalized)", "linear", "bthd", LINEAR_PARAMS, [("", _fla_linear)],
            available=lambda be: be.fla[1], cuda_only=True),
        Row("comp-cumsum", "(d) Flex window+LSE, fla linear (normalize=False) on shifted keys, cumsum denominator",
            "hybrid", "bthd", HYBRID_PARAMS, _composition_variants("cumsum"), available=_need_fla),
        Row("comp-lse", "(d) with m from a second, sharp Flex LSE instead of the argmax (training only)",
            "hybrid", "bthd", HYBRID_PARAMS, _composition_variants("cumsum", "lse"), available=_need_fla,
            cuda_only=True, modes=("fwdbwd",)),
        Row("comp-ones", "(d') as (d), denominator from a ones column appended to v (one fla call)",
            "hybrid", "bthd", HYBRID_PARAMS, _composition_variants("ones"), available=_need_fla),
    ]


# ---- reference ---------------------------------------------------------------------------------------


def reference(kind: str, c: Case, I: Inputs, dtype: torch.dtype, grad: bool):
    """The function a row of ``kind`` computes, by ``hybrid_attention_reference`` on upcast copies.

    hybrid: as is; window: phi = 0 (no linear part, so the window softmax); causal: window = T;
    linear: window = 0. Returns y [B,T,H,D] and, with ``grad``, the grads of HYBRID_PARAMS (None where unused).
    """
    from linearize.ops import hybrid_attention_reference

    xs = [t.detach().to(dtype).requires_grad_(grad) for t in I.get(HYBRID_PARAMS)]
    q, k, v, pq, pk, g = xs
    window = {"hybrid": c.window, "window": c.window, "causal": c.T, "linear": 0}[kind]
    if kind == "window":
        pq, pk = torch.zeros_like(pq), torch.zeros_like(pk)
    y = hybrid_attention_reference(q, k, v, pq, pk, window=window, window_weight=g)
    if not grad:
        return y.detach(), None
    grads = torch.autograd.grad(y, xs, I.dy.to(dtype), allow_unused=True)
    return y.detach(), dict(zip(HYBRID_PARAMS, grads))


def to_bthd(name: str, t: torch.Tensor) -> tuple[str, torch.Tensor]:
    """A heads-first tensor back to the model layout, with its model-layout name."""
    if name in HEADS_PARAMS:
        return name[0], t.transpose(1, 2)
    return name, t
