"""Chat rendering: assistant turns are weighted, everything else is read only."""

from __future__ import annotations

import pytest

from bios.data.chat import conversation_to_datum, render_conversation, render_prompt
from tiny_models import make_tokenizer

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hello"},
    {"role": "assistant", "content": "Paris"},
    {"role": "user", "content": "and Italy?"},
    {"role": "assistant", "content": "Rome"},
]


def test_assistant_turns_only_are_weighted():
    tokenizer = make_tokenizer()
    tokens, weights = render_conversation(tokenizer, MESSAGES)
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False)
    assert tokenizer.decode(tokens) == text
    weighted = [t if w else None for t, w in zip(tokens, weights, strict=True)]
    pieces, current = [], []
    for token in weighted:
        if token is None and current:
            pieces.append(tokenizer.decode(current))
            current = []
        elif token is not None:
            current.append(token)
    pieces.append(tokenizer.decode(current))
    assert pieces == ["Paris<|im_end|>\n", "Rome<|im_end|>\n"]

    _, all_weights = render_conversation(tokenizer, MESSAGES, train_on="all")
    assert all(w == 1.0 for w in all_weights)


def test_datum_is_shifted_by_one():
    tokenizer = make_tokenizer()
    tokens, weights = render_conversation(tokenizer, MESSAGES[:3])
    datum = conversation_to_datum(tokenizer, MESSAGES[:3])
    assert datum.model_input.to_ints() == tokens[:-1]
    assert datum.loss_fn_inputs["target_tokens"].tolist() == tokens[1:]
    assert datum.loss_fn_inputs["weights"].tolist() == weights[1:]
    prompt = render_prompt(tokenizer, MESSAGES[:2])
    assert tokens[: len(prompt)] == prompt and not any(weights[: len(prompt)])


def test_bad_train_on():
    with pytest.raises(ValueError, match="train_on"):
        render_conversation(make_tokenizer(), MESSAGES, train_on="user")
