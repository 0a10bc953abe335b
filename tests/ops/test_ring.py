"""The ring (decode) form of the state: in-place steps equal ``hybrid_attention_step`` exactly (fp64)."""

import pytest
import torch

from linearize.ops import HybridState, hybrid_attention_chunked, hybrid_attention_step
from linearize.ops.ring import ring_from_state, ring_slots, ring_step_torch, ring_tail_mask, ring_to_state

from .helpers import left_pad_mask, random_inputs

TOL = dict(rtol=1e-10, atol=1e-10)


def empty_state(k, pk):
    """An empty state; its sums in fp64 like the inputs, as the reference's state becomes after one step."""
    st = HybridState.empty(k.shape[0], k.shape[2], k.shape[3], pk.shape[2], pk.shape[3], dtype=k.dtype, device="cpu")
    return st._replace(S=st.S.double(), z=st.z.double())


def assert_states_equal(a: HybridState, b: HybridState):
    for name, x, y in zip(HybridState._fields, a, b):
        assert x.shape == y.shape and x.dtype == y.dtype, name
        torch.testing.assert_close(x, y, **TOL, msg=name)


def run_both(inputs, window, mask, state, t0, t1, fold=1):
    """Steps t0..t1-1 through the ordered reference and through a ring built from the same state."""
    q, k, v, pq, pk, g = inputs
    ring = ring_from_state(state, window, fold)
    ys_ref, ys_ring = [], []
    for t in range(t0, t1):
        sl = slice(t, t + 1)
        m = None if mask is None else mask[:, sl]
        args = (q[:, sl], k[:, sl], v[:, sl], pq[:, sl], pk[:, sl])
        y, state = hybrid_attention_step(*args, state, window=window, window_weight=g, attention_mask=m)
        ys_ref.append(y)
        ys_ring.append(ring_step_torch(*args, ring, window_weight=g, attention_mask=m))
    return torch.cat(ys_ref, 1), torch.cat(ys_ring, 1), state, ring


@pytest.mark.parametrize("window", [0, 1, 2, 5, 64])
@pytest.mark.parametrize("H,Hkv,Hf", [(4, 2, 2), (4, 2, 4), (3, 3, 3), (6, 1, 1)])
def test_ring_steps_equal_reference_steps(window, H, Hkv, Hf):
    T = 90 if window == 64 else 37  # past the window, so keys leave the ring
    inputs = random_inputs(3, T, H, Hkv, 8, 5, Hf, dtype=torch.float64, seed=window + 7 * Hf)
    mask = left_pad_mask(3, T, [0, 4, 11])
    mask[1, 20] = False  # padding inside a sequence too
    y_ref, y_ring, state, ring = run_both(inputs, window, mask, empty_state(inputs[1], inputs[4]), 0, T)
    torch.testing.assert_close(y_ring, y_ref, **TOL)
    assert_states_equal(ring_to_state(ring), state)
    assert int(ring.pos) == T and ring.k.shape[1] == ring_slots(window)


@pytest.mark.parametrize("window,fold", [(2, 2), (5, 3), (5, 8), (16, 7), (64, 16)])
@pytest.mark.parametrize("H,Hkv,Hf", [(4, 2, 2), (4, 2, 4)])
def test_deferred_folding_equals_reference_steps(window, fold, H, Hkv, Hf):
    """Keys that left the window wait in the ring (read out as linear terms) and join S every ``fold`` steps:
    every output, and the ordered state after every step (mid-wait included), equal the eager reference's."""
    from linearize.ops.ring import fold_phase

    T = window + 3 * fold + 5  # several folds, ending with keys waiting
    inputs = random_inputs(2, T, H, Hkv, 8, 5, Hf, dtype=torch.float64, seed=window * 31 + fold)
    q, k, v, pq, pk, g = inputs
    mask = left_pad_mask(2, T, [0, 3])
    mask[1, window + 1] = False  # a padding key that waits, then is folded
    state = empty_state(k, pk)
    ring = ring_from_state(state, window, fold)
    assert ring.slots == window + fold - 1 and ring.fold == fold
    folds, s_before = 0, ring.S.clone()
    for t in range(T):
        sl = slice(t, t + 1)
        args = (q[:, sl], k[:, sl], v[:, sl], pq[:, sl], pk[:, sl])
        _, does = fold_phase(ring.pos, window, fold)
        y, state = hybrid_attention_step(*args, state, window=window, window_weight=g, attention_mask=mask[:, sl])
        torch.testing.assert_close(ring_step_torch(*args, ring, window_weight=g, attention_mask=mask[:, sl]), y, **TOL)
        assert_states_equal(ring_to_state(ring), state)
        # S itself changes only on the steps that fold
        assert bool(does) == (not torch.equal(ring.S, s_before)), f"step {t}"
        folds, s_before = folds + int(does), ring.S.clone()
    assert folds == (T - window + 1) // fold >= 3


@pytest.mark.parametrize("fold", [1, 4])
def test_handover_with_deferred_folding(fold):
    """ring decode -> ordered state mid-wait -> chunked prefill -> ring decode equals one chunked pass."""
    window, T, cuts = 6, 60, (20, 31, 40)
    q, k, v, pq, pk, g = inputs = random_inputs(2, T, 4, 2, 8, 6, 2, dtype=torch.float64, seed=13)
    mask = left_pad_mask(2, T, [0, 5])
    y_full, s_full = hybrid_attention_chunked(
        q, k, v, pq, pk, window=window, window_weight=g, attention_mask=mask, output_final_state=True, chunk_size=16
    )
    sl = slice(0, cuts[0])
    y1, state = hybrid_attention_chunked(q[:, sl], k[:, sl], v[:, sl], pq[:, sl], pk[:, sl], window=window,
                                         window_weight=g, attention_mask=mask[:, sl], output_final_state=True)
    _, y2, _, ring = run_both(inputs, window, mask, state, cuts[0], cuts[1], fold)
    sl = slice(cuts[1], cuts[2])
    y3, state = hybrid_attention_chunked(q[:, sl], k[:, sl], v[:, sl], pq[:, sl], pk[:, sl], window=window,
                                         window_weight=g, attention_mask=mask[:, sl], initial_state=ring_to_state(ring),
                                         output_final_state=True)
    _, y4, _, ring = run_both(inputs, window, mask, state, cuts[2], T, fold)
    torch.testing.assert_close(torch.cat([y1, y2, y3, y4], 1), y_full, **TOL)
    assert_states_equal(ring_to_state(ring), s_full)


def test_fold_is_checked():
    _, k, _, _, pk, _ = random_inputs(2, 2, 4, 2, 8, 6, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="fold"):
        ring_from_state(empty_state(k, pk), 4, 0)
    assert ring_from_state(empty_state(k, pk), 1, 8).fold == 1  # no ring: nothing waits


@pytest.mark.parametrize("window", [0, 1, 2, 5, 64])
def test_handover_prefill_ring_decode_chunked_prefill(window):
    """chunked prefill -> ring decode -> chunked prefill again -> ring decode equals one chunked pass."""
    T, cuts = 120, (70, 85, 100)
    q, k, v, pq, pk, g = inputs = random_inputs(2, T, 4, 2, 8, 6, 2, dtype=torch.float64, seed=3)
    mask = left_pad_mask(2, T, [0, 9])
    y_full, s_full = hybrid_attention_chunked(
        q, k, v, pq, pk, window=window, window_weight=g, attention_mask=mask, output_final_state=True, chunk_size=16
    )

    def prefill(a, b, state):
        sl = slice(a, b)
        return hybrid_attention_chunked(
            q[:, sl], k[:, sl], v[:, sl], pq[:, sl], pk[:, sl], window=window, window_weight=g,
            attention_mask=mask[:, sl], initial_state=state, output_final_state=True, chunk_size=16,
        )

    y1, state = prefill(0, cuts[0], None)
    _, y2, _, ring = run_both(inputs, window, mask, state, cuts[0], cuts[1])
    y3, state = prefill(cuts[1], cuts[2], ring_to_state(ring))
    _, y4, _, ring = run_both(inputs, window, mask, state, cuts[2], T)
    torch.testing.assert_close(torch.cat([y1, y2, y3, y4], 1), y_full, **TOL)
    assert_states_equal(ring_to_state(ring), s_full)


def test_conversion_round_trip_and_short_tail():
    q, k, v, pq, pk, g = random_inputs(2, 3, 4, 2, 8, 6, 4, dtype=torch.float64, seed=5)
    _, state = hybrid_attention_chunked(q, k, v, pq, pk, window=16, window_weight=g, output_final_state=True)
    ring = ring_from_state(state, 16)
    assert ring.k.shape == (2, 16, 2, 8) and int(ring.pos) == 3 and not ring.mask[:, 3:].any()
    assert_states_equal(ring_to_state(ring), state)
    ring.S.add_(1.0)  # the ring owns its tensors: in-place steps never touch the HybridState
    assert not torch.equal(ring.S, state.S)
    with pytest.raises(ValueError, match="keeps at most"):
        ring_from_state(state, 3)


def test_index_batch_reorders_like_the_ordered_state():
    inputs = random_inputs(3, 12, 4, 2, 8, 6, 2, dtype=torch.float64, seed=9)
    _, _, state, ring = run_both(inputs, 5, None, empty_state(inputs[1], inputs[4]), 0, 12, fold=3)
    idx = torch.tensor([2, 0, 0, 1])
    assert_states_equal(ring_to_state(ring.index_batch(idx)), state.index_batch(idx))
    assert_states_equal(ring_to_state(ring.to("cpu")), state)


@pytest.mark.parametrize("fold", [1, 3])
@pytest.mark.parametrize("window", [0, 1, 2, 5])
@pytest.mark.parametrize("prefill", [0, 2, 9])
def test_tail_mask_is_the_ordered_tail(window, prefill, fold):
    """Before every step, ring_tail_mask is the ordered state's tail mask, left-filled with False to W - 1."""
    T = 16
    q, k, v, pq, pk, g = random_inputs(2, T, 4, 2, 8, 6, 2, dtype=torch.float64, seed=11)
    mask = left_pad_mask(2, T, [0, 3])
    mask[0, 7] = False
    _, state = hybrid_attention_chunked(
        q[:, :prefill], k[:, :prefill], v[:, :prefill], pq[:, :prefill], pk[:, :prefill],
        window=window, window_weight=g, attention_mask=mask[:, :prefill], output_final_state=True,
    )
    ring = ring_from_state(state, window, fold)
    for t in range(prefill, T):
        want = torch.zeros(2, max(ring_slots(window) - 1, 0), dtype=torch.bool)
        if state.tail_len:
            want[:, -state.tail_len :] = state.mask
        assert torch.equal(ring_tail_mask(ring), want), f"step {t}"
        sl = slice(t, t + 1)
        args = (q[:, sl], k[:, sl], v[:, sl], pq[:, sl], pk[:, sl])
        _, state = hybrid_attention_step(*args, state, window=window, window_weight=g, attention_mask=mask[:, sl])
        ring_step_torch(*args, ring, window_weight=g, attention_mask=mask[:, sl])


def test_step_checks_shapes():
    q, k, v, pq, pk, g = random_inputs(2, 2, 4, 2, 8, 6, 2, dtype=torch.float64)
    ring = ring_from_state(empty_state(k, pk), 4)
    with pytest.raises(ValueError, match="one token"):
        ring_step_torch(q, k, v, pq, pk, ring, window_weight=g)
    with pytest.raises(ValueError, match="ring S must be"):
        ring_step_torch(q[:1, :1], k[:1, :1], v[:1, :1], pq[:1, :1], pk[:1, :1], ring, window_weight=g)
