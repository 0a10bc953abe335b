"""A tiny saved model + tokenizer + text file, so the whole pipeline runs on CPU in seconds."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

WORDS = "the a sea ship sails wind blue grey cold warm night day sun moon star light dark sings waves shore".split()


def make_text(path: Path, paragraphs: int = 120, seed: int = 0) -> Path:
    """Patterned text: a grammar over few words, so a tiny model can learn and losses move."""
    rnd = random.Random(seed)
    paras = []
    for _ in range(paragraphs):
        sents = [" ".join(rnd.choice(WORDS[:8]) + " " + rnd.choice(WORDS[8:]) for _ in range(rnd.randint(3, 6))) for _ in range(4)]
        paras.append(" . ".join(sents) + " .")
    path.write_text("\n\n\n".join(paras))
    return path


def make_model_dir(path: Path, model_type: str = "llama", seed: int = 0) -> Path:
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<s>", "</s>", "<unk>", ".", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(
        model_type, vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


def tiny_overrides(text: Path, steps1: int = 6, steps2: int = 4, every: int = 2) -> list[str]:
    return [
        f"data.source={text}", "data.seq_len=32", "data.val_fraction=0.1", "data.val_tokens=256",
        "linearize.window=4", "linearize.feature_dim=4",
        f"stage1.steps={steps1}", "stage1.batch_size=2", f"stage2.steps={steps2}", "stage2.batch_size=2", "stage2.lr=1e-3",
        f"checkpoint_every={every}", "sample_tokens=5", "samples=[the sea, a ship]", "device=cpu",
    ]
