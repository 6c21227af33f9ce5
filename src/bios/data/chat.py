"""Chat conversations to `Datum`s, rendered with the tokenizer's own chat template.

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
    return tokens_to_datum(*render_conversation(tokenizer, messages, train_on), max_length)


# ---- prompt / completion pairs -------------------------------------------------------------------

Prompt = str | Sequence[Message]


def as_messages(value: Prompt, role: str) -> list[Message]:
    """A string as one message of `role`; a list of messages as it is."""
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def render_prompt_completion(
    tokenizer, prompt: Prompt, completion: Prompt, train_on: str = "assistant"
) -> tuple[list[int], list[float]]:
    """Tokens of a prompt followed by its completion, and a weight per token.

    `prompt` is a user message (a string) or messages; `completion` an assistant message (a
    string) or messages. `train_on="assistant"` weights the completion's assistant turns only (an
    assistant turn inside the prompt is context, not a target); `"all"` weights every token.
    A tokenizer without a chat template gets plain text when both are strings: the prompt as the
    tokenizer encodes it, then the completion and the end-of-sequence token, which are weighted.
    """
    if getattr(tokenizer, "chat_template", None) is None and isinstance(prompt, str):
        if not isinstance(completion, str):
            raise ValueError("completion: messages need a tokenizer with a chat template")
        head = tokenizer.encode(prompt)
        tail = tokenizer.encode(completion, add_special_tokens=False)
        tail += [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        weight = 1.0 if train_on == "all" else 0.0
        return head + tail, [weight] * len(head) + [1.0] * len(tail)
    prompt_messages = as_messages(prompt, "user")
    messages = prompt_messages + as_messages(completion, "assistant")
    tokens, weights = render_conversation(tokenizer, messages, train_on)
    if train_on == "assistant":
        header = render_prompt(tokenizer, prompt_messages)
        if tokens[: len(header)] != header:
            raise ValueError(
                "the chat template does not render the prompt as a prefix of prompt + completion"
            )
        weights[: len(header)] = [0.0] * len(header)
    return tokens, weights


def tokens_to_datum(
    tokens: Sequence[int], weights: Sequence[float], max_length: int | None = None
) -> Datum:
    """A `cross_entropy` Datum from a token sequence and its weights, cut to `max_length` inputs."""
    if max_length is not None:
        tokens, weights = tokens[: max_length + 1], weights[: max_length + 1]
    return Datum(
        model_input=ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": torch.tensor(list(tokens[1:]), dtype=torch.int64),
            "weights": torch.tensor(list(weights[1:]), dtype=torch.float32),
        },
    )


def prompt_completion_to_datum(
    tokenizer,
    prompt: Prompt,
    completion: Prompt,
    train_on: str = "assistant",
    max_length: int | None = None,
) -> Datum:
    """`render_prompt_completion` as a `cross_entropy` Datum (shifted by one, cut to max_length)."""
    return tokens_to_datum(
        *render_prompt_completion(tokenizer, prompt, completion, train_on), max_length
    )


def preference_pair_to_data(
    tokenizer, prompt: Prompt, chosen: Prompt, rejected: Prompt, max_length: int | None = None
) -> list[Datum]:
    """[chosen, rejected] Datums for the `dpo` objectives: weights 1 on each response only."""
    return [
        prompt_completion_to_datum(tokenizer, prompt, response, "assistant", max_length)
        for response in (chosen, rejected)
    ]


def prompt_tokens(tokenizer, prompt: Prompt) -> list[int]:
    """Tokens of a prompt ready for the model's reply: the chat template's assistant header, or
    the plain encoded string for a tokenizer without a chat template."""
    if getattr(tokenizer, "chat_template", None) is None and isinstance(prompt, str):
        return tokenizer.encode(prompt)
    return render_prompt(tokenizer, as_messages(prompt, "user"))
