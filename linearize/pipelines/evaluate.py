"""Validation loss / perplexity and sample generations for the report."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .distributed import SINGLE, Dist
from .finetune import lora_autocast


@torch.no_grad()
def perplexity(
    model: nn.Module,
    rows: torch.Tensor,
    device: torch.device,
    batch_size: int = 4,
    desc: str = "eval",
    dist: Dist = SINGLE,
    collective: bool = False,
) -> dict:
    """Mean next-token NLL over ``rows`` [N, L] (every position but the first predicted), and exp of it.

    With ``dist`` rank r scores batches r, r + world, ...; the sums are added over ranks, so the result is
    that of one process up to the order of the additions. ``collective``: the model is sharded (FSDP), so
    every forward is a collective that all ranks must join: a rank without a batch left runs a stand-in
    one-row forward, whose loss is not counted.
    """
    model.eval()
    nll, count = 0.0, 0
    n_batches = -(-rows.shape[0] // batch_size)
    if collective:
        rounds = -(-n_batches // dist.world)
        ids = range(dist.rank, rounds * dist.world, dist.world)
    else:
        ids = range(dist.rank, n_batches, dist.world)
    quiet = {} if dist.is_main else {"disable": True}
    for j in tqdm(ids, desc=desc, unit="batch", leave=False, dynamic_ncols=True, **quiet):
        real = j < n_batches
        batch = (rows[j * batch_size : (j + 1) * batch_size] if real else rows[:1]).to(device)
        with lora_autocast(model, device):
            logits = model(input_ids=batch, use_cache=False).logits.float()
        if not real:
            continue
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        nll += loss.item()
        count += batch[:, 1:].numel()
    if dist.enabled:
        sums = dist.all_reduce(torch.tensor([nll, count], dtype=torch.float64), "sum")
        nll, count = sums[0].item(), int(sums[1].item())
    mean = nll / max(count, 1)
    return {"loss": mean, "ppl": math.exp(min(mean, 50.0)), "tokens": count}


@torch.no_grad()
def sample(
    model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int, device: torch.device, synced: bool = False
) -> list[str]:
    """Greedy completions, through the chat template when the tokenizer has one.

    ``synced``: the model is sharded (FSDP) and every rank calls this with the same prompts; HF's
    ``synced_gpus`` keeps all ranks stepping until every one has finished, so the collectives match.
    """
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
        gen = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            **({"synced_gpus": True} if synced else {}),
        )
        out.append(tokenizer.decode(gen[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    return out
