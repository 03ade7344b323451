"""Training steps of several variants of one experiment timed side by side, alternating.

    python bench/sidebyside.py [--steps 6] [--repeats 5] EXPERIMENT.yaml NAME:key=value,key=value ...

Each variant's real train step (`research.train.loop.prepare` + `train_step`, jitted with the
run's shardings) is compiled first; then the variants take turns, `--steps` steps each per
round, for `--repeats` rounds, so machine load hits them alike. Prints the median step time,
tokens/s and the ratio to the first variant, and the losses after the first round (variants
that compute the same function should agree).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from research import config
from research.data import mixture
from research.data.tokenizer import load_tokenizer
from research.models.decoder import padded_vocab
from research.train.flops import flops_per_token
from research.train.loop import compile_train_step, prepare
from research.train.metrics import peak_flops
from research.train.state import init_state


def initial_state(cfg: config.ExperimentConfig):
    """(setup, the run's initial state, its batch iterator) of a config, as `research train`
    would start it (same seed: same weights and batches)."""
    setup = prepare(cfg)
    with setup.context():
        state = init_state(setup.model, setup.tx, jnp.zeros((1, cfg.train.seq_len), jnp.int32),
                           setup.spec, cfg.train.seed)
    data = mixture.train_iterator(setup.data, seq_len=cfg.train.seq_len,
                                  global_batch=cfg.train.batch_size, seed=cfg.train.seed)
    return setup, state, data


def compiled_step(cfg: config.ExperimentConfig):
    """(step(state, tokens) -> (state, metrics), initial state, batch iterator) of a config."""
    setup, state, data = initial_state(cfg)
    with setup.context():
        fn, knobs = compile_train_step(setup)

    def step(state, tokens):
        with setup.context():
            return fn(state, {"tokens": setup.global_array(tokens)}, knobs)

    return step, state, data


def alternate(cfgs: dict[str, config.ExperimentConfig], steps: int, repeats: int) -> dict[str, dict]:
    """Median seconds per step of each config, timed in turns; plus its first-round losses.

    Each turn starts with one untimed step: the first call after another program pays for
    fresh buffers (glibc's malloc hands freed memory back to the kernel), which a training run,
    calling one program over and over, does not (bench/mamba.py's SSD: 44 vs 31-34 ms)."""
    runs = {name: list(compiled_step(cfg)) for name, cfg in cfgs.items()}
    times: dict[str, list[float]] = {name: [] for name in cfgs}
    losses: dict[str, list[float]] = {name: [] for name in cfgs}
    for round_ in range(repeats + 1):  # round 0 warms up (first execution, allocator)
        for name, run in runs.items():
            step, state, data = run
            state = jax.block_until_ready(step(state, next(data)["tokens"])[0])
            batches = [next(data)["tokens"] for _ in range(steps)]
            start = time.perf_counter()
            for tokens in batches:
                state, metrics = step(state, tokens)
            jax.block_until_ready(state)
            if round_:
                times[name].append((time.perf_counter() - start) / steps)
            else:
                losses[name] = [float(metrics["loss"])]
            run[1] = state
    return {name: {"step_time": float(np.median(t)), "loss": losses[name][0]}
            for name, t in times.items()}


def mfu(cfg: config.ExperimentConfig, step_time: float) -> float:
    """Model FLOPs utilisation of a train step of `step_time` seconds: the loop's FLOPs formula
    (`research.train.flops`) against the device's peak (`research.train.metrics.peak_flops`)."""
    vocab = padded_vocab(cfg.model, load_tokenizer(cfg.data.tokenizer).vocab_size)
    tokens = cfg.train.batch_size * cfg.train.seq_len
    return (flops_per_token(cfg.model, vocab, cfg.train.seq_len) * tokens / step_time
            / peak_flops(cfg.model.compute_dtype, cfg.logging.peak_flops))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("experiment", type=Path)
    parser.add_argument("variants", nargs="+", help="NAME:key=value,key=value (NAME: for none)")
    args = parser.parse_args()
    cfgs = {}
    for variant in args.variants:
        name, _, overrides = variant.partition(":")
        cfgs[name] = config.load(args.experiment, [o for o in overrides.split(",") if o])
    results = alternate(cfgs, args.steps, args.repeats)
    first = next(iter(results.values()))["step_time"]
    tokens = next(iter(cfgs.values())).train.batch_size * next(iter(cfgs.values())).train.seq_len
    print(f"| {args.experiment.stem} | step ms (median of {args.repeats}) | tokens/s | speed vs "
          f"first | loss after {args.steps + 1} steps |\n|---|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['step_time'] * 1e3:.1f} | {tokens / r['step_time']:,.0f} | "
              f"{first / r['step_time']:.2f}x | {r['loss']:.6f} |")


if __name__ == "__main__":
    sys.exit(main())
