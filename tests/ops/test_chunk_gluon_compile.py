"""The Gluon kernels (``linearize/ops/triton/chunk_gluon.py``: the split forward's block kernel, bwd_dq, bwd_dk),
compiled ahead of time for sm_90 on this CPU machine (Gluon has no interpreter; their outputs are tested on the GPU,
tests/gpu/test_chunk_cuda.py -k gluon): the launcher picks them where ``LaunchConfig.gluon_fwd`` / ``gluon_dq`` /
``gluon_dk`` ask, and the binaries are what they were written to be: warpgroup MMA only, two programs an SM by
shared memory and registers, and no spill at the benchmark's and the real models' heads."""

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from tests.ops.helpers import needs_triton

pytestmark = needs_triton

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

# (name, B, T, H, Hkv, D, F, Hf, W): the benchmark's heads (key maps per query head) and SmolLM2's / Qwen2.5's
HEADS = [("bench", 2, 700, 4, 4, 128, 128, 4, 64), ("smollm2", 2, 700, 9, 3, 64, 128, 3, 64),
         ("qwen2.5", 2, 700, 14, 2, 64, 128, 2, 64)]


def _gluon_launches(shape, gluon_fwd, kernel="fwd_blocks_wgmma_kernel", gluon_dk=1):
    import check_smem

    from linearize.ops.triton import chunk_gluon
    from linearize.ops.triton.chunk import default_config

    if chunk_gluon.gluon is None:
        pytest.skip("this Triton has no Gluon")
    D, F = shape[4], shape[5]
    cfg = dataclasses.replace(default_config(D, F, training=True), gluon_fwd=gluon_fwd, gluon_dq=True,
                              gluon_dk=gluon_dk)
    launches = check_smem.record_launches(*shape, torch.bfloat16, config=cfg)
    kernels = [r["kernel"] for r in launches]
    assert {"fwd_blocks_wgmma_kernel", "bwd_dq_wgmma_kernel", "bwd_dk_wgmma_kernel"} <= set(kernels)
    assert not {"fwd_blocks_kernel", "bwd_dq_kernel", "bwd_dk_kernel"} & set(kernels)
    return [r for r in launches if r["kernel"] == kernel]


def _assert_wgmma_two_programs_an_sm_no_spill(launch):
    import check_smem

    compiled = check_smem.compile_launch(launch, 90)
    ptx = compiled.asm["ptx"]
    assert "wgmma.mma_async" in ptx and "mma.sync" not in ptx
    use = check_smem.resource_usage(compiled)
    # two 4-warp programs an SM: <= 256 registers a thread (65536 / 256 threads) and half the shared memory
    assert use["REG"] <= 255 and 2 * compiled.metadata.shared <= check_smem.H100_SMEM
    assert use.get("STACK", 0) + use.get("LOCAL", 0) == 0


@pytest.mark.parametrize("gluon_fwd", [128, 64])
@pytest.mark.parametrize("heads", HEADS, ids=[h[0] for h in HEADS])
def test_gluon_forward_compiles_to_wgmma_without_spills(heads, gluon_fwd):
    (launch,) = _gluon_launches(heads[1:], gluon_fwd)
    assert launch["constexprs"]["C"] == 64 and launch["opts"]["num_warps"] == 4
    _assert_wgmma_two_programs_an_sm_no_spill(launch)


@pytest.mark.parametrize("kernel,form,grads", [("bwd_dq_wgmma_kernel", 1, [0]), ("bwd_dk_wgmma_kernel", 1, [1, 2, 4]),
                                              ("bwd_dk_wgmma_kernel", 3, [7])], ids=["dq", "dk-3-launches", "dk-3-kinds"])
@pytest.mark.parametrize("heads", HEADS, ids=[h[0] for h in HEADS])
def test_gluon_backward_compiles_to_wgmma_without_spills(heads, kernel, form, grads):
    """bwd_dq; bwd_dk's three launches (dv, dk, dphi_k: GRADS 2, 1, 4) and its one launch of three kinds of program
    (``gluon_dk=3``: a program's kind from its place in the grid)."""
    found = _gluon_launches(heads[1:], 128, kernel, gluon_dk=form)
    assert sorted(r["constexprs"].get("GRADS", 0) for r in found) == grads
    for launch in found:
        _assert_wgmma_two_programs_an_sm_no_spill(launch)


def test_gluon_forward_with_padding_and_segment_prefixes_compiles():
    """The kernel's other branches (a key mask, the segment prefix of local_sums) compile for sm_90 and fit two
    programs an SM (spills are allowed there: a mask costs 8 B a thread at the benchmark heads); bwd_dk in each of
    its forms (``gluon_dk`` 1-3)."""
    import check_smem

    for name, form in [("fwd_blocks_wgmma_kernel", 1), ("bwd_dq_wgmma_kernel", 1),
                       *(("bwd_dk_wgmma_kernel", form) for form in (1, 2, 3))]:
        for launch in _gluon_launches(HEADS[0][1:], 128, name, gluon_dk=form):
            launch = dict(launch, constexprs=dict(launch["constexprs"], HAS_MASK=True, LOCAL=True))
            kernel = check_smem.compile_launch(launch, 90)
            assert kernel.asm["ptx"].count("wgmma.mma_async") > 0 and 2 * kernel.metadata.shared <= check_smem.H100_SMEM
            assert check_smem.resource_usage(kernel)["REG"] <= 255
