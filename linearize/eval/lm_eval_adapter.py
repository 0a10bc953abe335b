"""Run any stock lm-evaluation-harness task on a (linearized) model; imports ``lm_eval`` lazily.

With the hub reachable and ``pip install lm-eval``::

    import lm_eval, linearize.eval
    lm = linearize.eval.lm_eval_model("runs/smol/model", batch_size=16)   # an HFLM
    lm_eval.simple_evaluate(model=lm, tasks=["arc_easy", "mmlu"], num_fewshot=None)

or from the shell, after ``linearize.eval.register_lm_eval()`` has run in a plugin/wrapper
(``python -c "import linearize.eval as e, lm_eval.__main__ as m; e.register_lm_eval(); m.cli_evaluate()" --model linearize --model_args pretrained=runs/smol/model --tasks arc_easy``).
The ``linearize`` model name loads through :func:`linearize.models.load`, so aliases
(``smollm2-135m``) and ``.gguf`` files work as ``pretrained=`` too.
"""

from __future__ import annotations


def _hflm():
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise ImportError("lm_eval is not installed: pip install lm-eval") from None
    return HFLM


def lm_eval_model(model, tokenizer=None, *, batch_size: int | str = 16, device: str | None = None, **kwargs):
    """An lm-eval ``HFLM`` wrapping ``model`` (a loaded model, or a name/path for ``linearize.models.load``)."""
    HFLM = _hflm()
    import linearize  # noqa: F401  (registers linearized_* model types)

    if isinstance(model, str):
        from linearize.models import load

        model, tokenizer = load(model, device=device or "cpu")
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **kwargs)


def register_lm_eval(name: str = "linearize") -> None:
    """Register ``name`` as an lm-eval model type (``--model linearize --model_args pretrained=...``)."""
    HFLM = _hflm()
    from lm_eval.api.registry import register_model

    import linearize  # noqa: F401

    class LinearizeLM(HFLM):
        def __init__(self, pretrained: str, device: str | None = None, dtype: str | None = None, **kwargs):
            import torch

            from linearize.models import load

            dt = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else None
            model, tok = load(pretrained, dtype=dt, device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
            super().__init__(pretrained=model, tokenizer=tok, **kwargs)

    register_model(name)(LinearizeLM)
