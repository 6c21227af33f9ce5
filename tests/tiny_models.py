"""Tiny (~1M parameter) models built from the real Llama, Qwen2 and Qwen3 configs.

Each is saved to a folder with a real byte-level BPE tokenizer and a ChatML chat template, so
tests load them through Bios's own loading path exactly as a user's model would be.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

FAMILIES = ("llama", "qwen2", "qwen3")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Bios fine-tunes language models with LoRA adapters and full weights.",
    "What is two plus two? Two plus two is four.",
    "user assistant system: hello there, how are you today?",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\"()-",
]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on a few sentences: every string is encodable."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    wrapped.chat_template = CHATML_TEMPLATE
    return wrapped


def _config(family: str, vocab_size: int, tokenizer: PreTrainedTokenizerFast, **overrides):
    common = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    common.update(overrides)
    if family == "llama":
        return LlamaConfig(**common, tie_word_embeddings=False), LlamaForCausalLM
    if family == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=False), Qwen2ForCausalLM
    if family == "qwen3":
        return Qwen3Config(**common, head_dim=32, tie_word_embeddings=True), Qwen3ForCausalLM
    raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


def make_tiny_model(family: str, folder: Path, seed: int = 0, **overrides) -> Path:
    """Build a tiny model of `family` (its config's sizes changed by `overrides`), save it with
    its tokenizer to `folder`, return the folder."""
    tokenizer = make_tokenizer()
    config, model_class = _config(family, len(tokenizer), tokenizer, **overrides)
    torch.manual_seed(seed)
    model = model_class(config).to(torch.float32)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
