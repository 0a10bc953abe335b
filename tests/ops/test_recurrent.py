import pytest
import torch

from linearize.ops import HybridState, hybrid_attention_chunked, hybrid_attention_reference, hybrid_attention_step

from .helpers import left_pad_mask, random_inputs


def decode_all(q, k, v, pq, pk, g, window, mask=None, state=None):
    B, T = q.shape[:2]
    if state is None:
        state = HybridState.empty(B, k.shape[2], k.shape[3], pk.shape[2], pk.shape[3], dtype=q.dtype, device="cpu")
    ys = []
    for t in range(T):
        m = None if mask is None else mask[:, t : t + 1]
        sl = slice(t, t + 1)
        y, state = hybrid_attention_step(q[:, sl], k[:, sl], v[:, sl], pq[:, sl], pk[:, sl], state, window=window, window_weight=g, attention_mask=m)
        ys.append(y)
    return torch.cat(ys, 1), state


@pytest.mark.parametrize("window", [0, 1, 2, 5, 16, 100])
@pytest.mark.parametrize("Hf", [2, 4])
def test_step_by_step_equals_reference_and_chunked_state(window, Hf):
    T = 40
    q, k, v, pq, pk, g = random_inputs(2, T, 4, 2, 8, 6, Hf, dtype=torch.float64, seed=window)
    mask = left_pad_mask(2, T, [0, 6])
    y, state = decode_all(q, k, v, pq, pk, g, window, mask)
    y_ref = hybrid_attention_reference(q, k, v, pq, pk, window=window, window_weight=g, attention_mask=mask)
    torch.testing.assert_close(y[mask], y_ref[mask], rtol=1e-10, atol=1e-10)
    _, s_chunk = hybrid_attention_chunked(
        q, k, v, pq, pk, window=window, window_weight=g, attention_mask=mask, output_final_state=True, chunk_size=16
    )
    for a, b in zip(state, s_chunk):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("window", [0, 3, 64])
def test_prefill_then_decode_equals_one_pass(window):
    T, P = 90, 70
    q, k, v, pq, pk, g = random_inputs(3, T, 6, 3, 8, 4, 6, dtype=torch.float64, seed=1)
    y_full, _ = hybrid_attention_chunked(q, k, v, pq, pk, window=window, window_weight=g, chunk_size=32)
    y_pre, state = hybrid_attention_chunked(
        q[:, :P], k[:, :P], v[:, :P], pq[:, :P], pk[:, :P], window=window, window_weight=g, output_final_state=True, chunk_size=32
    )
    y_dec, _ = decode_all(q[:, P:], k[:, P:], v[:, P:], pq[:, P:], pk[:, P:], g, window, state=state)
    torch.testing.assert_close(torch.cat([y_pre, y_dec], 1), y_full, rtol=1e-10, atol=1e-10)


def test_state_size_is_constant():
    """Decode memory does not grow: the tail stops at window - 1 tokens and S, z keep their shape."""
    q, k, v, pq, pk, g = random_inputs(1, 30, 2, 1, 4, 3, 2)
    _, state = decode_all(q, k, v, pq, pk, g, window=8)
    assert state.tail_len == 7 and state.S.shape == (1, 2, 3, 4) and state.S.dtype == torch.float32


def test_step_does_not_modify_input_state_and_checks_T():
    q, k, v, pq, pk, g = random_inputs(1, 5, 2, 2, 4, 3, 2)
    _, state = hybrid_attention_chunked(q, k, v, pq, pk, window=3, window_weight=g, output_final_state=True)
    before = [t.clone() for t in state]
    hybrid_attention_step(q[:, :1], k[:, :1], v[:, :1], pq[:, :1], pk[:, :1], state, window=3, window_weight=g)
    for a, b in zip(before, state):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="one token"):
        hybrid_attention_step(q[:, :2], k[:, :2], v[:, :2], pq[:, :2], pk[:, :2], state, window=3, window_weight=g)


def test_bf16_decode_close_to_fp32():
    inputs = random_inputs(2, 20, 4, 2, 8, 6, 4, dtype=torch.bfloat16, seed=4)
    y, state = decode_all(*inputs, window=4)
    assert y.dtype == torch.bfloat16 and state.S.dtype == torch.float32
    y_ref = hybrid_attention_reference(*[t.float() for t in inputs[:5]], window=4, window_weight=inputs[5])
    assert ((y.float() - y_ref).norm() / y_ref.norm()).item() < 1e-2
