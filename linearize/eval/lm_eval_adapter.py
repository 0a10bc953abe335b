"""lm-evaluation-harness on our models: a registered ``linearize`` model type and an lm-eval CLI.

``LinearizeLM`` is lm-eval's ``HFLM`` with two differences: ``pretrained`` also takes our aliases
(``smollm2-135m``) and ``.gguf`` files (resolved with :func:`linearize.models.hub.resolve`, so fetched
and converted once), and importing :mod:`linearize` first registers the ``Linearized<Arch>`` classes,
so linearized checkpoints load with ``AutoModelForCausalLM``. Everything else (batching, truncation,
dtype, generation) is HFLM's. ``device`` defaults to CUDA when present, else CPU.

Python (any stock task with a hub; ``offline_*`` tasks without one, see :mod:`.lm_eval_tasks`)::

    import lm_eval
    from linearize.eval import lm_eval_model
    lm = lm_eval_model("runs/smol/model", batch_size=16)
    lm_eval.simple_evaluate(model=lm, tasks=["hellaswag", "arc_easy"])

Shell (``lm_eval``'s own CLI, with ``--model linearize`` registered, the default here)::

    python -m linearize.eval.lm_eval_adapter --model_args pretrained=runs/smol/model --tasks hellaswag
    linearize lm-eval --model_args pretrained=runs/smol/model --tasks offline_zeroshot,offline_mmlu

Tasks named ``offline_*`` make the CLI write the offline configs and pass ``--include_path`` itself.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

MODEL_NAME = "linearize"


def _lm_eval():
    try:
        import lm_eval  # noqa: F401
        import lm_eval.models  # noqa: F401  (lazy placeholders of the stock models: keep "hf" etc. registered)
        from lm_eval.api.registry import model_registry, register_model
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise ImportError("lm-eval is not installed: pip install 'lm-eval>=0.4.13,<0.5' (or the eval extra)") from None
    return HFLM, register_model, model_registry


def _make_class():
    HFLM, _, _ = _lm_eval()
    import linearize  # noqa: F401  (registers the Linearized<Arch> config/model classes with the Auto classes)

    class LinearizeLM(HFLM):
        """lm-eval's HFLM that also loads our aliases, ``.gguf`` files and linearized checkpoints."""

        def __init__(self, pretrained="smollm2-135m", device: str | None = None, **kwargs):
            import torch

            if isinstance(pretrained, str):
                from linearize.models.hub import resolve

                pretrained = resolve(pretrained)  # alias / .gguf -> cached HF dir; dirs and hub ids as is
            if device is None:
                device = "cuda" if torch.cuda.is_available() else "cpu"
            super().__init__(pretrained=pretrained, device=device, **kwargs)

    return LinearizeLM


_CLASS = None


def register_lm_eval(name: str = MODEL_NAME):
    """Register ``LinearizeLM`` as lm-eval model type ``name`` (idempotent); returns the class."""
    global _CLASS
    _, register_model, registry = _lm_eval()
    if _CLASS is None:
        _CLASS = _make_class()
    if name not in registry or registry.get(name) is not _CLASS:
        register_model(name)(_CLASS)
    return _CLASS


def lm_eval_model(model="smollm2-135m", tokenizer=None, *, batch_size: int | str = 16, device: str | None = None, **kwargs):
    """An lm-eval ``LM`` (a ``LinearizeLM``) for ``model``: a loaded ``PreTrainedModel`` (give its
    ``tokenizer``), or an alias / ``.gguf`` / HF dir (linearized or not) / hub id.

    ``kwargs`` go to ``HFLM`` (``dtype="float32"``, ``max_length=...``, ``add_bos_token=...``)."""
    cls = register_lm_eval()
    if not isinstance(model, str):
        device = device or str(next(model.parameters()).device)
    return cls(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device, **kwargs)


def _task_names(argv: Sequence[str]) -> list[str]:
    names: list[str] = []
    for i, a in enumerate(argv):
        if a == "--tasks" and i + 1 < len(argv):
            values = [argv[i + 1]]
            j = i + 2
            while j < len(argv) and not argv[j].startswith("-"):  # lm-eval 0.4.13 takes space-separated too
                values.append(argv[j])
                j += 1
        elif a.startswith("--tasks="):
            values = [a.split("=", 1)[1]]
        else:
            continue
        names += [t for v in values for t in v.split(",") if t]
    return names


def cli_args(argv: Sequence[str]) -> list[str]:
    """lm-eval CLI arguments with ``--model linearize`` as default and, when a task is ``offline_*``,
    the offline configs written and passed as ``--include_path`` (unless one is given)."""
    argv = list(argv)
    if argv and argv[0] in ("ls", "validate", "-h", "--help"):  # subcommands without a model
        return argv
    if not any(a == "--model" or a.startswith("--model=") for a in argv):
        argv += ["--model", MODEL_NAME]
    if any(t.startswith("offline_") for t in _task_names(argv)) and not any(a.startswith("--include_path") for a in argv):
        from .lm_eval_tasks import write_task_configs

        argv += ["--include_path", str(write_task_configs())]
    return argv


def main(argv: Sequence[str] | None = None) -> None:
    """``lm_eval``'s command line with the ``linearize`` model type registered."""
    register_lm_eval()
    from lm_eval.__main__ import cli_evaluate

    args = cli_args(sys.argv[1:] if argv is None else argv)
    sys.argv = ["lm-eval", *args]
    cli_evaluate()


if __name__ == "__main__":
    main()
