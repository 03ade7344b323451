"""Ranked-choice tasks: the JSONL format, its validation, and the built-in tasks.

A task is a JSONL file, one item per line: `{"context": "...", "choices": ["...", "..."],
"label": 1}` (optionally `"id"`). A choice is scored as the continuation of the context exactly as
written (no separator is added). A task's name is its file's name without `.jsonl`.

The built-in tasks are derived from the standard library's source, from the documents that the
default data split holds out (data.heldout_percent=2), so a model trained on the built-in corpus
with that split has not seen them. Each has `ITEMS` items and a known chance level.
"""

from __future__ import annotations

import ast
import io
import json
import keyword
import os
import random
import tempfile
import tokenize
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from research.config import ConfigError, DataConfig
from research.data.corpus import Document, is_heldout, read_documents, source_files
from research.data.examples import builtin_cache_dir, read_records

BUILTIN_VERSION = 2  # bump when the derivation of the built-in tasks changes
ITEMS = 200  # items per built-in task
CONTEXT_LINES = 6  # lines of code before the point a built-in item asks about
CONTEXT_CHARS = 300  # ... cut to at most this many characters (whole lines)
BRACKETS = (")", "]", "}")


@dataclass(frozen=True)
class Item:
    context: str
    choices: tuple[str, ...]
    label: int
    id: str | None = None


@dataclass(frozen=True)
class Task:
    name: str
    items: tuple[Item, ...]

    @property
    def chance(self) -> float:
        """Expected accuracy of a uniform random pick."""
        return sum(1 / len(item.choices) for item in self.items) / len(self.items)


# ----------------------------------------------------------------------------- reading


def _item(record: dict, where: str) -> Item:
    for name in ("context", "choices", "label"):
        if name not in record:
            raise ConfigError(f"{where}: missing field {name!r} (an item has context, choices, "
                              "label and optionally id)")
    context, choices, label = record["context"], record["choices"], record["label"]
    if not isinstance(context, str):
        raise ConfigError(f"{where}: 'context' must be a string")
    if not isinstance(choices, list) or not all(isinstance(c, str) and c for c in choices):
        raise ConfigError(f"{where}: 'choices' must be a list of non-empty strings")
    if len(choices) < 2:
        raise ConfigError(f"{where}: {len(choices)} choice(s); an item needs at least 2")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        raise ConfigError(f"{where}: label {label!r} is not an index of the {len(choices)} "
                          f"choices (0..{len(choices) - 1})")
    item_id = record.get("id")
    return Item(context, tuple(choices), label, None if item_id is None else str(item_id))


def read_task(path: Path) -> Task:
    """A task file; malformed lines and invalid items are one ConfigError naming file:line."""
    items = [_item(record, where) for record, where in read_records([path], field=None)]
    if not items:
        raise ConfigError(f"{path}: empty task (no items)")
    return Task(path.name.removesuffix(".jsonl"), tuple(items))


def task_files(spec: str, data: DataConfig, field: str = "eval.tasks") -> list[Path]:
    """The files of a task spec: comma-separated 'builtin' (all built-in tasks), built-in task
    names, folders (their *.jsonl) and .jsonl files."""
    builtin = builtin_tasks(data) if any(part.strip() == "builtin" or part.strip() in TASKS
                                         for part in spec.split(",")) else {}
    files: list[Path] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        path = Path(part).expanduser()
        if part == "builtin":
            files += builtin.values()
        elif part in TASKS:
            files.append(builtin[part])
        elif path.is_dir():
            found = sorted(path.glob("*.jsonl"))
            if not found:
                raise ConfigError(f"{field}: {path} holds no .jsonl task files")
            files += found
        elif path.is_file() and path.suffix == ".jsonl":
            files.append(path)
        else:
            raise ConfigError(f"{field}: unknown task {part!r} (allowed: builtin, a built-in "
                              f"task ({', '.join(TASKS)}), a folder of .jsonl files or a "
                              ".jsonl file)")
    if not files:
        raise ConfigError(f"{field}: {spec!r} names no tasks")
    files = list(dict.fromkeys(files))
    names = [f.name for f in files]
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"{field}: two tasks named {twice.removesuffix('.jsonl')!r}; a task's "
                          "name is its file's name")
    return files


def load_tasks(spec: str, data: DataConfig, field: str = "eval.tasks") -> list[Task]:
    return [read_task(path) for path in task_files(spec, data, field)]


# ----------------------------------------------------------------------------- built-in tasks


def _context(lines: list[str], end: int, tail: str = "") -> str:
    """Up to CONTEXT_LINES whole lines before line `end` (and `tail`, the start of line `end`),
    at most CONTEXT_CHARS characters."""
    before = lines[max(0, end - CONTEXT_LINES):end]
    while before and sum(map(len, before)) + len(tail) > CONTEXT_CHARS:
        before = before[1:]
    return "".join(before) + tail


def _tokens(text: str) -> list[tokenize.TokenInfo]:
    try:
        return list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return []


Point = tuple[str, str]  # (context, the true answer)
Choices = tuple[list[str], int]  # (choices, index of the true one)


def _next_line_points(doc: Document) -> Iterator[Point]:
    """(context, the next line) at every code line of 12+ characters after the first few."""
    lines = doc.text.splitlines(keepends=True)
    for i in range(CONTEXT_LINES, len(lines)):
        line = lines[i]
        if len(line.strip()) >= 12 and line.endswith("\n") and not line.lstrip().startswith("#"):
            yield _context(lines, i), line


def _word_order_points(doc: Document) -> Iterator[Point]:
    """Next lines (as _next_line_points) of 4 or more words with one space between each (so
    every order of the words is as long as the line)."""
    for context, line in _next_line_points(doc):
        words = line.split()
        if len(words) >= 4 and line.lstrip() == " ".join(words) + "\n":
            yield context, line


def _identifier_points(doc: Document) -> Iterator[Point]:
    """(text up to a name of 4+ characters that the context already holds, the name)."""
    lines = doc.text.splitlines(keepends=True)
    for token in _tokens(doc.text):
        row, col = token.start
        if token.type == tokenize.NAME and len(token.string) >= 4 and \
                not keyword.iskeyword(token.string):
            context = _context(lines, row - 1, lines[row - 1][:col])
            if token.string in context:
                yield context, token.string


def _closing_points(doc: Document) -> Iterator[Point]:
    """(text up to a closing bracket, the bracket), for brackets of code (not in strings)."""
    lines = doc.text.splitlines(keepends=True)
    for token in _tokens(doc.text):
        if token.type == tokenize.OP and token.string in BRACKETS:
            row, col = token.start
            yield _context(lines, row - 1, lines[row - 1][:col]), token.string


def _shuffled(choices: list[str], answer: str, rng: random.Random) -> Choices:
    rng.shuffle(choices)
    return choices, choices.index(answer)


def _other_answers(point: Point, answers: list[str], rng: random.Random) -> Choices | None:
    """The answer and 3 answers of other points that the context does not hold."""
    context, answer = point
    wrong = [a for a in rng.sample(answers, 12) if a != answer and a not in context][:3]
    return _shuffled([answer, *wrong], answer, rng) if len(wrong) == 3 else None


def _word_orders(point: Point, answers: list[str], rng: random.Random) -> Choices | None:
    """The line and 3 other orders of its words (same characters, same length)."""
    line = point[1]
    indent, words = line[:len(line) - len(line.lstrip())], line.split()
    orders: set[str] = set()
    for _ in range(30):
        rng.shuffle(words)
        orders.add(indent + " ".join(words) + "\n")
    orders.discard(line)
    return _shuffled([line, *sorted(orders)[:3]], line, rng) if len(orders) >= 3 else None


def _fixed(labels: tuple[str, ...]) -> Callable[[Point, list[str], random.Random], Choices]:
    return lambda point, answers, rng: (list(labels), labels.index(point[1]))


@dataclass(frozen=True)
class Builtin:
    """A built-in task: what it measures, its chance level, where its points are, and how a
    point becomes choices; `balanced` answers (fixed choices) come as often as each other."""

    about: str
    chance: str
    points: Callable[[Document], Iterator[Point]]
    choices: Callable[[Point, list[str], random.Random], Choices | None]
    balanced: tuple[str, ...] = ()


BUILTIN = {
    "word_order": Builtin("the next line of code among 4 orders of its words", "1/4",
                          _word_order_points, _word_orders),
    "identifier": Builtin("the name that comes next, which the context already holds, among 4 "
                          "(3 names from elsewhere)", "1/4", _identifier_points, _other_answers),
    "closing": Builtin("the bracket that comes next: ), ] or } (as many of each)", "1/3",
                       _closing_points, _fixed(BRACKETS), BRACKETS),
    "next_line": Builtin("the next line of code among 4 (3 lines from elsewhere)", "1/4",
                         _next_line_points, _other_answers),
}
TASKS = tuple(BUILTIN)


def _quota(task: Builtin) -> dict[str | None, int]:
    """Items wanted per answer (None: any answer)."""
    if task.balanced:
        return {label: -(-ITEMS // len(task.balanced)) for label in task.balanced}
    return {None: ITEMS}


def _items(task: Builtin, preferred: list[Point], others: list[Point], rng: random.Random
           ) -> tuple[list[tuple[str, list[str], int]], int]:
    """ITEMS items from `preferred` points (at random), topped up from `others`; and how many
    came from `preferred`."""
    answers = sorted({answer for _, answer in preferred + others})
    items: list[tuple[str, list[str], int, bool]] = []
    for label, wanted in _quota(task).items():
        found = 0
        for pool in (preferred, others):
            candidates = [p for p in pool if label is None or p[1] == label]
            rng.shuffle(candidates)
            for point in candidates:
                if found == wanted:
                    break
                choices = task.choices(point, answers, rng)
                if choices is not None:
                    items.append((point[0], *choices, pool is preferred))
                    found += 1
    rng.shuffle(items)
    items = items[:ITEMS]
    return [item[:3] for item in items], sum(item[3] for item in items)


def derive_tasks(out: Path, documents: Iterable[Document] | None = None
                 ) -> dict[str, tuple[Path, int]]:
    """Write out/<task>.jsonl for each built-in task; returns each task's path and how many of
    its items come from held-out documents. Items come from the built-in corpus's held-out
    documents (default split), topped up from the others (in a fixed shuffled order) where
    those hold too few; or, given `documents`, from those alone. Deterministic; each file is
    written atomically."""
    if documents is None:
        split = DataConfig()
        files = source_files(split.source)
        preferred = list(read_documents([f for f in files
                                         if is_heldout(f.doc_id, split.heldout_percent)], "text"))
        rest = [f for f in files if not is_heldout(f.doc_id, split.heldout_percent)]
        random.Random(BUILTIN_VERSION).shuffle(rest)
        others: Iterator[Document] = read_documents(rest, "text")
    else:
        preferred, others = list(documents), iter(())
    found = {name: [p for doc in preferred for p in task.points(doc)]
             for name, task in BUILTIN.items()}
    extra: dict[str, list[Point]] = {name: [] for name in BUILTIN}

    def short() -> bool:  # (2x: some points make no item)
        return any(sum(label is None or p[1] == label for p in found[name] + extra[name]) < 2 * n
                   for name, task in BUILTIN.items() for label, n in _quota(task).items())

    for doc in others:  # read the rest of the corpus only as far as needed
        if not short():
            break
        for name, task in BUILTIN.items():
            extra[name] += task.points(doc)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, task in BUILTIN.items():
        rng = random.Random(f"{name}-{BUILTIN_VERSION}")
        items, heldout = _items(task, found[name], extra[name], rng)
        lines = [json.dumps({"id": f"{name}-{i}", "context": context, "choices": choices,
                             "label": label}) for i, (context, choices, label) in enumerate(items)]
        path = out / f"{name}.jsonl"
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=out)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, path)
        written[name] = (path, heldout)
    return written


def harness_yaml(name: str, data_file: Path) -> str:
    """An lm-evaluation-harness task over a task file, scoring the same strings as the in-loop
    evaluator: the context, then each choice with nothing between (target_delimiter "")."""
    return f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(data_file.resolve()))}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1
"""


def builtin_tasks(data: DataConfig) -> dict[str, Path]:
    """The built-in task files, derived on first use under data.cache_dir."""
    out = builtin_cache_dir(data, "tasks", BUILTIN_VERSION)
    paths = {name: out / f"{name}.jsonl" for name in TASKS}
    if not all(p.is_file() for p in paths.values()):
        derive_tasks(out)
    return paths
