"""Validation loss / perplexity and sample generations for the report."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .distributed import SINGLE, Dist
from .transfer import autocast


@torch.no_grad()
def perplexity(
    model: nn.Module, rows: torch.Tensor, device: torch.device, batch_size: int = 4, desc: str = "eval", dist: Dist = SINGLE
) -> dict:
    """Mean next-token NLL over ``rows`` [N, L] (every position but the first predicted), and exp of it.

    With ``dist`` (every rank holding the whole model) rank r scores batches r, r + world, ...; the sums
    are added over ranks, so the result is that of one process up to the order of the additions.
    """
    model.eval()
    nll, count = 0.0, 0
    starts = range(dist.rank * batch_size, rows.shape[0], dist.world * batch_size)
    quiet = {} if dist.is_main else {"disable": True}
    for i in tqdm(starts, desc=desc, unit="batch", leave=False, dynamic_ncols=True, **quiet):
        batch = rows[i : i + batch_size].to(device)
        with autocast(device):
            logits = model(input_ids=batch, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        nll += loss.item()
        count += batch[:, 1:].numel()
    if dist.enabled:
        sums = dist.all_reduce(torch.tensor([nll, count], dtype=torch.float64), "sum")
        nll, count = sums[0].item(), int(sums[1].item())
    mean = nll / max(count, 1)
    return {"loss": mean, "ppl": math.exp(min(mean, 50.0)), "tokens": count}


@torch.no_grad()
def sample(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int, device: torch.device) -> list[str]:
    """Greedy completions, through the chat template when the tokenizer has one."""
    model.eval()
    out = []
    for prompt in prompts:
        if getattr(tokenizer, "chat_template", None):
            enc = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
        else:
            enc = tokenizer(prompt, return_tensors="pt")
        enc = {k: v.to(device) for k, v in enc.items()}
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        out.append(tokenizer.decode(gen[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    return out
