"""lm-evaluation-harness itself, offline, on a tiny random linearized model: our scorer must give the
same prompts, loglikelihoods, acc and acc_norm per doc (so it follows lm-eval's definitions), and
``--model linearize`` must work from lm-eval's own command line."""

import json
import os
import subprocess
import sys

import pytest

from linearize.eval.lm_eval_tasks import OFFLINE_TASKS, write_task_configs
from linearize.eval.scoring import doc_metrics, loglikelihood
from linearize.eval.tasks import load_task
from tests.eval.helpers import tiny_byte_model_dir

LIMIT = 4
# (our task, lm-eval task): every zero-shot task and one MMLU subject (5-shot; the prompts exceed the
# tiny model's 2048 positions sometimes, so left truncation is compared too)
PAIRS = [(t, OFFLINE_TASKS[t]) for t in ("arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "lambada")]
MMLU_SUBJECT = "high_school_european_history"  # the longest MMLU prompts


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = tmp_path_factory.mktemp("lmeval")
    model_dir = tiny_byte_model_dir(root / "model", linearized=True, max_positions=2048)
    return model_dir, write_task_configs(root / "tasks")


@pytest.fixture(scope="module")
def lm_eval_run(env):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from linearize.eval import lm_eval_model

    model_dir, cfg_dir = env
    lm = lm_eval_model(str(model_dir), batch_size=3, dtype="float32", device="cpu")
    tasks = [t for _, t in PAIRS] + [f"offline_mmlu_{MMLU_SUBJECT}"]
    # our configs include the stock YAMLs by path: no need to index lm-eval's ~10k stock configs
    manager = TaskManager(include_path=str(cfg_dir), include_defaults=False)
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=LIMIT, task_manager=manager, log_samples=True, bootstrap_iters=0)
    return lm, out


def _ours(lm, name):
    task = load_task(name, limit=LIMIT)
    if name == "mmlu":
        task.docs = [d for d in task.docs if d.group == MMLU_SUBJECT]
    flat = [r for d in task.docs for r in d.requests]
    res = loglikelihood(lm.model, lm.tokenizer, flat, batch_size=5, progress=False)
    return task, res, doc_metrics(task, res)


@pytest.mark.parametrize("ours,theirs", PAIRS + [("mmlu", f"offline_mmlu_{MMLU_SUBJECT}")])
def test_same_prompts_loglikelihoods_and_metrics_per_doc(lm_eval_run, ours, theirs):
    lm, out = lm_eval_run
    samples = sorted(out["samples"][theirs], key=lambda s: s["doc_id"])
    task, res, per_doc = _ours(lm, ours)
    assert len(samples) == len(task.docs) == LIMIT
    pos = 0
    for s, d, m in zip(samples, task.docs, per_doc):
        # the requests lm-eval built from its (stock) config are ours, in order
        assert [tuple(a) for a in s["arguments"]] == [(r.context, r.continuation) for r in d.requests]
        theirs_ll = [r[0] for r in s["filtered_resps"]]
        ours_ll = [ll for ll, _ in res[pos : pos + len(d.requests)]]
        pos += len(d.requests)
        assert ours_ll == pytest.approx(theirs_ll, rel=1e-4, abs=1e-3)
        for key in ("acc", "acc_norm"):
            if key in s:
                assert m[key] == s[key], (theirs, s["doc_id"], key)
        if ours == "lambada":
            assert s["perplexity"] == pytest.approx(m["ll"], rel=1e-4)
    # the aggregate lm-eval reports is the mean of the same per-doc values
    agg = out["results"][theirs]
    assert agg["acc,none"] == pytest.approx(sum(m["acc"] for m in per_doc) / LIMIT)


def test_offline_configs_change_only_the_data(env):
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    _, cfg_dir = env
    index = TaskManager(include_path=str(cfg_dir), include_defaults=False).task_index
    data_keys = {"task", "tag", "dataset_path", "dataset_name", "dataset_kwargs", "training_split", "validation_split", "test_split"}
    for ours, theirs in PAIRS + [("mmlu", f"offline_mmlu_{MMLU_SUBJECT}")]:
        path = index[theirs].yaml_path
        offline = load_yaml(path, resolve_func=False)
        stock = load_yaml(load_yaml(path, recursive=False)["include"], resolve_func=False)
        changed = {k for k in stock.keys() | offline.keys() if stock.get(k) != offline.get(k)}
        allowed = data_keys | ({"process_docs"} if ours == "hellaswag" else set())
        allowed |= {"fewshot_split", "num_fewshot"} if ours == "mmlu" else set()  # stock: --num_fewshot 5, fewshot_split dev
        assert changed <= allowed, (theirs, changed - allowed)
        assert offline["dataset_path"] == "json"
    assert index["offline_mmlu"].kind.name == "GROUP"


def test_lm_eval_command_line_runs_linearize_model(env, tmp_path):
    model_dir, cfg_dir = env
    cmd = [sys.executable, "-m", "linearize.eval.lm_eval_adapter", "--model_args", f"pretrained={model_dir},dtype=float32",
           "--tasks", "offline_piqa", "--limit", "2", "--device", "cpu", "--batch_size", "2",
           "--include_path", str(cfg_dir), "--output_path", str(tmp_path / "out")]
    env_vars = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env_vars, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = list((tmp_path / "out").rglob("results*.json"))
    assert results, proc.stdout[-2000:]
    data = json.loads(results[0].read_text())
    assert data["config"]["model"] == "linearize" and 0.0 <= data["results"]["offline_piqa"]["acc,none"] <= 1.0


def test_cli_args_defaults():
    from linearize.eval.lm_eval_adapter import cli_args

    assert cli_args(["--tasks", "hellaswag"]) == ["--tasks", "hellaswag", "--model", "linearize"]
    assert cli_args(["--model", "hf", "--tasks", "x"]) == ["--model", "hf", "--tasks", "x"]
    assert cli_args(["ls", "tasks"]) == ["ls", "tasks"]
    got = cli_args(["--tasks", "offline_piqa", "--include_path", "/x"])
    assert got.count("--include_path") == 1


def test_lm_eval_model_wraps_a_loaded_model(env):
    import torch

    from linearize.eval import lm_eval_model
    from linearize.models import load

    model_dir, _ = env
    model, tok = load(str(model_dir), dtype=torch.float32)
    lm = lm_eval_model(model, tok, batch_size=2)
    assert lm.model is model and lm.device.type == "cpu" and lm.batch_size == 2
    ((ll, greedy),) = lm._loglikelihood_tokens([(("a", " b"), [5, 6], [7])])
    assert ll < 0 and isinstance(greedy, bool)
