"""The step-time cost of each training-stability guard, measured side by side.

    python bench/stability.py [--steps 20] [--rounds 5] [EXPERIMENT.yaml] [key=value ...]

Every variant's real train step (`research.train.loop.prepare` + `compile_train_step`, the
guards as the loop configures them) is compiled once; then the variants take turns, `--rounds`
times, each timing `--steps` steps on the same real batches, so a machine's changing load
falls on all of them alike. Reported: the median ms/step and its ratio to the first row.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from research import config
from research.data import mixture
from research.train.loop import compile_train_step, prepare
from research.train.state import init_state

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "no guards": [],
    "model.qk_norm": ["model.qk_norm=true"],
    "optim.z_loss=1e-4": ["optim.z_loss=1e-4"],
    "train.skip_spikes": ["train.skip_spikes=true"],
    "train.on_nonfinite=rollback": ["train.on_nonfinite=rollback"],
    "logging.norms_every=10": ["logging.norms_every=10"],
    "logging.norms_every=1": ["logging.norms_every=1"],
    "all (norms every 10)": ["model.qk_norm=true", "optim.z_loss=1e-4", "train.skip_spikes=true",
                             "train.on_nonfinite=rollback", "logging.norms_every=10"],
}


def stepper(cfg: config.ExperimentConfig, steps: int):
    """A function that runs `steps` steps of `cfg`'s compiled step and returns s/step."""
    setup = prepare(cfg)
    data = mixture.train_iterator(setup.data, seq_len=cfg.train.seq_len,
                                  global_batch=cfg.train.batch_size, seed=cfg.train.seed,
                                  process_index=0, process_count=1)
    with setup.context():
        state = init_state(setup.model, setup.tx, jnp.zeros((1, cfg.train.seq_len), jnp.int32),
                           setup.spec, cfg.train.seed)
        step_fn, knobs = compile_train_step(setup)
        batches = [jax.tree.map(setup.global_array, next(data)) for _ in range(steps)]
    box = [state]

    def run() -> float:
        with setup.context():
            state, out = step_fn(box[0], batches[0], knobs)
            jax.block_until_ready(out)
            start = time.perf_counter()
            for batch in batches:
                state, out = step_fn(state, batch, knobs)
            jax.block_until_ready(out)
        box[0] = state
        return (time.perf_counter() - start) / steps

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("args", nargs="*", help="an experiment YAML and key=value overrides")
    args = parser.parse_args()
    experiment = next((a for a in args.args if a.endswith(".yaml")),
                      str(ROOT / "experiments/dense_tiny.yaml"))
    overrides = [a for a in args.args if "=" in a]
    runs = {name: stepper(config.load(experiment, [*overrides, *extra]), args.steps)
            for name, extra in VARIANTS.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            times[name].append(run())
    base = statistics.median(times[next(iter(times))])
    print(f"| {Path(experiment).stem} variant | ms/step (median of {args.rounds}) | vs no guards |")
    print("|---|---:|---:|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {1e3 * median:.1f} | {median / base:.3f}x |")


if __name__ == "__main__":
    main()
