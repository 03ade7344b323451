"""Token-cache build throughput and peak memory, byte tokenizer and a BPE tokenizer.json.

    python bench/token_cache.py [--corpus-mb 160] [--vocab 8192] [--out /tmp/research-tokenize]

Generates a .jsonl corpus of about --corpus-mb MB (the built-in corpus's documents, each copied
with its lines in a shuffled order, so no two copies are alike; several times the built-in
31.5 MB), trains a byte-level BPE tokenizer on its first 20 MB with the `tokenizers` library,
then builds the token cache of the corpus with each tokenizer in a fresh process. Reported per
tokenizer: seconds, MB/s, tokens/s and the process's peak resident memory (ru_maxrss), next to
the corpus size: the build streams, so the peak stays far below the corpus.
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
cfg = DataConfig(source=sys.argv[1], tokenizer=sys.argv[2], cache_dir=sys.argv[3])
start = time.perf_counter()
cache = build_token_cache(cfg)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "tokens": len(cache.train) + len(cache.heldout),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


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
    parser.add_argument("--corpus-mb", type=int, default=160)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--out", default="/tmp/research-tokenize")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "corpus" / "big.jsonl"
    corpus.parent.mkdir(exist_ok=True)
    text_bytes = make_corpus(corpus, args.corpus_mb)
    print(f"corpus: {corpus} {corpus.stat().st_size / 1e6:.0f} MB on disk, "
          f"{text_bytes / 1e6:.0f} MB of text")
    started = time.perf_counter()
    train_bpe(corpus, out / "tokenizer.json", args.vocab)
    print(f"BPE tokenizer (vocab {args.vocab}) trained in {time.perf_counter() - started:.0f}s")
    for name, spec in (("byte", "byte"), (f"BPE {args.vocab}", str(out / "tokenizer.json"))):
        cache = out / f"cache-{name.split()[0]}"
        subprocess.run(["rm", "-rf", str(cache)], check=True)
        result = subprocess.run([sys.executable, "-c", BUILD, str(corpus), spec, str(cache)],
                                cwd=ROOT, capture_output=True, text=True, check=True)
        r = json.loads(result.stdout.splitlines()[-1])
        print(f"{name:>10}: {r['seconds']:.1f}s, {text_bytes / 1e6 / r['seconds']:.1f} MB/s, "
              f"{r['tokens'] / r['seconds']:,.0f} tokens/s, {r['tokens']:,} tokens, "
              f"peak RSS {r['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
