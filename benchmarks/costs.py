"""FLOPs and fewest bytes of each benchmarked function (the formulas are written out in attention.py's docstring).

FLOPs count matrix arithmetic only (2 per multiply-add); exp/max/divide are not counted. Bytes count each
input read once and each output written once, at the dtype the row uses (2 for bf16, 4 for fp32).
"""

from __future__ import annotations

from dataclasses import dataclass

BF16 = 2
FP32 = 4


@dataclass(frozen=True)
class Cost:
    flops: float
    bytes: float

    def floor_ms(self, peak_tflops: float, peak_gbps: float) -> float:
        """The roofline floor: the larger of the arithmetic time and the memory time."""
        return max(self.flops / (peak_tflops * 1e12), self.bytes / (peak_gbps * 1e9)) * 1e3


def window_pairs(T: int, window: int) -> int:
    """(query, key) pairs of a causal band of ``window`` keys (the query's own included): sum_i min(i+1, w)."""
    w = min(window, T)
    return w * (w + 1) // 2 + (T - w) * w


def causal_pairs(T: int) -> int:
    return T * (T + 1) // 2


def _train(c: Cost, mode: str) -> Cost:
    """fwd+bwd = 3x the forward: every forward matmul has two backward ones; the forward reads the
    inputs I and writes the output O, the backward reads I, O and dO and writes dI (3|I| + 3|O|)."""
    if mode == "fwd":
        return c
    if mode == "fwdbwd":
        return Cost(3 * c.flops, 3 * c.bytes)
    raise ValueError(f"mode must be 'fwd' or 'fwdbwd'; got {mode!r}")


def hybrid_cost(B: int, T: int, H: int, Hkv: int, D: int, F: int, Hf: int, window: int, mode: str) -> Cost:
    """Window softmax (4 D per pair) + linear attention in recurrent form (4 F D + 4 F per token)."""
    flops = B * H * (4 * D * window_pairs(T, window) + (4 * F * D + 4 * F) * T)
    nbytes = BF16 * B * T * (H * D + 2 * Hkv * D + H * F + Hf * F + H * D)
    return _train(Cost(flops, nbytes), mode)


def softmax_cost(B: int, T: int, H: int, Hkv: int, D: int, pairs: int, mode: str) -> Cost:
    """Softmax attention over ``pairs`` (query, key) pairs per head: QK^T and PV, 2 D each per pair."""
    flops = B * H * 4 * D * pairs
    nbytes = BF16 * B * T * (2 * H * D + 2 * Hkv * D)
    return _train(Cost(flops, nbytes), mode)


def linear_cost(B: int, T: int, H: int, Hkv: int, D: int, F: int, Hf: int, mode: str) -> Cost:
    """Causal linear attention in recurrent form: S += phi_k v^T, z += phi_k, y = phi_q S / phi_q z."""
    flops = B * H * (4 * F * D + 4 * F) * T
    nbytes = BF16 * B * T * (H * F + Hf * F + Hkv * D + H * D)
    return _train(Cost(flops, nbytes), mode)


def hybrid_decode_cost(B: int, H: int, Hkv: int, D: int, F: int, Hf: int, window: int, fold: int = 1) -> Cost:
    """One token: window softmax over ``window`` keys, linear readout, and one evicted key added to S, z.

    Bytes: S and z read and written (fp32); the tail's window-1 keys and values read; the evicted key's
    phi_k read; the new q, k, v, phi_q, phi_k read; k, v, phi_k written to the tail; y written.
    With deferred folding (``fold = P > 1``), on average a step: S and z read, written 1 / P of the time; the
    (P - 1) / 2 keys waiting to be folded read (features and values); the P keys a fold adds read 1 / P of the time.
    """
    flops = B * H * (4 * D * window + 4 * F * D + 3 * F)
    state = (1 + 1 / fold) * FP32 * Hf * (F * D + F)
    waiting = BF16 * (fold - 1) / 2 * (Hf * F + Hkv * D) if fold > 1 else 0
    tail = BF16 * (2 * Hkv * (window - 1) * D + Hf * F) + waiting
    new_in = BF16 * (H * D + 2 * Hkv * D + H * F + Hf * F)
    new_out = BF16 * (2 * Hkv * D + Hf * F + H * D)
    return Cost(flops, B * (state + tail + new_in + new_out))


def hybrid_decode_state_floor_bytes(B: int, Hf: int, D: int, F: int) -> float:
    """The issue's decode floor: reading and writing the fp32 state S alone."""
    return 2 * FP32 * B * Hf * F * D


def linear_decode_cost(B: int, H: int, Hkv: int, D: int, F: int, Hf: int, with_z: bool = True) -> Cost:
    """Plain linear-attention step: S += phi_k v^T (and z += phi_k), y = phi_q S (/ phi_q z)."""
    flops = B * H * (4 * F * D + (3 * F if with_z else 0))
    state = 2 * FP32 * Hf * (F * D + (F if with_z else 0))
    io = BF16 * (H * F + Hf * F + Hkv * D + H * D)
    return Cost(flops, B * (state + io))


def sdpa_decode_cost(B: int, H: int, Hkv: int, D: int, cache_len: int) -> Cost:
    """One query against a KV cache of ``cache_len`` keys: read K and V once, q in, y out."""
    flops = B * H * 4 * D * cache_len
    return Cost(flops, BF16 * B * (2 * Hkv * cache_len * D + 2 * H * D))
