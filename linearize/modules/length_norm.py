"""Length normalization of the linear part (``LinearizeConfig.length_norm``): pure functions.

The linear part of query i sums phi_q_i . phi_k_j over the n_i valid keys older than the window, so its
mass grows ~linearly in n_i, while a softmax's mass on distant keys grows sub-linearly. Scaling phi_q_i
by s_{i,h} = (L0 / max(n_i, L0)) ** alpha_h makes it grow like n^(1 - alpha_h) past L0. It is only a
pre-scaling of phi_q, so every implementation of the hybrid attention (and its cached state) is used
unchanged; all that must agree between the full forward, a prefill in pieces and decode is n_i.
"""

from __future__ import annotations

import torch
import torch.nn.functional as Fn


def linear_key_counts(
    valid: torch.Tensor, window: int, seen: torch.Tensor | None = None, tail: torch.Tensor | None = None
) -> torch.Tensor:
    """n [B, T] int64: valid keys in each new query's linear set (keys at positions <= i - window).

    valid [B, T] bool: the new tokens' keys (False = padding). To continue a sequence: ``seen`` [B], the
    valid tokens before these, of which ``tail`` [B, L] (bool, oldest first) is the validity of the last
    L positions (the state's window tail, L <= window - 1, or every earlier position if fewer).
    Everything before the tail is older than any new query's window, so it is all in the linear sets.
    """
    B, T = valid.shape
    ext = valid if tail is None else torch.cat([tail.to(valid.device), valid], 1)
    L = ext.shape[1] - T
    before = Fn.pad(ext.long().cumsum(1), (1, 0))  # [B, L+T+1]: valid among ext[:e]
    # query i sits at ext[L + i]; its linear set is ext[: L + i - window + 1] (none if that is <= 0)
    upto = (torch.arange(T, device=valid.device) + (L + 1 - window)).clamp(min=0)
    n = before.index_select(1, upto)
    if seen is not None:
        older = seen.to(valid.device).long() - (0 if tail is None else tail.long().sum(1))
        n = n + older.view(B, 1)
    return n


def length_scale(counts: torch.Tensor, alpha: torch.Tensor, start: int, dtype: torch.dtype) -> torch.Tensor:
    """s [B, T, H, 1] = (start / max(counts, start)) ** alpha, from counts [B, T] and alpha [H].

    Exactly 1 where alpha == 0 (exp(-0.0)), so an untrained alpha leaves the plain recipe bit for bit."""
    log_ratio = torch.log(counts.clamp(min=start).to(dtype) / start)  # >= 0
    return torch.exp(-log_ratio.unsqueeze(-1) * alpha.to(dtype)).unsqueeze(-1)


def scale_phi_q(phi_q: torch.Tensor, counts: torch.Tensor, alpha: torch.Tensor, start: int) -> torch.Tensor:
    """phi_q [B, T, H, F] scaled by ``length_scale``, in fp32 (fp64 stays fp64), returned in phi_q's dtype."""
    ct = torch.float64 if phi_q.dtype == torch.float64 else torch.float32
    return (phi_q.to(ct) * length_scale(counts, alpha, start, ct)).to(phi_q.dtype)
