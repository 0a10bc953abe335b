"""Two CUDA processes (NCCL, FSDP2 with bf16 all-gathers / fp32 reductions) against one, on a tiny model.

The CPU tests (tests/pipelines/test_distributed.py) check equality in fp32 with gloo; here the same
runs go through NCCL and bf16 autocast, so the tolerances are bf16's.
"""

import json

import pytest
import torch

from tests.pipelines.test_distributed import losses, overrides, run_ok
from tests.pipelines.test_resume import env
from tests.pipelines.tiny_run import make_model_dir, make_text

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")


def command(model_dir, out, text, nproc):
    import sys

    cmd = [sys.executable, "-m", "linearize", "convert", str(model_dir), "--out", str(out), "--nproc", str(nproc)]
    for item in overrides(text) + ["device=cuda"]:
        cmd += ["--set", item]
    return cmd


def test_two_gpus_equal_one(tmp_path):
    model_dir, text = make_model_dir(tmp_path / "tiny"), make_text(tmp_path / "text.txt")
    environ = env(tmp_path / "cache") | {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    run_ok(command(model_dir, one, text, 1), environ)
    run_ok(command(model_dir, two, text, 2), environ)
    for stage in ("stage1", "stage2"):
        a, b = torch.tensor(losses(one, stage)), torch.tensor(losses(two, stage))
        assert len(a) == len(b) == 6
        torch.testing.assert_close(b, a, rtol=2e-2, atol=1e-6)
    r1, r2 = (json.loads((p / "report.json").read_text()) for p in (one, two))
    assert r2["environment"]["processes"] == 2
    assert r2["evals"]["stage2"]["ppl"] == pytest.approx(r1["evals"]["stage2"]["ppl"], rel=2e-2)
