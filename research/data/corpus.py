"""Document sources: the built-in corpora and .txt/.jsonl/.parquet files, in a deterministic order.

A document is an id and its text. Ids are stable across machines (paths relative to the
source's fixed directory, never absolute), because they decide the held-out split and feed the
token cache key.

The built-in sources come from the running interpreter, so they exist wherever Python runs:
`builtin` (every .py of the standard library), and three domains for mixtures, `builtin:code`
(the standard library without its test suites), `builtin:tests` (the test suites) and
`builtin:docs` (English prose: pydoc's topic texts and the docstrings of builtin:code).
"""

from __future__ import annotations

import ast
import functools
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
    """A file to read, the id prefix its documents get, and how its documents are read: by
    suffix (`text`), or the docstrings of a Python module, or pydoc's topics module."""

    path: Path
    doc_id: str
    extract: str = "text"  # "text" | "docstrings" | "topics"


def _files_under(root: Path, suffixes: tuple[str, ...], skip_dirs: frozenset[str] = frozenset()
                 ) -> list[Path]:
    """Files below `root` with one of `suffixes`, sorted (os.walk: 100x faster than rglob)."""
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip_dirs]
        found += [Path(folder, n) for n in names if n.endswith(suffixes)]
    return sorted(found)


BUILTIN_DOMAINS = ("code", "tests", "docs")
_TEST_DIRS = frozenset({"test", "tests", "idle_test"})


def _is_test(relative: str) -> bool:
    """A test-suite file: below a test/tests/idle_test folder, or named test_*.py."""
    *folders, name = relative.split("/")
    return bool(_TEST_DIRS & set(folders)) or name.startswith("test_")


def _builtin_files(domain: str | None) -> list[SourceFile]:
    """The running interpreter's standard library (always there, even offline): every .py
    (domain None), or one of BUILTIN_DOMAINS."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = frozenset({"site-packages", "dist-packages", "__pycache__"})
    files = [SourceFile(p, p.relative_to(root).as_posix()) for p in _files_under(root, (".py",), skip)]
    if domain is None:
        return files
    if domain == "tests":
        return [f for f in files if _is_test(f.doc_id)]
    code = [f for f in files if not _is_test(f.doc_id)]
    if domain == "code":
        return code
    topics = root / "pydoc_data" / "topics.py"
    return [SourceFile(topics, "pydoc_data/topics.py", "topics"),
            *(SourceFile(f.path, f.doc_id, "docstrings") for f in code if f.path != topics)]


def _fixed_dir(pattern: str) -> Path:
    """The leading directories of a glob before any wildcard: ids are relative to this."""
    fixed = []
    for part in Path(pattern).parts:
        if _GLOB_CHARS & set(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _expand(item: str, field: str) -> list[SourceFile]:
    """One comma-separated element of a source: a file, a directory or a glob."""
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
                raise ConfigError(f"{field}: unsupported file type {str(match)!r} "
                                  f"(allowed: {', '.join(SUFFIXES)})")
            found = [match]
        else:
            found = []
        files += [SourceFile(p, p.relative_to(base).as_posix()) for p in found]
    return files


def source_files(source: str, field: str = "data.source") -> list[SourceFile]:
    """The files behind a source (`field` names it in errors), in reading order (each element
    sorted, then de-duplicated)."""
    if source == "builtin" or source.startswith("builtin:"):
        domain = source.partition(":")[2] or None
        if domain is not None and domain not in BUILTIN_DOMAINS:
            raise ConfigError(f"{field}: unknown built-in source {source!r} (allowed: builtin, "
                              f"{', '.join('builtin:' + d for d in BUILTIN_DOMAINS)})")
        return _builtin_files(domain)
    files: dict[Path, SourceFile] = {}
    for item in (s.strip() for s in source.split(",")):
        for f in _expand(item, field) if item else []:
            files.setdefault(f.path.resolve(), f)
    if not files:
        raise ConfigError(f"{field}: no .txt/.jsonl/.parquet files match {source!r}")
    return list(files.values())


def _read_jsonl(f: SourceFile, field: str, where: str) -> Iterator[Document]:
    with open(f.path, encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{where}: {f.path}:{number}: malformed JSON ({exc.msg})") \
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


def _read_parquet(f: SourceFile, field: str, where: str) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(f.path)
    except pa.ArrowException as exc:  # not a parquet file, or a truncated one
        raise ConfigError(f"{where}: {f.path}: not a readable parquet file ({exc})") from None
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


@functools.lru_cache(maxsize=4096)
def _module_docstrings(path: Path, size: int, mtime_ns: int) -> str:
    """A module's docstrings (module, classes, functions, in source order), blank-line separated;
    "" when it has none or does not parse on this interpreter. Cached by (path, size, mtime):
    a cache build reads a source twice (content key, then tokens) and parsing is the slow part."""
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError):
        return ""
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return "\n\n".join(doc for node in ast.walk(tree) if isinstance(node, kinds)
                        and (doc := ast.get_docstring(node)))


def _docstrings(f: SourceFile) -> Iterator[Document]:
    st = f.path.stat()
    if text := _module_docstrings(f.path, st.st_size, st.st_mtime_ns):
        yield Document(f.doc_id, text)


def _topics(f: SourceFile) -> Iterator[Document]:
    """pydoc_data/topics.py: the language reference texts `help()` shows, one per topic (read as
    a literal from the file, not imported)."""
    tree = ast.parse(f.path.read_bytes())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "topics"
                                                for t in node.targets):
            for name, text in sorted(ast.literal_eval(node.value).items()):
                yield Document(f"{f.doc_id}:{name}", text)


def read_documents(files: list[SourceFile], text_field: str, where: str = "data.source"
                   ) -> Iterator[Document]:
    """The documents of `files`: a .txt (or a built-in .py) is one document (bytes as they are,
    no newline translation), .jsonl one per line, .parquet one per row; docstrings and topics
    as their SourceFile.extract says. `where` names the source in errors."""
    for f in files:
        if f.extract == "docstrings":
            yield from _docstrings(f)
        elif f.extract == "topics":
            yield from _topics(f)
        elif f.path.suffix == ".jsonl":
            yield from _read_jsonl(f, text_field, where)
        elif f.path.suffix == ".parquet":
            yield from _read_parquet(f, text_field, where)
        else:
            yield Document(f.doc_id, f.path.read_bytes().decode("utf-8", "replace"))


def iter_documents(cfg: DataConfig) -> Iterator[Document]:
    """Every document of data.source, in a deterministic order (files, then lines/rows)."""
    return read_documents(source_files(cfg.source or "builtin"), cfg.text_field)


def is_heldout(doc_id: str, percent: float) -> bool:
    """Whether a document is held out: a stable hash of its id, so the split never drifts."""
    digest = hashlib.sha256(doc_id.encode("utf-8", "replace")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100 < percent
