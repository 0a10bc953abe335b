"""``build_dataset``: source spec -> documents -> leak-free split -> packed train/val tensors, cached.

The packed result is cached in ``<cache>/data/packed/<key>.safetensors``, keyed by everything that
changes the rows: the sources (a user file by its content hash), the tokenizer (full fingerprint),
``seq_len``, ``seed``, ``val_fraction``, ``block_chars`` and the token budgets. A resumed run thus gets
exactly the same rows, and never stale ones after the data or tokenizer changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import corpora, files
from .common import Document, data_dir, log, temp_sibling
from .packing import encode_units, pack_rows, tokenizer_fingerprint, tokenizer_name
from .split import Unit, dedupe, order_units, split_units, to_units

__all__ = ["DEFAULT_BLOCK_CHARS", "DatasetSplits", "SplitStats", "build_dataset", "parse_source"]

DEFAULT_BLOCK_CHARS = 20_000
_FORMAT = 1  # bump when the packing changes, to invalidate cached tensors


@dataclass(frozen=True)
class SplitStats:
    """Counts for one side of the split.

    ``documents``/``blocks``/``chars``: source documents touched, split units (documents or blocks)
    and their characters assigned to this side. ``tokens``: tokens produced (with BOS/EOS) before
    cutting rows; when ``truncated``, tokenization stopped at the budget, so it counts only what was
    tokenized. ``rows``: packed rows. ``skipped``: conversations the chat template rejected.
    """

    documents: int
    blocks: int
    chars: int
    tokens: int
    rows: int
    skipped: int = 0
    truncated: bool = False


@dataclass
class DatasetSplits:
    """Packed ``train``/``val`` rows (int64 ``[N, seq_len]``) and how they were made.

    ``train_ids``/``val_ids``: the split units (``<doc id>`` or ``<doc id>@<block>``) assigned to each
    side, disjoint by construction. ``stats``: ``{"train": SplitStats, "val": SplitStats}``.
    """

    train: torch.Tensor
    val: torch.Tensor
    source: str
    seq_len: int
    seed: int
    val_fraction: float
    tokenizer: str
    stats: dict[str, SplitStats]
    train_ids: tuple[str, ...] = ()
    val_ids: tuple[str, ...] = ()
    dropped_duplicates: int = 0
    cache_path: Path | None = None
    from_cache: bool = False
    build_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def train_tokens(self) -> int:
        return self.train.numel()

    @property
    def val_tokens(self) -> int:
        return self.val.numel()


# ---------------------------------------------------------------------------------------------------
# sources


@dataclass(frozen=True)
class _Source:
    kind: str  # "corpus" | "file" | "hf"
    value: str  # corpus name, path as given, or the hf: spec
    fingerprint: str  # what identifies its content in the cache key


def parse_source(source: str) -> list[_Source]:
    """Split ``a+b+c`` into sources (a path that itself contains ``+`` is taken whole if it exists),
    checking each: built-in corpus name, ``hf:...``, or an existing file/directory."""
    source = source.strip()
    if not source:
        raise ValueError("empty data source")
    parts = [source] if Path(source).expanduser().exists() else [p.strip() for p in source.split("+")]
    out: list[_Source] = []
    for part in parts:
        if not part:
            raise ValueError(f"{source!r}: empty part in a '+' mix")
        if part.lower() in corpora.CORPORA:
            out.append(_Source("corpus", part.lower(), f"{part.lower()}:{corpora.CORPUS_FORMAT}"))
        elif part.startswith("hf:"):
            out.append(_Source("hf", part, part))
        else:
            path = Path(part).expanduser()
            if not path.exists():
                if any(c in part for c in "/\\.~"):  # evidently meant as a path
                    raise FileNotFoundError(f"{part}: no such file or directory")
                raise ValueError(f"unknown data source {part!r}: not a built-in corpus ({', '.join(corpora.CORPORA)}), an existing path, or hf:<dataset>")
            out.append(_Source("file", part, files.file_fingerprint(path)))
    return list(dict.fromkeys(out))  # "austen+austen" is austen


def _documents(src: _Source) -> list[Document]:
    if src.kind == "corpus":
        return corpora.load_corpus(src.value)
    if src.kind == "hf":
        return files.load_hf(src.value)
    return files.load_file(src.value)


# ---------------------------------------------------------------------------------------------------
# cache


def _cache_key(sources: list[_Source], fingerprint: str, seq_len: int, seed: int, val_fraction: float,
               block_chars: int, max_train_tokens: int | None, max_val_tokens: int | None) -> str:
    payload = json.dumps({
        "format": _FORMAT, "sources": [[s.kind, s.fingerprint] for s in sources], "tokenizer": fingerprint,
        "seq_len": seq_len, "seed": seed, "val_fraction": val_fraction, "block_chars": block_chars,
        "max_train_tokens": max_train_tokens, "max_val_tokens": max_val_tokens,
    }, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def _save(path: Path, splits: DatasetSplits) -> None:
    meta = {
        "source": splits.source, "seq_len": splits.seq_len, "seed": splits.seed, "val_fraction": splits.val_fraction,
        "tokenizer": splits.tokenizer, "stats": {k: asdict(v) for k, v in splits.stats.items()},
        "train_ids": list(splits.train_ids), "val_ids": list(splits.val_ids),
        "dropped_duplicates": splits.dropped_duplicates, "build_seconds": splits.build_seconds, "extra": splits.extra,
    }
    tmp = temp_sibling(path)
    try:
        save_file({"train": splits.train.contiguous(), "val": splits.val.contiguous()}, str(tmp),
                  metadata={"linearize.data": json.dumps(meta, ensure_ascii=False)})
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _load(path: Path) -> DatasetSplits | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["linearize.data"])
            train, val = f.get_tensor("train"), f.get_tensor("val")
    except Exception:  # missing, torn by a foreign writer, or an old layout: rebuild
        return None
    return DatasetSplits(
        train=train, val=val, source=meta["source"], seq_len=meta["seq_len"], seed=meta["seed"],
        val_fraction=meta["val_fraction"], tokenizer=meta["tokenizer"],
        stats={k: SplitStats(**v) for k, v in meta["stats"].items()},
        train_ids=tuple(meta["train_ids"]), val_ids=tuple(meta["val_ids"]),
        dropped_duplicates=meta.get("dropped_duplicates", 0), cache_path=path, from_cache=True,
        build_seconds=meta.get("build_seconds", 0.0), extra=meta.get("extra", {}),
    )


# ---------------------------------------------------------------------------------------------------
# build


def _side(units: list[Unit], tokenizer: Any, seq_len: int, seed: int, max_tokens: int | None, desc: str) -> tuple[torch.Tensor, SplitStats]:
    max_rows = None if max_tokens is None else max_tokens // seq_len
    budget = None if max_rows is None else max_rows * seq_len
    enc = encode_units(order_units(units, seed), tokenizer, max_tokens=budget, desc=desc) if max_rows != 0 else None
    rows = pack_rows(enc.tokens, seq_len, max_rows) if enc is not None else torch.zeros(0, seq_len, dtype=torch.int64)
    stats = SplitStats(
        documents=len({u.doc_id for u in units}), blocks=len(units), chars=sum(u.chars for u in units),
        tokens=int(enc.tokens.numel()) if enc else 0, rows=int(rows.shape[0]), skipped=enc.skipped if enc else 0,
        truncated=bool(enc.truncated) if enc else bool(units),
    )
    return rows, stats


def build_dataset(
    source: str,
    tokenizer: Any,
    seq_len: int,
    *,
    val_fraction: float = 0.05,
    seed: int = 0,
    max_train_tokens: int | None = None,
    max_val_tokens: int | None = None,
    block_chars: int = DEFAULT_BLOCK_CHARS,
    cache: bool = True,
) -> DatasetSplits:
    """Packed, leak-free train/validation rows for ``source``.

    ``source``: a built-in corpus (:func:`list_corpora`), a ``.txt``/``.jsonl``/``.json`` file or a
    directory of them, or ``hf:<dataset>[:<config>][@<split>]``; mix several with ``+``
    (``"austen+shakespeare"``). Each source is split on its own (so each contributes validation data),
    then train and val units of all sources are shuffled together by ``seed``.

    ``max_train_tokens``/``max_val_tokens``: keep the first ``max // seq_len`` rows of the seeded
    unit order (tokenization stops there). ``block_chars``: plain-text documents longer than this
    are cut into blocks at paragraph boundaries before splitting (see :mod:`linearize.data.split`).
    ``cache=False`` neither reads nor writes ``<cache>/data/packed/``.
    """
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    for name, value in (("max_train_tokens", max_train_tokens), ("max_val_tokens", max_val_tokens)):
        if value is not None and value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if max_train_tokens is not None and max_train_tokens < seq_len:
        raise ValueError(f"max_train_tokens={max_train_tokens} is less than one row of seq_len={seq_len}")

    sources = parse_source(source)
    fingerprint = tokenizer_fingerprint(tokenizer)
    key = _cache_key(sources, fingerprint, seq_len, seed, val_fraction, block_chars, max_train_tokens, max_val_tokens)
    path = data_dir("packed", f"{key}.safetensors")
    if cache and (cached := _load(path)) is not None:
        cached.source = source  # the same data may have been named differently ("./a.txt" vs "a.txt")
        return cached

    start = time.perf_counter()
    train_units: list[Unit] = []
    val_units: list[Unit] = []
    seen: set[bytes] = set()
    dropped = 0
    for src in sources:
        units, n_dropped = dedupe(to_units(_documents(src), block_chars), seen)
        dropped += n_dropped
        if not units:
            raise ValueError(f"{src.value}: all its text duplicates an earlier source in {source!r}")
        train, val = split_units(units, val_fraction, seed, label=src.value)
        train_units += train
        val_units += val

    train_rows, train_stats = _side(train_units, tokenizer, seq_len, seed, max_train_tokens, f"tokenizing {source} (train)")
    val_rows, val_stats = _side(val_units, tokenizer, seq_len, seed, max_val_tokens, f"tokenizing {source} (val)")
    if train_rows.shape[0] == 0:
        raise ValueError(
            f"{source}: {train_stats.tokens} training tokens, less than one row of seq_len={seq_len}; "
            "use more data or a smaller seq_len"
        )
    if val_fraction > 0 and val_rows.shape[0] == 0 and max_val_tokens != 0:
        log(f"[linearize] warning: {source}: validation has {val_stats.tokens} tokens, less than one row of seq_len={seq_len}")

    splits = DatasetSplits(
        train=train_rows, val=val_rows, source=source, seq_len=seq_len, seed=seed, val_fraction=val_fraction,
        tokenizer=tokenizer_name(tokenizer), stats={"train": train_stats, "val": val_stats},
        train_ids=tuple(u.id for u in train_units), val_ids=tuple(u.id for u in val_units),
        dropped_duplicates=dropped, build_seconds=round(time.perf_counter() - start, 3),
        extra={"block_chars": block_chars, "max_train_tokens": max_train_tokens, "max_val_tokens": max_val_tokens},
    )
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        _save(path, splits)
        splits.cache_path = path
    return splits
