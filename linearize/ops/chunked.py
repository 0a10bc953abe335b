"""Chunked PyTorch hybrid attention: linear memory in T, differentiable, resumable from a state.

Memory is O(T * (window + chunk)) for the window part and O(T / chunk * F * D) for the per-chunk
linear states; no T x T matrix is ever formed.

Coordinates. Let the "extended" key sequence be ``ext = [tail of the state (L keys), new keys (T)]``,
left-padded with invalid slots to length ``P + T`` where ``P = min(window - 1, L + T)``. Then for new
query ``i``:
  * its window is ``ext[i : i + P + 1]`` (the ``P + 1 = window`` most recent keys, itself included);
  * its linear set is the state's sums plus ``ext[e]`` for ``e < i`` (``e <= i`` when window == 0);
  * after the T queries, the linear sums hold ``ext[:T]`` too and the new tail is ``ext[T:]``.
A window larger than everything seen behaves as ``window = L + T + 1`` (exact softmax, nothing linear),
so ``window >= T`` costs O(T^2) like softmax attention would, but never allocates past the sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as Fn

from .common import Dims, check_inputs, compute_dtype, default_scale, key_mask, safe_divide, window_exp, window_weight_vector
from .state import HybridState


def _grouped(x: torch.Tensor, heads: int, groups: int) -> torch.Tensor:
    """[B, T, heads*groups, X] -> [B, heads, groups, T, X] (a view; no repeated k/v is materialized)."""
    B, T, _, X = x.shape
    return x.view(B, T, heads, groups, X).permute(0, 2, 3, 1, 4)


def _chunks(x: torch.Tensor, n: int, C: int) -> torch.Tensor:
    """[..., T, X] -> [..., n, C, X], zero-padding T up to n*C."""
    T = x.shape[-2]
    x = Fn.pad(x, (0, 0, 0, n * C - T))
    return x.unflatten(-2, (n, C))


def _check_state(state: HybridState, d: Dims, window: int) -> None:
    want_S = (d.B, d.Hf, d.F, d.D)
    if tuple(state.S.shape) != want_S or tuple(state.z.shape) != want_S[:3]:
        raise ValueError(f"state S/z must be {want_S}/{want_S[:3]}; got {tuple(state.S.shape)}/{tuple(state.z.shape)}")
    L = state.tail_len
    if L > max(window - 1, 0):
        raise ValueError(f"state holds {L} window keys but window={window} keeps at most {max(window - 1, 0)}")
    if state.k.shape != (d.B, L, d.Hkv, d.D) or state.phi_k.shape != (d.B, L, d.Hf, d.F) or state.mask.shape != (d.B, L):
        raise ValueError("state tail shapes do not match the inputs (k/v [B,L,Hkv,D], phi_k [B,L,H',F], mask [B,L])")


def hybrid_attention_chunked(
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
    """Hybrid attention over chunks of ``chunk_size`` queries. Same math as the reference.

    Args: q [B,T,H,D], k/v [B,T,Hkv,D], phi_q [B,T,H,F], phi_k [B,T,Hkv|H,F]; attention_mask [B,T]
    (0 = padding key); initial_state from a previous call (prefill in pieces).
    Returns y [B,T,H,D] in q's dtype, and the final state if ``output_final_state``.
    """
    d = check_inputs(q, k, v, phi_q, phi_k, window)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    ct = compute_dtype(q)
    dev = q.device
    scale = default_scale(scale, d.D)
    gamma = window_weight_vector(window_weight, d.H, ct, dev).view(1, d.Hkv, d.G, 1, 1)
    valid = key_mask(attention_mask, d.B, d.T, dev)
    if initial_state is None:
        initial_state = HybridState.empty(d.B, d.Hkv, d.D, d.Hf, d.F, dtype=k.dtype, device=dev, phi_dtype=phi_k.dtype)
    else:
        _check_state(initial_state, d, window)
    L = initial_state.tail_len
    if d.T == 0:
        return q.new_zeros(q.shape), (initial_state if output_final_state else None)
    C = min(chunk_size, max(d.T, 1))
    n = -(-d.T // C)

    # The extended key sequence [tail, new], left-padded to P + T (see module docstring).
    P = min(window - 1, L + d.T) if window > 0 else 0
    pad = P - L

    def ext(tail: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        x = torch.cat([tail.to(new.dtype), new], dim=1)
        return Fn.pad(x, (0,) * (2 * (x.dim() - 2)) + (pad, 0)) if pad else x

    k_ext, v_ext = ext(initial_state.k, k), ext(initial_state.v, v)
    pk_ext = ext(initial_state.phi_k, phi_k)
    m_ext = ext(initial_state.mask, valid)  # [B, P+T]

    qg = _chunks(_grouped(q.to(ct), d.Hkv, d.G), n, C)  # [B,Hkv,G,n,C,D]
    pqg = _chunks(_grouped(phi_q.to(ct), d.Hkv, d.G), n, C)  # [B,Hkv,G,n,C,F]
    vg_ext = _grouped(v_ext.to(ct), d.Hkv, 1)  # [B,Hkv,1,P+T,D]

    num = torch.zeros(d.B, d.Hkv, d.G, n, C, d.D, dtype=ct, device=dev)
    den = torch.zeros(d.B, d.Hkv, d.G, n, C, dtype=ct, device=dev)

    if window > 0:
        # Window part: chunk c's queries see ext[c*C : c*C + C + P] under a band mask.
        W = C + P
        kg_ext = _grouped(k_ext.to(ct), d.Hkv, 1)
        tail_pad = n * C - d.T
        kb = Fn.pad(kg_ext, (0, 0, 0, tail_pad)).unfold(3, W, C).transpose(-1, -2)  # [B,Hkv,1,n,W,D]
        vb = Fn.pad(vg_ext, (0, 0, 0, tail_pad)).unfold(3, W, C).transpose(-1, -2)
        mb = Fn.pad(m_ext, (0, tail_pad)).unfold(1, W, C)  # [B,n,W]
        r = torch.arange(C, device=dev).view(C, 1)
        col = torch.arange(W, device=dev).view(1, W)
        band = (col >= r) & (col <= r + P)  # [C,W]
        allowed = band & mb.view(d.B, 1, 1, n, 1, W)
        s = scale * (qg @ kb.transpose(-1, -2))  # [B,Hkv,G,n,C,W]
        p = window_exp(s, allowed)
        num = num + gamma.unsqueeze(-1) * (p @ vb)
        den = den + gamma * p.sum(-1)

    # Linear part over ext[:T]: strictly causal (inclusive when window == 0), plus the initial sums.
    pk_lin = _grouped((pk_ext[:, : d.T].to(ct) * m_ext[:, : d.T, None, None]), d.Hkv, d.Gk)  # [B,Hkv,Gk,T,F]
    pkc = _chunks(pk_lin, n, C)  # [B,Hkv,Gk,n,C,F]
    vc = _chunks(vg_ext[..., : d.T, :], n, C)  # [B,Hkv,1,n,C,D]
    kv = pkc.transpose(-1, -2) @ vc  # [B,Hkv,Gk,n,F,D]
    ksum = pkc.sum(-2)  # [B,Hkv,Gk,n,F]
    S0 = initial_state.S.to(ct).view(d.B, d.Hkv, d.Gk, 1, d.F, d.D)
    z0 = initial_state.z.to(ct).view(d.B, d.Hkv, d.Gk, 1, d.F)
    S_before = S0 + torch.cumsum(Fn.pad(kv, (0, 0, 0, 0, 1, 0))[:, :, :, :-1], dim=3)  # exclusive prefix
    z_before = z0 + torch.cumsum(Fn.pad(ksum, (0, 0, 1, 0))[:, :, :, :-1], dim=3)
    num = num + pqg @ S_before
    den = den + (pqg * z_before.unsqueeze(-2)).sum(-1)
    A = pqg @ pkc.transpose(-1, -2)  # [B,Hkv,G,n,C,C]
    A = A.tril(0 if window == 0 else -1)
    num = num + A @ vc
    den = den + A.sum(-1)

    y = safe_divide(num, den).flatten(3, 4)[:, :, :, : d.T]  # [B,Hkv,G,T,D]
    y = y.permute(0, 3, 1, 2, 4).reshape(d.B, d.T, d.H, d.D).to(q.dtype)

    if not output_final_state:
        return y, None
    final = HybridState(
        S=(S0.squeeze(3) + kv.sum(3)).reshape(d.B, d.Hf, d.F, d.D),
        z=(z0.squeeze(3) + ksum.sum(3)).reshape(d.B, d.Hf, d.F),
        k=k_ext[:, d.T :],
        v=v_ext[:, d.T :],
        phi_k=pk_ext[:, d.T :],
        mask=m_ext[:, d.T :],
    )
    return y, final
