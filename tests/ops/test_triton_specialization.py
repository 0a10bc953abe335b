"""The forward chunk kernels compile once per model, not once per pattern of lengths: Triton's own binder (the
code that picks a compiled variant at launch, built here for sm_90 on this CPU machine) gives every forward launch
of an evaluation at mixed batch sizes and lengths the same key. Before ``chunk_kernels.LENGTH_ARGS`` it gave 8 keys
for each of the two forward kernels over these lengths: 16 compiles of seconds each for one model's evaluation
(the first tasks of a converted model ran 2-6x slower than the base's on the H200, 2026-12-04)."""

import collections

import pytest
import torch

from tests.ops.helpers import needs_triton, random_inputs

pytestmark = needs_triton


def _launch_keys(shapes, grad: bool) -> dict[str, set]:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    from linearize.ops.triton import chunk
    from linearize.ops.triton import chunk_kernels as K

    backend = make_backend(GPUTarget("cuda", 90, 32))
    keys: dict[str, set] = collections.defaultdict(set)

    class Binder:  # stands in for a kernel: binds its arguments as a launch would, compiles and runs nothing
        def __init__(self, name, fn):
            self.name, self.bind = name, create_function_from_signature(fn.signature, fn.params, backend)

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                _, specialization, options = self.bind(*args, **kwargs)
                keys[self.name].add((repr(specialization), repr(sorted(options.items()))))
            return launch

    kernels = {n: f for n, f in vars(K).items() if n.endswith("_kernel") and hasattr(f, "params")}
    try:
        for n, f in kernels.items():
            setattr(K, n, Binder(n, f))
        for B, T in shapes:
            ins = random_inputs(B, T, 9, 3, 64, 128, 3, dtype=torch.bfloat16)
            if grad:
                for t in ins[:5]:
                    t.requires_grad_(True)
            y, _ = chunk.hybrid_attention_triton(*ins[:5], window=64, window_weight=ins[5])
            if grad:
                y.float().sum().backward()
    finally:
        for n, f in kernels.items():
            setattr(K, n, f)
    return keys


def test_forward_kernels_compile_once_across_batch_sizes_and_lengths():
    shapes = [(B, T) for B in (32, 7, 1) for T in (2, 17, 48, 64, 100, 128, 129, 700, 1024)]
    keys = _launch_keys(shapes, grad=False)
    assert set(keys) == {"fwd_kernel", "fwd_segment_sums_kernel", "segment_prefix_kernel"}
    assert {k: len(v) for k, v in keys.items()} == {"fwd_kernel": 1, "fwd_segment_sums_kernel": 1, "segment_prefix_kernel": 1}
    # T = 1 has no earlier key chunk in its window (nwin = 0, kept specialized: at 1 the loop over window chunks
    # unrolls): one more variant of fwd_kernel, and only one whatever the batch (its one chunk is one segment: no
    # segment sums)
    one = _launch_keys(shapes + [(B, 1) for B in (32, 7, 1)], grad=False)
    assert {k: len(v) for k, v in one.items()} == {"fwd_kernel": 2, "fwd_segment_sums_kernel": 1, "segment_prefix_kernel": 1}


@pytest.mark.parametrize("sms", [4, 132], ids=["one-segment", "segments"])
def test_backward_kernels_keep_their_hints_at_one_training_length(sms, monkeypatch):
    """Training runs at one length: one key per kernel there, with the divisibility hints kept (fewer spills). At
    4 SMs (the interpreter's count) SmolLM2's heads at B 8 walk one segment (from zero: no prefix pass either); at an
    H100's 132 they take segments (local_sums: the walks write the segment totals, so no segment-sum kernel)."""
    from linearize.ops.triton import chunk

    monkeypatch.setattr(chunk, "_num_sms", lambda device: sms)
    keys = _launch_keys([(8, 1024)], grad=True)
    walks = {"fwd_chunk_states_kernel", "fwd_blocks_kernel", "bwd_delta_kernel", "bwd_dq_kernel",
             "bwd_chunk_dstates_kernel", "bwd_dk_kernel"}
    assert set(keys) == walks | ({"segment_prefix_kernel"} if sms == 132 else set())
    assert all(len(v) == 1 for n, v in keys.items() if n != "segment_prefix_kernel")
    # over segments, the forward's prefix (seeded) and the backward's (reversed); local_sums keeps each S prefix in
    # the chunk sums' dtype (bf16), its z prefix fp32: two output dtypes each
    assert len(keys.get("segment_prefix_kernel", ())) == (0 if sms == 4 else 4)
    assert "16" in next(iter(keys["bwd_dk_kernel"]))[0]  # some int argument still carries the divisibility hint
