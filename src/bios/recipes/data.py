"""Reading a recipe's JSONL data file, with errors that name the file and the line.

Every format is one JSON object per line; blank lines are skipped.

    SFT          {"messages": [{"role": ..., "content": ...}, ...]}      (OpenAI chat format)
                 {"prompt": str | messages, "completion": str | messages}
    RL, distill  {"prompt": str | messages, ...any fields the reward reads, e.g. "answer"}
    DPO          {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}

The records are checked here, before any model is loaded, so a bad file fails in a second with
`DataError: data.jsonl:17: missing field 'completion' ...`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bios.data.chat import Message, Prompt

ROLES = ("system", "user", "assistant", "tool", "developer")


class DataError(ValueError):
    """A problem in a data file; the message starts with `file:line:` (or `file:`)."""


@dataclass(frozen=True)
class Line:
    """One record of a data file, with where it came from (for later error messages)."""

    path: str
    number: int
    record: dict[str, Any]

    def error(self, problem: str) -> DataError:
        return DataError(f"{self.path}:{self.number}: {problem}")


def read_jsonl(path: str | os.PathLike[str]) -> list[Line]:
    """The records of a JSONL file; DataError for a missing or empty file, invalid JSON or a line
    that is not an object."""
    name = os.fspath(path)
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{name}: no such file")
    lines = file.read_text(encoding="utf-8").splitlines()
    records: list[Line] = []
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{name}:{number}: invalid JSON ({error.msg} at column {error.colno})"
            ) from None
        if not isinstance(record, dict):
            raise DataError(f"{name}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append(Line(name, number, record))
    if not records:
        found = "an empty file" if not lines else f"{len(lines)} blank lines"
        raise DataError(f"{name}: no examples (expected one JSON object per line, found {found})")
    return records


def _field(line: Line, key: str, why: str) -> Any:
    if key not in line.record:
        raise line.error(f"missing field {key!r} ({why})")
    return line.record[key]


def _messages(line: Line, key: str, value: Any) -> list[Message]:
    """A checked list of {"role", "content"} messages."""
    if not isinstance(value, list) or not value:
        raise line.error(f"{key!r}: expected a non-empty list of messages, got {value!r:.60}")
    for index, message in enumerate(value):
        where = f"{key}[{index}]"
        if not isinstance(message, dict):
            raise line.error(f"{where}: expected an object with 'role' and 'content'")
        for part in ("role", "content"):
            if not isinstance(message.get(part), str):
                raise line.error(f"{where}: missing or non-string {part!r}")
        if message["role"] not in ROLES:
            raise line.error(f"{where}: unknown role {message['role']!r}; expected one of {ROLES}")
    return value


def _prompt(line: Line, key: str, why: str) -> Prompt:
    """A string or a list of messages."""
    value = _field(line, key, why)
    if isinstance(value, str):
        if not value:
            raise line.error(f"{key!r} is empty")
        return value
    return _messages(line, key, value)


# ---- SFT ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SFTExample:
    """A conversation (`prompt` None: learn its assistant turns) or a prompt and its completion."""

    line: Line
    messages: Prompt  # the conversation, or the completion
    prompt: Prompt | None = None


SFT_FORMAT = "an SFT example has 'messages', or 'prompt' and 'completion'"


def load_sft(path: str | os.PathLike[str], train_on: str = "assistant") -> list[SFTExample]:
    """SFT examples; a conversation without an assistant turn is an error unless train_on='all'."""
    examples = []
    for line in read_jsonl(path):
        if "messages" in line.record:
            messages = _messages(line, "messages", line.record["messages"])
            if train_on == "assistant" and not any(m["role"] == "assistant" for m in messages):
                raise line.error(
                    "the conversation has no assistant turn, so there is nothing to learn "
                    "(train_on='assistant')"
                )
            examples.append(SFTExample(line, messages))
        else:
            prompt = _prompt(line, "prompt", SFT_FORMAT)
            completion = _prompt(line, "completion", SFT_FORMAT)
            examples.append(SFTExample(line, completion, prompt))
    return examples


# ---- prompts (RL, distillation) -----------------------------------------------------------------


@dataclass(frozen=True)
class PromptExample:
    """A prompt, and the whole record (a reward may read any field, e.g. 'answer')."""

    line: Line
    prompt: Prompt
    record: dict[str, Any] = field(default_factory=dict)


def load_prompts(
    path: str | os.PathLike[str], required: tuple[str, ...] = (), why: str = ""
) -> list[PromptExample]:
    """Prompt records; `required` fields (e.g. 'answer' for the exact-match reward) must exist."""
    examples = []
    for line in read_jsonl(path):
        prompt = _prompt(line, "prompt", "a prompt record has 'prompt': a string or messages")
        for key in required:
            _field(line, key, why)
        examples.append(PromptExample(line, prompt, line.record))
    return examples


# ---- preference pairs (DPO) ---------------------------------------------------------------------


@dataclass(frozen=True)
class PreferencePair:
    line: Line
    prompt: Prompt
    chosen: Prompt
    rejected: Prompt


PAIR_FORMAT = "a preference pair has 'prompt', 'chosen' and 'rejected'"


def load_pairs(path: str | os.PathLike[str]) -> list[PreferencePair]:
    """Preference pairs; identical chosen and rejected responses are an error (no preference)."""
    pairs = []
    for line in read_jsonl(path):
        prompt = _prompt(line, "prompt", PAIR_FORMAT)
        chosen = _prompt(line, "chosen", PAIR_FORMAT)
        rejected = _prompt(line, "rejected", PAIR_FORMAT)
        if chosen == rejected:
            raise line.error("'chosen' and 'rejected' are the same response")
        pairs.append(PreferencePair(line, prompt, chosen, rejected))
    return pairs
