"""Token cache and the grain input pipeline.

Text is tokenized once into a cache keyed by its content (one cache per source, so adding a
source never re-tokenizes the others), streaming: documents are encoded about 1 MB at a time (a
Hugging Face tokenizer spreads each batch over all cores) and written as they come, so a corpus
larger than memory never sits in memory. The caches are read through memory maps; a
training batch is a set of windows of seq_len+1 tokens (research/data/mixture.py picks them).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grain
import numpy as np

from research.config import ConfigError, DataConfig
from research.data.corpus import SourceFile, is_heldout, read_documents, source_files
from research.data.tokenizer import Tokenizer, bos_tokens, load_tokenizer

CACHE_VERSION = 2  # bump when the layout or the tokenization rules change
SPLITS = ("train", "heldout")
_ENCODE_BATCH_BYTES = 1 << 20  # documents encoded together: every core busy, and a Hugging Face
# batch of Encodings (ids, offsets, token strings: ~200 bytes a token) stays near 50 MB
# One background thread reads a few batches ahead; the data sit in page-cached memmaps.
_READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)


@dataclass(frozen=True)
class TokenCache:
    """Both splits as 1-D memory-mapped token arrays: documents back to back, each + eos (and
    after a BOS when data.document_start names one, as an imported model was trained).

    heldout_bytes_per_token = UTF-8 bytes of the held-out documents / held-out tokens, where
    the tokens include one eos per document (eos carries no bytes). Bits per byte of a mean
    held-out loss L (nats per token, eos targets included) is L / ln 2 / heldout_bytes_per_token.
    """

    train: np.ndarray
    heldout: np.ndarray
    tokenizer: Tokenizer
    heldout_bytes_per_token: float
    path: Path


def _hasher(tokenizer: Tokenizer, cfg: DataConfig) -> hashlib._Hash:
    # a BOS before each document is part of the key (the key of other caches is unchanged)
    key = [CACHE_VERSION, tokenizer.name, cfg.heldout_percent, *bos_tokens(cfg.document_start)]
    return hashlib.sha256(json.dumps(key).encode())


def _update(h: hashlib._Hash, doc_id: str, data: bytes) -> None:
    """Length-prefixed, so no two different document streams hash the same bytes."""
    for part in (doc_id.encode("utf-8", "replace"), data):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)


def _content_key(files: list[SourceFile], cfg: DataConfig, tokenizer: Tokenizer, field: str
                 ) -> str:
    h = _hasher(tokenizer, cfg)
    for doc in read_documents(files, cfg.text_field, field):
        _update(h, doc.doc_id, doc.text.encode("utf-8", "replace"))
    return h.hexdigest()


def _pre_key(files: list[SourceFile], cfg: DataConfig, tokenizer: Tokenizer) -> str:
    """Cheap stand-in for the content key: file names, sizes and mtimes (no reading)."""
    h = _hasher(tokenizer, cfg)
    h.update(cfg.text_field.encode())
    for f in files:
        st = f.path.stat()
        stamp = [str(f.path.absolute()), f.doc_id, st.st_size, st.st_mtime_ns, f.extract]
        h.update(json.dumps(stamp).encode())
    return h.hexdigest()


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


class _Progress:
    """A bytes bar with MB/s while a cache is built (on a terminal), and one closing line."""

    def __init__(self, files: list[SourceFile], label: str, say: Callable[[str], None] | None):
        self.say, self.label, self.bytes, self.started = say, label, 0, time.perf_counter()
        self.bar = None
        if say is not None and sys.stderr.isatty():
            from tqdm import tqdm

            total = sum(f.path.stat().st_size for f in files)  # about the text: jsonl adds a bit
            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000,
                            desc=f"tokenizing {label}", dynamic_ncols=True, leave=False)

    def update(self, n_bytes: int) -> None:
        self.bytes += n_bytes
        if self.bar is not None:
            self.bar.update(min(n_bytes, self.bar.total - self.bar.n))

    def close(self, tokens: int) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.say is not None:
            seconds = max(time.perf_counter() - self.started, 1e-9)
            self.say(f"tokenized {self.label}: {self.bytes / 1e6:,.1f} MB in {seconds:.1f}s "
                     f"({self.bytes / 1e6 / seconds:,.1f} MB/s, {tokens / seconds:,.0f} tokens/s)")


def _tokenize(files: list[SourceFile], cfg: DataConfig, tokenizer: Tokenizer, out: Path,
              field: str, say: Callable[[str], None] | None = None) -> dict:
    """Write out/{train,heldout}.bin; returns the metadata, with the key of the content read.

    Documents are encoded about 1 MB at a time (`encode_batch`), so memory stays bounded by one
    batch whatever the corpus size."""
    h = _hasher(tokenizer, cfg)
    dtype = _token_dtype(tokenizer.vocab_size)
    eos = np.array([tokenizer.eos_id], dtype).tobytes()
    start = bos_tokens(cfg.document_start)
    bos = np.array(start, dtype).tobytes()
    meta = {"version": CACHE_VERSION, "tokenizer": tokenizer.name, "dtype": dtype.name,
            "heldout_percent": cfg.heldout_percent, "heldout_bytes": 0}
    meta |= {f"{split}_{n}": 0 for split in SPLITS for n in ("docs", "tokens")}
    sinks = {split: open(out / f"{split}.bin", "wb", buffering=1 << 22) for split in SPLITS}
    progress = _Progress(files, field, say)
    pending: list[tuple[str, str, int]] = []  # (split, text, UTF-8 bytes)

    def flush() -> None:
        for (split, _, size), ids in zip(pending, tokenizer.encode_batch([t for _, t, _ in pending])):
            sinks[split].write(bos + ids.astype(dtype).tobytes() + eos)
            meta[f"{split}_docs"] += 1
            meta[f"{split}_tokens"] += len(start) + len(ids) + 1
            meta["heldout_bytes"] += size if split == "heldout" else 0
        progress.update(sum(size for _, _, size in pending))
        pending.clear()

    try:
        batch_bytes = 0
        for doc in read_documents(files, cfg.text_field, field):
            data = doc.text.encode("utf-8", "replace")
            _update(h, doc.doc_id, data)
            split = "heldout" if is_heldout(doc.doc_id, cfg.heldout_percent) else "train"
            pending.append((split, doc.text, len(data)))
            batch_bytes += len(data)
            if batch_bytes >= _ENCODE_BATCH_BYTES:
                flush()
                batch_bytes = 0
        flush()
    finally:
        for sink in sinks.values():
            sink.close()
    progress.close(meta["train_tokens"] + meta["heldout_tokens"])
    if not meta["heldout_docs"] and meta["train_tokens"] > 1:
        _hold_out_tail(out, meta, tokenizer, dtype, cfg)
    return meta | {"key": h.hexdigest()}


def _hold_out_tail(out: Path, meta: dict, tokenizer: Tokenizer, dtype: np.dtype,
                   cfg: DataConfig) -> None:
    """Too few documents for a hashed split (say, one book in one .txt file): hold out the last
    heldout_percent of the train tokens instead, so every corpus has a held-out set."""
    train = np.memmap(out / "train.bin", dtype, mode="r")
    cut = len(train) - max(int(len(train) * cfg.heldout_percent / 100), 1)
    tail = np.array(train[cut:])
    del train
    tail.tofile(out / "heldout.bin")
    os.truncate(out / "train.bin", cut * dtype.itemsize)
    text_ids = tail[~np.isin(tail, [tokenizer.eos_id, *bos_tokens(cfg.document_start)])]
    meta.update(train_tokens=cut, heldout_tokens=len(tail), heldout_docs=1,
                heldout_bytes=len(tokenizer.decode(text_ids).encode("utf-8")), heldout_tail=True)


def _write_cache(files: list[SourceFile], cfg: DataConfig, tokenizer: Tokenizer, final: Path,
                 field: str, say: Callable[[str], None] | None) -> None:
    """Build in a private temporary folder, then rename it into place in one atomic step.

    A killed build leaves only a `.tmp-*` folder; of two concurrent builds the first rename
    wins and the other discards its (identical) copy.
    """
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name[:16]}-", dir=final.parent))
    try:
        meta = _tokenize(files, cfg, tokenizer, tmp, field, say)
        if meta["key"] != final.name:
            raise ConfigError(f"{field}: its files changed while they were being tokenized; "
                              "run again")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _load(path: Path, tokenizer: Tokenizer) -> TokenCache:
    meta = json.loads((path / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])

    def tokens(split: str) -> np.ndarray:
        n = meta[f"{split}_tokens"]  # np.memmap refuses empty files
        return np.memmap(path / f"{split}.bin", dtype, mode="r", shape=(n,)) if n else \
            np.zeros(0, dtype)

    n_heldout = meta["heldout_tokens"]
    return TokenCache(train=tokens("train"), heldout=tokens("heldout"), tokenizer=tokenizer,
                      heldout_bytes_per_token=meta["heldout_bytes"] / n_heldout if n_heldout
                      else float("nan"), path=path)


def build_token_cache(cfg: DataConfig, source: str | None = None, field: str = "data.source",
                      say: Callable[[str], None] | None = None) -> TokenCache:
    """Tokenize `source` (default data.source) once into data.cache_dir/<content key>/, or load
    it from there; `field` names the source in errors, `say` (if given) hears a build's progress.

    The key is a sha256 over the tokenizer's name, heldout_percent (the BOS, if any) and every
    document's id and text. A pointer from a cheap pre-key (paths, sizes, mtimes) skips
    re-reading unchanged files.
    """
    tokenizer = load_tokenizer(cfg.tokenizer)
    if any(bos >= tokenizer.vocab_size for bos in bos_tokens(cfg.document_start)):
        raise ConfigError(f"data.document_start={cfg.document_start}: not a token of the tokenizer "
                          f"({tokenizer.vocab_size} tokens)")
    root = Path(cfg.cache_dir).expanduser()
    (root / "prekeys").mkdir(parents=True, exist_ok=True)
    files = source_files(source or cfg.source or "builtin", field)
    pointer = root / "prekeys" / _pre_key(files, cfg, tokenizer)
    key = pointer.read_text() if pointer.is_file() else ""
    if not key or not (root / key / "meta.json").is_file():
        key = _content_key(files, cfg, tokenizer, field)
        if not (root / key / "meta.json").is_file():
            _write_cache(files, cfg, tokenizer, root / key, field, say)
        _write_text_atomic(pointer, key)
    return _load(root / key, tokenizer)


# ----------------------------------------------------------------------------- batches


def process_rows(global_batch: int, process_index: int, process_count: int) -> slice:
    """This process's rows of every global batch."""
    if global_batch % process_count:
        raise ConfigError(f"train.batch_size={global_batch} must be divisible by the number of "
                          f"processes ({process_count})")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    per = global_batch // process_count
    return slice(process_index * per, (process_index + 1) * per)


def n_windows(tokens: np.ndarray, seq_len: int) -> int:
    """Windows of seq_len+1 tokens at offsets i*seq_len (neighbours share one token)."""
    return max(0, (len(tokens) - 1) // seq_len)


def read_windows(tokens: np.ndarray, windows: np.ndarray, seq_len: int) -> np.ndarray:
    """int32 [len(windows), seq_len+1]; reads only these windows from the memmap."""
    return tokens[windows[:, None] * seq_len + np.arange(seq_len + 1)].astype(np.int32)


def shuffled_batches(n: int, read: Callable[[np.ndarray], dict[str, np.ndarray]], *,
                     global_batch: int, seed: int, process_index: int = 0,
                     process_count: int = 1) -> grain.MapDataset:
    """Element k: read(this process's rows of global batch k), where a global batch is
    `global_batch` indices of an endless, per-epoch seeded shuffle of range(n).

    The shuffle is over the GLOBAL batch, so the data order does not depend on how many
    processes read it; each process keeps its own contiguous rows.
    """
    rows = process_rows(global_batch, process_index, process_count)
    if not 0 <= seed < 2**32:
        raise ConfigError(f"train.seed={seed}: the data shuffle needs a seed in [0, 2**32)")
    return (grain.MapDataset.range(n).shuffle(seed=seed).repeat().batch(global_batch)
            .map(lambda indices: read(indices[rows])))


def checkpointable_iterator(dataset: grain.MapDataset) -> grain.DatasetIterator:
    """An iterator whose position orbax saves with the run (state: {"next_index": step})."""
    return iter(dataset.to_iter_dataset(_READ_OPTIONS))


def eval_batches(cache: TokenCache, *, seq_len: int, global_batch: int, n_batches: int,
                 process_index: int = 0, process_count: int = 1, field: str = "data"
                 ) -> list[np.ndarray]:
    """A fixed set of held-out windows, evenly spread through the held-out tokens.

    Batch j holds every n_batches-th of the chosen windows, so each batch spans the whole split.
    n_batches is capped at the held-out windows // global_batch, but at least 1 while there is
    any held-out window (windows then repeat to fill the batch). A held-out split shorter
    than one window is a ConfigError: found at start-up, not at the first eval.
    """
    rows = process_rows(global_batch, process_index, process_count)
    available = n_windows(cache.heldout, seq_len)
    if not available:
        raise ConfigError(f"{field}: the held-out split has {len(cache.heldout)} tokens, fewer than "
                          f"one eval window of train.seq_len+1={seq_len + 1}; raise "
                          "data.heldout_percent, use more data or a shorter train.seq_len")
    n_batches = min(n_batches, max(1, available // global_batch))
    total = n_batches * global_batch
    windows = (np.arange(total) * available // max(total, 1)).reshape(global_batch, n_batches).T
    return [read_windows(cache.heldout, w[rows], seq_len) for w in windows]
