"""The attention-sink feature of the linear part (``LinearizeConfig.sink_tokens``): pure functions.

Softmax attention in many layers puts a large, length-independent share of its mass on the first few
tokens (attention sinks). In the hybrid those tokens soon fall in the linear part, whose learned
features are bounded (Hedgehog's are softmax outputs), so a sink cannot get the weight it needs, and as
the number of older keys n grows their ~n linear mass dilutes it. One extra feature fixes that:

    phi_k_extra[b, j]    = 1 if key j is among the first S valid tokens of row b, else 0
    phi_q_extra[b, i, h] = exp(min(q_i . u_h + c_h, cap))

so each sink key adds exp(q_i . u_h + c_h) to query i's linear weight (unbounded, independent of n) and
ordinary keys add nothing through it. q is the post-RoPE query the feature maps see: the sinks sit at
fixed positions, so their post-RoPE keys are fixed vectors and ``q_i . u_h`` can reproduce the softmax's
own logit ``q_i . k_sink`` (which rotates with i exactly as the post-RoPE q does); a pre-RoPE q could not.
It is one more feature column, so every implementation of the hybrid attention (and its cached state)
is used unchanged with F + 1 features; what must agree between the full forward, a prefill in pieces
and decode is which keys are sinks, i.e. each row's count of valid tokens so far.
"""

from __future__ import annotations

import math

import torch

#: largest exponent of the query feature: a sink weight of exp(30) ~ 1e13 already takes all the mass
#: from window keys (weights <= 1 each), and it keeps phi_q, the fp32 sums and their products finite
EXPONENT_CAP = 30.0


def exponent_cap(dtype: torch.dtype) -> float:
    """The cap of the query feature's exponent for features stored in ``dtype``: ``EXPONENT_CAP``, lower
    for fp16 (max 65504), where exp(30) would be inf and inf * 0 a NaN in the linear sums."""
    return min(EXPONENT_CAP, math.log(torch.finfo(dtype).max) - 1.0)


def sink_keys(valid: torch.Tensor, sinks: int, seen: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T] bool: the new keys that are among their row's first ``sinks`` valid tokens.

    valid [B, T] bool (False = padding, never a sink); ``seen`` [B]: valid tokens of the row before these
    (a prefill in pieces or decode continues the count), None for a sequence's start.
    """
    rank = valid.long().cumsum(1)  # 1-based rank of each valid token among this call's
    if seen is not None:
        rank = rank + seen.to(valid.device).long().view(-1, 1)
    return valid & (rank <= sinks)


def sink_query_feature(q: torch.Tensor, u: torch.Tensor, c: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, T, H, 1] = exp(min(q . u_h + c_h, cap)) in ``dtype``, from q [B, T, H, D], u [H, D], c [H].

    Computed in fp32 (fp64 stays fp64) with an elementwise product, not a matmul, so that autocast does
    not round the exponent to bf16 (a 0.1 error at 20 is a 10% error in the weight)."""
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    e = (q.to(ct) * u.to(ct)).sum(-1) + c.to(ct)
    return torch.exp(e.clamp(max=exponent_cap(dtype))).unsqueeze(-1).to(dtype)


def sink_key_feature(is_sink: torch.Tensor, heads: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, T, heads, 1] in ``dtype``: 1 for sink keys, 0 otherwise, the same for every key head."""
    B, T = is_sink.shape
    return is_sink.to(dtype).view(B, T, 1, 1).expand(B, T, heads, 1)
