"""Data layer: sources, tokenizers, token cache, grain batches (determinism, resume, sharding)."""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from pathlib import Path

import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from research.config import ConfigError, DataConfig
from research.data import pipeline
from research.data.corpus import is_heldout, iter_documents, source_files
from research.data import mixture
from research.data.pipeline import TokenCache, build_token_cache, eval_batches
from research.data.tokenizer import ByteTokenizer, load_tokenizer


def cfg(tmp_path: Path, source: str | Path, **kw) -> DataConfig:
    return DataConfig(source=str(source), cache_dir=str(tmp_path / "cache"), **kw)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def synthetic_cache(n_train: int, n_heldout: int = 0) -> TokenCache:
    """Token value == position, so every window says where it came from."""
    return TokenCache(train=np.arange(n_train, dtype=np.uint32),
                      heldout=np.arange(n_heldout, dtype=np.uint32), tokenizer=ByteTokenizer(),
                      heldout_bytes_per_token=1.0, path=Path("."))


def single(cache: TokenCache) -> mixture.Mixture:
    """A cache as the one source `main` (what data.source gives)."""
    return mixture.Mixture({"main": cache}, {"main": "data.source"}, ((1, {"main": 1.0}),),
                           cache.tokenizer)


def train_iterator(cache: TokenCache, **kw) -> grain.DatasetIterator:
    return mixture.train_iterator(single(cache), **kw)


def train_dataset(cache: TokenCache, **kw) -> grain.MapDataset:
    return mixture.train_dataset(single(cache), **kw)


def take(it, n: int) -> list[np.ndarray]:
    return [next(it)["tokens"] for _ in range(n)]


# ----------------------------------------------------------------------------- sources


def test_readers_txt_jsonl_parquet_in_order(tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "b.txt").write_bytes("bé\r\n".encode() + b"\xff")  # kept as is; bad UTF-8 replaced
    (data / "notes.md").write_text("ignored: not a supported type inside a directory")
    write_jsonl(data / "a.jsonl", [{"text": "one", "x": 1}, {"text": "two"}])
    (data / "a.jsonl").write_text((data / "a.jsonl").read_text() + "\n")  # blank lines skipped
    pq.write_table(pa.table({"text": ["r0", "r1", "r2"], "n": [0, 1, 2]}), data / "sub/c.parquet")
    docs = [(d.doc_id, d.text) for d in iter_documents(cfg(tmp_path, data))]
    assert docs == [("a.jsonl:1", "one"), ("a.jsonl:2", "two"), ("b.txt", "bé\r\n\ufffd"),
                    ("sub/c.parquet:0", "r0"), ("sub/c.parquet:1", "r1"),
                    ("sub/c.parquet:2", "r2")]
    # a glob and a comma list give ids relative to the glob's fixed folder, duplicates once
    both = cfg(tmp_path, f"{data}/*.txt, {data}/**/*.parquet,{data}/b.txt")
    assert [d.doc_id for d in iter_documents(both)] == ["b.txt", "sub/c.parquet:0",
                                                       "sub/c.parquet:1", "sub/c.parquet:2"]


def test_text_field_is_configurable(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"content": "hello"}])
    assert [d.text for d in iter_documents(cfg(tmp_path, path, text_field="content"))] == ["hello"]


@pytest.mark.parametrize("setup, source, expected", [
    (lambda d: None, "{d}/nothing*.txt", ["data.source", "nothing*.txt", ".jsonl"]),
    (lambda d: (d / "x.csv").write_text("a,b"), "{d}/x.csv", ["data.source", "x.csv", ".parquet"]),
    (lambda d: write_jsonl(d / "m.jsonl", [{"text": "ok"}, {"body": "no", "id": 3}]),
     "{d}/m.jsonl", ["data.text_field", "'text'", "m.jsonl:2", "body, id"]),
    (lambda d: (d / "bad.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n'),
     "{d}/bad.jsonl", ["data.source", "bad.jsonl:2", "malformed JSON"]),
    (lambda d: write_jsonl(d / "n.jsonl", [{"text": 5}]), "{d}/n.jsonl",
     ["data.text_field", "n.jsonl:1", "int"]),
    (lambda d: pq.write_table(pa.table({"body": ["x"]}), d / "p.parquet"), "{d}/p.parquet",
     ["data.text_field", "p.parquet", "columns: body"]),
    (lambda d: pq.write_table(pa.table({"text": ["x", None]}), d / "q.parquet"), "{d}/q.parquet",
     ["data.text_field", "q.parquet row 1", "NoneType"]),
])
def test_source_errors_name_the_file_and_field(tmp_path, setup, source, expected):
    setup(tmp_path)
    with pytest.raises(ConfigError) as err:
        list(iter_documents(cfg(tmp_path, source.format(d=tmp_path))))
    message = str(err.value)
    assert "\n" not in message
    for part in expected:
        assert part in message


def test_is_heldout_is_a_stable_hash_of_the_id():
    ids = [f"doc{i}" for i in range(20000)]
    picked = [i for i in ids if is_heldout(i, 5.0)]
    assert 0.04 < len(picked) / len(ids) < 0.06
    reference = [i for i in ids
                 if int(hashlib.sha256(i.encode()).hexdigest()[:16], 16) < 0.05 * 2**64]
    assert picked == reference
    assert set(picked) <= {i for i in ids if is_heldout(i, 10.0)}  # growing the split only adds


# ----------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip():
    tok = load_tokenizer("byte")
    text = "naïve → 😀 code\n\tx = 1\x00"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.tolist() == list(text.encode("utf-8"))
    assert (tok.vocab_size, tok.eos_id, tok.name) == (257, 256, "byte")
    with_eos_and_padding = np.concatenate([ids[:5], [256, 300], ids[5:], [256]])
    assert tok.decode(with_eos_and_padding) == text


@pytest.fixture
def hf_tokenizer_file(tmp_path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer=trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    return tmp_path / "tokenizer.json"


def test_hf_tokenizer_round_trip(hf_tokenizer_file):
    tok = load_tokenizer(str(hf_tokenizer_file))
    assert tok.eos_id == 1
    assert tok.vocab_size == len(json.loads(hf_tokenizer_file.read_text())["model"]["vocab"])
    assert tok.name == "hf:" + hashlib.sha256(hf_tokenizer_file.read_bytes()).hexdigest()
    text = "the lazy dog, héllo 😀\n  zebra\t"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and len(ids) < len(text.encode())  # merges were learned
    assert tok.decode(ids) == text
    assert tok.decode(np.concatenate([ids, [tok.eos_id, tok.vocab_size + 7]])) == text


def test_tokenizer_errors(tmp_path, hf_tokenizer_file):
    with pytest.raises(ConfigError, match="data.tokenizer.*'missing.json'"):
        load_tokenizer("missing.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ConfigError, match="data.tokenizer: cannot load .*broken.json"):
        load_tokenizer(str(tmp_path / "broken.json"))
    spec = json.loads(hf_tokenizer_file.read_text())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != "<|endoftext|>"]
    del spec["model"]["vocab"]["<|endoftext|>"]
    (tmp_path / "no_eos.json").write_text(json.dumps(spec))
    with pytest.raises(ConfigError, match="data.tokenizer: .*no_eos.json has no end-of-text"):
        load_tokenizer(str(tmp_path / "no_eos.json"))


# ----------------------------------------------------------------------------- token cache


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_jsonl(tmp_path / "corpus.jsonl", [{"text": f"document {i}: " + "ab" * (i % 7)}
                                                   for i in range(300)])


def split_documents(tokens: np.ndarray) -> list[str]:
    """Byte tokens back to texts, one per eos."""
    assert tokens[-1] == 256
    return [bytes(part[:-1].astype(np.uint8)).decode()
            for part in np.split(tokens, np.flatnonzero(tokens == 256) + 1)[:-1]]


def test_cache_splits_documents_by_hash(tmp_path, corpus):
    config = cfg(tmp_path, corpus, heldout_percent=10)
    cache = build_token_cache(config)
    docs = list(iter_documents(config))
    held = [d.text for d in docs if is_heldout(d.doc_id, 10)]
    train = [d.text for d in docs if not is_heldout(d.doc_id, 10)]
    assert 10 < len(held) < 60 and not set(held) & set(train)
    assert split_documents(np.asarray(cache.heldout)) == held
    assert split_documents(np.asarray(cache.train)) == train
    assert isinstance(cache.train, np.memmap) and cache.train.dtype == np.uint16
    n_bytes = sum(len(t.encode()) for t in held)
    assert cache.heldout_bytes_per_token == pytest.approx(n_bytes / (n_bytes + len(held)))
    assert build_token_cache(config).heldout.tolist() == cache.heldout.tolist()  # stable


def test_a_single_document_holds_out_its_tail(tmp_path):
    """One .txt file is one document: the held-out set is then the last percent of its tokens."""
    book = tmp_path / "book.txt"
    text = "".join(f"Line {i}: to be or not to be, é.\n" for i in range(2000))
    book.write_text(text)
    cache = build_token_cache(cfg(tmp_path, book, heldout_percent=5))
    tokens = np.concatenate([cache.train, cache.heldout])
    assert tokens.tolist() == [*text.encode(), ByteTokenizer().eos_id]
    assert len(cache.heldout) == int(len(tokens) * 0.05)
    tail_bytes = len(cache.heldout) - 1  # the eos carries no bytes
    assert cache.heldout_bytes_per_token == pytest.approx(tail_bytes / len(cache.heldout))


def counting_encode(monkeypatch) -> list[int]:
    calls = [0]
    real = ByteTokenizer.encode

    def encode(self, text):
        calls[0] += 1
        return real(self, text)

    monkeypatch.setattr(ByteTokenizer, "encode", encode)
    return calls


def test_cache_is_reused_and_keyed_by_content(tmp_path, corpus, monkeypatch):
    calls = counting_encode(monkeypatch)
    config = cfg(tmp_path, corpus)
    first = build_token_cache(config)
    assert calls[0] == 300
    assert build_token_cache(config).path == first.path and calls[0] == 300
    os.utime(corpus, ns=(1, 1))  # same content, new mtime: re-hashed, not re-tokenized
    assert build_token_cache(config).path == first.path and calls[0] == 300
    corpus.write_text(corpus.read_text().replace("document 7:", "document seven:"))
    changed = build_token_cache(config)
    assert changed.path != first.path and calls[0] == 600
    assert len(changed.train) + len(changed.heldout) == len(first.train) + len(first.heldout) + 4
    other_split = build_token_cache(cfg(tmp_path, corpus, heldout_percent=7))
    assert other_split.path not in (first.path, changed.path)


def test_failed_or_concurrent_builds_leave_a_sound_cache(tmp_path, corpus, monkeypatch):
    config = cfg(tmp_path, corpus)
    real = ByteTokenizer.encode

    def crash(self, text):
        if text.startswith("document 150"):
            raise KeyboardInterrupt
        return real(self, text)

    monkeypatch.setattr(ByteTokenizer, "encode", crash)
    with pytest.raises(KeyboardInterrupt):
        build_token_cache(config)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["prekeys"]
    monkeypatch.setattr(ByteTokenizer, "encode", real)
    cache = build_token_cache(config)
    # a second process finishing the same build later keeps the first one's files
    pipeline._write_cache(source_files(config.source), config, ByteTokenizer(), cache.path,
                          "data.source", None)
    assert sorted(p.name for p in cache.path.parent.iterdir()) == sorted(["prekeys",
                                                                           cache.path.name])
    assert build_token_cache(config).train.tolist() == cache.train.tolist()


# ----------------------------------------------------------------------------- batches


def test_batches_are_shuffled_windows_covering_each_epoch():
    seq_len, batch = 8, 4
    cache = synthetic_cache(12 * seq_len + 1)  # exactly 12 windows = 3 batches per epoch
    it = train_iterator(cache, seq_len=seq_len, global_batch=batch, seed=0)
    epochs = [np.concatenate(take(it, 3)) for _ in range(2)]
    for rows in epochs:
        assert rows.dtype == np.int32 and rows.shape == (12, seq_len + 1)
        np.testing.assert_array_equal(rows, rows[:, :1] + np.arange(seq_len + 1))
        assert sorted(rows[:, 0] // seq_len) == list(range(12))  # every window once
    assert epochs[0][:, 0].tolist() != epochs[1][:, 0].tolist()  # reshuffled per epoch
    assert epochs[0][:, 0].tolist() != sorted(epochs[0][:, 0].tolist())


def test_same_seed_same_batches_other_seed_differs():
    cache = synthetic_cache(5000)
    a, b, c = (take(train_iterator(cache, seq_len=16, global_batch=8, seed=s), 5)
               for s in (3, 3, 4))
    np.testing.assert_array_equal(np.stack(a), np.stack(b))
    assert not np.array_equal(np.stack(a), np.stack(c))


def test_exact_resume_from_json_state():
    cache = synthetic_cache(5000)
    it = train_iterator(cache, seq_len=16, global_batch=8, seed=1)
    take(it, 7)
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, 5)
    fresh = train_iterator(cache, seq_len=16, global_batch=8, seed=1)
    fresh.set_state(state)
    np.testing.assert_array_equal(np.stack(take(fresh, 5)), np.stack(expected))


def test_process_rows_concatenate_to_the_global_batch():
    cache = synthetic_cache(5000)
    kw = dict(seq_len=16, global_batch=8, seed=2)
    whole = take(train_iterator(cache, **kw), 3)
    parts = [take(train_iterator(cache, **kw, process_index=p, process_count=2), 3)
             for p in range(2)]
    for k in range(3):
        assert parts[0][k].shape == (4, 17)
        np.testing.assert_array_equal(np.concatenate([parts[0][k], parts[1][k]]), whole[k])
    dataset = train_dataset(cache, **kw, process_index=1, process_count=2)
    assert isinstance(dataset, grain.MapDataset)
    np.testing.assert_array_equal(dataset[2]["tokens"], parts[1][2])


def test_batch_errors():
    cache = synthetic_cache(100)
    with pytest.raises(ConfigError, match="train.batch_size=8 .* processes \\(3\\)"):
        train_iterator(cache, seq_len=4, global_batch=8, seed=0, process_count=3)
    with pytest.raises(ConfigError, match="data.source: its train split has 100 tokens, fewer "
                       "than one window of train.seq_len"):
        train_iterator(cache, seq_len=100, global_batch=32, seed=0)
    with pytest.raises(ConfigError, match="train.seed=-1"):
        train_iterator(cache, seq_len=4, global_batch=8, seed=-1)


def test_eval_batches_spread_evenly_and_shard():
    cache = synthetic_cache(0, n_heldout=100 * 10 + 1)  # 100 windows of seq_len 10
    batches = eval_batches(cache, seq_len=10, global_batch=5, n_batches=4)
    starts = np.stack(batches)[:, :, 0] // 10
    assert starts.shape == (4, 5) and len(set(starts.ravel())) == 20
    np.testing.assert_array_equal(np.sort(starts.ravel()), np.arange(0, 100, 5))
    assert all(s.max() - s.min() >= 80 for s in starts)  # each batch spans the split
    halves = [eval_batches(cache, seq_len=10, global_batch=6, n_batches=2, process_index=p,
                           process_count=2) for p in range(2)]
    whole = eval_batches(cache, seq_len=10, global_batch=6, n_batches=2)
    for k in range(2):
        np.testing.assert_array_equal(np.concatenate([halves[0][k], halves[1][k]]), whole[k])
    assert len(eval_batches(cache, seq_len=10, global_batch=50, n_batches=9)) == 2  # capped
    (few,) = eval_batches(cache, seq_len=10, global_batch=300, n_batches=3)  # repeats windows
    assert few.shape == (300, 11) and len(set(few[:, 0])) == 100
    with pytest.raises(ConfigError, match="held-out split has 10 tokens, fewer than one eval window"):
        eval_batches(synthetic_cache(0, n_heldout=10), seq_len=10, global_batch=4, n_batches=3)


def test_builtin_corpus(tmp_path):
    config = cfg(tmp_path, "builtin")
    docs = iter_documents(config)
    first = next(docs)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert first.text == (stdlib / first.doc_id).read_bytes().decode()
    ids = [first.doc_id] + [d.doc_id for d in docs]
    assert len(ids) > 500 and all(i.endswith(".py") for i in ids) and "os.py" in ids
    assert not any("site-packages" in i for i in ids)
    cache = build_token_cache(config)
    n_bytes = sum(len((stdlib / i).read_bytes().decode("utf-8", "replace").encode()) for i in ids)
    assert len(cache.train) + len(cache.heldout) == n_bytes + len(ids)
    assert len(eval_batches(cache, seq_len=256, global_batch=16, n_batches=4)) == 4
    assert 0.99 < cache.heldout_bytes_per_token < 1


def test_iterator_checkpoints_with_orbax(tmp_path):
    import orbax.checkpoint as ocp

    cache = synthetic_cache(5000)
    it = train_iterator(cache, seq_len=16, global_batch=8, seed=5)
    take(it, 3)
    handlers = {"data": grain.checkpoint.CheckpointHandler()}
    with ocp.CheckpointManager(tmp_path / "ckpt", item_handlers=handlers) as manager:
        manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    expected = take(it, 2)
    fresh = train_iterator(cache, seq_len=16, global_batch=8, seed=5)
    handlers = {"data": grain.checkpoint.CheckpointHandler()}
    with ocp.CheckpointManager(tmp_path / "ckpt", item_handlers=handlers) as manager:
        manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    np.testing.assert_array_equal(np.stack(take(fresh, 2)), np.stack(expected))
