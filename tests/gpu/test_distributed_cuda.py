"""Two CUDA processes (NCCL, FSDP2 with bf16 all-gathers / fp32 reductions) against one, on a tiny model.

The CPU tests (tests/pipelines/test_distributed.py) check equality in fp32 with gloo, for both placements;
here the same runs go through NCCL and bf16 autocast, so the tolerances are bf16's. The 2-GPU runs use the
``sharded`` placement (stage 1 a pipeline of blocks sending boundary states over NCCL, everything else on
FSDP2 shards built from the CPU, export merged on rank 0's CPU), and the default ``auto``, which replicates a
model this small (stage 2 DDP over NCCL). A larger random model (1.6 GB of
bf16 weights) then shows that no GPU's peak comes near the model's size; a ``replicate`` run of it shows
the other placement still runs (and holds the whole model on each GPU).

    timeout 540 python -m pytest -q tests/gpu/test_distributed_cuda.py      # on a host with 2 GPUs
"""

import json
import sys

import pytest
import torch

from tests.pipelines.test_distributed import losses, overrides, run_and_kill, run_ok
from tests.pipelines.test_resume import env, metric_lines
from tests.pipelines.tiny_run import make_model_dir, make_text

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def command(model_dir, out, text, nproc, *sets, resume=False):
    cmd = [sys.executable, "-m", "linearize", "convert", str(model_dir), "--out", str(out), "--nproc", str(nproc)]
    for item in overrides(text) + ["device=cuda", *sets]:
        cmd += ["--set", item]
    return cmd + (["--resume"] if resume else [])


def report(out):
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("cuda-dist")
    model_dir, text = make_model_dir(base / "tiny"), make_text(base / "text.txt")
    environ = env(base / "cache") | NO_MULTICAST
    one, two, rep = base / "one", base / "two", base / "replicate"
    run_ok(command(model_dir, one, text, 1), environ)
    run_ok(command(model_dir, two, text, 2, "placement=sharded"), environ)
    run_ok(command(model_dir, rep, text, 2), environ)  # placement=auto: replicate
    return {"one": one, "two": two, "replicate": rep, "model_dir": model_dir, "text": text, "env": environ, "base": base}


@pytest.mark.parametrize("placement", ["sharded", "replicate"])
def test_two_gpus_equal_one(runs, placement):
    """sharded: stage 1 pipelined over 2 GPUs, stage 2 FSDP2; replicate (the default for a model this small): stage 1
    block-wise, stage 2 DDP (an NCCL all-reduce of the LoRA gradients). Either equals one GPU's steps."""
    one, two = runs["one"], runs["two" if placement == "sharded" else "replicate"]
    for stage in ("stage1", "stage2"):
        a, b = torch.tensor(losses(one, stage)), torch.tensor(losses(two, stage))
        assert len(a) == len(b) == 6
        torch.testing.assert_close(b, a, rtol=2e-2, atol=1e-6)
    r1, r2 = report(one), report(two)
    assert r2["environment"]["processes"] == 2 and r2["environment"]["placement"] == placement
    for key in ("base", "swapped", "stage1", "stage2"):  # (sharded: on the FSDP shards, every rank in every forward)
        assert r2["evals"][key]["ppl"] == pytest.approx(r1["evals"][key]["ppl"], rel=2e-2)


def test_sharded_ranks_hold_only_their_share(runs):
    held = report(runs["two"])["placement"]
    for h in held["stage1"]:
        assert h["layers_here"] == list(range(*h["span"])) and h["embeddings_here"] == (h["rank"] == 0)
        assert h["off_meta_devices"] == ["cuda"] and h["bytes_here"] < 0.6 * h["model_bytes"]
    assert len(held["stage2"]) == 2


def test_sharded_export_loads_and_matches_one_gpu(runs):
    """Rank 0 merged the adapters on its CPU: the export loads with from_pretrained and gives the 1-GPU export's outputs."""
    import linearize
    from transformers import AutoModelForCausalLM

    a, b = (AutoModelForCausalLM.from_pretrained(runs[k] / "model", dtype=torch.float32).cuda().eval() for k in ("one", "two"))
    assert linearize.is_linearized(b)
    ids = torch.randint(3, 32, (2, 20), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        la, lb = a(input_ids=ids).logits, b(input_ids=ids).logits
    assert (lb - la).abs().max() < 0.05 * la.abs().max()


def test_killed_sharded_run_resumes(runs):
    """Killed mid stage 2 on 2 GPUs (FSDP shards from the CPU), resumed on 2 GPUs to the end: the same run, to bf16
    tolerance. (The CPU test also kills one mid stage 1 and resumes the pipeline.)"""
    out = runs["base"] / "killed"
    model_dir, text, environ = runs["model_dir"], runs["text"], runs["env"]
    run_and_kill(command(model_dir, out, text, 2, "placement=sharded"), environ, out, "stage2", 3)
    assert json.loads((out / "checkpoints" / "LATEST").read_text())["stage"] == "stage2"
    run_ok(command(model_dir, out, text, 2, "placement=sharded", resume=True), environ)
    ref = runs["two"]
    assert [(l["stage"], l["step"]) for l in metric_lines(out)] == [(l["stage"], l["step"]) for l in metric_lines(ref)]
    for stage in ("stage1", "stage2"):
        torch.testing.assert_close(torch.tensor(losses(out, stage)), torch.tensor(losses(ref, stage)), rtol=1e-2, atol=1e-6)


def _large_model_dir(path):
    """A random Llama of 1.6 GB in bf16 (16 layers of 2048), with the tiny word-level tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    small = make_model_dir(path)  # the tokenizer (and a tiny model, replaced below)
    cfg = AutoConfig.for_model(
        "llama", vocab_size=32, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
        num_key_value_heads=16, head_dim=128, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(small)
    bytes_ = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    torch.cuda.empty_cache()
    return small, bytes_


def test_no_gpu_holds_the_whole_model(runs):
    """Per-rank CUDA peaks (max_memory_allocated over the whole run, before rank 0's CPU export) of a sharded run stay
    well under the model's weights on both GPUs; a replicated run holds all of them on each."""
    model_dir, model_bytes = _large_model_dir(runs["base"] / "large")
    short = ["stage1.steps=2", "stage2.steps=2", "checkpoint_every=2", "stage1.grad_accum=1", "stage2.grad_accum=1"]
    peaks = {}
    for placement in ("sharded", "replicate"):
        out = runs["base"] / f"large-{placement}"
        run_ok(command(model_dir, out, runs["text"], 2, f"placement={placement}", *short), runs["env"], timeout=300)
        peaks[placement] = [mb * 2**20 for mb in report(out)["peak_memory_mb_per_rank"]]
    print(f"model {model_bytes / 2**30:.2f} GiB; peaks per rank (GiB): "
          + "; ".join(f"{k} {[round(p / 2**30, 2) for p in v]}" for k, v in peaks.items()))
    assert max(peaks["sharded"]) < 0.8 * model_bytes
    assert min(peaks["replicate"]) > model_bytes
