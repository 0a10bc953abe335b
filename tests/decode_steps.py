"""A decode loop for tests: prefill, greedy steps through a step function, and the full forward to compare."""

from __future__ import annotations

import torch

from .tiny_models import cache_kw


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch: 0 at each row's first real token."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def greedy_steps_and_full_forward(model, step, cache, ids: torch.Tensor, mask: torch.Tensor, n: int, *,
                                  pass_mask: bool, no_recompile: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill ``ids`` [B, P] (padding ``mask`` [B, P]) into ``cache``, then ``n`` greedy tokens through
    ``step(tok [B, 1], pos [B, 1], cache[, mask over every token so far])``. ``no_recompile``: every step after
    the first must reuse the graph the first compiled. Returns the steps' logits [B, n, V] and the full
    forward's logits at the same positions."""
    B, P = ids.shape
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), **cache_kw(cache),
                       use_cache=True).logits[:, -1:]
        seq, full, got = ids, mask, []
        for i in range(n):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
            full = torch.cat([full, torch.ones(B, 1, dtype=full.dtype)], 1)
            args = (nxt, positions(full)[:, -1:], cache) + ((full,) if pass_mask else ())
            with torch._dynamo.config.patch(error_on_recompile=no_recompile and i > 0):
                logits = step(*args)
            got.append(logits)
        ref = model(input_ids=seq, attention_mask=full, position_ids=positions(full)).logits[:, P:]
    return torch.cat(got, 1), ref
