"""Fused chunkwise hybrid attention on Triton: forward and backward, linear memory in T, GQA without copies.

Same definition and signature as ``linearize.ops.hybrid_attention_chunked`` (the PyTorch reference path);
the kernels are in ``chunk_kernels.py``. Work per call, for one query head and T tokens (chunk C, window W,
``nwin = ceil((W-1)/C)``): the forward computes a [C, C*(nwin+1)] score tile twice over (q.k and
phi_q.phi_k) per chunk and carries a [F, D] fp32 running sum; nothing T x T and no per-chunk state is
written. Only the segment-prefix sums ([nseg, B, H', F, D] fp32, nseg small) and three fp32 numbers per
query (window max, denominator, arg-max key) are saved for the backward.

An initial state (prefill in pieces) is supported by prepending the state's window tail to the keys (its
queries are dummies) and seeding the running sums; it is treated as a constant (no gradient flows into it).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from ..common import check_inputs, default_scale, key_mask, window_weight_vector
from ..state import HybridState
from . import chunk_gluon as KG
from . import chunk_kernels as K


@dataclass(frozen=True)
class LaunchConfig:
    """Block shapes. ``C`` chunk length; ``BV`` value columns per program of the running-sum kernels."""

    C: int
    BV: int
    num_warps: int
    num_stages: int = 1
    nseg: int | None = None  # segments per sequence; None = enough to fill the device
    # Forward only where the window weight needs no gradient (prefill, evaluation, a frozen weight): the window max
    # in a first pass, then one accumulator (fwd_kernel's ONE_ACC). Off until a GPU sweep measures it.
    one_acc: bool = False
    # The backward's intra kernels (bwd_dq, bwd_dk: one program a block of queries / keys) on blocks of C_intra
    # rows (a divisor of C, >= 16) with warps_intra warps; None: C and num_warps. Smaller blocks need fewer
    # registers (sm_90, D = F = 128: C 32 at 4 warps 184 / 255, against 236 / 255 at 8 warps, i.e. two programs an
    # SM instead of one) and score fewer keys. default_config: 32 at 4 warps where C = 64.
    C_intra: int | None = None
    warps_intra: int | None = None
    # The split forward's block kernel (fwd_blocks) and bwd_dk on their own blocks; None: C_intra / warps_intra.
    # Blocks of 64 rows let Hopper's warpgroup MMA (wgmma) serve them: on blocks of 32 they issue mma.sync only,
    # since a 4-warp warpgroup's tile has 64 rows (sm_90 PTX, benchmarks/NOTES-chunk.md). Each kernel has its own
    # live set, so each spills (or not) at its own block: sm_90, D = F = 128, 8 warps, blocks of 64: fwd_blocks at
    # BV 64 8 B a thread, bwd_dq 48 B, bwd_dk 416 B.
    C_fwd: int | None = None
    warps_fwd: int | None = None
    C_dk: int | None = None
    warps_dk: int | None = None
    # The forward in two passes: a light walk writes each chunk's running sums ([n_chunks, B, H', F, D] in the
    # inputs' dtype, the dtype fwd_kernel's product takes them in), then one program a block of C_intra queries
    # (at warps_intra) does the rest, with no fp32 running sum in its registers. Same outputs, more memory traffic,
    # more and lighter programs. With fold_backward, the chunk sums it wrote are kept for the backward, which then
    # does not walk them again (H100 16K: that walk is 0.48 ms of 7.87), at the cost of keeping them from the forward
    # to the backward ([n_chunks, B, H', F, D]: F x D / C values a token and head, 0.4x of q, k, v, phi_q, phi_k at
    # D = F = 128, C = 64). default_config: on in training where C = 64 (forward alone it is slower).
    split_forward: bool = False
    # The backward without its two sequential running-sum walks (bwd_dq_state, bwd_dk_state): each chunk's sums
    # (walked again, as split_forward does) and gradient sums (a light reverse walk) written down, and the intra
    # kernels add their parts and write finished gradients. default_config: on where C = 64.
    fold_backward: bool = False
    # The window, near-linear and intra-backward loops skip, per (query block, key block) pair, the part (window
    # softmax or linear terms) that no pair of positions in it can take, instead of computing it under an all-false
    # mask: each loop runs as three (linear-only, both, window-only block pairs), and the empty part is neither loaded
    # nor computed. Same results (the skipped terms are exact zeros). At W = 64 on blocks of 32 that is ~1/4 of the
    # forward's block products and ~1/5 of the backward's. default_config: on in training where C = 64 (H100: 16K
    # forward+backward -5.4%).
    skip_empty: bool = False
    # bwd_dk's three gradients over 1, 2 or 3 launches with smaller live sets: 2 = dk and dv, then dphi_k; 3 = dk, dv,
    # dphi_k apart. Each launch holds one or two [C, D] fp32 accumulators instead of three (what spills bwd_dk on
    # blocks of 64, where wgmma serves it) and recomputes the terms it needs: dphi_k the linear pairs' dy . v^T, dv
    # the window exponents (a q.k^T) that dk also forms.
    dk_launches: int = 1
    # The chunk-sum walks of the split forward (fwd_chunk_states) and of the folded backward (bwd_chunk_dstates) start
    # each segment from zero and write its total, so the two segment-sum passes (fwd_segment_sums, bwd_segment_sums:
    # each a read of two [B, T, H, 128] inputs, 0.28 + 0.42 ms of the H100's 6.9 at 16K) do not run; each reader of
    # the chunk sums (fwd_blocks, bwd_dq, bwd_dk) adds its segment's [F, D] prefix instead (kept in the chunk sums'
    # dtype, a second product: chunk_kernels._prefix_sums). No effect with one segment, whose walk starts from the
    # initial state and has no segment-sum pass to drop. default_config: on in training where C = 64.
    local_sums: bool = False
    # The chunk-sum walks (fwd_chunk_states, bwd_chunk_dstates) on [walk_tile, walk_tile] tiles of the [F, D] state
    # at 4 warps, F and D split across programs (a walk's sums are separable in both), instead of one [F, BV] tile a
    # program at num_warps: 4x the programs at D = F = 128 and tile 64, each walking with a quarter of the state. With
    # nseg = 1 that is one walk over the whole sequence: no segment-sum passes, no prefix for the readers to add
    # (one segment's prefix is the initial state); with split_forward + fold_backward and nseg None, one segment is
    # picked where a segment's tiles fill the SMs (_segments). None: [F, BV]. default_config: 64 in training where C = 64.
    walk_tile: int | None = None
    # The chunk-sum walks two chunks a step (the second chunk's sums formed beside the first's: two independent
    # products and their loads in flight, where one a step leaves each step waiting on its loads and its product),
    # and their software pipeline's depth (None: num_stages). default_config: walk_stages 3 in training; pairs off
    # (timed no faster).
    walk_pairs: bool = False
    walk_stages: int | None = None
    # Registers a thread the three block kernels (fwd_blocks, bwd_dq, bwd_dk) may use (ptxas .maxnreg; None: 255).
    # At 255 and 4 warps two programs fill an SM's 64K registers; at 168 three fit, at 128 four, for spills to
    # local memory (L1). Those kernels wait on their loads at two programs an SM (51-60% of copy bandwidth at 16K,
    # benchmarks/NOTES-chunk.md). Off: it lost at 168 and 128 (H100 16K 6.20 -> 7.52 / 11.40 ms, their spills).
    maxnreg: int | None = None
    # The window weight's gradient formed by the folded backward's bwd_dq from what it holds anyway (the window's
    # exp(s - m) dw and exp(s - m) row sums, and phi_q . dphi_q: chunk_kernels.bwd_dq_kernel's DGAM) instead of from
    # an fp32-formed u = dy / dgamma that the forward writes ([B, T, H, D]) and bwd_delta reads: one [B, T, H, D]
    # tensor less written and read, one (phi_q) more read. delta_in_dq: delta = dy . y formed in bwd_dq too, so
    # bwd_delta does not run (it then read y and dy only). Both need fold_backward. Off: slower on an H100 (16K
    # 6.14 -> 6.28 / 6.26 ms: the forward no faster without u's write, bwd_dq spilling more), though the more precise.
    dgamma_in_dq: bool = False
    delta_in_dq: bool = False
    # The folded backward's gradient-sum walk (bwd_chunk_dstates: 0.61 ms at 16K, latency-bound, two 4-warp programs
    # an SM) on a high-priority side stream beside bwd_dq (1.35 ms, register-bound at two programs an SM), which
    # reads none of its outputs; joined before bwd_dk. CUDA only (also inside CUDA graphs). H100, tune_chunk
    # (benchmarks/results/tune-chunk-nvidia-h100-20261207-overlap-*), forward+backward: 16K 6.103 -> 5.989 ms (bwd_dq
    # 1.37 -> 1.87 ms beside the walk's 0.60 -> 0.74), 2K CUDA graph 0.827 -> 0.817, SmolLM2's heads B8 x 1K graph
    # 0.342 -> 0.334. default_config: on in training where C = 64 (the folded backward); its GPU tests, CUDA graph
    # included, pass (benchmarks/results/call65-h100-tests-*.log).
    overlap: bool = False
    # Registers a thread the chunk-sum walks (fwd_chunk_states, bwd_chunk_dstates) may use (ptxas .maxnreg; None: as
    # compiled). For overlap: at the benchmark heads the backward walk compiles to 155 registers (sm_90), so an SM
    # holding two of its 4-warp programs (2 x 160 x 128 of the 64K registers) has no room for a bwd_dq program
    # (255 x 128) beside them, and the walk's 256 programs take nearly every SM two apiece: bwd_dq would wait. At 128
    # (no spill there; fwd_chunk_states 118 -> 115) two walk programs and one bwd_dq fill an SM exactly. Real models'
    # heads unroll GQ query heads in the backward walk and spill at 128 (SmolLM2 56 B, Qwen2.5 232 B). Off: mixed
    # beside overlap (H100 16K 5.989 ms without it, 6.009 with; 2K graph 0.817 / 0.804; one run) and nothing alone
    # (16K 6.126 against 6.103).
    walk_maxnreg: int | None = None
    # The split forward's block kernel (fwd_blocks) written in Gluon for Hopper (chunk_gluon.py) on value blocks of
    # this many columns (64 or 128), where chunk_gluon.supported says it can run (sm_90, 16-bit inputs, C = 64, dims
    # <= 128 and multiples of 8, rows 16-byte aligned); elsewhere the Triton kernel. One warpgroup a block of 64 queries, every tile in wgmma's accumulator
    # layout (each warp owns 16 whole rows): the score tiles reach the next product in registers and the row
    # statistics stay in a warp, where Triton's mma.sync layout on blocks of 32 (warps [1, 4]) sends both through
    # shared memory. sm_90 compile (tests/ops/test_chunk_gluon_compile.py), no spill: 255 / 229 registers a thread at
    # the benchmark heads on 128 / 64 value columns, 219 at SmolLM2's, 80 KB of shared memory (two programs an SM).
    # default_config: 128 in training (H100 16K forward 1.94 -> 1.26 ms; on 64 columns 1.67). GPU tests:
    # tests/gpu/test_chunk_cuda.py -k gluon (benchmarks/results/call67-h100-tests-gluon.log).
    gluon_fwd: int | None = None
    # The folded backward's bwd_dq written in Gluon the same way (chunk_gluon.bwd_dq_wgmma_kernel: blocks of 64, one
    # warpgroup; the chunk sums' part of dphi_q before the key loop), where chunk_gluon.supported says it can run and
    # neither dgamma_in_dq nor delta_in_dq asks bwd_dq for more; elsewhere the Triton kernel. default_config: on in
    # training (H100 16K forward+backward 5.95 -> 5.69 ms alone, 5.31 -> 5.03 beside the Gluon forward).
    gluon_dq: bool = False
    # The folded backward's bwd_dk in Gluon (chunk_gluon.bwd_dk_wgmma_kernel: blocks of 64 keys, one warpgroup,
    # query-major score tiles transposed through shared memory into the products over the queries), where
    # chunk_gluon.supported says it can run and dk_launches is 1; elsewhere the Triton kernel. Its three gradients
    # are split among programs holding one or two [64, D] accumulators (one program holding all three spilled), in
    # one of three forms: 1 three launches (dv, dk, dphi_k); 2 two launches (dk, then dv + dphi_k); 3 one launch of
    # three kinds of program (dk | dv | dphi_k), a key block's kinds side by side in the grid so that their reads meet
    # in L2. 0: off. sm_90, D = F = 128, registers / spill bytes a thread: 1 214 / 251 / 168, no spill; 2 251,
    # 255 / 16; 3 254, no spill. Form 1 was correct (its GPU tests pass) but slower on an H100 than the Triton
    # kernel (16K forward+backward 5.95 -> 6.09 ms alone, 5.03 -> 5.17 beside the other two): each launch read its
    # tiles from HBM (~19 tensors' bytes for the three against the one kernel's 11). Forms 2 and 3: not yet timed.
    gluon_dk: int = 0

    def blocks(self, kernel: str) -> tuple[int, int]:
        """(rows a block, warps) of an intra kernel: 'fwd' (fwd_blocks), 'dq' (bwd_dq) or 'dk' (bwd_dk)."""
        C = self.C_intra or self.C
        warps = self.warps_intra or self.num_warps
        own = {"fwd": (self.C_fwd, self.warps_fwd), "dk": (self.C_dk, self.warps_dk), "dq": (None, None)}[kernel]
        return own[0] or C, own[1] or warps

    @property
    def keeps_chunk_sums(self) -> bool:
        """The split forward's chunk sums are kept for the folded backward (which then does not walk them again)."""
        return self.split_forward and self.fold_backward

    def __post_init__(self):
        for name in ("C_intra", "C_fwd", "C_dk"):
            ci = getattr(self, name)
            if ci is not None and (ci < 16 or ci & (ci - 1) or self.C % ci):
                raise ValueError(f"LaunchConfig: {name}={ci} must be a power of two >= 16 that divides C={self.C}")
        for name in ("C_fwd", "warps_fwd", "C_dk", "warps_dk"):  # (the custom ops carry them a byte each)
            if (getattr(self, name) or 0) > 128:
                raise ValueError(f"LaunchConfig: {name}={getattr(self, name)} must be at most 128")
        if self.dk_launches not in (1, 2, 3):
            raise ValueError(f"LaunchConfig: dk_launches={self.dk_launches} must be 1, 2 or 3")
        if self.split_forward and self.one_acc:
            raise ValueError("LaunchConfig: one_acc is a form of the one-pass forward; pass it or split_forward")
        for name in ("maxnreg", "walk_maxnreg"):
            if getattr(self, name) is not None and not 64 <= getattr(self, name) <= 255:
                raise ValueError(f"LaunchConfig: {name}={getattr(self, name)} must be None or 64-255")
        if self.walk_stages not in (None, 1, 2, 3, 4):
            raise ValueError(f"LaunchConfig: walk_stages={self.walk_stages} must be None or 1-4")
        if self.walk_tile not in (None, 16, 32, 64):
            raise ValueError(f"LaunchConfig: walk_tile={self.walk_tile} must be None, 16, 32 or 64")
        if self.dgamma_in_dq and not self.fold_backward:
            raise ValueError("LaunchConfig: dgamma_in_dq needs fold_backward (bwd_dq's dphi_q is complete only there)")
        if self.overlap and not self.fold_backward:
            raise ValueError("LaunchConfig: overlap runs the folded backward's walk beside bwd_dq; it needs fold_backward")
        if self.overlap and self.delta_in_dq:
            raise ValueError("LaunchConfig: overlap's walk reads delta before bwd_dq runs; it excludes delta_in_dq")
        if self.delta_in_dq and not self.dgamma_in_dq:
            raise ValueError("LaunchConfig: delta_in_dq needs dgamma_in_dq (else bwd_delta runs anyway, for u)")
        if self.gluon_fwd not in (None, 64, 128):
            raise ValueError(f"LaunchConfig: gluon_fwd={self.gluon_fwd} must be None, 64 or 128 (value columns)")
        if self.gluon_dk not in (0, 1, 2, 3):
            raise ValueError(f"LaunchConfig: gluon_dk={self.gluon_dk} must be 0 (off), 1 (three launches), 2 (two) "
                             "or 3 (one launch of three kinds of program)")
        for name, kernel in (("gluon_dq", "bwd_dq"), ("gluon_dk", "bwd_dk")):
            if getattr(self, name) and not self.fold_backward:
                raise ValueError(f"LaunchConfig: {name} is the folded backward's {kernel}; it needs fold_backward")
        if self.gluon_fwd and not self.split_forward:
            raise ValueError("LaunchConfig: gluon_fwd is the split forward's block kernel; it needs split_forward")
        if self.local_sums and not (self.split_forward or self.fold_backward):
            raise ValueError("LaunchConfig: local_sums changes the chunk-sum walks of split_forward and fold_backward; "
                             "pass one of them too")


#: CUDA's limit on a grid's second (and third) axis; the kernels put batch x heads there.
MAX_GRID_Y = 65535

#: Tests set this to fill every kernel output with NaN before launch, so an element left unwritten fails.
POISON_OUTPUTS = False


def _empty(*shape, dtype, device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan") if dtype.is_floating_point else -7, dtype=dtype, device=device)
    return torch.empty(*shape, dtype=dtype, device=device)


def _pow2(n: int) -> int:
    return 1 << max(4, (n - 1).bit_length())  # tl.dot needs >= 16


def default_config(D: int, F: int, training: bool = False) -> LaunchConfig:
    """A fixed table instead of autotuning: no first-call stall in ``generate`` or a short run. ``training``: a
    backward will follow (some input needs a gradient), which picks the two-pass forward where it pays."""
    # Measured on an H100 at B=4, H=16, T=16K, D=F=128 (benchmarks/tune_chunk.py): C=64, BV=128, 8 warps,
    # 2 stages was the fastest of 16 shapes for forward and forward+backward.
    if max(D, F) > 128:
        C, BV, warps, stages = 32, 64, 4, 1
    else:
        C, BV, warps, stages = 64, min(_pow2(D), 128), 8, 2
    C = min(C, value_block(BV, D))  # the chunk no wider than the value block the kernels get: see _check_blocks
    if C == 64:
        # The backward folded (no running-sum walks) with its intra kernels on blocks of 32 rows at 4 warps: two
        # programs an SM instead of one. H100, tune_chunk (benchmarks/results/tune-chunk-nvidia-h100-20261205-*):
        # B4 H16 D=F=128 16K forward+backward 9.26 -> 7.87 ms, 2K 1.58 -> 1.37 (CUDA graph 1.34 -> 1.15); B8 x 1K
        # CUDA graph SmolLM2's heads 0.41 -> 0.37, Qwen2.5's 1.02 -> 0.88. Gemma 3's D = 256 (C 32) stays one-pass:
        # its folded kernels spill, and fold alone doubled its graph time.
        # Training also splits the forward, whose chunk sums the folded backward then reuses (no second walk).
        # H200, tune_chunk (benchmarks/results/tune-chunk-nvidia-h200-20261205b-*), forward+backward against fold
        # alone: 16K 7.53 -> 7.18 ms, 8K 3.91 -> 3.70, 2K CUDA graph 1.08 -> 1.03; B8 x 1K CUDA graph SmolLM2's
        # heads 0.446 -> 0.404, Qwen2.5's 0.855 -> 0.620. Forward alone it was slower (16K 2.52 -> 2.61 ms, Qwen's
        # heads 0.39 -> 0.49 eager), so evaluation and prefill keep the one-pass forward.
        # Training also skips block pairs' empty window / linear parts (skip_empty). H100, tune_chunk --skip
        # (benchmarks/results/tune-chunk-nvidia-h100-20261206-skip-*), forward+backward: 16K 7.42 -> 7.02 ms, 2K CUDA
        # graph 1.075 -> 1.022; B8 x 1K CUDA graph SmolLM2's heads 0.414 -> 0.394, Qwen2.5's 0.629 -> 0.603. The
        # one-pass forward (evaluation) keeps it off: at SmolLM2's heads it spills twice as much with it (sm_90) and
        # was slower there (0.168 -> 0.247 ms eager), against 2.62 -> 2.53 ms at the benchmark heads' 16K.
        # Training also walks the chunk sums from zero in each segment (local_sums): no segment-sum passes, the
        # block kernels add the segment prefix. H100, tune_chunk --local (benchmarks/results/
        # tune-chunk-nvidia-h100-20261207-local-*), forward+backward: 16K 6.92 -> 6.79 ms (32 segments 7.13 ->
        # 6.95), 2K CUDA graph 1.025 -> 0.987. At C = 128 it lost (16K 7.51 -> 7.65 ms).
        # Training also walks the sums on [64, 64] state tiles at 4 warps (walk_tile), over the whole sequence where
        # the tiles fill the SMs (_segments). H100, tune_chunk --walk (benchmarks/results/
        # tune-chunk-nvidia-h100-20261207-walk-*), forward+backward: 16K 6.82 -> 6.29 ms, 2K CUDA graph 0.983 ->
        # 0.851; B8 x 1K CUDA graph (segments kept) SmolLM2's heads 0.361 -> 0.343, Qwen2.5's 0.529 -> 0.491.
        # Training's walks pipeline 3 deep (walk_stages). H100, tune_chunk --walk-opts (benchmarks/results/
        # tune-chunk-nvidia-h100-20261207-pairs-*), forward+backward: 16K 6.204 -> 6.127 ms (fwd_chunk_states 515 ->
        # 440 us, bwd_chunk_dstates 648 -> 610), 2K CUDA graph 0.854 -> 0.836; SmolLM2's heads 0.344 -> 0.342. Two
        # chunks a step (walk_pairs) was no faster (6.227, 0.852), and capping the block kernels' registers (maxnreg
        # 168 / 128) lost (7.52 / 11.40 ms: their spills).
        # Training runs the backward's gradient-sum walk on a side stream beside bwd_dq (overlap). H100, tune_chunk
        # --walk-opts noov against it (benchmarks/results/tune-chunk-nvidia-h100-20261207-ovdefault-*),
        # forward+backward: 16K 6.105 -> 5.983 ms, 2K CUDA graph 0.821 -> 0.810, SmolLM2's heads B8 x 1K graph
        # 0.344 -> 0.331 (call 61 before it: 6.103 -> 5.989, 0.827 -> 0.817, 0.342 -> 0.334). The block kernels
        # keep 2 pipeline stages: 1 and 3 were slower (16K 5.980 -> 6.130 / 6.250 ms, -stages-16k).
        # Training runs the split forward's block kernel and bwd_dq in Gluon (gluon_fwd, gluon_dq: wgmma on blocks of
        # 64, chunk_gluon.py) where they can run (sm_90, 16-bit; the Triton kernels elsewhere). H100, tune_chunk
        # --walk-opts (benchmarks/results/tune-chunk-nvidia-h100-20261207-gluon2-*), forward+backward: 16K 5.960 ->
        # 5.032 ms (forward 1.936 -> 1.257), 2K CUDA graph 0.814 -> 0.693, SmolLM2's heads B8 x 1K graph 0.331 ->
        # 0.264. bwd_dk in Gluon (gluon_dk) was slower there (16K 5.953 -> 6.094 alone, 5.178 with the other two:
        # -gluon-*), so it stays off.
        return LaunchConfig(C=C, BV=BV, num_warps=warps, num_stages=stages, C_intra=32, warps_intra=4,
                            fold_backward=True, split_forward=training, skip_empty=training,
                            local_sums=training, walk_tile=64 if training else None,
                            walk_stages=3 if training else None, overlap=training,
                            gluon_fwd=128 if training else None, gluon_dq=training)
    return LaunchConfig(C=C, BV=BV, num_warps=warps, num_stages=stages)


def value_block(BV: int, D: int) -> int:
    """The value block the kernels use for a config's ``BV``: clamped to the padded head dim."""
    return min(BV, _pow2(D))


def _check_blocks(C: int, BV: int, device: torch.device) -> None:
    """Value blocks narrower than the chunk are refused on CUDA: Triton 3.6 miscompiles ``fwd_kernel`` for
    C=64, BV=32 on sm_90, with illegal shared-memory reads at 4 warps and silently wrong outputs at 8
    (``scripts/sweep_launch_configs.py``, results/gpu-tests/sweep-*.json); every config with BV >= C was right."""
    if BV < C and device.type == "cuda":
        raise ValueError(
            f"LaunchConfig: value block BV={BV} (after clamping to the head dim) is narrower than the chunk C={C}; "
            f"Triton miscompiles that on CUDA: use BV >= C, e.g. LaunchConfig(C={BV}, BV={BV}, ...)"
        )


#: (kernel, constexprs) launches that ran out of shared memory with the config's num_stages: launched with 1.
_ONE_STAGE: set[tuple] = set()


def _launch(kernel, grid, *args, num_stages: int = 1, **kwargs) -> None:
    """``kernel[grid](*args, ...)``; a launch that runs out of shared memory (the software pipeline's buffers
    grow with num_stages, and with the GQ heads a program unrolls) is retried with ``num_stages=1``, which
    changes no result and no buffer, and remembered so the next call skips the failing compile."""
    from triton.runtime.errors import OutOfResources

    def key() -> tuple:
        # Triton compiles per constexprs and per int argument's ==1 / %16 class: the same key, the same binary.
        # (Built only where a launch failed before: ~16 us a launch on the host, which small models' steps wait on.)
        spec = tuple((a == 1, a % 16 == 0) for a in args if isinstance(a, int) and not isinstance(a, bool))
        return getattr(kernel, "__name__", None) or repr(kernel), tuple(sorted(kwargs.items())), spec, num_stages

    if num_stages > 1 and not (_ONE_STAGE and key() in _ONE_STAGE):
        try:
            kernel[grid](*args, num_stages=num_stages, **kwargs)
            return
        except OutOfResources:
            _ONE_STAGE.add(key())
    try:
        kernel[grid](*args, num_stages=1, **kwargs)
    except OutOfResources as e:
        name = getattr(kernel, "__name__", "kernel")
        raise RuntimeError(
            f"{name} needs more shared memory than this GPU has ({e}) even with num_stages=1; "
            "pass a smaller config, e.g. config=LaunchConfig(C=32, BV=64, num_warps=4)"
        ) from None


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a few segments, to exercise the segment logic


def _segments(n_chunks: int, programs_per_segment: int, device: torch.device, nseg: int | None,
              whole: bool = False) -> tuple[int, int]:
    """(n_per, nseg): chunks per segment and segment count.

    ``whole`` (split + fold, whose only walks are the chunk-sum walks, on state tiles: ``LaunchConfig.walk_tile``):
    one segment where a segment's programs fill the SMs. H100 (tune_chunk --walk,
    benchmarks/results/tune-chunk-nvidia-h100-20261207-walk-*): at B4 H16 D=F=128 (256 walk programs) one segment
    beat the default 17 by 11% at 16K (6.29 against 7.07 ms) and 15% at 2K in a CUDA graph; at SmolLM2's heads
    B8 x 1K (48 programs) it lost (0.383 against 0.343 ms).

    Default: about 8 programs an SM (more programs hide the latency of each one's sequential walk), but at least
    4 chunks a segment (each segment costs a prefix-sum entry of F x D fp32 and a partial walk). On the H200 at
    B=4, H=16, D=F=128 (``benchmarks/tune_chunk.py --nseg``, 2026-12-04) this picks the fastest counts of the
    sweep: 16 at T=16K (forward+backward 9.37 ms with the old 2-programs-an-SM rule's 5 -> 8.75) and 8 at T=2K
    (1.82 -> 1.58 ms)."""
    if nseg is None and whole and programs_per_segment >= _num_sms(device):
        nseg = 1
    if nseg is None:
        nseg = max(1, min(math.ceil(8 * _num_sms(device) / max(programs_per_segment, 1)), n_chunks // 4))
    nseg = max(1, min(nseg, n_chunks))
    n_per = math.ceil(n_chunks / nseg)
    return n_per, math.ceil(n_chunks / n_per)


def _segment_prefix(x: torch.Tensor, init: torch.Tensor | None, reverse: bool = False,
                    dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``out[s] = init + sum(x[:s])`` (``sum(x[s+1:])`` if ``reverse``; ``init`` 0 if None) for segment sums
    ``x`` [nseg, ...] fp32 contiguous, ``init`` of shape ``x[0]``; one Triton pass (``segment_prefix_kernel``),
    summed in fp32 and stored in ``dtype`` (default x's). The torch form, ``x.cumsum(0) - x + init``, is the
    reference in the tests. ``out``: written instead of a new tensor (of ``dtype``'s)."""
    if out is None:
        out = _empty(*x.shape, dtype=dtype or x.dtype, device=x.device)
    n = x[0].numel()
    block = 1024
    K.segment_prefix_kernel[(math.ceil(n / block),)](
        x, x if init is None else init.contiguous(), out, x.shape[0], n,
        HAS_INIT=init is not None, REVERSE=reverse, BLOCK=block, num_warps=4,
    )
    return out


_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def _side_stream(dev: torch.device) -> torch.cuda.Stream:
    """One high-priority side stream a device (``LaunchConfig.overlap``): its blocks are scheduled first as the
    main stream's retire."""
    i = dev.index if dev.index is not None else torch.cuda.current_device()
    if i not in _SIDE_STREAMS:
        _SIDE_STREAMS[i] = torch.cuda.Stream(device=i, priority=-1)
    return _SIDE_STREAMS[i]


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _prec(dtype: torch.dtype) -> str:
    # fp32 inputs get exact fp32 products; half inputs use tf32 only for the fp32 running-sum products.
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def _geometry(q, k, phi_q, phi_k, window: int, cfg: LaunchConfig) -> tuple:
    """(B, T, H, D, Hkv, Hf, F, C, n, W, nwin, BD, BF, BV, NV, n_per, nseg) of a call: shapes, chunks (n of C), the
    window's chunks, padded blocks, value blocks and segments; the forward, the backward and the op's fake agree."""
    B, T, H, D = q.shape
    Hkv, Hf, F = k.shape[2], phi_k.shape[2], phi_q.shape[3]
    C = cfg.C
    n = math.ceil(T / C)
    W = min(window, T)
    nwin = math.ceil((W - 1) / C) if W > 0 else 0
    BD, BF, BV = _pow2(D), _pow2(F), value_block(cfg.BV, D)
    NV = math.ceil(D / BV)
    # The walks on tiles may take one segment only where every walk is one: the one-pass forward and the unfolded
    # backward keep their segments (their walks run on [F, BV], a program a segment).
    if cfg.walk_tile and cfg.keeps_chunk_sums:
        n_per, nseg = _segments(n, B * Hf * _walk_launch(cfg, BF, BV, F, D)[2], q.device, cfg.nseg, whole=True)
    else:
        n_per, nseg = _segments(n, B * Hf * NV, q.device, cfg.nseg)
    return B, T, H, D, Hkv, Hf, F, C, n, W, nwin, BD, BF, BV, NV, n_per, nseg


def _mask_arg(mask, q) -> tuple[bool, torch.Tensor, int]:
    """(has_mask, the mask pointer the kernels get (q's where there is none: never read), its batch stride)."""
    return mask is not None, (mask if mask is not None else q), (mask.stride(0) if mask is not None else 0)


def _regs(cfg: LaunchConfig, walk: bool = False) -> dict:
    """The block kernels' (``walk``: the chunk-sum walks') register cap as a launch option (none named where the
    config sets none)."""
    cap = cfg.walk_maxnreg if walk else cfg.maxnreg
    return {"maxnreg": cap} if cap else {}


def _local(cfg: LaunchConfig, nseg: int) -> bool:
    """The chunk-sum walks start each segment from zero (``cfg.local_sums``): only over several segments; one
    segment's walk starts from the initial state, and its prefix needs no segment sums."""
    return cfg.local_sums and nseg > 1


def _walk_launch(cfg: LaunchConfig, BF: int, BV: int, F: int, D: int) -> tuple[int, int, int, int]:
    """(BF, BV, programs a (segment, head), warps) of the chunk-sum walks: the config's [F, BV] tile at num_warps,
    or ``cfg.walk_tile`` square tiles at 4 warps (the kernels number them value block fastest)."""
    if cfg.walk_tile is None:
        return BF, BV, math.ceil(D / BV), cfg.num_warps
    bf, bv = min(cfg.walk_tile, BF), min(cfg.walk_tile, BV)
    return bf, bv, math.ceil(F / bf) * math.ceil(D / bv), 4


def _chunk_states(phi_q, phi_k, v, mask, q, pre_S, pre_z, window: int, cfg: LaunchConfig, seg=None):
    """(CS [n_chunks, B, H', F, D] in phi_q's dtype, CZ [n_chunks, B, H', F] fp32): the running sums each query
    chunk reads, walked from the segment prefixes (fwd_chunk_states_kernel); with ``cfg.local_sums`` each segment's
    walk starts from zero (pre_S, pre_z unread) and writes its total to ``seg`` ([nseg, B, H', F, D] and
    [nseg, B, H', F] fp32; None: scratch). pre_S empty: one segment from a zero state (``_zero_start``)."""
    B, T, H, D, Hkv, Hf, F, C, n, W, nwin, BD, BF, BV, NV, n_per, nseg = _geometry(q, v, phi_q, phi_k, window, cfg)
    has_mask, m_arg, sM_b = _mask_arg(mask, q)
    cs = _empty(n, B, Hf, F, D, dtype=phi_q.dtype, device=q.device)
    cz = _empty(n, B, Hf, F, dtype=torch.float32, device=q.device)
    local = _local(cfg, nseg)
    if local and seg is None:
        seg = (_empty(nseg, B, Hf, F, D, dtype=torch.float32, device=q.device),
               _empty(nseg, B, Hf, F, dtype=torch.float32, device=q.device))
    seg_S, seg_z = seg if local else (cz, cz)  # (never written unless local)
    wf, wv, tiles, warps = _walk_launch(cfg, BF, BV, F, D)
    _launch(K.fwd_chunk_states_kernel, (nseg, B * Hf, tiles),
        phi_k, v, m_arg, pre_S, pre_z, cs, cz, seg_S, seg_z, *_strides(phi_k), *_strides(v), sM_b,
        B, T, Hf, Hf // Hkv, n, n_per, nwin, F=F, D=D, BF=wf, BV=wv, C=C, HAS_MASK=has_mask, PREC=_prec(q.dtype),
        LOCAL=local, PAIRS=cfg.walk_pairs, ZERO_START=not pre_S.numel(), num_warps=warps,
        num_stages=cfg.walk_stages or cfg.num_stages, **_regs(cfg, walk=True),
    )
    return cs, cz


def _zero_start(cfg: LaunchConfig, nseg: int, S0) -> bool:
    """The split + fold form over one segment from no initial state: the forward's prefix is zero and only its walk
    would read it, so no prefix pass runs (the walk starts from zero; the op's pre_S / pre_z are empty). Four launches
    fewer a forward + backward (the backward's reverse prefix is zero at one segment too)."""
    return cfg.keeps_chunk_sums and nseg == 1 and S0 is None


def _chunk_forward(q, k, v, phi_q, phi_k, gamma, mask, S0, z0, window: int, scale: float, cfg: LaunchConfig,
                   store_u: bool):
    """-> (y, u or None, mx, den, arg, pre_S, pre_z, cs, cz): the output and what the backward reads; cs, cz (each
    chunk's running sums, ``_chunk_states``) where the split forward wrote them and the folded backward reads them
    (else None: the backward walks them again if it folds)."""
    B, T, H, D, Hkv, Hf, F, C, n, W, nwin, BD, BF, BV, NV, n_per, nseg = _geometry(q, k, phi_q, phi_k, window, cfg)
    Gk, GQ = Hf // Hkv, H // Hf
    _check_blocks(C, BV, q.device)
    has_mask, m_arg, sM_b = _mask_arg(mask, q)
    prec = _prec(q.dtype)
    f32 = torch.float32
    dev = q.device

    zero = _zero_start(cfg, nseg, S0)
    # (the zero start reads no segment sums)
    seg_S = _empty(*((0,) if zero else (nseg, B, Hf, F, D)), dtype=f32, device=dev)
    seg_z = _empty(*((0,) if zero else (nseg, B, Hf, F)), dtype=f32, device=dev)
    local = cfg.split_forward and _local(cfg, nseg)
    if local:  # the chunk-sum walk writes each segment's total itself
        cs, cz = _chunk_states(phi_q, phi_k, v, mask, q, seg_S, seg_z, window, cfg, seg=(seg_S, seg_z))
    elif nseg > 1:  # (one segment's prefix is the initial state: its sums are never read)
        _launch(K.fwd_segment_sums_kernel, (nseg, B * Hf, NV),
            phi_k, v, m_arg, seg_S, seg_z, *_strides(phi_k), *_strides(v), sM_b,
            B, T, Hf, Gk, n, n_per, nwin, F=F, D=D, BF=BF, BV=BV, C=C, HAS_MASK=has_mask, PREC=prec,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    # Exclusive prefix over segments, seeded with the initial sums. Local chunk sums kept for the folded backward:
    # the prefix is read only by the block kernels' products, so it is stored in their operand dtype (_prefix_sums).
    low = local and cfg.keeps_chunk_sums
    if zero:
        pre_S, pre_z = _empty(0, dtype=f32, device=dev), _empty(0, dtype=f32, device=dev)  # (op outputs: no aliases)
    else:
        pre_S, pre_z = _segment_prefix(seg_S, S0, dtype=phi_q.dtype if low else None), _segment_prefix(seg_z, z0)

    y = _empty(*q.shape, dtype=q.dtype, device=dev)
    u = _empty(*q.shape, dtype=q.dtype, device=dev) if store_u else y
    mx = _empty(B, H, T, dtype=f32, device=dev)
    den = _empty(B, H, T, dtype=f32, device=dev)
    arg = _empty(B, H, T, dtype=torch.int32, device=dev)
    if cfg.split_forward:
        if not local:
            cs, cz = _chunk_states(phi_q, phi_k, v, mask, q, pre_S, pre_z, window, cfg)
        Ci, wi = cfg.blocks("fwd")
        bv = BV
        gluon = cfg.gluon_fwd and KG.supported(q, D, F, cfg.gluon_fwd, C, k, v, phi_q, phi_k)
        if gluon:
            Ci, wi, bv = KG.BLOCK, KG.WARPS, value_block(cfg.gluon_fwd, D)
        ni = math.ceil(T / Ci)
        args = (q, k, v, phi_q, phi_k, m_arg, gamma, cs, cz, pre_S.to(cs.dtype) if local else pre_S, pre_z, y, u, mx,
                den, arg, *_strides(q), *_strides(k), *_strides(v), *_strides(phi_q), *_strides(phi_k),
                *_strides(y), sM_b, B, T, H, Hf, Gk, GQ, ni, n_per, nwin, W, scale, C)
        consts = dict(D=D, F=F, BD=BD, BF=BF, BV=bv, C=Ci, HAS_MASK=has_mask, PREC=prec, STORE_U=store_u,
                      SKIP=cfg.skip_empty, LOCAL=local)
        grid = (ni, B * H, math.ceil(D / bv))
        if gluon:  # (Gluon: no software pipeliner, so no stages to fall back on)
            KG.fwd_blocks_wgmma_kernel[grid](*args, **consts, num_warps=wi)
        else:
            _launch(K.fwd_blocks_kernel, grid, *args, **consts, num_warps=wi, num_stages=cfg.num_stages, **_regs(cfg))
        if not cfg.keeps_chunk_sums:
            cs = cz = None
        return y, (u if store_u else None), mx, den, arg, pre_S, pre_z, cs, cz
    _launch(K.fwd_kernel, (nseg, B * Hf, NV),
        q, k, v, phi_q, phi_k, m_arg, gamma, pre_S, pre_z, y, u, mx, den, arg,
        *_strides(q), *_strides(k), *_strides(v), *_strides(phi_q), *_strides(phi_k), *_strides(y), sM_b,
        B, T, H, Hf, Gk, n, n_per, nwin, W, scale,
        D=D, F=F, BD=BD, BF=BF, BV=BV, C=C, GQ=GQ, HAS_MASK=has_mask, PREC=prec, STORE_U=store_u,
        ONE_ACC=cfg.one_acc and not store_u, SKIP=cfg.skip_empty, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y, (u if store_u else None), mx, den, arg, pre_S, pre_z, None, None


def _chunk_backward(dy, q, k, v, phi_q, phi_k, gamma, mask, y, u, mx, den, arg, pre_S, pre_z, cs, cz, window: int,
                    scale: float, cfg: LaunchConfig, want_dgamma: bool = False):
    """-> (dq, dk, dv, dphi_q, dphi_k, dgamma or None): dgamma from u where the forward stored it, else from bwd_dq
    where ``want_dgamma`` and ``cfg.dgamma_in_dq``, else None. ``cs``, ``cz``: the chunk sums the split forward
    kept, or None (a folded backward walks them again)."""
    B, T, H, D, Hkv, Hf, F, C, n, W, nwin, BD, BF, BV, NV, n_per, nseg = _geometry(q, k, phi_q, phi_k, window, cfg)
    G, Gk, GQ = H // Hkv, Hf // Hkv, H // Hf
    has_mask, m_arg, sM_b = _mask_arg(mask, q)
    prec = _prec(q.dtype)
    f32 = torch.float32
    dev = q.device
    dy = dy.contiguous()
    kw = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    delta = _empty(B, H, T, dtype=f32, device=dev)
    BT = 64
    has_u = u is not None
    in_dq = want_dgamma and cfg.dgamma_in_dq and not has_u  # (bwd_dq forms dgamma: DGAM)
    delta_here = cfg.delta_in_dq and not has_u  # (bwd_dq forms delta: DELTA_HERE; bwd_delta does not run)
    Ci, wi = cfg.blocks("dq")
    ni = math.ceil(T / Ci)
    dgam = _empty(math.ceil(T / BT), B, H, dtype=f32, device=dev) if has_u else (
        _empty(ni, B, H, dtype=f32, device=dev) if in_dq else delta)
    if not delta_here:
        K.bwd_delta_kernel[(math.ceil(T / BT), B * H)](
            y, u if has_u else y, dy, delta, dgam, *_strides(y), *_strides(dy), B, T, H,
            D=D, BD=BD, BT=BT, HAS_U=has_u, num_warps=4,
        )
    strides_in = (*_strides(q), *_strides(k), *_strides(v), *_strides(phi_q), *_strides(phi_k), *_strides(dy), sM_b)

    dq = _empty(*q.shape, dtype=q.dtype, device=dev)
    fold = cfg.fold_backward
    local = fold and _local(cfg, nseg)  # (the chunk sums then hold each segment's own keys / queries: readers add its prefix)
    # Folded, the intra kernels also take the running-sum parts (from each chunk's sums, walked again here, and each
    # chunk's gradient sums) and write finished dphi_q / dv / dphi_k: no bwd_*_state walks, no fp32 buffers.
    if not fold:
        cs = cz = dy  # (never read)
    elif cs is None:
        cs, cz = _chunk_states(phi_q, phi_k, v, mask, q, pre_S, pre_z, window, cfg)
    dpq = _empty(B, T, H, F, dtype=phi_q.dtype if fold else f32, device=dev)
    corr = _empty(B, H, T, dtype=f32, device=dev)

    def dstates(side=None):
        """The running-sum parts: -> (cds, cdz: each chunk's gradient sums where folded, rev_dS, rev_dz: each
        segment's reverse prefix, seg_dS, seg_dz: the segment sums they came from). Reads phi_q, dy, den and delta
        only, so with ``side`` its launches run on that stream, beside bwd_dq (``LaunchConfig.overlap``). Its buffers
        are allocated on the current stream either way, so the caller keeps all six until the side stream joins it
        (the allocator may then reuse them: no record_stream, and no side-stream allocation, which graph capture under
        torch.compile refuses)."""
        zero = fold and nseg == 1  # (one segment's reverse prefix is zero: the walk starts there, no prefix pass)
        S_shape, z_shape = ((0,), (0,)) if zero else ((nseg, B, Hf, F, D), (nseg, B, Hf, F))  # (unread where zero)
        seg_dS = _empty(*S_shape, dtype=f32, device=dev)
        seg_dz = _empty(*z_shape, dtype=f32, device=dev)
        rev_dS = _empty(*S_shape, dtype=phi_q.dtype if local else f32, device=dev)
        rev_dz = _empty(*z_shape, dtype=f32, device=dev)
        cds = _empty(n, B, Hf, F, D, dtype=phi_q.dtype, device=dev) if fold else None
        cdz = _empty(n, B, Hf, F, dtype=f32, device=dev) if fold else None
        if side is not None:  # Forked after the allocations, so that whatever the main stream does to them comes
            # first. (Forked before them, POISON_OUTPUTS' NaN fills raced the walk's writes in a CUDA graph: call 61.)
            side.wait_stream(torch.cuda.current_stream(dev))

        def chunk_dstates(start_S, start_z):
            wf, wv, tiles, warps = _walk_launch(cfg, BF, BV, F, D)
            _launch(K.bwd_chunk_dstates_kernel, (nseg, B * Hf, tiles),
                phi_q, dy, den, delta, start_S, start_z, cds, cdz, seg_dS, seg_dz, *_strides(phi_q), *_strides(dy),
                B, T, H, Hf, n, n_per, nwin, F=F, D=D, BF=wf, BV=wv, C=C, GQ=GQ, PREC=prec, LOCAL=local,
                PAIRS=cfg.walk_pairs, ZERO_START=zero,
                **dict(kw, num_warps=warps, num_stages=cfg.walk_stages or cfg.num_stages), **_regs(cfg, walk=True),
            )

        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            if local:  # the walk from zero writes each segment's total, then the readers add the reverse prefix
                chunk_dstates(seg_dS, seg_dz)
            elif nseg > 1:  # (one segment's reverse prefix is zero: its sums are never read)
                _launch(K.bwd_segment_sums_kernel, (nseg, B * Hf, NV),
                    phi_q, dy, den, delta, seg_dS, seg_dz, *_strides(phi_q), *_strides(dy),
                    B, T, H, Hf, n, n_per, nwin, F=F, D=D, BF=BF, BV=BV, C=C, GQ=GQ, PREC=prec, **kw,
                )
            if not zero:  # Reverse exclusive prefix: segment s starts from the sums of every later segment.
                _segment_prefix(seg_dS, None, reverse=True, out=rev_dS)
                _segment_prefix(seg_dz, None, reverse=True, out=rev_dz)
            if fold and not local:
                chunk_dstates(rev_dS, rev_dz)
        return cds, cdz, rev_dS, rev_dz, seg_dS, seg_dz

    # LaunchConfig.overlap: the gradient-sum walk (latency-bound, a few programs an SM) on a high-priority side
    # stream beside bwd_dq, which takes the SM slots the walk leaves. Joined before bwd_dk. (Without it the buffers
    # are allocated after bwd_dq, once the forward's chunk sums are freed, as before.)
    overlap = fold and cfg.overlap and dev.type == "cuda"
    side = _side_stream(dev) if overlap else None
    if overlap:
        sums = dstates(side)
    if delta_here:
        assert y.stride() == dy.stride(), "bwd_dq reads y with dy's strides"  # (both contiguous [B, T, H, D])
    gluon_dq = (cfg.gluon_dq and fold and not in_dq and not delta_here
                and KG.supported(q, D, F, D, C, k, v, phi_q, phi_k, dy))
    if gluon_dq:
        Ci, wi = KG.BLOCK, KG.WARPS
        ni = math.ceil(T / Ci)
    dq_args = (q, k, v, phi_q, phi_k, m_arg, gamma, dy, mx, den, delta, arg, dq, dpq, corr, cs, cz,
               pre_S.to(cs.dtype) if local else pre_S, pre_z, y, dgam, *strides_in,  # (.to: a no-op where kept low)
               B, T, H, Hf, G, GQ, ni, n_per, nwin, W, scale, C)
    dq_consts = dict(D=D, F=F, BD=BD, BF=BF, C=Ci, HAS_MASK=has_mask, PREC=prec, FOLD=fold, SKIP=cfg.skip_empty,
                     LOCAL=local, DGAM=in_dq, DELTA_HERE=delta_here)
    if gluon_dq:
        KG.bwd_dq_wgmma_kernel[(ni, B * H)](*dq_args, **dq_consts, num_warps=wi)
    else:
        _launch(K.bwd_dq_kernel, (ni, B * H), *dq_args, **dq_consts, **dict(kw, num_warps=wi), **_regs(cfg))
    del cs, cz
    dk_b = _empty(B, T, Hf, D, dtype=k.dtype if Gk == 1 else f32, device=dev)

    def dk_kernel(dv_b, dpk, cds, cdz, rev=(None, None)):
        Ck, wk = cfg.blocks("dk")
        rev_S, rev_z = (cds, cdz) if rev[0] is None else rev  # (read only where local)
        if cfg.gluon_dk and fold and cfg.dk_launches == 1 and KG.supported(q, D, F, D, C, k, v, phi_q, phi_k, dy):
            nk = math.ceil(T / KG.BLOCK)
            kinds = 3 if cfg.gluon_dk == 3 else 1  # (the forms: LaunchConfig.gluon_dk; the kernel)
            for grads in {1: (2, 1, 4), 2: (1, 6), 3: (7,)}[cfg.gluon_dk]:
                KG.bwd_dk_wgmma_kernel[(kinds * nk, B * Hf)](
                    q, k, v, phi_q, phi_k, m_arg, gamma, dy, mx, den, delta, arg, corr, dk_b, dv_b, dpk, cds, cdz,
                    rev_S, rev_z, *strides_in, B, T, H, Hf, Gk, nk, n_per, nwin, W, scale, C, D=D, F=F, BD=BD, BF=BF,
                    C=KG.BLOCK, GQ=GQ, HAS_MASK=has_mask, PREC=prec, FOLD=fold, SKIP=cfg.skip_empty, GRADS=grads,
                    LOCAL=local, KINDS=kinds, num_warps=KG.WARPS,
                )
            return
        nk = math.ceil(T / Ck)
        for grads in {1: (7,), 2: (3, 4), 3: (1, 2, 4)}[cfg.dk_launches]:
            _launch(K.bwd_dk_kernel, (nk, B * Hf),
                q, k, v, phi_q, phi_k, m_arg, gamma, dy, mx, den, delta, arg, corr, dk_b, dv_b, dpk, cds, cdz,
                rev_S, rev_z, *strides_in, B, T, H, Hf, Gk, nk, n_per, nwin, W, scale, C, D=D, F=F, BD=BD, BF=BF,
                C=Ck, GQ=GQ, HAS_MASK=has_mask, PREC=prec, FOLD=fold, SKIP=cfg.skip_empty, GRADS=grads,
                LOCAL=local, **dict(kw, num_warps=wk), **_regs(cfg),
            )

    atomic = NV > 1 and not fold
    final = not atomic and Gk == 1  # the last kernel to touch dv / dphi_k writes them in their dtype
    if not fold:
        dv_b = _empty(B, T, Hf, D, dtype=f32, device=dev)
        dpk = _empty(B, T, Hf, F, dtype=f32, device=dev)
        dk_kernel(dv_b, dpk, dy, dy)
    if overlap:  # (the walk's side stream joins here: bwd_dk reads its gradient sums)
        torch.cuda.current_stream(dev).wait_stream(side)
    else:
        sums = dstates()
    cds, cdz, rev_dS, rev_dz, *_ = sums
    if fold:
        dv_b = _empty(B, T, Hf, D, dtype=v.dtype if final else f32, device=dev)
        dpk = _empty(B, T, Hf, F, dtype=phi_k.dtype if final else f32, device=dev)
        dk_kernel(dv_b, dpk, cds, cdz, (rev_dS, rev_dz))
        dpq_out = dpq
    else:
        dpq_out = dpq if atomic else _empty(B, T, H, F, dtype=phi_q.dtype, device=dev)
        _launch(K.bwd_dq_state_kernel, (nseg, B * Hf, NV),
            phi_k, v, m_arg, dy, den, delta, pre_S, pre_z, dpq, dpq_out,
            *_strides(phi_k), *_strides(v), *_strides(dy), sM_b,
            B, T, H, Hf, Gk, n, n_per, nwin, F=F, D=D, BF=BF, BV=BV, C=C, GQ=GQ, HAS_MASK=has_mask, PREC=prec,
            ATOMIC=atomic, **kw,
        )
        dv_out = _empty(B, T, Hkv, D, dtype=v.dtype, device=dev) if final else dv_b
        dpk_out = _empty(B, T, Hf, F, dtype=phi_k.dtype, device=dev) if final else dpk
        _launch(K.bwd_dk_state_kernel, (nseg, B * Hf, NV),
            phi_q, phi_k, v, m_arg, dy, den, delta, rev_dS, rev_dz, dv_b, dpk, dv_out, dpk_out,
            *_strides(phi_q), *_strides(phi_k), *_strides(v), *_strides(dy), sM_b,
            B, T, H, Hf, Gk, n, n_per, nwin, F=F, D=D, BF=BF, BV=BV, C=C, GQ=GQ, HAS_MASK=has_mask, PREC=prec,
            ATOMIC=atomic, FINAL=final, **kw,
        )
        if final:
            dv_b, dpk = dv_out, dpk_out
    if Gk > 1:  # key feature maps per query head: k and v gradients summed over each KV group
        dk_b = dk_b.view(B, T, Hkv, Gk, D).sum(3)
        dv_b = dv_b.view(B, T, Hkv, Gk, D).sum(3)
    dgamma = dgam.sum((0, 1)) if has_u or in_dq else None
    return dq, dk_b.to(k.dtype), dv_b.to(v.dtype), dpq_out.to(phi_q.dtype), dpk.to(phi_k.dtype), dgamma


# Two autograd bindings of the same forward and backward:
# - eagerly, an autograd.Function: a forward + backward costs ~65 us on the host against the custom op's ~230
#   (measured on this 2-core CPU with the launches stubbed out: the op's Python autograd wrapper), and a small
#   model's training step is host-bound;
# - under torch.compile (``compile=true`` in training), torch.library custom ops with the backward registered as the
#   forward's autograd: opaque to inductor, which fuses the glue around them and never traces into the launches.
#   A LaunchConfig travels as ints (nseg -1: None).
class _HybridChunkFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, phi_q, phi_k, gamma, mask, S0, z0, window: int, scale: float, cfg: LaunchConfig,
                store_u: bool):
        y, *saved = _chunk_forward(q, k, v, phi_q, phi_k, gamma, mask, S0, z0, window, scale, cfg, store_u)
        ctx.save_for_backward(q, k, v, phi_q, phi_k, gamma, mask, y, *saved)
        ctx.meta = (window, scale, cfg)
        return y

    @staticmethod
    def backward(ctx, dy):
        grads = _chunk_backward(dy, *ctx.saved_tensors, *ctx.meta, ctx.needs_input_grad[5])  # (want_dgamma)
        return (*grads,) + (None,) * 7  # (saved: ... pre_z, cs, cz)


def _cfg(launch) -> LaunchConfig:
    C, BV, warps, stages, nseg, flags, C_intra, warps_intra, blocks = launch
    own = [(blocks >> s) & 0xFF or None for s in (0, 8, 16, 24)]
    return LaunchConfig(C=C, BV=BV, num_warps=warps, num_stages=stages, nseg=None if nseg < 0 else nseg,
                        one_acc=bool(flags & 1), split_forward=bool(flags & 2), fold_backward=bool(flags & 4),
                        C_intra=C_intra or None, warps_intra=warps_intra or None, skip_empty=bool(flags & 8),
                        C_fwd=own[0], warps_fwd=own[1], C_dk=own[2], warps_dk=own[3],
                        dk_launches=1 + (flags >> 4 & 3), local_sums=bool(flags & 64),
                        walk_tile=(None, 16, 32, 64)[flags >> 7 & 3], walk_pairs=bool(flags & 512),
                        walk_stages=(flags >> 10 & 7) or None, maxnreg=(blocks >> 32) & 0xFF or None,
                        dgamma_in_dq=bool(flags & 8192), delta_in_dq=bool(flags & 16384), overlap=bool(flags & 65536),
                        walk_maxnreg=(blocks >> 40) & 0xFF or None, gluon_fwd=(None, 64, 128)[flags >> 17 & 3],
                        gluon_dq=bool(flags & 524288), gluon_dk=flags >> 20 & 3)


def _launch_ints(cfg: LaunchConfig) -> tuple:
    """A LaunchConfig as the custom ops' ints: (C, BV, num_warps, num_stages, nseg (-1: None), flags (1: one_acc,
    2: split_forward, 4: fold_backward, 8: skip_empty, 16 and 32: dk_launches - 1, 64: local_sums, 128 and 256:
    walk_tile (0: None, 1: 16, 2: 32, 3: 64), 512: walk_pairs, 1024-4096: walk_stages (0: None), 8192: dgamma_in_dq,
    16384: delta_in_dq, 65536: overlap, 131072 and 262144: gluon_fwd (0: None, 1: 64, 2: 128), 524288: gluon_dq,
    1048576 and 2097152: gluon_dk (0-3); the backward op's also WANT_DGAMMA), C_intra (0: None),
    warps_intra (0: None), blocks (C_fwd, warps_fwd, C_dk, warps_dk, maxnreg, walk_maxnreg a byte each, low byte
    first; 0: None))."""
    flags = (int(cfg.one_acc) | 2 * int(cfg.split_forward) | 4 * int(cfg.fold_backward) | 8 * int(cfg.skip_empty)
             | 16 * (cfg.dk_launches - 1) | 64 * int(cfg.local_sums) | 128 * (None, 16, 32, 64).index(cfg.walk_tile)
             | 512 * int(cfg.walk_pairs) | 1024 * (cfg.walk_stages or 0) | 8192 * int(cfg.dgamma_in_dq)
             | 16384 * int(cfg.delta_in_dq) | 65536 * int(cfg.overlap) | 131072 * (None, 64, 128).index(cfg.gluon_fwd)
             | 524288 * int(cfg.gluon_dq) | 1048576 * int(cfg.gluon_dk))
    blocks = sum((x or 0) << s for x, s in zip((cfg.C_fwd, cfg.warps_fwd, cfg.C_dk, cfg.warps_dk, cfg.maxnreg,
                                                cfg.walk_maxnreg), (0, 8, 16, 24, 32, 40)))
    return (cfg.C, cfg.BV, cfg.num_warps, cfg.num_stages, -1 if cfg.nseg is None else cfg.nseg, flags,
            cfg.C_intra or 0, cfg.warps_intra or 0, blocks)


#: A flag of the backward op alone (set by its autograd from needs_input_grad): the window weight wants a gradient,
#: which bwd_dq forms where the config has dgamma_in_dq (the forward then stored no u).
WANT_DGAMMA = 1 << 15

#: The custom ops' names carry their schema's version: torch's on-disk compile caches (AOTAutograd's, inductor's) key
#: a cached graph on the op's name, not its schema, so a graph cached before a schema change called the new op with
#: the old arguments (seen on 2026-12-05 when the ops gained the kept chunk sums). Bump it with any schema change.
OP_VERSION = 4
FORWARD_OP, BACKWARD_OP = f"hybrid_chunk_v{OP_VERSION}", f"hybrid_chunk_backward_v{OP_VERSION}"


@torch.library.custom_op(f"linearize::{FORWARD_OP}", mutates_args=())
def _hybrid_chunk_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, phi_q: torch.Tensor, phi_k: torch.Tensor,
                     gamma: torch.Tensor, mask: torch.Tensor | None, S0: torch.Tensor | None,
                     z0: torch.Tensor | None, window: int, scale: float, C: int, BV: int, num_warps: int,
                     num_stages: int, nseg: int, flags: int, C_intra: int, warps_intra: int,
                     blocks: int, store_u: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                             torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, u, mx, den, arg, pre_S, pre_z, cs, cz); u, cs and cz are empty where not stored / kept (an op's outputs
    may not alias)."""
    cfg = _cfg((C, BV, num_warps, num_stages, nseg, flags, C_intra, warps_intra, blocks))
    y, u, mx, den, arg, pre_S, pre_z, cs, cz = _chunk_forward(q, k, v, phi_q, phi_k, gamma, mask, S0, z0, window, scale,
                                                             cfg, store_u)
    none = q.new_empty(0)
    return (y, none if u is None else u, mx, den, arg, pre_S, pre_z, none.clone() if cs is None else cs,
            none.clone() if cz is None else cz)


@_hybrid_chunk_op.register_fake
def _(q, k, v, phi_q, phi_k, gamma, mask, S0, z0, window, scale, C, BV, num_warps, num_stages, nseg, flags, C_intra,
      warps_intra, blocks, store_u):
    cfg = _cfg((C, BV, num_warps, num_stages, nseg, flags, C_intra, warps_intra, blocks))
    B, T, H, D, _, Hf, F, _, n, *_, n_seg = _geometry(q, k, phi_q, phi_k, window, cfg)
    f32 = torch.float32
    keep = cfg.keeps_chunk_sums
    zero = _zero_start(cfg, n_seg, S0)
    return (q.new_empty(q.shape), q.new_empty(q.shape if store_u else (0,)), q.new_empty(B, H, T, dtype=f32),
            q.new_empty(B, H, T, dtype=f32), q.new_empty(B, H, T, dtype=torch.int32),
            q.new_empty((0,) if zero else (n_seg, B, Hf, F, D), dtype=phi_q.dtype if keep and _local(cfg, n_seg) else f32),
            q.new_empty((0,) if zero else (n_seg, B, Hf, F), dtype=f32),
            phi_q.new_empty((n, B, Hf, F, D) if keep else (0,)),
            q.new_empty((n, B, Hf, F) if keep else (0,), dtype=f32))


@torch.library.custom_op(f"linearize::{BACKWARD_OP}", mutates_args=())
def _hybrid_chunk_backward_op(dy: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              phi_q: torch.Tensor, phi_k: torch.Tensor, gamma: torch.Tensor,
                              mask: torch.Tensor | None, y: torch.Tensor, u: torch.Tensor, mx: torch.Tensor,
                              den: torch.Tensor, arg: torch.Tensor, pre_S: torch.Tensor, pre_z: torch.Tensor,
                              cs: torch.Tensor, cz: torch.Tensor, window: int, scale: float, C: int, BV: int,
                              num_warps: int, num_stages: int, nseg: int, flags: int, C_intra: int,
                              warps_intra: int, blocks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                         torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dphi_q, dphi_k, dgamma); dgamma is empty where neither the forward stored u nor flags has
    WANT_DGAMMA with dgamma_in_dq."""
    cfg = _cfg((C, BV, num_warps, num_stages, nseg, flags, C_intra, warps_intra, blocks))
    *grads, dgamma = _chunk_backward(dy, q, k, v, phi_q, phi_k, gamma, mask, y, u if u.numel() else None, mx, den,
                                     arg, pre_S, pre_z, cs if cs.numel() else None, cz if cs.numel() else None,
                                     window, scale, cfg, bool(flags & WANT_DGAMMA))  # (want_dgamma)
    return (*grads, gamma.new_empty(0) if dgamma is None else dgamma)


@_hybrid_chunk_backward_op.register_fake
def _(dy, q, k, v, phi_q, phi_k, gamma, mask, y, u, mx, den, arg, pre_S, pre_z, cs, cz, window, scale, *launch):
    flags = launch[5]
    dgamma = u.numel() or (flags & WANT_DGAMMA and _cfg(launch).dgamma_in_dq)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), phi_q.new_empty(phi_q.shape),
            phi_k.new_empty(phi_k.shape), gamma.new_empty(gamma.shape if dgamma else (0,), dtype=torch.float32))


def _chunk_setup(ctx, inputs, output):
    q, k, v, phi_q, phi_k, gamma, mask, S0, z0, window, scale, *launch = inputs
    y, u, mx, den, arg, pre_S, pre_z, cs, cz = output
    ctx.save_for_backward(q, k, v, phi_q, phi_k, gamma, mask, y, u, mx, den, arg, pre_S, pre_z, cs, cz)
    ctx.meta = (window, scale, *launch[:-1])  # (store_u is read off u)
    ctx.mark_non_differentiable(u, mx, den, arg, pre_S, pre_z, cs, cz)
    ctx.set_materialize_grads(False)  # (else autograd fills a zero gradient for each of those, pre_S's 67 MB at 16K)


def _chunk_autograd(ctx, dy, *_):
    if dy is None:  # (y unused by the loss)
        return (None,) * 21
    window, scale, C, BV, warps, stages, nseg, flags, *rest = ctx.meta
    want = WANT_DGAMMA if ctx.needs_input_grad[5] else 0
    *grads, dgamma = _hybrid_chunk_backward_op(dy, *ctx.saved_tensors, window, scale, C, BV, warps, stages, nseg,
                                               flags | want, *rest)
    return (*grads, dgamma if dgamma.numel() else None) + (None,) * 15


_hybrid_chunk_op.register_autograd(_chunk_autograd, setup_context=_chunk_setup)


def hybrid_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    *,
    window: int,
    window_weight: float | torch.Tensor,
    scale: float | None = None,
    attention_mask: torch.Tensor | None = None,
    initial_state: HybridState | None = None,
    output_final_state: bool = False,
    config: LaunchConfig | None = None,
) -> tuple[torch.Tensor, HybridState | None]:
    """``hybrid_attention_chunked`` on Triton kernels. Shapes as there: q [B,T,H,D], k/v [B,T,Hkv,D],
    phi_q [B,T,H,F], phi_k [B,T,Hkv|H,F], attention_mask [B,T]. Returns y [B,T,H,D] (q's dtype) and, if
    asked, the final ``HybridState``. Gradients flow to q, k, v, phi_q, phi_k and window_weight."""
    d = check_inputs(q, k, v, phi_q, phi_k, window)
    if d.B * d.H > MAX_GRID_Y:
        return _in_batch_pieces(q, k, v, phi_q, phi_k, window=window, window_weight=window_weight, scale=scale,
                                attention_mask=attention_mask, initial_state=initial_state,
                                output_final_state=output_final_state, config=config)
    scale = default_scale(scale, d.D)
    dev = q.device
    dtype = q.dtype
    gamma = window_weight_vector(window_weight, d.H, torch.float32, dev).contiguous()
    # One operand dtype for the tensor-core products; accumulation is fp32 regardless.
    k, v, phi_q, phi_k = (x.to(dtype) for x in (k, v, phi_q, phi_k))
    q, k, v, phi_q, phi_k = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v, phi_q, phi_k))
    valid = key_mask(attention_mask, d.B, d.T, dev) if attention_mask is not None else None
    def empty() -> HybridState:
        return HybridState.empty(d.B, d.Hkv, d.D, d.Hf, d.F, dtype=dtype, device=dev, phi_dtype=dtype)

    # No initial state (training, a whole prefill): none is built; the kernels start from zero sums without
    # reading any (two fills and two reads fewer a layer, and their host calls).
    given = initial_state is not None
    L = initial_state.tail_len if given else 0
    if d.T == 0:
        return q.new_zeros(q.shape), ((initial_state if given else empty()) if output_final_state else None)
    if L:  # the tail's keys lead the sequence; its query rows are dummies and are dropped
        def lead(tail, new):
            return torch.cat([tail.to(new.dtype), new], dim=1)

        q_run = torch.cat([q.new_zeros(d.B, L, d.H, d.D), q], dim=1)
        k_run, v_run = lead(initial_state.k, k), lead(initial_state.v, v)
        pq_run = torch.cat([phi_q.new_zeros(d.B, L, d.H, d.F), phi_q], dim=1)
        pk_run = lead(initial_state.phi_k, phi_k)
        new_valid = valid if valid is not None else torch.ones(d.B, d.T, dtype=torch.bool, device=dev)
        valid_run = torch.cat([initial_state.mask.to(dev), new_valid], dim=1)
    else:
        q_run, k_run, v_run, pq_run, pk_run, valid_run = q, k, v, phi_q, phi_k, valid
    mask_u8 = None if valid_run is None or bool(valid_run.all()) else valid_run.to(torch.uint8).contiguous()
    S0 = initial_state.S.detach().to(torch.float32).contiguous() if given else None
    z0 = initial_state.z.detach().to(torch.float32).contiguous() if given else None
    training = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, phi_q, phi_k, gamma))
    cfg = config or default_config(d.D, d.F, training)
    # (read here: grad mode is off inside the op; with dgamma_in_dq the backward forms dgamma without u)
    store_u = torch.is_grad_enabled() and gamma.requires_grad and not cfg.dgamma_in_dq
    args = (q_run, k_run, v_run, pq_run, pk_run, gamma, mask_u8, S0, z0, window, scale)
    if torch.compiler.is_compiling():
        y = _hybrid_chunk_op(*args, *_launch_ints(cfg), store_u)[0]
    else:
        y = _HybridChunkFn.apply(*args, cfg, store_u)
    if L:
        y = y[:, L:]
    if not output_final_state:
        return y, None
    init = initial_state if given else empty()
    return y, _final_state(init.S.float(), init.z.float(), k_run, v_run, pk_run, valid_run, window, d)


def _in_batch_pieces(q, k, v, phi_q, phi_k, *, attention_mask, initial_state, output_final_state, **kw):
    """Sequences are independent: run batches whose B * H programs per chunk exceed CUDA's grid limit on
    its second axis in slices that fit, and concatenate (gradients flow through the slices)."""
    B, H = q.shape[0], q.shape[2]
    step = max(1, MAX_GRID_Y // H)
    ys, states = [], []
    for i in range(0, B, step):
        sl = slice(i, i + step)
        init = None if initial_state is None else HybridState(*(t[sl] for t in initial_state))
        mask = None if attention_mask is None else attention_mask[sl]
        y, st = hybrid_attention_triton(q[sl], k[sl], v[sl], phi_q[sl], phi_k[sl], attention_mask=mask,
                                        initial_state=init, output_final_state=output_final_state, **kw)
        ys.append(y)
        states.append(st)
    if not output_final_state:
        return torch.cat(ys), None
    return torch.cat(ys), HybridState(*(torch.cat(parts) for parts in zip(*states)))


def _final_state(S0, z0, k, v, pk, valid, window: int, d) -> HybridState:
    """The sums over every key but the last ``window - 1``, which form the new tail (torch ops: one pass)."""
    Tr = k.shape[1]
    keep = min(window - 1, Tr) if window > 0 else 0
    n_lin = Tr - keep
    if valid is None:
        valid = torch.ones(d.B, Tr, dtype=torch.bool, device=k.device)
    m = valid[:, :n_lin, None, None].float()
    pk_l = (pk[:, :n_lin].float() * m).view(d.B, n_lin, d.Hkv, d.Gk, d.F)
    v_l = v[:, :n_lin].float()
    S = S0.view(d.B, d.Hkv, d.Gk, d.F, d.D) + torch.einsum("btkgf,btkd->bkgfd", pk_l, v_l)
    z = z0.view(d.B, d.Hkv, d.Gk, d.F) + pk_l.sum(1)
    return HybridState(
        S=S.reshape(d.B, d.Hf, d.F, d.D),
        z=z.reshape(d.B, d.Hf, d.F),
        k=k[:, n_lin:],
        v=v[:, n_lin:],
        phi_k=pk[:, n_lin:],
        mask=valid[:, n_lin:],
    )
