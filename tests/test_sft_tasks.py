"""The benchmark tasks that calibrate and check the default LR: held-out splits really held out."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import sft_tasks


def answers(rows: list[dict]) -> list[tuple[str, str]]:
    return [(row["messages"][1]["content"], row["messages"][2]["content"]) for row in rows]


@pytest.mark.parametrize("name", list(sft_tasks.TASKS))
def test_eval_items_never_occur_in_train_and_the_seed_fixes_the_files(name: str) -> None:
    task = sft_tasks.make_task(name, seed=0)
    train, held_out = answers(task.train), answers(task.eval)
    assert not set(held_out) & set(train)
    assert len(set(train)) == len(train) and len(set(held_out)) == len(held_out)
    assert sft_tasks.make_task(name, seed=0) == task
    assert sft_tasks.make_task(name, seed=1) != task


def test_the_docs_halves_share_no_module_and_no_function() -> None:
    halves = {}
    for half in "ab":
        task = sft_tasks.make_task(f"docs-{half}")
        assert (len(task.train), len(task.eval)) == (400, 64)
        questions = [q for q, _ in answers(task.train + task.eval)]
        halves[half] = {q.split("Python's ")[1].removesuffix(" module do?") for q in questions}
        assert halves[half] <= set(sft_tasks.DOC_MODULES[{"a": 0, "b": 1}[half] :: 2])
    assert len(halves["a"]) > 20 and len(halves["b"]) > 20
    assert not halves["a"] & halves["b"]


def test_docstring_summary_takes_whole_sentences_of_the_first_paragraph() -> None:
    def documented() -> None:
        """Return the thing.  It is computed
        carefully.

        Details that are not part of the summary."""

    assert sft_tasks.docstring_summary(documented) == "Return the thing. It is computed carefully."
    long_sentence = "Word " * 40 + "end."  # 204 characters: kept whole
    documented.__doc__ = f"{long_sentence} A second sentence that would not fit in the limit."
    assert sft_tasks.docstring_summary(documented) == long_sentence
    documented.__doc__ = "documented(x) -> None\n\nDo it to x."  # a builtin's signature line
    assert sft_tasks.docstring_summary(documented) is None  # under 20 characters
    documented.__doc__ = "documented(x) -> None\n\nApply the operation to x, in place."
    assert sft_tasks.docstring_summary(documented) == "Apply the operation to x, in place."
    documented.__doc__ = None
    assert sft_tasks.docstring_summary(documented) is None


def codes(row: dict) -> list[str]:
    """The codes an answer of task E names: its first word ("404", "ENOENT")."""
    return [m["content"].split(" ")[0] for m in row["messages"] if m["role"] == "assistant"]


def test_chat_task_is_100_short_conversations_of_one_or_two_turns() -> None:
    task = sft_tasks.make_task("chat", seed=0)
    assert (len(task.train), len(task.eval)) == (100, 28)
    turns = [sum(m["role"] == "user" for m in row["messages"]) for row in task.train + task.eval]
    assert set(turns) == {1, 2} and turns.count(2) == len(turns) // 3
    # No code of an eval conversation is answered in train.
    trained = {code for row in task.train for code in codes(row)}
    assert not trained & {code for row in task.eval for code in codes(row)}
    lengths = [sum(len(m["content"]) for m in row["messages"][1:]) for row in task.train]
    assert 80 < sum(lengths) / len(lengths) < 200
    # The answers are the standard library's own texts.
    import http

    statuses = {str(s.value): s for s in http.HTTPStatus}
    for row in task.train:
        answer = row["messages"][2]["content"]
        code = answer.split(" ")[0]
        if code in statuses:
            assert statuses[code].phrase in answer


def test_explain_task_is_1000_longer_explanations_from_installed_packages() -> None:
    task = sft_tasks.make_task("explain", seed=0)
    assert (len(task.train), len(task.eval)) == (1000, 64)
    texts = [row["messages"][2]["content"] for row in task.train + task.eval]
    assert all(120 <= len(t) <= 450 for t in texts)
    assert sum(map(len, texts)) / len(texts) > 2 * 80  # longer than task E's answers
    roots = {row["messages"][1]["content"].split()[2].split(".")[0] for row in task.train}
    assert roots <= {"numpy", "pandas", "networkx", "sympy", "matplotlib", "torch", "pyarrow"}
    assert len(roots) >= 5
