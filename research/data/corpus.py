"""Document sources: the built-in corpus and .txt/.jsonl/.parquet files, in a deterministic order.

A document is an id and its text. Ids are stable across machines (paths relative to the
source's fixed directory, never absolute), because they decide the held-out split and feed the
token cache key.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from research.config import ConfigError, DataConfig

SUFFIXES = (".txt", ".jsonl", ".parquet")
_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str


@dataclass(frozen=True)
class SourceFile:
    """A file to read and the id prefix its documents get."""

    path: Path
    doc_id: str


def _files_under(root: Path, suffixes: tuple[str, ...], skip_dirs: frozenset[str] = frozenset()
                 ) -> list[Path]:
    """Files below `root` with one of `suffixes`, sorted (os.walk: 100x faster than rglob)."""
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip_dirs]
        found += [Path(folder, n) for n in names if n.endswith(suffixes)]
    return sorted(found)


def _builtin_files() -> list[SourceFile]:
    """Every .py of the running interpreter's standard library (always there, even offline)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = frozenset({"site-packages", "dist-packages", "__pycache__"})
    paths = _files_under(root, (".py",), skip)
    return [SourceFile(p, p.relative_to(root).as_posix()) for p in paths]


def _fixed_dir(pattern: str) -> Path:
    """The leading directories of a glob before any wildcard: ids are relative to this."""
    fixed = []
    for part in Path(pattern).parts:
        if _GLOB_CHARS & set(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _expand(item: str) -> list[SourceFile]:
    """One comma-separated element of data.source: a file, a directory or a glob."""
    pattern = str(Path(item).expanduser())
    is_glob = bool(_GLOB_CHARS & set(pattern))
    base = _fixed_dir(pattern) if is_glob else Path(pattern)
    if not is_glob and base.is_file():
        base = base.parent
    matches = sorted(glob.glob(pattern, recursive=True)) if is_glob else [pattern]
    files = []
    for match in map(Path, matches):
        if match.is_dir():
            found = _files_under(match, SUFFIXES)
        elif match.is_file():
            if match.suffix not in SUFFIXES:
                raise ConfigError(f"data.source: unsupported file type {str(match)!r} "
                                  f"(allowed: {', '.join(SUFFIXES)})")
            found = [match]
        else:
            found = []
        files += [SourceFile(p, p.relative_to(base).as_posix()) for p in found]
    return files


def source_files(cfg: DataConfig) -> list[SourceFile]:
    """The files behind data.source, in reading order (each element sorted, then de-duplicated)."""
    if cfg.source == "builtin":
        return _builtin_files()
    files: dict[Path, SourceFile] = {}
    for item in (s.strip() for s in cfg.source.split(",")):
        for f in _expand(item) if item else []:
            files.setdefault(f.path.resolve(), f)
    if not files:
        raise ConfigError(f"data.source: no .txt/.jsonl/.parquet files match {cfg.source!r}")
    return list(files.values())


def _read_jsonl(f: SourceFile, field: str) -> Iterator[Document]:
    with open(f.path, encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"data.source: {f.path}:{number}: malformed JSON ({exc.msg})") \
                    from None
            if not isinstance(record, dict) or field not in record:
                present = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                raise ConfigError(f"data.text_field: {field!r} missing in {f.path}:{number} "
                                  f"(fields: {present})")
            text = record[field]
            if not isinstance(text, str):
                raise ConfigError(f"data.text_field: {field!r} in {f.path}:{number} is "
                                  f"{type(text).__name__}, not a string")
            yield Document(f"{f.doc_id}:{number}", text)


def _read_parquet(f: SourceFile, field: str) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(f.path)
    except pa.ArrowException as exc:  # not a parquet file, or a truncated one
        raise ConfigError(f"data.source: {f.path}: not a readable parquet file ({exc})") from None
    names = table.schema_arrow.names
    if field not in names:
        raise ConfigError(f"data.text_field: {field!r} is not a column of {f.path} "
                          f"(columns: {', '.join(names)})")
    row = 0
    for batch in table.iter_batches(columns=[field]):
        for text in batch.column(0).to_pylist():
            if not isinstance(text, str):
                raise ConfigError(f"data.text_field: {field!r} in {f.path} row {row} is "
                                  f"{type(text).__name__}, not a string")
            yield Document(f"{f.doc_id}:{row}", text)
            row += 1


def read_documents(files: list[SourceFile], text_field: str) -> Iterator[Document]:
    """The documents of `files`: a .txt is one document (bytes as they are, no newline
    translation), .jsonl one per line, .parquet one per row."""
    for f in files:
        if f.path.suffix == ".jsonl":
            yield from _read_jsonl(f, text_field)
        elif f.path.suffix == ".parquet":
            yield from _read_parquet(f, text_field)
        else:
            yield Document(f.doc_id, f.path.read_bytes().decode("utf-8", "replace"))


def iter_documents(cfg: DataConfig) -> Iterator[Document]:
    """Every document of data.source, in a deterministic order (files, then lines/rows)."""
    return read_documents(source_files(cfg), cfg.text_field)


def is_heldout(doc_id: str, percent: float) -> bool:
    """Whether a document is held out: a stable hash of its id, so the split never drifts."""
    digest = hashlib.sha256(doc_id.encode("utf-8", "replace")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100 < percent
