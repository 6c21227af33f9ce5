"""Chat conversations to supervised `Datum`s, rendered with the tokenizer's own chat template.

A conversation is rendered turn by turn: the tokens that turn `i` adds to the rendering of
turns `< i` belong to turn `i`. Assistant turns get weight 1 (the model learns to write them),
everything else weight 0 (the model reads it). Then the usual shift: position t of the model
input predicts token t + 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from bios.types import Datum, ModelInput

Message = dict[str, str]


def _render(tokenizer, messages: Sequence[Message], add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return tokenizer.encode(text, add_special_tokens=False)


def render_prompt(tokenizer, messages: Sequence[Message]) -> list[int]:
    """Tokens of `messages` followed by the header of an assistant reply."""
    return _render(tokenizer, messages, add_generation_prompt=True)


def render_conversation(
    tokenizer, messages: Sequence[Message], train_on: str = "assistant"
) -> tuple[list[int], list[float]]:
    """Tokens of the whole conversation and a weight per token.

    `train_on="assistant"` weights the assistant turns' own tokens (content and end-of-turn);
    `"all"` weights every token.
    """
    if train_on not in ("assistant", "all"):
        raise ValueError(f"train_on: expected 'assistant' or 'all', got {train_on!r}")
    tokens: list[int] = []
    weights: list[float] = []
    for index, message in enumerate(messages):
        is_assistant = message.get("role") == "assistant"
        if is_assistant:
            header = _render(tokenizer, messages[:index], add_generation_prompt=True)
            _extend(tokens, weights, header, 1.0 if train_on == "all" else 0.0, index)
        rendered = _render(tokenizer, messages[: index + 1], add_generation_prompt=False)
        weight = 1.0 if is_assistant or train_on == "all" else 0.0
        _extend(tokens, weights, rendered, weight, index)
    return tokens, weights


def _extend(tokens: list[int], weights: list[float], rendered: list[int], weight: float, turn: int):
    if rendered[: len(tokens)] != tokens:
        raise ValueError(
            f"messages[{turn}]: the chat template does not render turns as a growing prefix, "
            "so turns cannot be weighted separately"
        )
    new = rendered[len(tokens) :]
    tokens.extend(new)
    weights.extend([weight] * len(new))


def conversation_to_datum(
    tokenizer,
    messages: Sequence[Message],
    train_on: str = "assistant",
    max_length: int | None = None,
) -> Datum:
    """A `cross_entropy` Datum: inputs = tokens[:-1], targets = tokens[1:], weights alike."""
    tokens, weights = render_conversation(tokenizer, messages, train_on)
    if max_length is not None:
        tokens, weights = tokens[: max_length + 1], weights[: max_length + 1]
    return Datum(
        model_input=ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": torch.tensor(tokens[1:], dtype=torch.int64),
            "weights": torch.tensor(weights[1:], dtype=torch.float32),
        },
    )
