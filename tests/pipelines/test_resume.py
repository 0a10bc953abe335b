"""SIGKILL at any point, then --resume: the run ends exactly where an uninterrupted run ends."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from .tiny_run import make_model_dir, make_text, tiny_overrides


def cli(model_dir, out, text, *extra):
    cmd = [sys.executable, "-m", "linearize", "convert", str(model_dir), "--out", str(out)]
    for item in tiny_overrides(text, steps1=8, steps2=6, every=2):
        cmd += ["--set", item]
    return cmd + list(extra)


def env(cache):
    # one thread: bitwise-reproducible CPU math between processes
    return os.environ | {"LINEARIZE_CACHE": str(cache), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def metric_lines(out):
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    lines = []
    for raw in path.read_text().splitlines():
        try:
            lines.append(json.loads(raw))
        except ValueError:
            pass
    return lines


def run_and_kill(cmd, environ, out, stage, after_lines, timeout=120):
    """Start the CLI, SIGKILL it once ``after_lines`` metric lines of ``stage`` exist (or it is loading when 0)."""
    proc = subprocess.Popen(cmd, env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if sum(1 for l in metric_lines(out) if l["stage"] == stage) >= after_lines:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"run ended before the kill point: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_sigkill_and_resume_equals_uninterrupted(tmp_path):
    model_dir, text = make_model_dir(tmp_path / "tiny"), make_text(tmp_path / "text.txt")
    environ = env(tmp_path / "cache")

    ref = tmp_path / "ref"
    done = subprocess.run(cli(model_dir, ref, text), env=environ, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-3000:]

    out = tmp_path / "killed"
    run_and_kill(cli(model_dir, out, text), environ, out, "stage1", 3)  # mid stage 1, between checkpoints
    run_and_kill(cli(model_dir, out, text, "--resume"), environ, out, "stage2", 1)  # early stage 2
    run_and_kill(cli(model_dir, out, text, "--resume"), environ, out, "stage2", 5)  # late stage 2
    done = subprocess.run(cli(model_dir, out, text, "--resume"), env=environ, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-3000:]

    assert metric_lines(out) == [{**l, "tokens_per_s": m["tokens_per_s"]} for l, m in zip(metric_lines(ref), metric_lines(out))]
    assert len(metric_lines(out)) == 14
    a, b = load_file(ref / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    ra, rb = json.loads((ref / "report.json").read_text()), json.loads((out / "report.json").read_text())
    assert ra["evals"] == rb["evals"]
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_partial_checkpoint_is_never_taken_for_a_good_one(tmp_path):
    """A checkpoint directory without its LATEST pointer (a save killed before publishing) is ignored."""
    import torch

    from linearize.pipelines.checkpoint import CheckpointManager

    mgr = CheckpointManager(tmp_path)
    mgr.save("stage1", 2, {"w": torch.ones(3)}, {"x": 1})
    (tmp_path / ".tmp-stage1-step0000004-abc").mkdir()  # a save killed midway
    (tmp_path / "stage1-step0000004").mkdir()  # renamed but LATEST not yet written
    latest = mgr.latest()
    assert latest.step == 2 and torch.equal(latest.load_weights()["w"], torch.ones(3))
    (tmp_path / "LATEST").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt checkpoint pointer"):
        mgr.latest()
