"""Scores far above the window's max on keys outside it (future keys, keys past the window) must not turn the
backward into NaN. Found on Qwen2.5-Coder-0.5B (2026-12-04, CPU): its layer 2 gave every LoRA gradient below it
NaN at the first stage-2 step, because exp(s - m) overflowed on masked keys and where()'s backward multiplied
that inf by 0."""

import torch

from linearize.ops import hybrid_attention_chunked, hybrid_attention_reference
from linearize.ops.common import window_exp

from .helpers import random_inputs, rel_err


def test_window_exp_gradient_is_finite_with_huge_masked_scores():
    s = torch.tensor([[1.0, 2.0, 1000.0, -5.0], [3.0, 1e4, 0.5, 0.0]], dtype=torch.float32, requires_grad=True)
    allowed = torch.tensor([[True, True, False, True], [True, False, True, False]])
    p = window_exp(s, allowed)
    expected = torch.tensor([[torch.e**-1, 1.0, 0.0, torch.e**-7], [1.0, 0.0, torch.e**-2.5, 0.0]])
    assert torch.allclose(p.detach(), expected, rtol=1e-6)
    (p * torch.randn_like(p)).sum().backward()
    assert torch.isfinite(s.grad).all() and (s.grad[~allowed] == 0).all()


def test_a_row_with_no_allowed_key_is_zero_with_zero_gradient():
    s = torch.randn(2, 5, requires_grad=True)
    p = window_exp(s, torch.zeros(2, 5, dtype=torch.bool))
    p.sum().backward()
    assert (p == 0).all() and (s.grad == 0).all()


def _steep_inputs(T, dtype):
    """Random inputs plus a score that grows with the key's position: every future key outscores every key a
    query may see by up to ~2500, past exp's range even in float64."""
    q, k, v, pq, pk, g = random_inputs(1, T, 4, 2, 16, 8, 2, dtype=dtype, seed=T)
    q[..., 0] = 100.0
    k[..., 0] = 100.0 * torch.arange(T, dtype=dtype).view(1, T, 1) / T
    return [t.detach().requires_grad_(True) for t in (q, k, v, pq, pk, g)]


def test_chunked_and_reference_backward_stay_finite_and_agree_on_steep_scores():
    for window in (1, 16, 64):
        ref_in, chk_in = _steep_inputs(65, torch.float64), _steep_inputs(65, torch.float64)
        y_ref = hybrid_attention_reference(*ref_in[:5], window=window, window_weight=ref_in[5])
        y, _ = hybrid_attention_chunked(*chk_in[:5], window=window, window_weight=chk_in[5], chunk_size=32)
        assert torch.isfinite(y).all() and rel_err(y, y_ref) < 1e-10
        dy = torch.randn_like(y)
        grads_ref = torch.autograd.grad(y_ref, ref_in, dy)
        grads = torch.autograd.grad(y, chk_in, dy)
        for name, a, b in zip(["q", "k", "v", "phi_q", "phi_k", "gamma"], grads, grads_ref):
            assert torch.isfinite(a).all() and torch.isfinite(b).all(), f"{name}: non-finite gradient (window {window})"
            assert (a - b).norm() <= 1e-8 * b.norm() + 1e-12, f"{name} (window {window})"
