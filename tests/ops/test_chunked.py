import pytest
import torch

from linearize.ops import HybridState, hybrid_attention, hybrid_attention_chunked, hybrid_attention_reference

from .helpers import left_pad_mask, random_inputs, rel_err

TS = [1, 7, 63, 64, 65, 200, 1000]
WINDOWS = [0, 1, 16, 64, "T"]  # "T": window >= T, i.e. exact softmax


def _window(w, T):
    return T + 3 if w == "T" else w


@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("w", WINDOWS)
@pytest.mark.parametrize("Hf", [2, 4], ids=["phik_per_kv_head", "phik_per_q_head"])
def test_chunked_matches_reference_fp32_outputs_and_grads(T, w, Hf):
    """GQA (4 query heads over 2 kv heads), random data, chunk 32 so T=63/64/65 hit every tail case."""
    window = _window(w, T)
    B = 2 if T <= 200 else 1
    ref_in = random_inputs(B, T, 4, 2, 16, 8, Hf, dtype=torch.float32, seed=T + 7 * window, requires_grad=True)
    chk_in = [t.detach().clone().requires_grad_(True) for t in ref_in]
    q, k, v, pq, pk, g = ref_in
    y_ref = hybrid_attention_reference(q, k, v, pq, pk, window=window, window_weight=g)
    q2, k2, v2, pq2, pk2, g2 = chk_in
    y, _ = hybrid_attention_chunked(q2, k2, v2, pq2, pk2, window=window, window_weight=g2, chunk_size=32)
    assert rel_err(y, y_ref) < 1e-5
    dy = torch.randn_like(y_ref)
    grads_ref = torch.autograd.grad(y_ref, ref_in, dy, allow_unused=True, materialize_grads=True)
    grads = torch.autograd.grad(y, chk_in, dy, allow_unused=True, materialize_grads=True)
    for name, a, b in zip(["q", "k", "v", "phi_q", "phi_k", "gamma"], grads, grads_ref):
        # a floor at fp32 noise level of the whole backward: gamma's true gradient is exactly 0 when
        # window >= T (gamma cancels), and then both sides are rounding noise
        floor = 1e-5 * grads_ref[2].norm()
        assert (a - b).norm() <= 1e-4 * b.norm() + floor, name


@pytest.mark.parametrize("T,window", [(7, 0), (65, 16), (200, 64), (130, 200)])
def test_chunked_bf16_close_to_fp32_reference(T, window):
    """bf16 inputs, fp32 accumulation: error at bf16 rounding level, output in bf16."""
    inputs = random_inputs(2, T, 4, 2, 16, 8, 4, dtype=torch.bfloat16, seed=T)
    q, k, v, pq, pk, g = inputs
    y, _ = hybrid_attention_chunked(q, k, v, pq, pk, window=window, window_weight=g, chunk_size=32)
    assert y.dtype == torch.bfloat16
    y_ref = hybrid_attention_reference(*[t.float() for t in inputs[:5]], window=window, window_weight=g)
    assert rel_err(y, y_ref) < 1e-2


def test_bf16_grads_flow_and_are_close():
    inputs = random_inputs(1, 70, 4, 2, 16, 8, 4, dtype=torch.bfloat16, seed=5, requires_grad=True)
    y, _ = hybrid_attention_chunked(*inputs[:5], window=16, window_weight=inputs[5], chunk_size=32)
    ref_in = [t.detach().float().requires_grad_(True) for t in inputs]
    y_ref = hybrid_attention_reference(*ref_in[:5], window=16, window_weight=ref_in[5])
    dy = torch.randn_like(y_ref)
    for a, b in zip(torch.autograd.grad(y, inputs, dy.bfloat16()), torch.autograd.grad(y_ref, ref_in, dy)):
        assert a.dtype == b.dtype or a.dtype == torch.bfloat16
        assert rel_err(a, b) < 3e-2


@pytest.mark.parametrize("window", [0, 1, 5, 16, 300])
@pytest.mark.parametrize("splits", [[1], [37], [64, 65], [10, 10, 100], [199]])
def test_split_prefill_with_state_equals_one_pass(window, splits):
    T = 200
    q, k, v, pq, pk, g = random_inputs(2, T, 4, 2, 8, 6, 2, dtype=torch.float64, seed=window)
    mask = left_pad_mask(2, T, [0, 13])
    y_full, s_full = hybrid_attention_chunked(
        q, k, v, pq, pk, window=window, window_weight=g, attention_mask=mask, output_final_state=True, chunk_size=16
    )
    bounds = [0] + [sum(splits[: i + 1]) for i in range(len(splits))] + [T]
    state, ys = None, []
    for a, b in zip(bounds[:-1], bounds[1:]):
        y, state = hybrid_attention_chunked(
            q[:, a:b], k[:, a:b], v[:, a:b], pq[:, a:b], pk[:, a:b], window=window, window_weight=g,
            attention_mask=mask[:, a:b], initial_state=state, output_final_state=True, chunk_size=16,
        )
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys, 1), y_full, rtol=1e-10, atol=1e-10)
    for a, b in zip(state, s_full):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert state.tail_len == min(max(window - 1, 0), T)


@pytest.mark.parametrize("window", [0, 3, 16])
def test_left_padding_equals_unpadded(window):
    """A left-padded sequence gives the same outputs on its real tokens as the sequence alone."""
    T, pad = 50, 11
    q, k, v, pq, pk, g = random_inputs(1, T, 4, 2, 8, 6, 4, dtype=torch.float64, seed=9)
    noise = random_inputs(1, pad, 4, 2, 8, 6, 4, dtype=torch.float64, seed=10)
    padded = [torch.cat([n, x], 1) for n, x in zip(noise[:5], (q, k, v, pq, pk))]
    mask = left_pad_mask(1, T + pad, [pad])
    y_pad, _ = hybrid_attention_chunked(*padded, window=window, window_weight=g, attention_mask=mask, chunk_size=16)
    y, _ = hybrid_attention_chunked(q, k, v, pq, pk, window=window, window_weight=g, chunk_size=16)
    torch.testing.assert_close(y_pad[:, pad:], y, rtol=1e-10, atol=1e-10)
    y_ref = hybrid_attention_reference(*padded, window=window, window_weight=g, attention_mask=mask)
    torch.testing.assert_close(y_pad[:, pad:], y_ref[:, pad:], rtol=1e-10, atol=1e-10)


def test_public_entry_point_and_scalar_window_weight():
    q, k, v, pq, pk, _ = random_inputs(2, 33, 4, 4, 8, 6, 4, dtype=torch.float64)
    y = hybrid_attention(q, k, v, pq, pk, window=8, window_weight=0.3, scale=0.2)
    y_ref = hybrid_attention_reference(q, k, v, pq, pk, window=8, window_weight=0.3, scale=0.2)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)


def test_memory_is_linear_never_a_T_by_T_matrix():
    """No tensor saved for backward (nor the output) grows like T^2: the largest is O(T * (window + chunk))."""
    T, H, C, W = 4096, 2, 64, 64
    inputs = random_inputs(1, T, H, H, 16, 8, H, requires_grad=True)
    biggest = 0

    def pack(t):
        nonlocal biggest
        biggest = max(biggest, t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, _ = hybrid_attention_chunked(*inputs[:5], window=W, window_weight=inputs[5], chunk_size=C)
    assert biggest <= H * T * (C + W), biggest
    assert biggest < T * T / 8


def test_state_rejects_mismatched_window():
    q, k, v, pq, pk, g = random_inputs(1, 20, 2, 2, 4, 3, 2)
    _, st = hybrid_attention_chunked(q, k, v, pq, pk, window=8, window_weight=g, output_final_state=True)
    with pytest.raises(ValueError, match="window"):
        hybrid_attention_chunked(q, k, v, pq, pk, window=4, window_weight=g, initial_state=st)


def test_empty_state_constructor_matches_fresh_start():
    q, k, v, pq, pk, g = random_inputs(2, 9, 2, 1, 4, 3, 1, dtype=torch.float64)
    st = HybridState.empty(2, 1, 4, 1, 3, dtype=torch.float64, device="cpu")
    a, _ = hybrid_attention_chunked(q, k, v, pq, pk, window=4, window_weight=g, initial_state=st)
    b, _ = hybrid_attention_chunked(q, k, v, pq, pk, window=4, window_weight=g)
    torch.testing.assert_close(a, b)
