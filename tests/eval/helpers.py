"""Tiny fixtures for the eval tests: a word-level tokenizer and deterministic fake / tiny models."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn as nn
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

WORDS = "the a sea ship sails wind blue grey cold warm night day sun moon star light dark sings waves shore".split()


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", ".", ":", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


class SuccessorLM(nn.Module):
    """Logits at position t favour token ``x[t] + 1`` (by ``margin``): greedy output is known exactly."""

    def __init__(self, vocab: int = 32, margin: float = 3.0, max_pos: int = 512):
        super().__init__()
        self.vocab, self.margin = vocab, margin
        self.dummy = nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(max_position_embeddings=max_pos)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits.scatter_(-1, ((input_ids + 1) % self.vocab)[..., None], self.margin)
        return SimpleNamespace(logits=logits + self.dummy)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer without merges: any text, one token per byte (ids 3..258)."""
    from tokenizers import decoders

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 byte characters of GPT-2's byte-level BPE
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {ch: 3 + i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_byte_model_dir(path, *, linearized: bool = False, max_positions: int = 4096, seed: int = 0):
    """A saved tiny random llama (fp32) with the byte tokenizer; optionally linearized first
    (window 8, feature weights moved off their initial values)."""
    from tests.tiny_models import perturb_added_weights, tiny_model

    tok = byte_tokenizer()
    model = tiny_model("llama", seed=seed, vocab_size=len(tok), max_position_embeddings=max_positions)
    if linearized:
        import linearize

        model = linearize.convert(model, linearize.LinearizeConfig(window=8))
        perturb_added_weights(model)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
