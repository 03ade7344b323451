"""Prompt/response (sft) and preference (dpo) examples: reading, the chat template, fitting to
train.seq_len, packing with segment ids and loss masks, and the built-in example files.

An example becomes a row of `train.seq_len + 1` tokens (inputs are row[:-1], targets row[1:], as
for pretraining) with three companions of the same shape:

* `segment_ids`: 1, 2, ... per example in the row, 0 for padding. Attention stays within a
  segment (research/models/attention.py), so packed examples never see each other.
* `positions`: restart at 0 with every segment (rotary positions as if each example were alone).
* `loss_mask`: 1 on the tokens the objective learns (response tokens and the eos after them),
  never on the first token of a segment (it has no context of its own to be predicted from).

sft rows hold as many examples as fit, in file order (`examples.pack`), or one each; dpo rows
come in pairs [N, 2, L+1]: the chosen and the rejected sequence of one preference example.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import json
import os
import sys
import sysconfig
import tempfile
import textwrap
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grain
import numpy as np

from research.config import ConfigError, DataConfig, ExperimentConfig
from research.data.corpus import Document, read_documents, source_files
from research.data.pipeline import checkpointable_iterator, shuffled_batches
from research.data.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
FIELDS = ("tokens", "segment_ids", "positions", "loss_mask")
BUILTIN_VERSION = 1  # bump when the derivation of the built-in examples changes
BUILTIN_MAX_CHARS = 1500  # functions longer than this are left out of the built-in examples

Segment = tuple[str, bool]  # (text, learned)


@dataclass(frozen=True)
class Examples:
    """Rows ready for batching (`FIELDS` -> int32 [N, L+1], or [N, 2, L+1] for dpo pairs) and
    what fitting them to the rows did (read, truncated, dropped examples; rows; learned tokens)."""

    rows: dict[str, np.ndarray]
    counts: dict[str, int]

    def summary(self) -> str:
        c = self.counts
        rows = "pairs of rows" if self.rows["tokens"].ndim == 3 else "rows"
        return (f"{c['examples']:,} examples read, {c['truncated']:,} truncated, {c['dropped']:,} "
                f"dropped, {c['rows']:,} {rows}, {c['learned_tokens']:,} learned tokens")


# ----------------------------------------------------------------------------- reading


def render_messages(messages: Any, where: str) -> list[Segment]:
    """Chat `messages` -> segments: each message is "<|role|>\\n" + content + "\\n", and only
    the assistant's content and its closing newline are learned."""
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    segments: list[Segment] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ConfigError(f"{where}: messages[{i}] is {type(message).__name__}, not an object")
        role, content = _field(message, "role", f"{where}: messages[{i}]"), \
            _field(message, "content", f"{where}: messages[{i}]")
        if role not in ROLES:
            raise ConfigError(f"{where}: messages[{i}].role {role!r} (allowed: {', '.join(ROLES)})")
        segments.append((f"<|{role}|>\n", False))
        segments.append((content + "\n", role == "assistant"))
    if not any(learned for _, learned in segments):
        raise ConfigError(f"{where}: 'messages' has no assistant message to learn from")
    return segments


def _field(record: dict, name: str, where: str) -> str:
    if name not in record:
        present = ", ".join(record) or "none"
        raise ConfigError(f"{where}: missing field {name!r} (fields: {present})")
    value = record[name]
    if not isinstance(value, str):
        raise ConfigError(f"{where}: field {name!r} is {type(value).__name__}, not a string")
    return value


def parse_sft(record: dict, where: str) -> list[Segment]:
    """A line with `messages` (the chat template) or `prompt` + `response` (concatenated)."""
    if "messages" in record:
        return render_messages(record["messages"], where)
    return [(_field(record, "prompt", where), False), (_field(record, "response", where), True)]


def parse_pair(record: dict, where: str) -> tuple[list[Segment], list[Segment]]:
    """A line with `prompt`, `chosen`, `rejected` -> the chosen and the rejected sequence."""
    prompt = _field(record, "prompt", where)
    chosen, rejected = _field(record, "chosen", where), _field(record, "rejected", where)
    return [(prompt, False), (chosen, True)], [(prompt, False), (rejected, True)]


def example_files(source: str) -> list[Path]:
    """The .jsonl files of examples.source (files, directories, globs; comma-separated)."""
    files: list[Path] = []
    for item in filter(None, (part.strip() for part in source.split(","))):
        path = Path(item).expanduser()
        for match in [path] if path.exists() else sorted(map(Path, glob.glob(str(path),
                                                                             recursive=True))):
            files += sorted(match.rglob("*.jsonl")) if match.is_dir() else [match]
    if not files:
        raise ConfigError(f"examples.source: no .jsonl files match {source!r}")
    for f in files:
        if f.suffix != ".jsonl":
            raise ConfigError(f"examples.source: {f} is not a .jsonl file")
    return list(dict.fromkeys(files))


def read_records(files: list[Path], field: str | None = "examples.source"
                 ) -> Iterator[tuple[dict, str]]:
    """(record, "field: file:line") for every non-blank line of JSONL files; malformed JSON or a
    line that is no JSON object is one clear error."""
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                where = f"{field}: {path}:{number}" if field else f"{path}:{number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"{where}: malformed JSON ({exc.msg})") from None
                if not isinstance(record, dict):
                    raise ConfigError(f"{where}: expected a JSON object, got "
                                      f"{type(record).__name__}")
                yield record, where


# ----------------------------------------------------------------------------- tokens and rows


def encode(segments: list[Segment], tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Segments -> (ids, learned) with eos appended (learned when the last segment is); each
    segment is tokenized on its own, so a learned span never shares a token with the prompt."""
    ids = [tokenizer.encode(text) for text, _ in segments] + [np.array([tokenizer.eos_id])]
    learned = [np.full(len(part), flag) for part, (_, flag) in zip(ids, segments)]
    learned.append(np.array([segments[-1][1]]))
    return np.concatenate(ids).astype(np.int32), np.concatenate(learned).astype(np.int32)


def fit(ids: np.ndarray, learned: np.ndarray, limit: int, overlong: str
        ) -> tuple[np.ndarray, np.ndarray] | None:
    """The example cut to `limit` tokens (overlong=truncate) or None (overlong=drop, or nothing
    learnable left after the cut)."""
    if len(ids) > limit:
        if overlong == "drop":
            return None
        ids, learned = ids[:limit], learned[:limit]
    return (ids, learned) if learned[1:].any() else None


def pack(examples: list[tuple[np.ndarray, np.ndarray]], length: int, pad_id: int,
         packed: bool) -> dict[str, np.ndarray]:
    """Examples -> rows of `length` tokens: greedily in order, as many per row as fit (packed)
    or one per row; the rest of a row is padding (segment 0, nothing learned)."""
    groups: list[list[tuple[np.ndarray, np.ndarray]]] = []
    used = length
    for example in examples:
        if packed and used + len(example[0]) <= length:
            groups[-1].append(example)
            used += len(example[0])
        else:
            groups.append([example])
            used = len(example[0])
    rows = {name: np.zeros((len(groups), length), np.int32) for name in FIELDS}
    rows["tokens"][:] = pad_id
    for r, group in enumerate(groups):
        start = 0
        for segment, (ids, learned) in enumerate(group, start=1):
            span = slice(start, start + len(ids))
            rows["tokens"][r, span] = ids
            rows["segment_ids"][r, span] = segment
            rows["positions"][r, span] = np.arange(len(ids))
            rows["loss_mask"][r, span] = learned
            rows["loss_mask"][r, start] = 0
            start += len(ids)
    return rows


def load_examples(cfg: ExperimentConfig, tokenizer: Tokenizer) -> Examples:
    """examples.source read, tokenized and fitted into rows for train.objective (sft or dpo)."""
    dpo = cfg.train.objective == "dpo"
    source = cfg.examples.source
    files = [builtin_examples(cfg.data)[cfg.train.objective]] if source == "builtin" else \
        example_files(source)
    length, overlong = cfg.train.seq_len + 1, cfg.examples.overlong
    counts = dict(examples=0, truncated=0, dropped=0)
    kept: list[tuple[np.ndarray, np.ndarray]] = []
    for record, where in read_records(files):
        sequences = parse_pair(record, where) if dpo else (parse_sft(record, where),)
        encoded = [encode(segments, tokenizer) for segments in sequences]
        fitted = [fit(ids, learned, length, overlong) for ids, learned in encoded]
        counts["examples"] += 1
        if any(f is None for f in fitted):
            counts["dropped"] += 1
            continue
        counts["truncated"] += any(len(ids) > length for ids, _ in encoded)
        kept += fitted
    rows = pack(kept, length, tokenizer.eos_id, cfg.examples.pack and not dpo)
    if dpo:  # consecutive rows are (chosen, rejected): pair them up
        rows = {name: a.reshape(-1, 2, length) for name, a in rows.items()}
    counts.update(rows=len(rows["tokens"]), learned_tokens=int(rows["loss_mask"].sum()))
    if counts["rows"] < cfg.train.batch_size:
        raise ConfigError(f"examples.source: {counts['rows']} rows of train.seq_len+1={length} "
                          f"tokens ({', '.join(map(str, files))}), fewer than train.batch_size="
                          f"{cfg.train.batch_size}")
    return Examples(rows, counts)


def example_dataset(examples: Examples, *, global_batch: int, seed: int, process_index: int = 0,
                    process_count: int = 1) -> grain.MapDataset:
    """Element k: this process's rows of global batch k, shuffled per epoch like the windows."""
    def read(indices: np.ndarray) -> dict[str, np.ndarray]:
        return {name: rows[indices] for name, rows in examples.rows.items()}

    return shuffled_batches(len(examples.rows["tokens"]), read, global_batch=global_batch,
                            seed=seed, process_index=process_index, process_count=process_count)


def example_iterator(examples: Examples, **kwargs: Any) -> grain.DatasetIterator:
    """A checkpointable iterator over `example_dataset` (same state as the token iterator)."""
    return checkpointable_iterator(example_dataset(examples, **kwargs))


# ----------------------------------------------------------------------------- built-in examples


def _function_examples(text: str) -> Iterator[tuple[str, str]]:
    """(signature + docstring, body) of every documented function with a body in a module."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):  # the stdlib ships a few deliberately broken files
        return
    lines = text.splitlines(keepends=True)
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(node.body) < 2 \
                or ast.get_docstring(node) is None:
            continue
        doc_end = node.body[0].end_lineno
        if node.body[1].lineno <= doc_end:  # body on the docstring's line
            continue
        function = textwrap.dedent("".join(lines[node.lineno - 1:node.end_lineno]))
        if len(function) > BUILTIN_MAX_CHARS:
            continue
        split = function.splitlines(keepends=True)
        cut = doc_end - node.lineno + 1
        prompt, body = "".join(split[:cut]), "".join(split[cut:])
        if body.strip():
            yield prompt, body


def _corrupt(body: str) -> str | None:
    """The body's lines in reverse order (a plausible-looking but wrong answer), or None when
    that changes nothing."""
    lines = body.splitlines(keepends=True)
    lines[-1] = lines[-1] if lines[-1].endswith("\n") else lines[-1] + "\n"
    reversed_body = "".join(reversed(lines))
    return reversed_body if reversed_body != "".join(lines) else None


def derive_examples(out: Path, documents: Iterable[Document] | None = None) -> dict[str, Path]:
    """Write out/sft.jsonl (prompt = a function's signature and docstring, response = its
    body) and out/dpo.jsonl (chosen = the body, rejected = its lines reversed) from Python
    `documents` (default: the built-in corpus), each file written atomically. Deterministic."""
    if documents is None:
        documents = read_documents(source_files("builtin"), "text")
    out.mkdir(parents=True, exist_ok=True)
    sft, dpo = [], []
    for doc in documents:
        for prompt, body in _function_examples(doc.text):
            sft.append(json.dumps({"prompt": prompt, "response": body}))
            rejected = _corrupt(body)
            if rejected is not None:
                dpo.append(json.dumps({"prompt": prompt, "chosen": body, "rejected": rejected}))
    paths = {"sft": out / "sft.jsonl", "dpo": out / "dpo.jsonl"}
    for name, lines in (("sft", sft), ("dpo", dpo)):
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=out)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, paths[name])
    return paths


def builtin_examples(data: DataConfig) -> dict[str, Path]:
    """The built-in example files, derived on first use under data.cache_dir (keyed by this
    Python's version and standard-library path, which decide their content)."""
    out = builtin_cache_dir(data, "examples", BUILTIN_VERSION)
    paths = {"sft": out / "sft.jsonl", "dpo": out / "dpo.jsonl"}
    if not all(p.is_file() for p in paths.values()):
        derive_examples(out)
    return paths


def builtin_cache_dir(data: DataConfig, kind: str, version: int) -> Path:
    """Where files derived from the standard library are kept under data.cache_dir: keyed by
    the derivation's version, this Python's version and standard-library path, which decide
    their content."""
    stdlib = sysconfig.get_paths()["stdlib"]
    key = hashlib.sha256(json.dumps([version, sys.version, stdlib]).encode()).hexdigest()
    return Path(data.cache_dir).expanduser() / f"{kind}-{key[:16]}"
