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
    import check_smem

    launches = check_smem.record_launches(*shape)
    assert {r["kernel"] for r in launches} >= {"fwd_kernel", "bwd_dk_state_kernel", "bwd_delta_kernel"}
    (row,) = check_smem.check(launches, 90, check_smem.H100_SMEM, kernels={"bwd_dk_state_kernel"})
    assert row["stages"] == 2 and row["shared"] == reported
    assert row["shared_1_stage"] <= check_smem.H100_SMEM and row["fits"]
