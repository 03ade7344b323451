"""Sampling from a trained run: `research generate RUN_DIR --prompt TEXT [options]`.

The prompt, after what a document starts after in the run's data (data.document_start: the eos
separator of runs trained here, an imported model's BOS, or nothing; so the continuation starts
as a fresh document would), is prefilled in one decode call; then tokens are
sampled one at a time, each a jitted call that reads and updates the decode cache (attention's
KV buffers, Mamba's convolution and SSM state; see research/models/decoder.py). Sampling:
temperature 0 is greedy; otherwise softmax(logits / temperature) restricted to the nucleus, the
smallest set of most likely tokens whose probability reaches top_p. It stops after
--max-new-tokens or at eos. Generation runs on one device.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from research import flags
from research.config import ConfigError
from research.data.tokenizer import Tokenizer, start_tokens

Cache = Any
MAX_NEW_TOKENS = 16384  # the decode cache grows with it; each token is one device call


def init_cache(model: nn.Module, batch: int, max_len: int) -> Cache:
    """Zeroed decode state for `batch` sequences of up to `max_len` tokens (shapes only: no
    forward pass runs)."""
    tokens = jnp.zeros((batch, max_len), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, decode=True))["cache"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def decode(model: nn.Module, params: Any, cache: Cache, tokens: jax.Array,
           positions: jax.Array) -> tuple[jax.Array, Cache]:
    """Logits [B, T, V] of `tokens` [B, T] at `positions` continuing the cached sequence, and
    the updated cache."""
    (logits, _), state = model.apply({"params": params, "cache": cache}, tokens, positions,
                                     decode=True, mutable=["cache"])
    return logits, state["cache"]


def sample(logits: jax.Array, key: jax.Array, temperature: float, top_p: float) -> jax.Array:
    """One token per row of `logits` [B, V]: greedy at temperature 0, else nucleus sampling."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    ranked = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(ranked, axis=-1)
    # a token is in the nucleus if the tokens ranked above it hold less than top_p
    inside = jnp.cumsum(probs, axis=-1) - probs < top_p
    cutoff = jnp.min(jnp.where(inside, ranked, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 6, 7, 8), donate_argnums=2)
def next_token(model: nn.Module, params: Any, cache: Cache, tokens: jax.Array,
               positions: jax.Array, key: jax.Array, temperature: float, top_p: float,
               vocab_limit: int | None) -> tuple[jax.Array, Cache]:
    """Decode `tokens` [B, T] and sample one token [B] from the last one's logits; ids >=
    vocab_limit (the model's padding rows) are never sampled. Compiled once per model, sampling
    settings and token shape (a prefill, then single tokens)."""
    logits, cache = decode(model, params, cache, tokens, positions)
    last = logits[:, -1]
    if vocab_limit is not None:
        last = jnp.where(jnp.arange(last.shape[-1]) < vocab_limit, last, -jnp.inf)
    return sample(last, key, temperature, top_p), cache


def stream(model: nn.Module, params: Any, prompt: Sequence[int], max_new_tokens: int, *,
           temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
           eos_id: int | None = None, vocab_limit: int | None = None) -> Iterator[int]:
    """Up to `max_new_tokens` sampled after the (non-empty) `prompt`, one at a time as they are
    sampled, stopping after eos."""
    cache = init_cache(model, 1, len(prompt) + max_new_tokens)
    key = jax.random.key(seed)
    tokens = jnp.asarray(prompt, jnp.int32)[None, :]
    positions = jnp.arange(len(prompt), dtype=jnp.int32)[None, :]
    for i in range(max_new_tokens):
        token, cache = next_token(model, params, cache, tokens, positions,
                                  jax.random.fold_in(key, i), temperature, top_p, vocab_limit)
        yield int(token[0])
        if int(token[0]) == eos_id:
            return
        tokens, positions = token[:, None], positions[:, -1:] + 1


def generate(model: nn.Module, params: Any, prompt: Sequence[int], max_new_tokens: int,
             **options: Any) -> list[int]:
    """All tokens of `stream` (same arguments) as a list."""
    return list(stream(model, params, prompt, max_new_tokens, **options))


def prompt_tokens(document_start: str | int, tokenizer: Tokenizer, text: str) -> list[int]:
    """The prompt as a document starts in training (data.document_start: after this
    framework's eos, or an imported tokenizer's BOS, or nothing), then the text's tokens."""
    prompt = [*start_tokens(document_start, tokenizer), *tokenizer.encode(text).tolist()]
    if not prompt:
        raise ConfigError(f"--prompt: empty, and this run's documents start with no token "
                          f"(data.document_start={document_start!r}): give a prompt")
    return prompt


def load(run_dir: Path, step: int | None = None) -> tuple[Any, Any, int]:
    """(setup, params, step) of a run's checkpoint (default: the latest), on one device."""
    from research.train.loop import load_run
    from research.train.rundir import RunDir

    setup, state, meta = load_run(RunDir(run_dir), step, jax.devices()[:1])
    return setup, state["params"], meta["step"]


def run(args: argparse.Namespace) -> int:
    """The `research generate` command: print the prompt and its continuation."""
    if args.temperature < 0:
        raise ConfigError(f"--temperature={args.temperature}: must be >= 0 (0 is greedy)")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p={args.top_p}: must be in (0, 1]")
    setup, params, _ = load(Path(args.run_dir), args.step)
    tokenizer = setup.data.tokenizer
    prompt = prompt_tokens(setup.cfg.data.document_start, tokenizer, args.prompt)
    print(args.prompt, end="", flush=True)
    new: list[int] = []
    shown = ""
    with setup.context():
        for token in stream(setup.model, params, prompt, args.max_new_tokens,
                            temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                            eos_id=tokenizer.eos_id, vocab_limit=tokenizer.vocab_size):
            new.append(token)
            text = tokenizer.decode(np.asarray(new))
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                print(text[len(shown):], end="", flush=True)
                shown = text
    print(tokenizer.decode(np.asarray(new))[len(shown):])
    return 0


def add_generate_command(subparsers: Any) -> None:
    """Register `generate` on the `research` command's subparsers."""
    parser = subparsers.add_parser("generate", help="sample text from a run's checkpoint")
    parser.add_argument("run_dir")
    parser.add_argument("--prompt", default="", help="text to continue (default: none)")
    parser.add_argument("--max-new-tokens", type=flags.int_range(0, MAX_NEW_TOKENS), default=200)
    parser.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass (1: off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step", type=flags.non_negative, help="checkpoint step (default: latest)")
    parser.set_defaults(func=run)
