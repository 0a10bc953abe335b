"""Sliding-window perplexity on held-out text.

Task names: ``ppl:<source>[@<len>,<len>...]``, default lengths 512, 2048 and 4096.

Text: an existing file or directory is read whole (:func:`linearize.data.load_documents`, each
document tokenized, EOS between documents); anything else (a built-in corpus such as ``austen``,
``hf:...``, ``a+b``) goes through :func:`linearize.data.build_dataset` with ``seq_len=1024``,
``seed=0`` and the default ``val_fraction`` and its validation rows are joined into one stream, so
it is the text the training pipeline holds out with its default data settings.

Windows (the Hugging Face "perplexity of fixed-length models" recipe): windows of ``L`` tokens
start every ``stride`` tokens (default ``stride = L // 2``); the first window scores all its tokens
but the first, each later window scores only its last ``end - previous_end`` tokens, so every token
but the first of the stream is scored exactly once, with at least ``L - stride`` tokens of context
(except in the first window). ``stride == L`` gives disjoint blocks, each scoring all its tokens but
its first (like the training report's validation perplexity). Perplexity = ``exp(total NLL / tokens scored)``. ``limit`` caps the
number of windows.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

DEFAULT_LENGTHS = (512, 2048, 4096)


def parse_ppl(name: str) -> tuple[str, tuple[int, ...]]:
    spec = name[len("ppl:") :]
    source, _, lens = spec.rpartition("@") if "@" in spec else (spec, "", "")
    if not source:
        raise ValueError(f"task {name!r}: expected ppl:<corpus or file>[@len,...]")
    try:
        lengths = tuple(int(x) for x in lens.split(",")) if lens else DEFAULT_LENGTHS
    except ValueError:
        raise ValueError(f"task {name!r}: context lengths must be integers, e.g. ppl:austen@512,2048") from None
    if any(n < 2 for n in lengths):
        raise ValueError(f"task {name!r}: context lengths must be at least 2")
    return source, lengths


def load_tokens(source: str, tokenizer) -> torch.Tensor:
    """The held-out token stream of ``source`` (1-D int64)."""
    from ..data import build_dataset, load_documents

    if Path(source).exists():
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        ids: list[int] = []
        for doc in load_documents(source):
            if doc.text is None:
                continue
            ids += tokenizer(doc.text)["input_ids"] + eos
        if not ids:
            raise ValueError(f"{source}: no text to evaluate")
        return torch.tensor(ids, dtype=torch.long)
    if "." in Path(source).name and "+" not in source and not source.startswith("hf:"):
        raise FileNotFoundError(f"no such file: {source}")
    val = build_dataset(source, tokenizer, seq_len=1024, seed=0).val
    if val.numel() == 0:
        raise ValueError(f"{source}: no validation text")
    return val.flatten()


def windows(total: int, length: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, scored)`` per window: tokens ``[end - scored, end)`` are scored."""
    out, prev_end = [], 0
    for begin in range(0, max(total - 1, 1), stride):
        end = min(begin + length, total)
        scored = min(end - prev_end, end - begin - 1)
        out.append((begin, end, scored))
        prev_end = end
        if end == total:
            break
    return out


@torch.no_grad()
def sliding_perplexity(
    model, ids: torch.Tensor, length: int, stride: int | None = None, *, batch_size: int = 4,
    limit: int | None = None, progress: bool = True,
) -> dict:
    stride = stride or max(length // 2, 1)
    if not 0 < stride <= length:
        raise ValueError(f"stride must be in 1..{length}, got {stride}")
    from .scoring import _takes_logits_to_keep

    device = next(model.parameters()).device
    wins = windows(ids.numel(), length, stride)[:limit]
    keep = _takes_logits_to_keep(model)
    nll, count = 0.0, 0
    for s in tqdm(range(0, len(wins), batch_size), desc=f"ppl@{length}", leave=False, disable=not progress, dynamic_ncols=True):
        batch = wins[s : s + batch_size]
        width = max(e - b for b, e, _ in batch)
        x = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros_like(x)
        for i, (b, e, _) in enumerate(batch):
            x[i, : e - b] = ids[b:e]
            mask[i, : e - b] = 1
        kw = {}
        span = max(sc for _, _, sc in batch)
        if keep:  # only the positions that predict scored tokens go through the LM head: (B, span)
            kw["logits_to_keep"] = torch.stack([torch.arange(e - b - 1 - span, e - b - 1).clamp(min=0) for b, e, _ in batch]).to(device)
        logits = model(input_ids=x.to(device), attention_mask=mask.to(device), use_cache=False, **kw).logits
        for i, (b, e, scored) in enumerate(batch):
            n = e - b
            end = span if keep else n - 1
            lp = torch.log_softmax(logits[i, end - scored : end].float(), dim=-1)
            tgt = x[i, n - scored : n].to(lp.device)
            nll -= lp.gather(1, tgt[:, None]).sum().item()
            count += scored
    mean = nll / max(count, 1)
    return {"ppl": math.exp(min(mean, 50.0)), "loss": mean, "tokens": count, "windows": len(wins), "context": length, "stride": stride}
