"""Token-cache build throughput and peak memory, byte tokenizer and a BPE tokenizer.json.

    python bench/token_cache.py [--sizes-mb 40,160] [--bpe-max-mb 40] [--vocab 8192]
                                [--out /tmp/research-tokenize]

Generates .jsonl corpora of the given sizes (the built-in corpus's documents, each copied with
its lines in a shuffled order, so no two copies are alike; 160 MB is five times the built-in
31.5 MB), trains a byte-level BPE tokenizer on the first 20 MB with the `tokenizers` library,
then builds the token cache of each corpus in a fresh process, with the byte tokenizer and (up
to --bpe-max-mb) the BPE one. A build reads the corpus twice: once for its content key, once
to tokenize. Reported per build: wall seconds, MB/s, tokens/s, CPU seconds over wall seconds
(the cores it kept busy; on a shared machine also what the scheduler gave it) and the process's
peak resident memory (ru_maxrss), beside a process that only imports the pipeline: the build
streams, so the peak does not grow with the corpus.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BUILD = """
import json, resource, sys, time
from research.config import DataConfig
from research.data.pipeline import build_token_cache
from research.data.tokenizer import load_tokenizer
load_tokenizer(sys.argv[2])
def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
tokens, seconds, cpu_seconds = 0, 0.0, 0.0
if sys.argv[1] != "-":
    cfg = DataConfig(source=sys.argv[1], tokenizer=sys.argv[2], cache_dir=sys.argv[3])
    start, cpu_start = time.perf_counter(), cpu()
    cache = build_token_cache(cfg)
    seconds, cpu_seconds = time.perf_counter() - start, cpu() - cpu_start
    tokens = len(cache.train) + len(cache.heldout)
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "tokens": tokens,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def build(corpus: str, tokenizer: str, cache: Path) -> dict:
    """One cache build (or, for corpus "-", only the imports) in a fresh process."""
    subprocess.run(["rm", "-rf", str(cache)], check=True)
    result = subprocess.run([sys.executable, "-c", BUILD, corpus, tokenizer, str(cache)],
                            cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.splitlines()[-1])


def make_corpus(path: Path, megabytes: int) -> int:
    """A jsonl file of shuffled-line copies of the built-in corpus's documents; returns its bytes
    of text."""
    from research.data.corpus import read_documents, source_files

    docs = [d.text for d in read_documents(source_files("builtin"), "text")]
    rng = random.Random(0)
    written = 0
    with path.open("w") as f:
        while written < megabytes * 1e6:
            for text in docs:
                lines = text.splitlines(keepends=True)
                rng.shuffle(lines)
                copy = "".join(lines)
                f.write(json.dumps({"text": copy}) + "\n")
                written += len(copy.encode())
                if written >= megabytes * 1e6:
                    break
    return written


def train_bpe(corpus: Path, out: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    def texts(limit: int = 20_000_000):
        seen = 0
        with corpus.open() as f:
            for line in f:
                text = json.loads(line)["text"]
                seen += len(text)
                yield text
                if seen > limit:
                    return

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts(), trainer)
    tok.save(str(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes-mb", default="40,160")
    parser.add_argument("--bpe-max-mb", type=int, default=40)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--out", default="/tmp/research-tokenize")
    args = parser.parse_args()
    out = Path(args.out)
    (out / "corpus").mkdir(parents=True, exist_ok=True)
    sizes = [int(size) for size in args.sizes_mb.split(",")]
    corpora = {}
    for size in sizes:
        corpora[size] = out / "corpus" / f"{size}mb.jsonl"
        text_bytes = make_corpus(corpora[size], size)
        print(f"corpus {corpora[size]}: {corpora[size].stat().st_size / 1e6:.0f} MB on disk, "
              f"{text_bytes / 1e6:.0f} MB of text")
    started = time.perf_counter()
    bpe = out / "tokenizer.json"
    train_bpe(corpora[max(sizes)], bpe, args.vocab)
    print(f"BPE tokenizer (vocab {args.vocab}) trained in {time.perf_counter() - started:.0f}s")
    for name, spec in (("byte", "byte"), (f"BPE {args.vocab}", str(bpe))):
        base = build("-", spec, out / "cache")
        print(f"{name:>9}, imports only: peak RSS {base['peak_rss_mb']:.0f} MB")
        for size in sizes:
            if name != "byte" and size > args.bpe_max_mb:
                continue
            r = build(str(corpora[size]), spec, out / "cache")
            print(f"{name:>9}, {size:>4} MB: {r['seconds']:.1f}s, {size / r['seconds']:.2f} MB/s, "
                  f"{r['tokens'] / r['seconds']:,.0f} tokens/s, {r['tokens']:,} tokens, "
                  f"CPU/wall {r['cpu_seconds'] / r['seconds']:.2f} "
                  f"({r['tokens'] / r['cpu_seconds']:,.0f} tokens per CPU-second), "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
