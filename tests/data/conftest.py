"""Fixtures for linearize.data tests: tiny offline tokenizers and an isolated cache root."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer(*, bos: bool = True, chat_template: str | None = None, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained in milliseconds on two sentences: encodes any text, ids < vocab_size.
    ``<pad>``=0, ``<s>``=1, ``</s>``=2; with ``bos`` a post-processor adds ``<s>`` like Llama's."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(
        ["It is a truth universally acknowledged, that a single man in possession of a good fortune"] * 5
        + ["the quick brown fox jumps over the lazy dog. To be, or not to be, that is the question"] * 5,
        trainer,
    )
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    out.name_or_path = f"tiny-bpe{'-bos' if bos else ''}{'-chat' if chat_template else ''}"
    if chat_template:
        out.chat_template = chat_template
    return out


@pytest.fixture(scope="session")
def tok() -> PreTrainedTokenizerFast:
    """Adds BOS (Llama-style), no chat template."""
    return make_tokenizer(bos=True)


@pytest.fixture(scope="session")
def tok_nobos() -> PreTrainedTokenizerFast:
    """Adds no BOS (Qwen/SmolLM2-style)."""
    return make_tokenizer(bos=False)


@pytest.fixture(scope="session")
def tok_chat() -> PreTrainedTokenizerFast:
    """No BOS, ChatML chat template."""
    return make_tokenizer(bos=False, chat_template=CHATML)


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """An empty cache root for tests that build packed data (built-in corpora are not fetched there)."""
    root = tmp_path / "cache"
    monkeypatch.setenv("LINEARIZE_CACHE", str(root))
    return root
