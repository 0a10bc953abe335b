"""Several processes on CPU (gloo, 2 processes, tiny model) against one process over the same global batch.

Both placements (``replicate``: every rank holds the whole model, what ``auto`` picks for this small one;
``sharded``: no rank does):
- stage 1 block-wise (one block of layers per rank; sharded: a pipeline, each rank holding only its
  span of layers, fed the teacher's boundary states by the rank before) equals single-process training;
- stage 2 data-parallel (sharded: FSDP2; replicate: DDP) equals single-process training (gradient accumulation
  included; replicate also with the KL + CE objective);
- sharded: each rank held only its layers in stage 1 and a shard in stage 2; the export, merged on
  rank 0's CPU, loads with from_pretrained and gives the replicate export's outputs;
- a killed 2-process (sharded) run resumes with 2 processes, is killed again and finished by 1 (DCP reshards);
- bad set-ups are one-line errors.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from linearize.pipelines.distributed import (
    DistributedError,
    check_same_device_type,
    local_device,
    split_blocks,
    world_from_env,
)
from linearize.pipelines.launch import LaunchError, torchrun_args

from .test_resume import env, metric_lines
from .tiny_run import make_model_dir, make_text, tiny_overrides

pytestmark = [
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"),
    # one xdist worker runs the whole file (tests/conftest.py schedules as --dist loadgroup), so the module's
    # `runs` (three training runs, ~40 s) is made once instead of once per worker
    pytest.mark.xdist_group("distributed"),
]

# stage 1: 2 layers -> one per rank; stage 2: global batch 4 = 2 rows per rank, 2 micro-batches per step
SETTINGS = ["stage1.lr=3e-2", "stage1.grad_accum=2", "stage2.batch_size=4", "stage2.grad_accum=2"]


def overrides(text):
    return tiny_overrides(text, steps1=6, steps2=6, every=2) + SETTINGS


def torchrun(model_dir, out, text, nproc, *extra):
    """torchrun itself (what `linearize convert --nproc N` calls), skipping the CLI's imports in the launcher."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    cmd += ["-m", "linearize", "convert", str(model_dir), "--out", str(out)]
    for item in overrides(text):
        cmd += ["--set", item]
    return cmd + list(extra)


def single(model_dir, out, text, *extra):
    """`linearize convert` (with "--nproc", "N" in ``extra``: the CLI launches torchrun itself)."""
    cmd = [sys.executable, "-m", "linearize", "convert", str(model_dir), "--out", str(out)]
    for item in overrides(text):
        cmd += ["--set", item]
    return cmd + list(extra)


def run_ok(cmd, environ, timeout=240):
    done = subprocess.run(cmd, env=environ, capture_output=True, timeout=timeout)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    return done


def one_and_two_processes(model_dir, one, two, settings, environ) -> None:
    """`linearize convert` into ``one`` with one process and into ``two`` with two (torchrun), same ``--set`` items."""
    sets = [a for s in settings for a in ("--set", s)]
    run_ok([sys.executable, "-m", "linearize", "convert", str(model_dir), "--out", str(one), *sets], environ)
    run_ok([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "linearize", "convert", str(model_dir), "--out", str(two), *sets], environ)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in their own sessions, so a process group kill misses them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def run_and_kill(cmd, environ, out, stage, after_lines, timeout=240):
    """Start ``cmd``; once ``after_lines`` metric lines of ``stage`` exist, SIGKILL it and all its workers at once."""
    proc = subprocess.Popen(cmd, env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if sum(1 for l in metric_lines(out) if l["stage"] == stage) >= after_lines:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"run ended before the kill point: {proc.stderr.read().decode()[-2000:]}"
    for pid in [*descendants(proc.pid), proc.pid]:  # a crash of the whole job: workers and launcher
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    time.sleep(0.2)


def losses(out, stage):
    return [l["loss"] for l in metric_lines(out) if l["stage"] == stage]


def assert_close_weights(a, b, rtol, atol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One single-process run and two uninterrupted 2-process runs (sharded; replicate, which the default ``auto``
    picks for a model this small) of the same settings."""
    base = tmp_path_factory.mktemp("dist")
    model_dir, text = make_model_dir(base / "tiny"), make_text(base / "text.txt")
    environ = env(base / "cache")
    one, two, two_rep = base / "one", base / "two", base / "two-replicate"
    run_ok(single(model_dir, one, text), environ)
    run_ok(torchrun(model_dir, two, text, 2, "--set", "placement=sharded"), environ)
    auto = run_ok(torchrun(model_dir, two_rep, text, 2), environ)  # placement=auto
    return {"model_dir": model_dir, "text": text, "env": environ, "one": one, "two": two, "replicate": two_rep, "base": base,
            "auto_log": auto.stdout.decode() + auto.stderr.decode()}


PLACEMENTS = {"sharded": "two", "replicate": "replicate"}


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_block_wise_stage1_equals_single_process(runs, placement):
    one, two = runs["one"], runs[PLACEMENTS[placement]]
    l1, l2 = losses(one, "stage1"), losses(two, "stage1")
    assert len(l1) == len(l2) == 6 and l1[-1] < l1[0]  # it trains
    torch.testing.assert_close(torch.tensor(l2), torch.tensor(l1), rtol=1e-5, atol=0)
    w1, w2 = load_file(one / "stage1_final.safetensors"), load_file(two / "stage1_final.safetensors")
    assert_close_weights(w2, w1, rtol=1e-5, atol=1e-7)  # the blocks, stitched, are the one-process weights
    r1, r2 = (json.loads((p / "report.json").read_text()) for p in (one, two))
    assert r2["environment"]["processes"] == 2 and r1["environment"]["processes"] == 1
    assert r2["environment"]["placement"] == placement and r1["environment"]["placement"] == "replicate"
    assert r2["stages"]["stage1"]["trainable_params"] == r1["stages"]["stage1"]["trainable_params"]


def test_auto_placement_says_what_it_chose_and_why(runs):
    log = " ".join(runs["auto_log"].replace(">", " ").split())  # (the console wraps long lines)
    assert "2 processes on cpu, placement replicate (placement=auto: the weights (" in log
    assert "so every device holds them all (placement=sharded shards them)" in log
    report = json.loads((runs["replicate"] / "report.json").read_text())
    assert report["environment"]["placement_reason"].startswith("placement=auto: the weights (")
    assert "- placement chosen by placement=auto: the weights (" in (runs["replicate"] / "report.md").read_text()


def test_pipelined_stage1_equals_block_wise(runs):
    """The pipeline (boundary states sent rank to rank) and the frozen forward on every rank train the same weights."""
    assert losses(runs["two"], "stage1") == losses(runs["replicate"], "stage1")  # (bitwise on CPU)
    w1, w2 = (load_file(runs[k] / "stage1_final.safetensors") for k in ("replicate", "two"))
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_data_parallel_stage2_equals_single_process(runs, placement):
    one, two = runs["one"], runs[PLACEMENTS[placement]]
    l1, l2 = losses(one, "stage2"), losses(two, "stage2")
    assert len(l1) == len(l2) == 6
    torch.testing.assert_close(torch.tensor(l2), torch.tensor(l1), rtol=1e-5, atol=0)
    m1, m2 = load_file(one / "model" / "model.safetensors"), load_file(two / "model" / "model.safetensors")
    assert_close_weights(m2, m1, rtol=1e-4, atol=1e-6)
    base = load_file(runs["model_dir"] / "model.safetensors")
    moved = [k for k in base if k in m1 and "q_proj" in k and not torch.equal(base[k], m1[k])]
    assert moved  # LoRA was merged into the exported weights, so the comparison above compares trained weights
    r1, r2 = (json.loads((p / "report.json").read_text()) for p in (one, two))
    assert r2["stages"]["stage2"]["trainable_params"] == r1["stages"]["stage2"]["trainable_params"]
    for key in ("base", "swapped", "stage1", "stage2"):  # (sharded: evaluated on the FSDP shards by both ranks)
        assert r2["evals"][key]["ppl"] == pytest.approx(r1["evals"][key]["ppl"], rel=1e-5)
        assert r2["evals"][key]["tokens"] == r1["evals"][key]["tokens"]
    assert r2["samples"].keys() == r1["samples"].keys() == {"base", "linearized"}


def test_replicate_stage2_with_kl_equals_single_process(runs):
    """KL to the teacher plus CE (the recipe of the converted models that meet the quality goals): the teacher's
    no-grad forward passes through DDP's hooks too, and the 2-process replicate run still equals one process."""
    model_dir, text, environ, base = runs["model_dir"], runs["text"], runs["env"], runs["base"]
    loss = ["--set", "stage2_loss.kl_weight=1", "--set", "stage2_loss.ce_weight=0.3", "--set", "stage1.steps=2"]
    one, two = base / "kl-one", base / "kl-two"
    run_ok(single(model_dir, one, text, *loss), environ)
    run_ok(torchrun(model_dir, two, text, 2, "--set", "placement=replicate", *loss), environ)
    l1, l2 = losses(one, "stage2"), losses(two, "stage2")
    assert len(l1) == len(l2) == 6 and l1 != losses(runs["one"], "stage2")  # (another objective than CE alone)
    torch.testing.assert_close(torch.tensor(l2), torch.tensor(l1), rtol=1e-5, atol=0)
    assert_close_weights(load_file(two / "model" / "model.safetensors"), load_file(one / "model" / "model.safetensors"), rtol=1e-4, atol=1e-6)


def test_sharded_ranks_hold_only_their_share(runs):
    """Stage 1: each rank had on its device only the layers of its span (others on meta), the embeddings on rank 0
    only; stage 2: a shard of the model. What each rank reports is in report.json."""
    report = json.loads((runs["two"] / "report.json").read_text())
    held = report["placement"]["stage1"]
    assert [h["rank"] for h in held] == [0, 1] and [h["span"] for h in held] == [[0, 1], [1, 2]]
    for h in held:
        assert h["layers_here"] == list(range(*h["span"]))  # the 2 layers: one per rank
        assert h["embeddings_here"] == (h["rank"] == 0)
        assert h["off_meta_devices"] == ["cpu"]  # (the training device here)
        assert 0 < h["bytes_here"] < 0.6 * h["model_bytes"]
    model_bytes = held[0]["model_bytes"]
    for h in report["placement"]["stage2"]:  # the LoRA model, halved (the adapters add a few percent)
        assert 0.4 * model_bytes < h["bytes_here"] < 0.7 * model_bytes
    assert json.loads((runs["replicate"] / "report.json").read_text())["placement"] == {"mode": "replicate"}


def test_sharded_export_loads_and_matches_replicate(runs):
    """Rank 0 merged the gathered adapters on its CPU: the export loads with from_pretrained and equals the replicate one."""
    import linearize  # noqa: F401  (registers the linearized classes)
    from transformers import AutoModelForCausalLM

    a, b = (AutoModelForCausalLM.from_pretrained(runs[k] / "model").eval() for k in ("replicate", "two"))
    assert linearize.is_linearized(a) and linearize.is_linearized(b)
    ids = torch.randint(3, 32, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(b(input_ids=ids).logits, a(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
        assert torch.equal(b.generate(ids[:1, :4], max_new_tokens=6, do_sample=False), a.generate(ids[:1, :4], max_new_tokens=6, do_sample=False))


def test_killed_two_process_run_resumes(runs):
    """Killed mid stage 1 (2 processes, sharded: a pipeline); resumed by 2 processes (the CLI's own torchrun launcher;
    the stage-1 checkpoint goes back into the pipeline) and killed mid stage 2 (FSDP shards); finished by 1 process
    (DCP reshards the 2 processes' checkpoint). tests/gpu/test_distributed_cuda.py resumes stage 2 on 2 processes."""
    model_dir, text, environ = runs["model_dir"], runs["text"], runs["env"]
    out = runs["base"] / "killed"
    latest = lambda: json.loads((out / "checkpoints" / "LATEST").read_text())  # noqa: E731
    run_and_kill(torchrun(model_dir, out, text, 2, "--set", "placement=sharded"), environ, out, "stage1", 3)
    assert latest()["stage"] == "stage1"
    run_and_kill(single(model_dir, out, text, "--resume", "--nproc", "2", "--set", "placement=sharded"), environ, out, "stage2", 3)
    assert latest()["stage"] == "stage2"  # written by the 2 shards
    run_ok(single(model_dir, out, text, "--resume"), environ)

    ref = runs["two"]
    assert [(l["stage"], l["step"]) for l in metric_lines(out)] == [(l["stage"], l["step"]) for l in metric_lines(ref)]
    for stage in ("stage1", "stage2"):
        torch.testing.assert_close(torch.tensor(losses(out, stage)), torch.tensor(losses(ref, stage)), rtol=1e-5, atol=0)
    assert_close_weights(load_file(out / "model" / "model.safetensors"), load_file(ref / "model" / "model.safetensors"), rtol=1e-4, atol=1e-6)
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert json.loads((out / "checkpoints" / "LATEST").read_text())["stage"] == "stage2"


def test_killed_replicate_run_resumes(runs):
    """The replicate placement's stage 2 is DDP (the adapters plain tensors, the same on every rank, which DCP
    writes once): killed mid stage 2, resumed by 2 processes from that checkpoint and killed again, then finished
    by 1 process from the resumed run's checkpoint, it ends where the uninterrupted run does."""
    model_dir, text, environ = runs["model_dir"], runs["text"], runs["env"]
    out = runs["base"] / "killed-replicate"
    latest = lambda: json.loads((out / "checkpoints" / "LATEST").read_text())  # noqa: E731
    run_and_kill(torchrun(model_dir, out, text, 2, "--set", "placement=replicate"), environ, out, "stage2", 3)
    assert latest()["stage"] == "stage2" and latest()["step"] >= 2
    run_and_kill(torchrun(model_dir, out, text, 2, "--set", "placement=replicate", "--resume"), environ, out, "stage2", 5)
    assert latest()["stage"] == "stage2" and latest()["step"] >= 4  # written by the resumed DDP ranks
    run_ok(single(model_dir, out, text, "--resume"), environ)
    ref = runs["replicate"]
    torch.testing.assert_close(torch.tensor(losses(out, "stage2")), torch.tensor(losses(ref, "stage2")), rtol=1e-5, atol=0)
    assert_close_weights(load_file(out / "model" / "model.safetensors"), load_file(ref / "model" / "model.safetensors"), rtol=1e-4, atol=1e-6)


# ---- bad set-ups: one-line errors ---------------------------------------------------------------------


def test_missing_rendezvous():
    with pytest.raises(DistributedError, match="MASTER_ADDR, MASTER_PORT are not set") as e:
        world_from_env({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"})
    assert "\n" not in str(e.value) and "--nproc 2" in str(e.value)
    assert world_from_env({}) == (0, 1, 0)
    assert world_from_env({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}) == (1, 2, 1)


def test_missing_rendezvous_from_the_cli(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from linearize.cli import app

    for var in ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    result = CliRunner().invoke(app, ["convert", "smollm2-135m", "--out", str(tmp_path / "run"), "--set", "device=cpu"])
    assert result.exit_code == 2
    text = " ".join(result.output.split())  # (rich wraps long lines at the terminal width)
    assert text.startswith("error: rank 0/2: WORLD_SIZE=2 but MASTER_ADDR, MASTER_PORT are not set (no rendezvous)")
    assert not (tmp_path / "run").exists()  # nothing was started


def test_layers_split_into_contiguous_blocks():
    assert split_blocks([0, 1, 2, 3], 2) == [(0, 2), (2, 4)]
    assert split_blocks(list(range(32)), 3) == [(0, 11), (11, 22), (22, 32)]
    assert split_blocks([3, 9, 15], 3) == [(3, 4), (9, 10), (15, 16)]  # e.g. Gemma 3's global layers only
    assert split_blocks([0, 1], 1) == [(0, 2)]
    with pytest.raises(DistributedError, match="at least one trained layer per process") as e:
        split_blocks([0, 1], 3)
    assert "\n" not in str(e.value) and "--nproc 2" in str(e.value)


def test_mixed_devices_and_too_many_gpu_ranks():
    check_same_device_type(["cuda", "cuda"])
    with pytest.raises(DistributedError, match="mixed devices across ranks \\(rank 0: cuda, rank 1: cpu\\)"):
        check_same_device_type(["cuda", "cpu"])
    with pytest.raises(DistributedError, match="LOCAL_RANK=2 needs GPU 2 but this host sees 2 GPU") as e:
        local_device("cuda", local_rank=2, world=4, cuda_count=2)
    assert "\n" not in str(e.value)
    assert local_device("auto", 1, 2, cuda_count=2) == torch.device("cuda", 1)
    assert local_device("auto", 5, 8, cuda_count=0) == torch.device("cpu")
    with pytest.raises(DistributedError, match="CUDA is not available"):
        local_device("cuda", 0, 2, cuda_count=0)


def test_torchrun_arguments():
    cmd = ["convert", "m", "--out", "o"]
    assert torchrun_args(cmd, 2) == ["--nproc-per-node", "2", "--nnodes", "1", "--standalone", "-m", "linearize", *cmd]
    multi = torchrun_args(cmd, 8, "2", "host1:29400")
    assert multi[:4] == ["--nproc-per-node", "8", "--nnodes", "2"] and "host1:29400" in multi and "--standalone" not in multi
    with pytest.raises(LaunchError, match="needs --rdzv-endpoint"):
        torchrun_args(cmd, 8, "2")


def test_launch_failure_is_one_line(monkeypatch):
    """A worker's failure reaches the `--nproc` launcher as one line naming the rank (torchrun's run is stubbed
    here; the real launcher runs in test_killed_two_process_run_resumes_with_one_then_two)."""
    import torch.distributed.run as torchrun_module
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from linearize.pipelines.launch import launch

    seen = {}

    def failing_run(args):
        seen["args"] = args
        failure = ProcessFailure(local_rank=1, pid=1234, exitcode=2, error_file="/nonexistent")
        raise ChildFailedError("linearize", {1: failure})

    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setattr(torchrun_module, "run", failing_run)
    with pytest.raises(LaunchError, match="^the distributed run failed: rank 1 exited with code 2") as e:
        launch(["convert", "m", "--out", "o"], 2)
    assert "\n" not in str(e.value)
    assert seen["args"].nproc_per_node == "2" and seen["args"].standalone and seen["args"].module
    assert seen["args"].training_script == "linearize" and seen["args"].training_script_args == ["convert", "m", "--out", "o"]
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    with pytest.raises(LaunchError, match="already running under torchrun"):
        launch(["convert"], 2)


def test_block_gradients_equal_full_model_gradients():
    """The stage-1 loss is a sum of per-layer terms on teacher inputs: a layer's gradient from its block's loss
    equals its gradient from the whole model's loss, so training blocks apart is training the model."""
    import linearize
    from linearize.pipelines.transfer import freeze_for_transfer, transfer_loss

    from ..tiny_models import perturb_added_weights, tiny_model

    model = linearize.convert(tiny_model("llama"), linearize.LinearizeConfig(window=3, feature_dim=4))
    perturb_added_weights(model)
    params = freeze_for_transfer(model)
    ids = torch.randint(3, 96, (2, 24), generator=torch.Generator().manual_seed(0))
    transfer_loss(model, ids).backward()
    full = {k: p.grad.clone() for k, p in params.items()}
    for blocks in ([(0, 1), (1, 3)], [(0, 1), (1, 2), (2, 3)]):
        for a, b in blocks:
            model.zero_grad(set_to_none=True)
            transfer_loss(model, ids, block=(a, b)).backward()
            for k, p in params.items():
                layer = int(k.split("layers.")[1].split(".")[0])
                if a <= layer < b:
                    assert p.grad is not None and bool(p.grad.abs().sum() > 0), k
                    torch.testing.assert_close(p.grad, full[k], rtol=1e-6, atol=1e-9)
                else:
                    assert p.grad is None or not bool(p.grad.any()), k  # no gradient leaks across blocks


def test_replicate_with_compiled_layers_equals_single_process(runs):
    """compile=true under DDP (the replicate placement): each rank runs its decoder layers compiled, in stage 1
    (block-wise) and stage 2 (DDP's hooks around the compiled layers); the run equals the eager single process."""
    model_dir, text, environ, base = runs["model_dir"], runs["text"], runs["env"], runs["base"]
    out = base / "two-compiled"
    done = run_ok(torchrun(model_dir, out, text, 2, "--set", "placement=replicate", "--set", "compile=true"), environ)
    assert "compile=true" in done.stdout.decode() + done.stderr.decode()
    for stage in ("stage1", "stage2"):
        torch.testing.assert_close(torch.tensor(losses(out, stage)), torch.tensor(losses(runs["one"], stage)), rtol=1e-4, atol=0)
    assert_close_weights(load_file(out / "model" / "model.safetensors"), load_file(runs["one"] / "model" / "model.safetensors"),
                         rtol=1e-4, atol=1e-6)


def test_sharded_with_compiled_layers_equals_single_process(runs):
    """compile=true under the sharded placement: the stage-1 pipeline's spans and the FSDP2 stage 2 (its per-layer
    hooks around the compiled layers) train what the eager single process trains."""
    model_dir, text, environ, base = runs["model_dir"], runs["text"], runs["env"], runs["base"]
    out = base / "two-sharded-compiled"
    run_ok(torchrun(model_dir, out, text, 2, "--set", "placement=sharded", "--set", "compile=true"), environ)
    for stage in ("stage1", "stage2"):
        torch.testing.assert_close(torch.tensor(losses(out, stage)), torch.tensor(losses(runs["one"], stage)), rtol=1e-4, atol=0)
    assert_close_weights(load_file(out / "model" / "model.safetensors"), load_file(runs["one"] / "model" / "model.safetensors"),
                         rtol=1e-4, atol=1e-6)
