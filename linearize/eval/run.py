"""``evaluate(models, tasks, ...)``: every task on every model, side by side."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .meter import Meter
from .perplexity import parse_ppl
from .recall import MQAR_PAIRS, PASSKEY_LENGTHS, check_length, parse_counts
from .scoring import max_length
from .tasks import TASKS, check_task

DEFAULT_TASKS = ("arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "lambada", "mmlu", "ppl:austen", "passkey", "mqar")


def check_tasks(tasks: list[str]) -> None:
    """Validate task names before any model is loaded (one-line ``ValueError``)."""
    if not tasks:
        raise ValueError("no tasks given")
    for t in tasks:
        if t.startswith("ppl:"):
            parse_ppl(t)
        elif t.split("@")[0] == "passkey":
            parse_counts(t, PASSKEY_LENGTHS)
        elif t.split("@")[0] == "mqar":
            parse_counts(t, MQAR_PAIRS)
        else:
            check_task(t)


def resolve_device(device: str | None) -> str:
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype, device: str):
    """``auto``: bf16 on CUDA, fp32 on CPU (bf16 matmuls are slow on most CPUs); else a torch dtype name."""
    import torch

    if dtype in (None, "", "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, {', '.join(names)}")
    return names[dtype]


def load_model(name: str, device: str, dtype=None):
    """``(model, tokenizer)`` from an alias, ``.gguf``, HF dir (linearized or not) or hub id."""
    import linearize  # noqa: F401  (registers the linearized model types)
    from linearize.models import load

    if not Path(name).exists() and (name.startswith((".", "/", "~")) or name.endswith(".gguf")):
        raise FileNotFoundError(f"no such model: {name}")
    model, tok = load(name, dtype=resolve_dtype(dtype, device), device=device)
    return model, tok


def _free(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def run_task(model, tok, task: str, *, limit: int | None, batch_size: int, seed: int, progress: bool = True) -> dict:
    from .perplexity import load_tokens, sliding_perplexity
    from .recall import score_mqar, score_passkey
    from .scoring import score_task
    from .tasks import load_task

    if task.startswith("ppl:"):
        source, lengths = parse_ppl(task)
        for n in lengths:
            check_length(model, n, task)
        ids = load_tokens(source, tok)
        out: dict = {"source_tokens": int(ids.numel())}
        for n in lengths:
            r = sliding_perplexity(model, ids, n, batch_size=max(1, batch_size // 4), limit=limit, progress=progress)
            out |= {f"ppl@{n}": r["ppl"], f"loss@{n}": r["loss"], f"tokens@{n}": r["tokens"], f"windows@{n}": r["windows"], f"stride@{n}": r["stride"]}
        return out
    base = task.split("@")[0]
    if base == "passkey":
        lengths = parse_counts(task, PASSKEY_LENGTHS)
        if "@" not in task:  # default lengths: only those the model can take (an explicit list is checked)
            lengths = tuple(n for n in lengths if n < max_length(model)) or lengths
        return score_passkey(model, tok, lengths, limit=limit, seed=seed, batch_size=1, progress=progress)
    if base == "mqar":
        return score_mqar(model, tok, parse_counts(task, MQAR_PAIRS), limit=limit, seed=seed, batch_size=max(1, batch_size // 4), progress=progress)
    return score_task(model, tok, load_task(task, limit), batch_size=batch_size, progress=progress)


def evaluate(
    models: list[str], tasks: list[str], limit: int | None = None, out: Path | str | None = None, device: str | None = None,
    *, batch_size: int = 16, seed: int = 0, echo: Callable[[str], None] | None = None, progress: bool = True,
    dtype=None,
) -> dict:
    """Run ``tasks`` on each of ``models``; returns the report (written to ``out`` when given).

    Task names: ``arc_easy arc_challenge piqa hellaswag winogrande lambada mmlu``,
    ``ppl:<corpus or file>[@len,...]``, ``passkey[@len,...]``, ``mqar[@pairs,...]``.
    """
    echo = echo or (lambda _m: None)
    if not models:
        raise ValueError("no models given")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be positive, got {limit}")
    check_tasks(tasks)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    results: dict[str, dict] = {}
    timing: dict[str, dict] = {}
    resources: dict[str, dict] = {}
    labels = []
    for name in models:
        label = name if name not in labels else f"{name} ({len(labels)})"
        labels.append(label)
        echo(f"loading {name}")
        with Meter(device=device) as load_meter:
            model, tok = load_model(name, device, torch_dtype)
        results[label], timing[label] = {}, {}
        per_task: dict[str, dict] = {}
        for task in tasks:
            echo(f"{label}: {task}")
            with Meter(model) as meter:
                results[label][task] = run_task(model, tok, task, limit=limit, batch_size=batch_size, seed=seed, progress=progress)
            per_task[task] = meter.result()
            timing[label][task] = per_task[task]["seconds"]
        load = load_meter.result()
        resources[label] = {
            "params": sum(p.numel() for p in model.parameters()),
            "load_seconds": load["seconds"],
            "peak_mem_mb": max([load["peak_mem_mb"]] + [r["peak_mem_mb"] for r in per_task.values()]),
            "memory": load["memory"],
            "tasks": per_task,
        }
        del model
        _free(device)
    report = {
        "models": labels,
        "tasks": list(tasks),
        "results": results,
        "seconds": timing,
        "resources": resources,
        "settings": {"limit": limit, "device": device, "dtype": str(torch_dtype).removeprefix("torch."), "batch_size": batch_size, "seed": seed},
        "notes": [
            "zero-shot tasks and MMLU (5-shot): lm-evaluation-harness 0.4.13 prompts and metrics (linearize.eval.scoring; checked per doc against lm-eval itself in tests/eval/test_lm_eval_equivalence.py)",
            "ppl: sliding window, stride = context/2; passkey/mqar: greedy exact match (linearize.eval.recall)",
            "resources: tokens = non-padding tokens through the model's forward; peak memory = CUDA max_memory_allocated or CPU peak RSS of the process (linearize.eval.meter)",
        ],
    }
    if out is not None:
        from .report import write_report

        write_report(report, Path(out))
    return report


__all__ = ["DEFAULT_TASKS", "TASKS", "evaluate"]
