"""In-context recall probes, deterministic by seed, scored by greedy exact match.

``passkey[@len,...]`` (default 1024, 2048, 4096, 8192 tokens): a random 5-digit pass key sentence is
hidden at depths 0, 0.25, 0.5, 0.75, 1 of repeated filler text (the LongLLaMA / Landmark-attention
prompt); the prompt ends with "What is the pass key? The pass key is" and the example is right when
greedy decoding would produce exactly `` <key>``: every token of the key is the argmax given the
prompt and the previous key tokens (teacher-forced greedy check, the LAMBADA ``acc`` rule). Each
example is built to be exactly ``len`` tokens long, key included.

``mqar[@pairs,...]`` (default 4, 8, 16, 32, 64 pairs): Zoology's multi-query associative recall
posed in natural tokens to a pretrained model: ``<word>: <number>`` lines with distinct words, then
every key again in a shuffled order, each followed by its value. A query is right when all its value
tokens are the greedy prediction (teacher forcing, as Zoology scores all queries of a sequence in one
forward pass). Accuracy is over queries.

``limit`` caps the examples per task (spread evenly over the settings); default 5 per
(length, depth) cell for passkey and 10 sequences per number of pairs for MQAR.
"""

from __future__ import annotations

import random

import torch
from tqdm.auto import tqdm

from .scoring import loglikelihood_tokens, max_length

PASSKEY_LENGTHS = (1024, 2048, 4096, 8192)
PASSKEY_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
MQAR_PAIRS = (4, 8, 16, 32, 64)

INTRO = "There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you about it."
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = " What is the pass key? The pass key is"
KEY_WORDS = (
    "apple river stone cloud horse garden window candle forest bridge mirror pencil button rocket castle "
    "island jacket ladder meadow needle orange pepper quilt rabbit saddle tiger violin wagon yacht zebra "
    "anchor basket cactus dragon engine falcon guitar hammer igloo jungle kettle lemon magnet napkin oyster "
    "parrot rhino shovel tunnel umbrella valley walrus barrel cobra desert feather glacier harbor insect "
    "jewel lantern marble nickel orchid pillow puzzle ribbon silver temple trumpet velvet whistle bucket"
).split()


def parse_counts(name: str, default: tuple[int, ...]) -> tuple[int, ...]:
    base, _, spec = name.partition("@")
    if not spec:
        return default
    try:
        counts = tuple(int(x) for x in spec.split(","))
    except ValueError:
        raise ValueError(f"task {name!r}: expected {base}@<int>,<int>...") from None
    if not counts or min(counts) < 1:
        raise ValueError(f"task {name!r}: values must be positive")
    return counts


def _enc(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _bos(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text (BOS or nothing)."""
    with_special = tokenizer("a")["input_ids"]
    plain = _enc(tokenizer, "a")
    return with_special[: len(with_special) - len(plain)] if with_special[-len(plain) :] == plain else []


def passkey_examples(tokenizer, lengths=PASSKEY_LENGTHS, depths=PASSKEY_DEPTHS, per_cell: int = 5, seed: int = 0) -> list[dict]:
    """``{"length", "depth", "key", "context": ids, "answer": ids}`` per example, deterministic by seed."""
    rng = random.Random(seed)
    intro = _bos(tokenizer) + _enc(tokenizer, INTRO)
    unit, question = _enc(tokenizer, FILLER), _enc(tokenizer, QUESTION)
    out = []
    for length in lengths:
        for depth in depths:
            for _ in range(per_cell):
                key = str(rng.randint(10000, 99999))
                needle = _enc(tokenizer, f" The pass key is {key}. Remember it. {key} is the pass key.")
                answer = _enc(tokenizer, f" {key}")
                room = length - len(intro) - len(needle) - len(question) - len(answer)
                if room < 0:
                    raise ValueError(f"passkey length {length} is too short for the prompt ({length - room} tokens)")
                units = room // len(unit)
                at = round(depth * units)
                filler = unit * units + unit[: room - units * len(unit)]
                cut = at * len(unit)
                ctx = intro + filler[:cut] + needle + filler[cut:] + question
                out.append({"length": length, "depth": depth, "key": key, "context": ctx, "answer": answer})
    return out


def score_passkey(model, tokenizer, lengths=PASSKEY_LENGTHS, *, limit: int | None = None, seed: int = 0, batch_size: int = 1, progress: bool = True) -> dict:
    check_length(model, max(lengths), "passkey")
    cells = len(lengths) * len(PASSKEY_DEPTHS)
    per_cell = max(1, limit // cells) if limit else 5
    exs = passkey_examples(tokenizer, lengths, PASSKEY_DEPTHS, per_cell, seed)[: limit or None]
    res = loglikelihood_tokens(model, [(e["context"], e["answer"]) for e in exs], batch_size=batch_size, desc="passkey", progress=progress)
    hits = [float(g) for _, g in res]
    out: dict = {"acc": sum(hits) / len(hits), "n": len(hits), "depths": list(PASSKEY_DEPTHS), "seed": seed}
    for length in lengths:
        sel = [h for h, e in zip(hits, exs) if e["length"] == length]
        if sel:
            out[f"acc@{length}"] = sum(sel) / len(sel)
    # by depth, over the lengths: depth 1.0 puts the needle just before the question, inside a 64-token
    # window, so a hybrid failing there loses what its window sees, not only what its linear state holds
    for depth in PASSKEY_DEPTHS:
        sel = [h for h, e in zip(hits, exs) if e["depth"] == depth]
        if sel:
            out[f"acc_depth{depth:g}"] = sum(sel) / len(sel)
    return out


def mqar_example(tokenizer, pairs: int, rng: random.Random, *, lines: bool = False):
    """Token ids of one MQAR sequence and the ``[start, end)`` spans of its query answers; with ``lines``, also
    the ``[start, end)`` span of each queried pair's "key: value" line in the memory part, in the order of the
    answer spans (where the answer is to be read from)."""
    if pairs > len(KEY_WORDS):
        raise ValueError(f"mqar supports at most {len(KEY_WORDS)} pairs, got {pairs}")
    keys = rng.sample(KEY_WORDS, pairs)
    values = [str(rng.randint(10, 99)) for _ in keys]
    ids = _bos(tokenizer) + _enc(tokenizer, "Remember the number after each word.\n")
    memory = []
    for k, v in zip(keys, values):
        line = _enc(tokenizer, f"{k}: {v}\n")
        memory.append((len(ids), len(ids) + len(line)))
        ids += line
    ids += _enc(tokenizer, "Now recall them.\n")
    spans = []
    order = list(range(pairs))
    rng.shuffle(order)
    for j in order:
        ids += _enc(tokenizer, f"{keys[j]}:")
        ans = _enc(tokenizer, f" {values[j]}")
        spans.append((len(ids), len(ids) + len(ans)))
        ids += ans + _enc(tokenizer, "\n")
    return (ids, spans, [memory[j] for j in order]) if lines else (ids, spans)


def mqar_sequences(tokenizer, pairs=MQAR_PAIRS, *, limit: int | None = None, seed: int = 0, lines: bool = False) -> tuple[list, list[int]]:
    """The suite's MQAR sequences (``mqar_example``; ``limit`` spread over ``pairs``, else 10 each) and their pair counts."""
    rng = random.Random(seed)
    per = max(1, limit // len(pairs)) if limit else 10
    seqs, tags = [], []
    for p in pairs:
        for _ in range(per):
            seqs.append(mqar_example(tokenizer, p, rng, lines=lines))
            tags.append(p)
    return seqs, tags


@torch.no_grad()
def greedy_spans(model, seqs: list[tuple[list[int], list[tuple[int, int]]]], *, batch_size: int = 4, progress: bool = True, desc: str = "mqar") -> list[list[bool]]:
    """For each sequence, whether each span's tokens are all the argmax of the previous positions."""
    device = next(model.parameters()).device
    out: list[list[bool]] = []
    for s in tqdm(range(0, len(seqs), batch_size), desc=desc, leave=False, disable=not progress, dynamic_ncols=True):
        batch = seqs[s : s + batch_size]
        width = max(len(ids) for ids, _ in batch)
        x = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros_like(x)
        for i, (ids, _) in enumerate(batch):
            x[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(ids)] = 1
        pred = model(input_ids=x.to(device), attention_mask=mask.to(device), use_cache=False).logits.argmax(-1).cpu()
        for i, (ids, spans) in enumerate(batch):
            out.append([bool((pred[i, a - 1 : b - 1] == x[i, a:b]).all()) for a, b in spans])
    return out


def score_mqar(model, tokenizer, pairs=MQAR_PAIRS, *, limit: int | None = None, seed: int = 0, batch_size: int = 4, progress: bool = True) -> dict:
    seqs, tags = mqar_sequences(tokenizer, pairs, limit=limit, seed=seed)
    longest = max(len(ids) for ids, _ in seqs)
    check_length(model, longest, "mqar")
    hits = greedy_spans(model, seqs, batch_size=batch_size, progress=progress)
    flat = [h for hs in hits for h in hs]
    out: dict = {"acc": sum(flat) / len(flat), "n": len(seqs), "queries": len(flat), "seed": seed}
    for p in pairs:
        sel = [h for hs, t in zip(hits, tags) if t == p for h in hs]
        out[f"acc@{p}"] = sum(sel) / len(sel)
    return out


def check_length(model, length: int, what: str) -> None:
    limit = max_length(model)
    if length > limit:
        raise ValueError(f"{what}: {length} tokens exceed the model's max_position_embeddings ({limit})")
