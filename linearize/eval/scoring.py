"""Loglikelihood scoring and the lm-evaluation-harness metrics, re-implemented in a few lines.

We do not run lm-eval itself: it needs ``datasets``/``evaluate``/``sacrebleu``/``scikit-learn`` and
fetches its data from the Hugging Face hub, which offline machines cannot reach. This module follows
lm-eval 0.4's definitions exactly (``lm_eval/api/model.py``, ``lm_eval/api/task.py``):

* encoding (``_encode_pair``): trailing spaces of the context move to the continuation; the
  continuation's tokens are ``tok(context + continuation)[len(tok(context)):]``, with the
  tokenizer's default special tokens; an empty context is replaced by the BOS (else EOS) token;
  the input is ``(context + continuation)[-(max_len + 1):][:-1]`` (left truncation).
* loglikelihood: sum of the continuation tokens' log-probabilities; ``is_greedy``: every
  continuation token is the argmax at its position.
* ``acc``: argmax over choices of the loglikelihood equals gold. ``acc_norm``: argmax of
  loglikelihood / ``len(choice)`` (characters of the choice string, lm-eval's code; lm-eval's docs
  say "byte length", which is its ``acc_bytes``, also reported). Winogrande: ``acc`` only.
* LAMBADA: ``acc`` = mean ``is_greedy``; ``perplexity`` = ``exp(-mean(loglikelihood))``.
* MMLU: ``acc`` of the ``mmlu`` group = size-weighted mean over subjects (``weight_by_size: True``
  at every level), i.e. the mean over all questions; the unweighted subject mean is reported too.

Batching: requests are sorted by length (longest first), right-padded with an attention mask, and
scored in one forward pass per batch; causal attention makes right padding exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .tasks import Request, Task


def max_length(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", 2048) or 2048)


def prefix_token_id(tokenizer) -> int:
    tid = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tid is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token for empty contexts")
    return tid


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    if not context:
        return [prefix_token_id(tokenizer)], tokenizer(continuation, add_special_tokens=False)["input_ids"]
    n = len(context) - len(context.rstrip())
    if n:
        continuation, context = context[-n:] + continuation, context[:-n]
    whole = tokenizer(context + continuation)["input_ids"]
    ctx = tokenizer(context)["input_ids"]
    return ctx, whole[len(ctx) :]


@torch.no_grad()
def loglikelihood_tokens(
    model, pairs: Sequence[tuple[list[int], list[int]]], *, batch_size: int = 16, max_len: int | None = None,
    desc: str = "loglikelihood", progress: bool = True,
) -> list[tuple[float, bool]]:
    """``(sum log p(continuation | context), is_greedy)`` per ``(context_ids, continuation_ids)`` pair."""
    max_len = max_len or max_length(model)
    device = next(model.parameters()).device
    items = []
    for i, (ctx, cont) in enumerate(pairs):
        if not cont:
            raise ValueError("a request has an empty continuation")
        ids = (list(ctx) + list(cont))[-(max_len + 1) :][:-1]
        items.append((i, ids, list(cont)[-max_len:]))
    items.sort(key=lambda it: -len(it[1]))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(items)
    for s in tqdm(range(0, len(items), batch_size), desc=desc, leave=False, disable=not progress, dynamic_ncols=True):
        batch = items[s : s + batch_size]
        width = len(batch[0][1])
        input_ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for b, (_, ids, _) in enumerate(batch):
            input_ids[b, : len(ids)] = torch.tensor(ids)
            mask[b, : len(ids)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        for b, (i, ids, cont) in enumerate(batch):
            n = len(cont)
            lp = torch.log_softmax(logits[b, len(ids) - n : len(ids)].float(), dim=-1)
            target = torch.tensor(cont, device=lp.device)
            ll = lp.gather(1, target[:, None]).sum().item()
            out[i] = (ll, bool((lp.argmax(-1) == target).all().item()))
    return out


def loglikelihood(model, tokenizer, requests: Sequence[Request], **kw) -> list[tuple[float, bool]]:
    return loglikelihood_tokens(model, [encode_pair(tokenizer, r.context, r.continuation) for r in requests], **kw)


def multiple_choice_metrics(lls: Sequence[float], choices: Sequence[str], gold: int) -> dict[str, float]:
    lls = np.asarray(lls, dtype=np.float64)
    chars = np.array([float(len(c)) for c in choices])
    nbytes = np.array([float(len(c.encode("utf-8"))) for c in choices])
    return {
        "acc": float(np.argmax(lls) == gold),
        "acc_norm": float(np.argmax(lls / chars) == gold),
        "acc_bytes": float(np.argmax(lls / nbytes) == gold),
    }


def stderr(values: Sequence[float]) -> float:
    """lm-eval's ``mean_stderr``: sample standard deviation / sqrt(n)."""
    n = len(values)
    return float(np.std(values, ddof=1) / math.sqrt(n)) if n > 1 else float("nan")


def score_task(model, tokenizer, task: Task, *, batch_size: int = 16, progress: bool = True) -> dict:
    """Metrics of ``task`` (means over docs, with ``<metric>_stderr``) and ``n`` docs."""
    flat = [r for d in task.docs for r in d.requests]
    results = loglikelihood(model, tokenizer, flat, batch_size=batch_size, desc=task.name, progress=progress)
    per_doc: list[dict[str, float]] = []
    pos = 0
    for d in task.docs:
        res = results[pos : pos + len(d.requests)]
        pos += len(d.requests)
        lls = [ll for ll, _ in res]
        if task.kind == "lambada":
            per_doc.append({"acc": float(res[0][1]), "ll": lls[0]})
        elif task.kind == "winogrande":
            per_doc.append({"acc": float(np.argmax(lls) == d.gold)})
        else:
            per_doc.append(multiple_choice_metrics(lls, d.choices, d.gold))
    out: dict = {"n": len(per_doc)}
    for key in per_doc[0] if per_doc else []:
        if key == "ll":
            continue
        vals = [m[key] for m in per_doc]
        out[key] = float(np.mean(vals))
        out[f"{key}_stderr"] = stderr(vals)
    if task.kind == "lambada" and per_doc:
        out["perplexity"] = math.exp(-float(np.mean([m["ll"] for m in per_doc])))
    if task.name == "mmlu" and per_doc:
        subjects: dict[str, list[float]] = {}
        for d, m in zip(task.docs, per_doc):
            subjects.setdefault(d.group, []).append(m["acc"])
        out["acc_subject_mean"] = float(np.mean([np.mean(v) for v in subjects.values()]))
        out["subjects"] = {s: {"acc": float(np.mean(v)), "n": len(v)} for s, v in sorted(subjects.items())}
        for k in ("acc_norm", "acc_norm_stderr", "acc_bytes", "acc_bytes_stderr"):
            out.pop(k, None)
    return out
