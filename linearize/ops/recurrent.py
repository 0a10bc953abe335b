"""One decode step of the hybrid attention: constant work per token, a fixed-size state."""

from __future__ import annotations

import torch

from .common import check_inputs, compute_dtype, default_scale, key_mask, safe_divide, window_exp, window_weight_vector
from .state import HybridState


def hybrid_attention_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    state: HybridState,
    *,
    window: int,
    window_weight: float | torch.Tensor,
    scale: float | None = None,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, HybridState]:
    """Attend one new token per sequence, then advance the state.

    Shapes: q [B,1,H,D], k/v [B,1,Hkv,D], phi_q [B,1,H,F], phi_k [B,1,H',F], attention_mask [B,1].
    The window is the state's tail (up to window-1 keys) plus the new key; the linear part reads the
    sums of everything older. The oldest tail key moves into the sums once the tail is full.
    Returns y [B,1,H,D] and the new state (the input state is not modified).
    """
    d = check_inputs(q, k, v, phi_q, phi_k, window)
    if d.T != 1:
        raise ValueError(f"hybrid_attention_step takes one token per sequence; got T={d.T}")
    ct = compute_dtype(q)
    dev = q.device
    scale = default_scale(scale, d.D)
    gamma = window_weight_vector(window_weight, d.H, ct, dev).view(1, d.Hkv, d.G, 1)
    valid = key_mask(attention_mask, d.B, 1, dev)
    L = state.tail_len
    if L > max(window - 1, 0):
        raise ValueError(f"state holds {L} window keys but window={window} keeps at most {max(window - 1, 0)}")

    qg = q.to(ct).view(d.B, d.Hkv, d.G, d.D)
    pq = phi_q.to(ct).view(d.B, d.Hkv, d.G, d.F)
    S = state.S.to(ct).view(d.B, d.Hkv, d.Gk, d.F, d.D)
    z = state.z.to(ct).view(d.B, d.Hkv, d.Gk, d.F)

    # The window and the tail after this step: ext = [tail, new].
    k_ext = torch.cat([state.k.to(k.dtype), k], dim=1)  # [B,L+1,Hkv,D]
    v_ext = torch.cat([state.v.to(v.dtype), v], dim=1)
    pk_ext = torch.cat([state.phi_k.to(phi_k.dtype), phi_k], dim=1)  # [B,L+1,H',F]
    m_ext = torch.cat([state.mask, valid], dim=1)  # [B,L+1]
    keep = min(window - 1, L + 1) if window > 0 else 0
    evict = L + 1 - keep  # 0 or 1 tokens leave the window and join the linear sums

    def absorb(S: torch.Tensor, z: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        pk = (pk_ext[:, lo:hi].to(ct) * m_ext[:, lo:hi, None, None]).view(d.B, hi - lo, d.Hkv, d.Gk, d.F)
        vv = v_ext[:, lo:hi].to(ct).view(d.B, hi - lo, d.Hkv, 1, d.D)
        return S + torch.einsum("bthgf,bthgd->bhgfd", pk, vv.expand(-1, -1, -1, d.Gk, -1)), z + pk.sum(1)

    if window == 0:  # the new key is in the linear set of its own query
        S, z = absorb(S, z, 0, 1)

    # Linear part: [B,Hkv,G,F] x [B,Hkv,Gk,F,D]
    num = (pq.unsqueeze(-2) @ S).squeeze(-2)  # [B,Hkv,G,D]
    den = (pq * z).sum(-1)  # [B,Hkv,G]
    if window > 0:
        kw = k_ext.to(ct).permute(0, 2, 1, 3)  # [B,Hkv,L+1,D]
        vw = v_ext.to(ct).permute(0, 2, 1, 3)
        s = scale * (qg @ kw.transpose(-1, -2))  # [B,Hkv,G,L+1]
        allowed = m_ext.view(d.B, 1, 1, L + 1)
        p = window_exp(s, allowed)
        num = num + gamma * (p @ vw)
        den = den + gamma.squeeze(-1) * p.sum(-1)
        if evict:
            S, z = absorb(S, z, 0, evict)

    y = safe_divide(num, den).reshape(d.B, 1, d.H, d.D).to(q.dtype)
    new_state = HybridState(
        S=S.reshape(d.B, d.Hf, d.F, d.D),
        z=z.reshape(d.B, d.Hf, d.F),
        k=k_ext[:, evict:] if window > 0 else k_ext[:, :0],
        v=v_ext[:, evict:] if window > 0 else v_ext[:, :0],
        phi_k=pk_ext[:, evict:] if window > 0 else pk_ext[:, :0],
        mask=m_ext[:, evict:] if window > 0 else m_ext[:, :0],
    )
    return y, new_state
