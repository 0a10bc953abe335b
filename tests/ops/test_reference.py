import itertools
import math

import pytest
import torch

from linearize.ops import hybrid_attention_reference

from .helpers import left_pad_mask, random_inputs


def brute_force(q, k, v, phi_q, phi_k, window, gamma, scale, mask=None):
    """The issue's definition, one query at a time, in float64."""
    B, T, H, D = q.shape
    Hkv, Hf = k.shape[2], phi_k.shape[2]
    y = torch.zeros(B, T, H, D, dtype=torch.float64)
    for b, h, i in itertools.product(range(B), range(H), range(T)):
        kh, fh = h // (H // Hkv), h // (H // Hf)
        valid = [j for j in range(i + 1) if mask is None or mask[b, j]]
        win = [j for j in valid if j > i - window]
        lin = [j for j in valid if j <= i - window]
        s = {j: scale * float(q[b, i, h] @ k[b, j, kh]) for j in win}
        m = max(s.values()) if s else 0.0
        num = torch.zeros(D, dtype=torch.float64)
        den = 0.0
        for j in win:
            w = gamma[h] * math.exp(s[j] - m)
            num += w * v[b, j, kh]
            den += w
        for j in lin:
            w = float(phi_q[b, i, h] @ phi_k[b, j, fh])
            num += w * v[b, j, kh]
            den += w
        y[b, i, h] = num / den if den > 0 else 0.0
    return y


@pytest.mark.parametrize("T,window", [(1, 0), (5, 0), (5, 1), (9, 3), (9, 4), (6, 10)])
@pytest.mark.parametrize("Hf", [2, 4])
def test_reference_matches_brute_force_float64(T, window, Hf):
    q, k, v, pq, pk, g = random_inputs(2, T, 4, 2, 5, 3, Hf, dtype=torch.float64, seed=T * 10 + window)
    scale = 0.37
    got = hybrid_attention_reference(q, k, v, pq, pk, window=window, window_weight=g, scale=scale)
    want = brute_force(q, k, v, pq, pk, window, g, scale)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_reference_padding_matches_brute_force():
    q, k, v, pq, pk, g = random_inputs(3, 8, 2, 1, 4, 3, 2, dtype=torch.float64, seed=3)
    mask = left_pad_mask(3, 8, [0, 3, 7])
    got = hybrid_attention_reference(q, k, v, pq, pk, window=3, window_weight=g, attention_mask=mask)
    want = brute_force(q, k, v, pq, pk, 3, g, 1 / 2.0, mask)
    torch.testing.assert_close(got[mask], want[mask], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("T,window", [(17, 17), (17, 100), (64, 64)])
def test_window_at_least_T_is_causal_softmax(T, window):
    """With the whole past in the window, gamma cancels and the result is SDPA's causal attention."""
    q, k, v, pq, pk, g = random_inputs(2, T, 6, 2, 8, 4, 6, dtype=torch.float64, seed=1)
    got = hybrid_attention_reference(q, k, v, pq, pk, window=window, window_weight=g)
    kk = k.repeat_interleave(3, dim=2).transpose(1, 2)
    vv = v.repeat_interleave(3, dim=2).transpose(1, 2)
    want = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), kk, vv, is_causal=True).transpose(1, 2)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_window_zero_is_causal_normalized_linear_attention():
    q, k, v, pq, pk, g = random_inputs(1, 12, 2, 2, 4, 5, 2, dtype=torch.float64, seed=2)
    got = hybrid_attention_reference(q, k, v, pq, pk, window=0, window_weight=g)
    a = torch.einsum("bihf,bjhf->bhij", pq, pk).tril()
    want = torch.einsum("bhij,bjhd->bihd", a, v) / a.sum(-1).transpose(1, 2).unsqueeze(-1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_returns_input_dtype():
    q, k, v, pq, pk, g = random_inputs(1, 5, 2, 1, 4, 3, 2, dtype=torch.bfloat16)
    assert hybrid_attention_reference(q, k, v, pq, pk, window=2, window_weight=g).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.__setitem__(1, a[1][..., :3]), "k and v"),
        (lambda a: a.__setitem__(0, a[0][:, :, :3]), "multiple"),
        (lambda a: a.__setitem__(4, a[4][..., :2]), "phi_k"),
    ],
)
def test_bad_shapes_raise_one_line(mutate, match):
    args = list(random_inputs(1, 5, 4, 2, 4, 3, 2)[:5])
    mutate(args)
    with pytest.raises(ValueError, match=match) as e:
        hybrid_attention_reference(*args, window=2, window_weight=0.1)
    assert "\n" not in str(e.value)
