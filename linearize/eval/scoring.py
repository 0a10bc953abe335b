"""Loglikelihood scoring and the lm-evaluation-harness metrics, in a few lines.

``linearize eval`` scores with this module rather than through lm-eval: it is small, needs only the
data wheel, shares one forward among requests with equal inputs and measures memory and throughput
per task. It follows lm-eval 0.4.13's definitions (``lm_eval/api/model.py``, ``lm_eval/api/task.py``,
``lm_eval/models/huggingface.py``), and ``tests/eval/test_lm_eval_equivalence.py`` runs lm-eval
itself (offline configs, :mod:`.lm_eval_tasks`) on the same docs and checks the same prompts,
loglikelihoods, ``acc`` and ``acc_norm`` per doc:

* encoding (``_encode_pair``): trailing spaces of the context move to the continuation; the
  continuation's tokens are ``tok(context + continuation)[len(tok(context)):]``, with the
  tokenizer's default special tokens; an empty context is replaced by the BOS (else EOS) token
  (or the continuation's first token when that is already it);
  the input is ``(context + continuation)[-(max_len + 1):][:-1]`` (left truncation).
* loglikelihood: sum of the continuation tokens' log-probabilities; ``is_greedy``: every
  continuation token is the argmax at its position.
* ``acc``: argmax over choices of the loglikelihood equals gold. ``acc_norm``: argmax of
  loglikelihood / ``len(choice)`` (characters of the choice string, lm-eval's code; lm-eval's docs
  say "byte length", which is its ``acc_bytes``, also reported). Winogrande: ``acc`` only.
* LAMBADA: ``acc`` = mean ``is_greedy``; ``perplexity`` = ``exp(-mean(loglikelihood))``.
* MMLU: ``acc`` of the ``mmlu`` group = size-weighted mean over subjects (``weight_by_size: True``
  at every level), i.e. the mean over all questions; the unweighted subject mean is reported too.

Batching: requests with identical inputs share one row (lm-eval's ``logits_cache``: MMLU's four
one-token answers cost one forward of the question); rows are sorted by length (longest first),
right-padded with an attention mask and run in one forward pass per batch (causal attention makes
right padding exact); the LM head runs only at the scored positions.
"""

from __future__ import annotations

import inspect
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
        cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        prefix = prefix_token_id(tokenizer)
        # lm-eval 0.4.13: a continuation that already starts with the prefix token conditions on it
        return ([prefix], cont) if not cont or cont[0] != prefix else (cont[:1], cont[1:])
    n = len(context) - len(context.rstrip())
    if n:
        continuation, context = context[-n:] + continuation, context[:-n]
    whole = tokenizer(context + continuation)["input_ids"]
    ctx = tokenizer(context)["input_ids"]
    return ctx, whole[len(ctx) :]


def encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]], chunk: int = 4096) -> list[tuple[list[int], list[int]]]:
    """:func:`encode_pair` for many ``(context, continuation)`` pairs, with the same result per pair.

    Each distinct string is tokenized once (an MMLU question's context serves its four answers), and
    strings go to the tokenizer in batches: a fast tokenizer encodes a batch on all cores, where one
    call per string kept a 16-core GPU host on one core (full MMLU: ~3 min of tokenizing, 5 ms a request)."""
    plan: list[tuple[str, str] | None] = []  # (context, whole) after moving the trailing spaces; None = empty context
    for context, continuation in pairs:
        if not context:
            plan.append(None)
            continue
        n = len(context) - len(context.rstrip())
        if n:
            continuation, context = context[-n:] + continuation, context[:-n]
        plan.append((context, context + continuation))
    texts = sorted({t for p in plan if p is not None for t in p})
    ids: dict[str, list[int]] = {}
    for s in range(0, len(texts), chunk):
        part = texts[s : s + chunk]
        ids.update(zip(part, tokenizer(part)["input_ids"]))
    out = []
    for (context, continuation), p in zip(pairs, plan):
        if p is None:
            out.append(encode_pair(tokenizer, context, continuation))
        else:
            ctx = ids[p[0]]
            out.append((ctx, ids[p[1]][len(ctx) :]))
    return out


def _inputs(pairs: Sequence[tuple[list[int], list[int]]], max_len: int) -> list[tuple[tuple[int, ...], list[int]]]:
    """lm-eval's model input per request: ``(context + continuation)[-(max_len + 1):][:-1]`` (left
    truncation), and the continuation scored at its last ``len(continuation)`` positions."""
    out = []
    for ctx, cont in pairs:
        if not cont:
            raise ValueError("a request has an empty continuation")
        out.append((tuple((list(ctx) + list(cont))[-(max_len + 1) :][:-1]), list(cont)[-max_len:]))
    return out


def _takes_logits_to_keep(model) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def loglikelihood_tokens(
    model, pairs: Sequence[tuple[list[int], list[int]]], *, batch_size: int = 16, max_len: int | None = None,
    desc: str = "loglikelihood", progress: bool = True,
) -> list[tuple[float, bool]]:
    """``(sum log p(continuation | context), is_greedy)`` per ``(context_ids, continuation_ids)`` pair.

    Requests whose model inputs are identical (the choices of an MMLU question: one shared context,
    single-token continuations `` A``..`` D``; in general equal ``context + continuation[:-1]``) are
    scored from ONE forward pass, as lm-eval's ``logits_cache`` does. Unique inputs are sorted longest
    first, right-padded and run ``batch_size`` at a time; only the scored positions go through the LM
    head (``logits_to_keep``) when the model takes it. :func:`loglikelihood_tokens_reference` is the
    plain one-request-at-a-time version.
    """
    max_len = max_len or max_length(model)
    device = next(model.parameters()).device
    groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
    for i, (ids, cont) in enumerate(_inputs(pairs, max_len)):
        groups.setdefault(ids, []).append((i, cont))
    rows = sorted(groups.items(), key=lambda kv: -len(kv[0]))
    keep = _takes_logits_to_keep(model)
    out: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    for s in tqdm(range(0, len(rows), batch_size), desc=desc, leave=False, disable=not progress, dynamic_ncols=True):
        batch = rows[s : s + batch_size]
        width = len(batch[0][0])
        lens = [len(ids) for ids, _ in batch]
        span = max(len(c) for _, reqs in batch for _, c in reqs)  # scored positions kept per row
        input_ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for b, (ids, _) in enumerate(batch):
            input_ids[b, : len(ids)] = torch.tensor(ids)
            mask[b, : len(ids)] = 1
        kw = {}
        if keep:  # (B, span) positions: the last `span` of each row (clamped at 0 for short rows)
            pos = torch.stack([torch.arange(n - span, n).clamp(min=0) for n in lens])
            kw["logits_to_keep"] = pos.to(device)
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False, **kw).logits
        # Every request of the batch in one gather and one copy to the host (one sync per batch, not two
        # per request): request r reads row rb[r], its continuation right-aligned at the row's end.
        if keep:
            kept = logits.float()  # [B, span, V]
        else:
            idx = torch.stack([torch.arange(n - span, n).clamp(min=0) for n in lens]).to(device)
            kept = logits.gather(1, idx[:, :, None].expand(-1, -1, logits.shape[-1])).float()  # [B, span, V]: only the scored rows in fp32
        lp = torch.log_softmax(kept, dim=-1)
        greedy = lp.argmax(-1)  # [B, span]
        reqs_flat = [(b, i, cont) for b, (_, reqs) in enumerate(batch) for i, cont in reqs]
        R = len(reqs_flat)
        tgt = torch.zeros(R, span, dtype=torch.long)
        valid = torch.zeros(R, span, dtype=torch.bool)
        for r, (_, _, cont) in enumerate(reqs_flat):
            tgt[r, span - len(cont) :] = torch.tensor(cont)
            valid[r, span - len(cont) :] = True
        rb = torch.tensor([b for b, _, _ in reqs_flat], device=device)
        tgt, valid = tgt.to(device), valid.to(device)
        pos = torch.arange(span, device=device)[None, :]
        tok_lp = lp[rb[:, None], pos, tgt]  # [R, span], without copying the vocab axis per request
        lls = torch.where(valid, tok_lp, 0.0).sum(1)
        hits = ((greedy[rb] == tgt) | ~valid).all(1)
        lls, hits = lls.double().cpu().tolist(), hits.cpu().tolist()
        for r, (_, i, _) in enumerate(reqs_flat):
            out[i] = (lls[r], bool(hits[r]))
    return out


@torch.no_grad()
def loglikelihood_tokens_reference(model, pairs: Sequence[tuple[list[int], list[int]]], *, max_len: int | None = None) -> list[tuple[float, bool]]:
    """The plain version of :func:`loglikelihood_tokens`: one forward per request, all logits."""
    max_len = max_len or max_length(model)
    device = next(model.parameters()).device
    out = []
    for ids, cont in _inputs(pairs, max_len):
        logits = model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0]
        lp = torch.log_softmax(logits[len(ids) - len(cont) :].float(), dim=-1)
        target = torch.tensor(cont, device=lp.device)
        out.append((lp.gather(1, target[:, None]).sum().item(), bool((lp.argmax(-1) == target).all().item())))
    return out


def loglikelihood(model, tokenizer, requests: Sequence[Request], **kw) -> list[tuple[float, bool]]:
    return loglikelihood_tokens(model, encode_pairs(tokenizer, [(r.context, r.continuation) for r in requests]), **kw)


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


def doc_metrics(task: Task, results: Sequence[tuple[float, bool]]) -> list[dict[str, float]]:
    """Per-doc metrics (lm-eval's ``process_results``) from the flat ``(loglikelihood, is_greedy)``
    results of ``task``'s requests in order; LAMBADA docs also carry ``ll``."""
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
    return per_doc


def score_task(model, tokenizer, task: Task, *, batch_size: int = 16, progress: bool = True) -> dict:
    """Metrics of ``task`` (means over docs, with ``<metric>_stderr``) and ``n`` docs."""
    flat = [r for d in task.docs for r in d.requests]
    results = loglikelihood(model, tokenizer, flat, batch_size=batch_size, desc=task.name, progress=progress)
    per_doc = doc_metrics(task, results)
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
