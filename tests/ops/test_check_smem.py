"""scripts/check_smem.py: compiled ahead of time for sm_90 on this CPU machine, the launches that ran out of
shared memory on the H200 (2026-12-03, tests/gpu/test_chunk_cuda.py) need the bytes Triton reported there,
and fit with the one-stage fallback of ``chunk._launch``."""

import sys
from pathlib import Path

import pytest
import torch

from tests.ops.helpers import needs_triton

pytestmark = needs_triton

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))


@pytest.mark.parametrize("shape,reported", [
    ((2, 1, 4, 2, 128, 128, 2, 64, torch.float32), 279040),  # test_against_reference[float32-128-128], T=1
    ((2, 700, 14, 2, 64, 128, 2, 64, torch.bfloat16), 247552),  # test_real_model_head_shapes[qwen2.5]
])
def test_h200_overflows_are_reproduced_and_fit_with_one_stage(shape, reported):
    """At the launch the H200 ran then (the one-pass backward with its running-sum walks, the default until
    2026-12-05): bwd_dk_state_kernel's 2-stage shared memory over the limit, 1 stage under it."""
    import dataclasses

    import check_smem

    from linearize.ops.triton.chunk import default_config

    D, F = shape[4], shape[5]
    then = dataclasses.replace(default_config(D, F), C_intra=None, warps_intra=None, fold_backward=False)
    launches = check_smem.record_launches(*shape, config=then)
    assert {r["kernel"] for r in launches} >= {"fwd_kernel", "bwd_dk_state_kernel", "bwd_delta_kernel"}
    (row,) = check_smem.check(launches, 90, check_smem.H100_SMEM, kernels={"bwd_dk_state_kernel"})
    assert row["stages"] == 2 and row["shared"] == reported
    assert row["shared_1_stage"] <= check_smem.H100_SMEM and row["fits"]


def test_register_report_reads_the_binary_that_would_run():
    """--registers: registers a thread and spill bytes from the cubin. The benchmark shape's forward is the kernel
    whose pressure the notes discuss (benchmarks/NOTES-chunk.md); here only that the report is read and sane.
    (A forward + backward records the training launch: the forward in two passes, its block kernel in Gluon on sm_90,
    ``fwd_blocks_wgmma_kernel``, which the recorder takes as an H100 would.)"""
    import check_smem

    launches = check_smem.record_launches(2, 200, 4, 4, 128, 128, 4, 64, torch.bfloat16)
    kernels = {"fwd_blocks_wgmma_kernel", "bwd_delta_kernel"}
    rows = check_smem.check(launches, 90, check_smem.H100_SMEM, kernels=kernels, registers=True)
    assert {r["kernel"] for r in rows} == kernels
    for r in rows:
        assert 16 <= r["registers"] <= 255 and r["spill_bytes"] >= 0


def test_one_acc_reaches_the_forward_only_when_the_window_weight_is_frozen():
    import check_smem

    from linearize.ops.triton.chunk import LaunchConfig

    cfg = LaunchConfig(C=64, BV=128, num_warps=8, num_stages=2, one_acc=True)
    shape = (2, 200, 4, 4, 128, 128, 4, 64, torch.bfloat16)
    flags = {g: [r["constexprs"]["ONE_ACC"] for r in check_smem.record_launches(*shape, config=cfg, gamma_grad=g)
                 if r["kernel"] == "fwd_kernel"] for g in (True, False)}
    assert flags == {True: [False], False: [True]}


@pytest.mark.parametrize("dq_kernel", ["bwd_dq_kernel", "bwd_dq_wgmma_kernel"], ids=["triton", "gluon"])
def test_walk_register_cap_reaches_the_walks_and_fits_one_dq_program_beside_two(dq_kernel):
    """``LaunchConfig.walk_maxnreg``: the cap is a compile option of the two chunk-sum walks only. At 128 the
    benchmark heads' backward walk (155 registers uncapped, sm_90) compiles without spill, so two of its 4-warp
    programs and one bwd_dq program (Triton's, or Gluon's: ``gluon_dq``) fit an SM's 64K registers together, as
    ``overlap`` needs."""
    import dataclasses

    import check_smem

    from linearize.ops.triton.chunk import default_config

    cfg = dataclasses.replace(default_config(128, 128, training=True), overlap=True, walk_maxnreg=128,
                              gluon_dq=dq_kernel == "bwd_dq_wgmma_kernel")
    launches = check_smem.record_launches(2, 200, 4, 4, 128, 128, 4, 64, torch.bfloat16, config=cfg)
    caps = {r["kernel"]: r["opts"].get("maxnreg") for r in launches}
    walks = {"fwd_chunk_states_kernel", "bwd_chunk_dstates_kernel"}
    assert {k for k, v in caps.items() if v is not None} == walks and {caps[k] for k in walks} == {128}
    rows = {r["kernel"]: r for r in check_smem.check(launches, 90, check_smem.H100_SMEM, registers=True,
                                                     kernels={"bwd_chunk_dstates_kernel", dq_kernel})}
    walk, dq = rows["bwd_chunk_dstates_kernel"], rows[dq_kernel]
    assert walk["registers"] <= 128 and walk["spill_bytes"] == 0
    per_program = {name: -(-r["registers"] // 8) * 8 * 32 * r["warps"] for name, r in rows.items()}  # (8 a thread)
    assert 2 * per_program["bwd_chunk_dstates_kernel"] + per_program[dq_kernel] <= 65536
    assert 2 * walk["shared"] + dq["shared"] <= check_smem.H100_SMEM
