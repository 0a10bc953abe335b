"""Quadratic reference of the hybrid attention: plain, obviously right, O(T^2). Used by tests."""

from __future__ import annotations

import torch

from .common import check_inputs, compute_dtype, default_scale, key_mask, safe_divide, window_exp, window_weight_vector


def hybrid_attention_reference(
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
    """y_i = (g sum_W exp(s_ij - m_i) v_j + sum_L (phi_q_i . phi_k_j) v_j) / (g sum_W exp(s_ij - m_i) + sum_L phi_q_i . phi_k_j)

    W(i) = {j: i - window < j <= i}, L(i) = {j: j <= i - window}, m_i = max_{j in W(i)} s_ij.
    Shapes: q [B,T,H,D], k/v [B,T,Hkv,D], phi_q [B,T,H,F], phi_k [B,T,Hkv|H,F] -> y [B,T,H,D].
    attention_mask [B,T] marks padding keys (False/0), which count in neither set.
    """
    d = check_inputs(q, k, v, phi_q, phi_k, window)
    ct = compute_dtype(q)
    scale = default_scale(scale, d.D)
    gamma = window_weight_vector(window_weight, d.H, ct, q.device).view(1, d.H, 1, 1)
    valid = key_mask(attention_mask, d.B, d.T, q.device)

    qh = q.to(ct).transpose(1, 2)  # [B,H,T,D]
    kh = k.to(ct).repeat_interleave(d.G, dim=2).transpose(1, 2)
    vh = v.to(ct).repeat_interleave(d.G, dim=2).transpose(1, 2)
    pq = phi_q.to(ct).transpose(1, 2)  # [B,H,T,F]
    pk = phi_k.to(ct).repeat_interleave(d.H // d.Hf, dim=2).transpose(1, 2)

    i = torch.arange(d.T, device=q.device).view(-1, 1)
    j = torch.arange(d.T, device=q.device).view(1, -1)
    keep = valid.view(d.B, 1, 1, d.T)
    in_window = (j <= i) & (j > i - window) & keep  # [B,1,T,T]
    in_linear = (j <= i - window) & keep

    s = scale * qh @ kh.transpose(-1, -2)  # [B,H,T,T]
    a_win = window_exp(s, in_window)
    a_lin = torch.where(in_linear, pq @ pk.transpose(-1, -2), torch.zeros_like(s))

    num = gamma * (a_win @ vh) + a_lin @ vh
    den = gamma.squeeze(-1) * a_win.sum(-1) + a_lin.sum(-1)
    return safe_divide(num, den).transpose(1, 2).to(q.dtype)
