"""Baseline (d): the hybrid attention composed from existing kernels, and the pieces it is built from.

Derivation. For query i: window W(i) = {i-w < j <= i}, linear set L(i) = {j <= i-w}, s_ij = scale q_i.k_j,
m_i = max_{j in W(i)} s_ij, g the window weight. The hybrid (``linearize.ops.hybrid_attention_reference``) is

    y_i = (g sum_W e^(s_ij - m_i) v_j + sum_L (pq_i.pk_j) v_j) / (g sum_W e^(s_ij - m_i) + sum_L pq_i.pk_j).

* FlexAttention over W (block mask ``j <= i and i - j < w``) returns the *normalized* window softmax
  o_i = sum_W e^(s_ij - lse_i) v_j and lse_i = log sum_W e^(s_ij) (natural log), so
      sum_W e^(s_ij - m_i)     = e^(lse_i - m_i)
      sum_W e^(s_ij - m_i) v_j = e^(lse_i - m_i) o_i.
* Linear attention with an inclusive causal mask over keys shifted right by w (pk'_t = pk_(t-w),
  v'_t = v_(t-w), zero for t < w) sums exactly L(i):
      N_i = sum_(t<=i) (pq_i.pk'_t) v'_t = sum_L (pq_i.pk_j) v_j
  which is fla's ``chunk_linear_attn(pq, pk', v', scale=1, normalize=False)`` (unnormalized; fla's
  ``normalize=True`` would divide by its own denominator, which we must not). The denominator
  Z_i = sum_L pq_i.pk_j comes either from a cumulative sum, Z_i = pq_i . cumsum_t(pk')_i ("cumsum", the
  default), or from the same fla call with v' augmented by a column of ones, N and Z in one pass ("ones").
* With a_i = g e^(lse_i - m_i):   y_i = (a_i o_i + N_i) / (a_i + Z_i).

m_i does not cancel (it sets how much the window weighs against the linear part), so it must be the
window max and, for training, its gradient must flow (to q_i and the argmax key). FlexAttention's
``max_scores`` (``return_aux=AuxRequest(max_scores=True)``) gives it exactly but is not differentiable,
so under autograd m_i comes from one of two ``max_fn``:
  * ``window_max`` (exact): m_i = scale q_i.k_(j*(i)) with j* the window argmax, found without grad by a
    banded score product in PyTorch (top-2 candidates re-scored in fp32, so bf16 rounding cannot pick a
    wrong near-tie); torch.compile fuses it on CUDA;
  * ``sharp_lse_max_fn`` (FlexAttention only): m_i ~ lse_i(beta s) / beta, a second Flex call at scale
    beta * scale with a dummy 16-wide value, differentiable through Flex's LSE gradient; its error is
    0 <= m~ - m <= log(w) / beta (4e-4 for w = 64, beta = 1e4), far under bf16 rounding, and its gradient
    is softmax(beta s), the argmax's one-hot up to ties.
The forward-only path uses ``max_scores`` when the device has it.

The window and linear kernels are plugged in (``WindowFn``, ``LinearFn``): on CUDA, compiled
FlexAttention and fla; on CPU (the smoke test), FlexAttention's eager path or a dense PyTorch window,
and a quadratic PyTorch linear attention.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as Fn

# (q [B,H,T,D], k [B,Hkv,T,D], v [B,Hkv,T,D], scale, want_max) -> (o [B,H,T,D], lse [B,H,T], m [B,H,T] | None)
WindowFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, bool], tuple]
# (pq [B,T,H,F], pk [B,T,H,F], v [B,T,H,V]) -> sum_(t<=i) (pq_i.pk_t) v_t  [B,T,H,V]
LinearFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def shift_right(x: torch.Tensor, n: int) -> torch.Tensor:
    """[B,T,...] -> x delayed by n steps along T, zeros first."""
    T = x.shape[1]
    if n >= T:
        return torch.zeros_like(x)
    pad = [0, 0] * (x.dim() - 2) + [n, 0]
    return Fn.pad(x[:, : T - n], pad)


def window_argmax(q: torch.Tensor, k: torch.Tensor, window: int, scale: float, chunk: int = 64) -> torch.Tensor:
    """Index j*(i) of the highest-scoring key in each query's window. q [B,T,H,D], k [B,T,Hkv,D] -> [B,T,H] long.

    Banded like the chunked path: chunk c's queries see keys [cC - (w-1), cC + C). Scores in the input
    dtype find two candidates; they are re-scored in fp32 and the better one kept.
    """
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    G = H // Hkv
    C = min(chunk, T)
    n = -(-T // C)
    P = window - 1
    with torch.no_grad():
        qg = Fn.pad(q, (0, 0, 0, 0, 0, n * C - T)).view(B, n, C, Hkv, G, D).permute(0, 3, 4, 1, 2, 5)  # [B,Hkv,G,n,C,D]
        kp = Fn.pad(k, (0, 0, 0, 0, P, n * C - T))  # [B,P+nC,Hkv,D]
        kb = kp.unfold(1, C + P, C).permute(0, 2, 1, 4, 3)  # [B,Hkv,n,C+P,D]
        s = qg @ kb.unsqueeze(2).transpose(-1, -2)  # [B,Hkv,G,n,C,C+P]
        dev = q.device
        r = torch.arange(C, device=dev).view(1, C, 1)
        col = torch.arange(C + P, device=dev).view(1, 1, C + P)
        base = (torch.arange(n, device=dev) * C - P).view(n, 1, 1)
        allowed = (col >= r) & (col <= r + P) & (base + col >= 0)  # [n,C,C+P]
        s = s.masked_fill(~allowed, float("-inf"))
        top = s.topk(min(2, C + P), dim=-1)
        cand = (top.indices + base).clamp(0, T - 1)  # [B,Hkv,G,n,C,2] absolute key index
        ok = torch.isfinite(top.values)
        nc = cand.shape[-1]
        kh = k.permute(0, 2, 1, 3)  # [B,Hkv,T,D]
        idx = cand.reshape(B, Hkv, -1, 1).expand(-1, -1, -1, D)
        ksel = torch.gather(kh, 2, idx).view(B, Hkv, G, n, C, nc, D)
        exact = (qg.unsqueeze(-2).float() * ksel.float()).sum(-1) * scale
        exact = exact.masked_fill(~ok, float("-inf"))
        best = cand.gather(-1, exact.argmax(-1, keepdim=True)).squeeze(-1)  # [B,Hkv,G,n,C]
        return best.flatten(3)[..., :T].permute(0, 3, 1, 2).reshape(B, T, H)


def window_max(q: torch.Tensor, k: torch.Tensor, window: int, scale: float) -> torch.Tensor:
    """m_i = scale q_i.k_(j*(i)), differentiable in q and k (the argmax itself is not). -> [B,H,T] fp32."""
    B, T, H, D = q.shape
    G = H // k.shape[2]
    idx = window_argmax(q, k, window, scale)
    kx = k.repeat_interleave(G, dim=2) if G > 1 else k
    ksel = torch.gather(kx, 1, idx.unsqueeze(-1).expand(-1, -1, -1, D))  # [B,T,H,D]
    return (scale * (q.float() * ksel.float()).sum(-1)).transpose(1, 2)


def combine(
    o_w: torch.Tensor, lse: torch.Tensor, m: torch.Tensor, gamma: torch.Tensor, num: torch.Tensor, den: torch.Tensor
) -> torch.Tensor:
    """y = (a o_w + N) / (a + Z), a = g e^(lse - m). o_w [B,H,T,D], lse/m [B,H,T], gamma [H], num [B,T,H,D], den [B,T,H]."""
    a = (gamma.float().view(1, -1, 1) * torch.exp(lse.float() - m.float())).transpose(1, 2).unsqueeze(-1)
    y = (a * o_w.transpose(1, 2).float() + num.float()) / (a + den.float().unsqueeze(-1))
    return y.to(num.dtype)


def hybrid_composition(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    *,
    window: int,
    window_weight: torch.Tensor,
    window_fn: WindowFn,
    linear_fn: LinearFn,
    scale: Optional[float] = None,
    den: str = "cumsum",
    combine_fn: Callable = combine,
    max_fn: Optional[Callable] = None,
) -> torch.Tensor:
    """The hybrid from a window-softmax kernel with its LSE and a linear-attention kernel. Same shapes as
    ``linearize.ops.hybrid_attention``: q [B,T,H,D], k/v [B,T,Hkv,D], phi_q [B,T,H,F], phi_k [B,T,Hf,F]."""
    B, T, H, D = q.shape
    Hkv, Hf = k.shape[2], phi_k.shape[2]
    if window < 1:
        raise ValueError(f"the composition needs window >= 1; got {window}")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    gamma = window_weight.reshape(-1).expand(H) if window_weight.numel() == 1 else window_weight
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k))

    o_w, lse, m = window_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale, not need_grad)
    if need_grad or m is None:
        m = (max_fn or window_max)(q, k, window, scale)

    pk = shift_right(phi_k, window)  # [B,T,Hf,F]
    vs = shift_right(v, window)  # [B,T,Hkv,D]
    pk_h = pk.repeat_interleave(H // Hf, dim=2) if Hf != H else pk
    vs_h = vs.repeat_interleave(H // Hkv, dim=2) if Hkv != H else vs
    if den == "ones":
        out = linear_fn(phi_q, pk_h, torch.cat([vs_h, torch.ones_like(vs_h[..., :1])], dim=-1))
        num, z = out[..., :D], out[..., D]
    elif den == "cumsum":
        num = linear_fn(phi_q, pk_h, vs_h)
        zc = torch.cumsum(pk.float(), dim=1)  # [B,T,Hf,F], on the key heads (no repeat)
        z = (phi_q.float().view(B, T, Hf, H // Hf, -1) * zc.unsqueeze(3)).sum(-1).view(B, T, H)
    else:
        raise ValueError(f"den must be 'cumsum' or 'ones'; got {den!r}")
    return combine_fn(o_w, lse, m, gamma, num, z).to(q.dtype)


# ---- window and linear providers -------------------------------------------------------------------


def torch_window_fn(window: int) -> WindowFn:
    """Dense masked window softmax in PyTorch, O(T^2) (tiny CPU tests). Returns o, lse and the max."""

    def fn(qh, kh, vh, scale, want_max):
        G = qh.shape[1] // kh.shape[1]
        kx, vx = kh.repeat_interleave(G, dim=1), vh.repeat_interleave(G, dim=1)
        T = qh.shape[2]
        i = torch.arange(T, device=qh.device).view(-1, 1)
        j = torch.arange(T, device=qh.device).view(1, -1)
        s = (scale * qh.float() @ kx.float().transpose(-1, -2)).masked_fill(~((j <= i) & (i - j < window)), float("-inf"))
        lse = torch.logsumexp(s, -1)
        o = (torch.softmax(s, -1) @ vx.float()).to(qh.dtype)
        return o, lse, s.amax(-1).detach() if want_max else None

    return fn


def torch_linear_fn(pq: torch.Tensor, pk: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Quadratic causal linear attention, unnormalized, scale 1 (tiny CPU tests)."""
    a = torch.einsum("bihf,bjhf->bhij", pq.float(), pk.float()).tril()
    return torch.einsum("bhij,bjhd->bihd", a, v.float()).to(v.dtype)


def fla_linear_fn(pq: torch.Tensor, pk: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """fla's chunked linear attention, unnormalized (normalize=False), scale 1."""
    from fla.ops.linear_attn import chunk_linear_attn

    return chunk_linear_attn(pq, pk, v, scale=1.0, normalize=False)[0]


def sharp_lse_max_fn(block_mask, flex, beta: float = 1e4) -> Callable:
    """m_i ~ lse(beta s_i.) / beta from a second FlexAttention call (see the module docstring). -> [B,H,T]."""
    from torch.nn.attention import flex_attention as fa

    aux_request = getattr(fa, "AuxRequest", None)
    value_dim = [16]  # the narrowest value Flex takes; the full head dim if it refuses a narrower one

    def m_fn(q, k, window, scale):
        qh, kh = q.transpose(1, 2), k.transpose(1, 2)
        gqa = qh.shape[1] != kh.shape[1]

        def call(dv):
            vd = kh.new_zeros(kh.shape[:-1] + (dv,))
            if aux_request is not None:
                return flex(qh, kh, vd, block_mask=block_mask, scale=scale * beta, enable_gqa=gqa,
                            return_aux=aux_request(lse=True))[1].lse
            return flex(qh, kh, vd, block_mask=block_mask, scale=scale * beta, enable_gqa=gqa, return_lse=True)[1]

        try:
            lse = call(value_dim[0])
        except Exception:
            if value_dim[0] == kh.shape[-1]:
                raise
            value_dim[0] = kh.shape[-1]
            lse = call(value_dim[0])
        return lse / beta

    return m_fn


def band_mask_mod(window: int):
    def band(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

    return band


def flex_window_fn(block_mask, flex) -> WindowFn:
    """FlexAttention over the window block mask, returning its LSE (and its max where supported)."""
    from torch.nn.attention import flex_attention as fa

    aux_request = getattr(fa, "AuxRequest", None)

    def fn(qh, kh, vh, scale, want_max):
        gqa = qh.shape[1] != kh.shape[1]
        want_max = want_max and qh.is_cuda and aux_request is not None
        if aux_request is not None:
            o, aux = flex(qh, kh, vh, block_mask=block_mask, scale=scale, enable_gqa=gqa,
                          return_aux=aux_request(lse=True, max_scores=want_max))
            return o, aux.lse, aux.max_scores if want_max else None
        o, lse = flex(qh, kh, vh, block_mask=block_mask, scale=scale, enable_gqa=gqa, return_lse=True)
        return o, lse, None

    return fn
