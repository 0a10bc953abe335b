"""Tokenize split units (documents or blocks) and pack them into fixed-length rows.

Each unit (document or block) becomes ``[BOS] tokens [EOS]`` (BOS only if the tokenizer normally adds one, EOS if it
has one); units are concatenated in order and the stream is cut into rows of exactly ``seq_len``
tokens; the last partial row is dropped. Rows therefore cross document boundaries, which is the usual
packing for LM training: nothing is padded, and the EOS tells the model where a document ended.

With a token budget, tokenization stops as soon as the budget is reached, so taking 10M tokens of a
100M-character corpus does not tokenize all of it. The rows kept are the first ones, i.e. a prefix of
what an unlimited build would give: the unit order is already a seeded shuffle.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .chat import render_messages
from .common import progress
from .split import Unit

__all__ = ["EncodeResult", "encode_units", "pack_rows", "special_ids", "tokenizer_fingerprint", "tokenizer_name"]

_BATCH_CHARS = 1 << 20  # per tokenizer call: big enough for the Rust tokenizer to parallelize
_BATCH_UNITS = 256


def tokenizer_name(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def special_ids(tokenizer: Any) -> tuple[int | None, int | None]:
    """(BOS to prepend or None, EOS to append or None). BOS counts only if the tokenizer itself adds
    it to plain text (Llama does, Qwen and SmolLM2 do not): we follow the model's own convention."""
    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    if bos is not None:
        ids = tokenizer("a", add_special_tokens=True)["input_ids"]
        if not ids or ids[0] != bos:
            bos = None
    return bos, eos


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A digest of everything about the tokenizer that changes the packed ids: its full serialized
    pipeline (vocab, merges, normalizer, added tokens) when it is a fast tokenizer, else its vocab,
    plus its BOS/EOS convention and chat template."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        digest.update(backend.to_str().encode("utf-8"))
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode("utf-8"))
    bos, eos = special_ids(tokenizer)
    template = getattr(tokenizer, "chat_template", None)
    digest.update(json.dumps([type(tokenizer).__name__, bos, eos, template], default=str).encode("utf-8"))
    return digest.hexdigest()


@dataclass
class EncodeResult:
    tokens: torch.Tensor  # int64 [n]: the concatenated stream
    units: int  # units tokenized
    chars: int  # characters tokenized (rendered text)
    skipped: int  # chat conversations the template rejected
    truncated: bool  # stopped early at the budget


def _render(unit: Unit, tokenizer: Any) -> str | None:
    if unit.messages is None:
        return unit.text
    text = render_messages(unit.messages, tokenizer)
    # ChatML-style templates end with "<|im_end|>\n"; when that end-of-turn is the EOS, drop the
    # newline so the conversation ends on it instead of getting a second EOS appended
    eos = getattr(tokenizer, "eos_token", None)
    if text and isinstance(eos, str) and eos and text.rstrip().endswith(eos):
        text = text.rstrip()
    return text


def encode_units(units: Sequence[Unit], tokenizer: Any, *, max_tokens: int | None = None, desc: str = "tokenizing") -> EncodeResult:
    """Tokenize units in order into one stream, stopping once ``max_tokens`` are reached."""
    bos, eos = special_ids(tokenizer)
    total_chars = sum(u.chars for u in units)
    parts: list[np.ndarray] = []
    n_tokens = n_chars = n_units = skipped = 0
    truncated = False
    with progress(total_chars, desc, unit="char", min_total=2_000_000) as bar:
        i = 0
        while i < len(units):
            batch_texts: list[str] = []
            batch_chars = 0
            # near a budget, smaller batches: ~8 chars per missing token is generous for any tokenizer
            cap = _BATCH_CHARS if max_tokens is None else min(_BATCH_CHARS, max(1 << 16, 8 * (max_tokens - n_tokens)))
            while i < len(units) and len(batch_texts) < _BATCH_UNITS and batch_chars < cap:
                unit = units[i]
                i += 1
                bar.update(unit.chars)
                text = _render(unit, tokenizer)
                if text is None:
                    skipped += 1
                    continue
                batch_texts.append(text)
                batch_chars += len(text)
            if not batch_texts:
                continue
            encoded = tokenizer(batch_texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
            for ids in encoded:
                if bos is not None and (not ids or ids[0] != bos):
                    ids = [bos, *ids]
                if eos is not None and (not ids or ids[-1] != eos):
                    ids = [*ids, eos]
                parts.append(np.asarray(ids, dtype=np.int64))
                n_tokens += len(ids)
            n_chars += batch_chars
            n_units += len(batch_texts)
            if max_tokens is not None and n_tokens >= max_tokens:
                truncated = i < len(units) or n_tokens > max_tokens
                break
    stream = torch.from_numpy(np.concatenate(parts)) if parts else torch.zeros(0, dtype=torch.int64)
    return EncodeResult(stream, n_units, n_chars, skipped, truncated)


def pack_rows(stream: torch.Tensor, seq_len: int, max_rows: int | None = None) -> torch.Tensor:
    """``[N, seq_len]`` int64 rows cut from the token stream; the trailing partial row is dropped."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    rows = stream.numel() // seq_len
    if max_rows is not None:
        rows = min(rows, max_rows)
    return stream[: rows * seq_len].reshape(rows, seq_len).to(torch.int64).clone()
