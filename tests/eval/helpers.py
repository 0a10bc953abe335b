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
