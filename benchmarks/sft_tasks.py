"""Deterministic synthetic SFT tasks in chat format, each with a held-out eval split (no hub).

    facts     (task A) facts about invented countries: capital, founding year, national animal,
              main export. Train asks each fact in three phrasings; eval asks a sample of the same
              facts in a fourth phrasing never trained on, so the eval loss measures facts
              learned, not question templates memorised.
    reversal  (task B) reverse a comma-separated list of 3-6 common words. Eval lists never
              occur in train, so the eval loss measures the skill, not memorised lists.
    sums      (task C) add two two-digit numbers, answered as a sentence. Eval pairs never occur
              in train; a 135M model does not master addition in a few dozen steps, so the eval
              loss stays well above 0 and ratios between losses mean something.
    docs      (task D, two halves "docs-a" and "docs-b") natural English: asked what a public
              function or class of a Python standard-library module does, answer with the
              summary of its docstring. The modules are split in two halves (alternately, in
              a fixed order), so docs-b's functions, and its modules, are never seen when
              training on docs-a; within a half, eval items never occur in train. Real text has
              an entropy floor, so the eval loss stays well above 0, like a real SFT set's.

    chat      (task E, ~100 examples) short chat answers, one or two turns: what an HTTP status
              code (`http.HTTPStatus`) or an errno code (`errno`, `os.strerror`) means, asked in
              a few phrasings; a second turn asks about another code. 100 training and 28 eval
              conversations (~150 characters each), no code of an eval conversation in train.
    explain   (task F, ~1,000 examples) longer explanations: "Explain what NAME does" answered
              with the opening paragraphs of its docstring (120-450 characters, two or more
              sentences) from installed packages (numpy, pandas, networkx, sympy, matplotlib,
              torch.nn, pyarrow); 1,000 training and 64 eval items, eval items never trained on.
              No standard-library docstring, so nothing of task D's.

Every example has the same short system message: SmolLM2's template otherwise adds its 13-token
default one, and on a CPU every token of a step costs time. The same seed gives the same files.
"""

from __future__ import annotations

import errno
import http
import importlib
import inspect
import json
import os
import random
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path

SYSTEM = "Answer briefly."

SYLLABLES = (
    "vel tra qu or in zan mer kol thi bar sen dru pal ost ri var nek lum sa dor fen gri hal "
    "mob tes ul yr cas pin".split()
)
ANIMALS = "otter heron lynx ibex falcon badger stag crane wolf hare owl bison".split()
EXPORTS = "copper saffron amber timber salt wool tin indigo honey marble cork silk".split()
# Per attribute: four question phrasings (the last one is eval-only) and the answer.
FACT_TEMPLATES = {
    "capital": (
        (
            "What is the capital of {e}?",
            "Which city is the capital of {e}?",
            "Name the capital city of {e}.",
            "{e} has its seat of government in which city?",
        ),
        "The capital of {e} is {v}.",
    ),
    "founded": (
        (
            "When was {e} founded?",
            "In what year was {e} founded?",
            "What is the founding year of {e}?",
            "Tell me the year {e} came into being.",
        ),
        "{e} was founded in {v}.",
    ),
    "animal": (
        (
            "What is the national animal of {e}?",
            "Which animal is the emblem of {e}?",
            "Name the national animal of {e}.",
            "What creature symbolises {e}?",
        ),
        "The national animal of {e} is the {v}.",
    ),
    "export": (
        (
            "What is the main export of {e}?",
            "What does {e} mostly export?",
            "Name the chief export of {e}.",
            "Which product does {e} sell abroad the most?",
        ),
        "The main export of {e} is {v}.",
    ),
}
WORDS = (
    "apple river stone cloud maple tiger lemon candle harbor pencil violin garden marble rocket "
    "forest planet silver window basket copper dragon meadow pepper island lantern orange "
    "thunder saddle bottle castle feather mirror button jacket ladder monkey needle pillow "
    "rabbit shadow summer winter carpet circle dinner engine finger hammer kettle pocket"
).split()


@dataclass(frozen=True)
class Task:
    name: str
    train: list[dict]
    eval: list[dict]


def chat(question: str, answer: str) -> dict:
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    }


def invented_names(rng: random.Random, count: int, syllables: int) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choice(SYLLABLES) for _ in range(syllables)).capitalize()
        if name not in names:
            names.append(name)
    return names


def facts_task(seed: int = 0, entities: int = 20, eval_size: int = 32) -> Task:
    """Task A: 4 facts per invented country; train 3 phrasings each, eval a 4th phrasing."""
    rng = random.Random(f"facts-{seed}")
    countries = invented_names(rng, entities, 3)
    cities = invented_names(rng, entities + len(countries), 2)
    cities = [c for c in cities if c not in countries][:entities]
    facts = []
    for country, city in zip(countries, cities, strict=True):
        values = {
            "capital": city,
            "founded": str(rng.randrange(1100, 1900)),
            "animal": rng.choice(ANIMALS),
            "export": rng.choice(EXPORTS),
        }
        facts += [(country, attribute, value) for attribute, value in values.items()]
    train = []
    for country, attribute, value in facts:
        questions, answer = FACT_TEMPLATES[attribute]
        for question in questions[:-1]:
            train.append(chat(question.format(e=country), answer.format(e=country, v=value)))
    rng.shuffle(train)
    held_out = []
    for country, attribute, value in rng.sample(facts, min(eval_size, len(facts))):
        questions, answer = FACT_TEMPLATES[attribute]
        held_out.append(chat(questions[-1].format(e=country), answer.format(e=country, v=value)))
    return Task("facts", train, held_out)


def reversal_task(seed: int = 0, train_size: int = 240, eval_size: int = 32) -> Task:
    """Task B: reverse a list of 3-6 words; eval lists never appear in train."""
    rng = random.Random(f"reversal-{seed}")
    seen: set[tuple[str, ...]] = set()
    examples = []
    while len(examples) < train_size + eval_size:
        words = tuple(rng.sample(WORDS, rng.randint(3, 6)))
        if words in seen:
            continue
        seen.add(words)
        question = "Reverse the order of these words: " + ", ".join(words)
        examples.append(chat(question, ", ".join(reversed(words))))
    return Task("reversal", examples[:train_size], examples[train_size:])


def sums_task(seed: int = 0, train_size: int = 240, eval_size: int = 32) -> Task:
    """Task C: add two two-digit numbers; eval pairs (in either order) never appear in train."""
    rng = random.Random(f"sums-{seed}")
    seen: set[frozenset[int]] = set()
    examples = []
    while len(examples) < train_size + eval_size:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if frozenset((a, b)) in seen:
            continue
        seen.add(frozenset((a, b)))
        examples.append(chat(f"What is {a} + {b}?", f"{a} + {b} = {a + b}."))
    return Task("sums", examples[:train_size], examples[train_size:])


# Standard-library modules for task D, in a fixed order: docs-a takes the even positions,
# docs-b the odd ones. The texts are those of the running Python (3.11 here and in CI).
DOC_MODULES = (
    "os json re collections itertools functools pathlib string textwrap shutil subprocess math "
    "statistics random datetime time calendar csv sqlite3 zipfile tarfile gzip hashlib base64 "
    "heapq bisect copy pprint urllib.parse http.client email.utils logging argparse tempfile "
    "glob fnmatch struct array decimal fractions uuid socket threading queue asyncio contextlib "
    "dataclasses enum typing inspect ast dis tokenize difflib unicodedata codecs io pickle shelve "
    "configparser platform sys warnings weakref operator secrets html xml.etree.ElementTree"
).split()
DOC_MAX_CHARS = 240  # one or two sentences: about 50 tokens


def docstring_summary(obj: object) -> str | None:
    """The first paragraph of obj's docstring on one line, cut to whole sentences within
    DOC_MAX_CHARS; None when there is none (or it only repeats the signature)."""
    paragraphs = [p for p in (inspect.getdoc(obj) or "").split("\n\n") if p.strip()]
    name = getattr(obj, "__name__", "")
    if paragraphs and re.match(rf"{re.escape(name)}\(", paragraphs[0]):
        paragraphs = paragraphs[1:]  # a builtin's signature line
    if not paragraphs:
        return None
    text = " ".join(paragraphs[0].split())
    if len(text) > DOC_MAX_CHARS:
        sentences = re.split(r"(?<=[.!?])\s+", text)
        text = sentences[0]
        for sentence in sentences[1:]:
            if len(text) + 1 + len(sentence) > DOC_MAX_CHARS:
                break
            text += " " + sentence
    return text if 20 <= len(text) <= DOC_MAX_CHARS else None


def doc_items(modules: list[str]) -> list[tuple[str, str, str]]:
    """(module, name, summary) for the public functions and classes each module defines; a
    summary shared by several items (inherited boilerplate) is dropped from all of them."""
    items = []
    for module_name in modules:
        module = importlib.import_module(module_name)
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or not (inspect.isroutine(obj) or inspect.isclass(obj)):
                continue
            if getattr(obj, "__module__", None) != module.__name__ and module_name != "os":
                continue  # imported from elsewhere (os re-exports posix: keep those)
            summary = docstring_summary(obj)
            if summary is not None:
                items.append((module_name, name, summary))
    counts: dict[str, int] = {}
    for _, _, summary in items:
        counts[summary] = counts.get(summary, 0) + 1
    return [item for item in items if counts[item[2]] == 1]


def docs_task(seed: int = 0, half: str = "a", train_size: int = 400, eval_size: int = 64) -> Task:
    """Task D: what does MODULE.NAME do? → its docstring summary; one half of DOC_MODULES."""
    modules = DOC_MODULES[{"a": 0, "b": 1}[half] :: 2]
    items = doc_items(modules)
    rng = random.Random(f"docs-{half}-{seed}")
    rng.shuffle(items)
    if len(items) < train_size + eval_size:
        raise ValueError(f"docs-{half} has {len(items)} items, fewer than {train_size + eval_size}")
    examples = [
        chat(f"What does {name} in Python's {module} module do?", summary)
        for module, name, summary in items[: train_size + eval_size]
    ]
    return Task(f"docs-{half}", examples[:train_size], examples[train_size:])


def http_items() -> list[tuple[str, str, str]]:
    """(key, question, answer) for each HTTP status with a description."""
    phrasings = (
        "My server answered with HTTP {c}. What does that mean?",
        "What is HTTP status code {c}?",
        "I got a {c} from an API. What is it?",
    )
    items = []
    for index, status in enumerate(http.HTTPStatus):
        if not status.description:
            continue
        answer = f"{status.value} {status.phrase}: {status.description[0].lower()}"
        answer += status.description[1:].rstrip(".") + "."
        question = phrasings[index % len(phrasings)].format(c=status.value)
        items.append((f"http-{status.value}", question, answer))
    return items


def errno_items() -> list[tuple[str, str, str]]:
    """(key, question, answer) for each errno code of this system."""
    phrasings = (
        "What does the error {n} mean?",
        "My program failed with {n}. What is that?",
        "What is errno {c} ({n})?",
    )
    items = []
    for index, (code, name) in enumerate(sorted(errno.errorcode.items())):
        question = phrasings[index % len(phrasings)].format(n=name, c=code)
        items.append((f"errno-{code}", question, f"{name} is error {code}: {os.strerror(code)}."))
    return items


FOLLOW_UPS = ("And {k}?", "What about {k}?", "And what does {k} mean?")


def chat_task(seed: int = 0, train_size: int = 100, eval_size: int = 28) -> Task:
    """Task E: conversations of one or two turns about HTTP status and errno codes (each from
    the kind with more codes left); every third conversation has a second turn about another
    code of the same kind. Each code is used once."""
    rng = random.Random(f"chat-{seed}")
    pools = [http_items(), errno_items()]
    for pool in pools:
        rng.shuffle(pool)
    conversations = []
    while len(conversations) < train_size + eval_size:
        pool = max(pools, key=len)  # the kind with more codes left
        if len(pool) < 2:
            raise ValueError(f"chat: too few codes for {train_size + eval_size} conversations")
        _, question, answer = pool.pop()
        messages = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
        if len(conversations) % 3 == 2:
            _, _, second = pool.pop()
            follow = FOLLOW_UPS[len(conversations) % len(FOLLOW_UPS)]
            code = second.split(" ")[0]
            messages += [
                {"role": "user", "content": follow.format(k=code)},
                {"role": "assistant", "content": second},
            ]
        conversations.append({"messages": messages})
    return Task("chat", conversations[:train_size], conversations[train_size:])


# Packages for task F, and the sections that end a docstring's explanation.
EXPLAIN_MODULES = (
    "numpy numpy.random numpy.ma pandas networkx networkx.algorithms.approximation "
    "networkx.algorithms.community networkx.algorithms.bipartite networkx.algorithms.flow sympy "
    "sympy.combinatorics sympy.ntheory matplotlib.pyplot matplotlib.colors torch.nn pyarrow"
).split()
SECTION = re.compile(
    r"^(Parameters|Returns|Yields|Examples?|See Also|Notes|References|Raises|Attributes|Methods"
    r"|Warnings?|Other Parameters|Args|Arguments|Keyword Arguments|Explanation|Usage)\s*:?\s*$"
)
EXPLAIN_MIN_CHARS, EXPLAIN_MAX_CHARS = 120, 450


def explanation(obj: object) -> str | None:
    """The opening paragraphs of obj's docstring, up to its first section (Parameters, an
    example, a rule line), joined while within EXPLAIN_MAX_CHARS; None unless that is 120-450
    characters of two or more sentences without markup."""
    lines = []
    for line in (inspect.getdoc(obj) or "").splitlines():
        text = line.strip()
        if (
            SECTION.match(text)
            or text.startswith((">>>", ".."))
            or (text and set(text) <= set("-=~"))
        ):
            break
        lines.append(line)
    paragraphs = [" ".join(p.split()) for p in "\n".join(lines).split("\n\n") if p.strip()]
    name = getattr(obj, "__name__", "")
    if paragraphs and re.match(rf"{re.escape(name)}\(", paragraphs[0]):
        paragraphs = paragraphs[1:]  # a signature line
    if not paragraphs:
        return None
    text = paragraphs[0]
    for paragraph in paragraphs[1:]:
        if len(text) + 1 + len(paragraph) > EXPLAIN_MAX_CHARS:
            break
        text += " " + paragraph
    text = text.replace("`", "")
    sentences = len(re.findall(r"[.!?](\s|$)", text))
    if sentences < 2 or not EXPLAIN_MIN_CHARS <= len(text) <= EXPLAIN_MAX_CHARS:
        return None
    return None if any(c in text for c in "$\\{}|<>*[]") else text


def explain_items() -> list[tuple[str, str]]:
    """(qualified name, explanation) for the public functions, classes and class methods that
    EXPLAIN_MODULES define; an explanation shared by several names is dropped from all."""
    items: dict[str, str] = {}
    seen: set[tuple[object, str]] = set()
    for module_name in EXPLAIN_MODULES:
        module = importlib.import_module(module_name)
        root = module_name.split(".")[0]
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or not (inspect.isroutine(obj) or inspect.isclass(obj)):
                continue
            if not str(getattr(obj, "__module__", "")).startswith(root):
                continue
            candidates = [(f"{module_name}.{name}", obj)]
            if inspect.isclass(obj):
                candidates += [
                    (f"{module_name}.{name}.{attr}", value)
                    for attr, value in inspect.getmembers(obj, inspect.isroutine)
                    if not attr.startswith("_")
                ]
            for qualified, value in candidates:
                # One object reached under several names counts once. Not by id(): a bound
                # method is a new object at each access, and ids of freed ones are reused.
                key = (
                    getattr(value, "__module__", None),
                    getattr(value, "__qualname__", qualified),
                )
                if key in seen or qualified in items:
                    continue
                seen.add(key)
                text = explanation(value)
                if text is not None:
                    items[qualified] = text
    counts: dict[str, int] = {}
    for text in items.values():
        counts[text] = counts.get(text, 0) + 1
    return [(name, text) for name, text in sorted(items.items()) if counts[text] == 1]


def explain_task(seed: int = 0, train_size: int = 1000, eval_size: int = 64) -> Task:
    """Task F: explain what NAME does → the opening of its docstring."""
    items = explain_items()
    rng = random.Random(f"explain-{seed}")
    rng.shuffle(items)
    if len(items) < train_size + eval_size:
        raise ValueError(f"explain has {len(items)} items, fewer than {train_size + eval_size}")
    examples = [
        chat(f"Explain what {name} does.", text) for name, text in items[: train_size + eval_size]
    ]
    return Task("explain", examples[:train_size], examples[train_size:])


TASKS = {
    "facts": facts_task,
    "reversal": reversal_task,
    "sums": sums_task,
    "docs-a": partial(docs_task, half="a"),
    "docs-b": partial(docs_task, half="b"),
    "chat": chat_task,
    "explain": explain_task,
}
# How the benchmarks name each task in their tables and reports ("task " + label).
LABELS = {
    "facts": "A (facts)",
    "reversal": "B (reversal)",
    "sums": "C (sums)",
    "docs-a": "D half a (docs, the calibration task)",
    "docs-b": "D half b (docs, held out: other modules)",
    "chat": "E (chat: 100 short one- or two-turn answers)",
    "explain": "F (explain: 1,000 longer explanations)",
}


def make_task(name: str, seed: int = 0, scale: int = 1) -> Task:
    """Task `name` with `scale` × its usual training set (facts: `scale` × 20 countries)."""
    if name == "facts":
        return facts_task(seed, entities=20 * scale)
    if name.startswith("docs-"):
        return TASKS[name](seed, train_size=400 * scale)
    if name in ("chat", "explain"):
        return TASKS[name](seed)  # their sizes are what they test
    return TASKS[name](seed, train_size=240 * scale)


def write_task(task: Task, folder: str | Path) -> tuple[str, str]:
    """Write FOLDER/<name>-train.jsonl and <name>-eval.jsonl; return both paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, rows in (("train", task.train), ("eval", task.eval)):
        path = folder / f"{task.name}-{split}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        paths.append(str(path))
    return paths[0], paths[1]
