"""Training throughput and MFU of the dense configs, measured side by side in one run.

    python bench/throughput.py [--steps 20] [EXPERIMENT.yaml ...] [key=value ...]

Each row trains the experiment for `--steps` steps through the real loop (`research.train.loop`)
and reports the steady-state tokens/s and MFU of the second half of the steps (compilation and
warm-up excluded). Ratios are against the first row of each experiment.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from research import config
from research.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "float32, remat dots": ["model.compute_dtype=float32", "model.remat=dots"],
    "float32, remat full": ["model.compute_dtype=float32", "model.remat=full"],
    "float32, remat none": ["model.compute_dtype=float32", "model.remat=none"],
    "bfloat16, remat dots": ["model.compute_dtype=bfloat16", "model.remat=dots"],
}


def measure(experiment: Path, overrides: list[str], steps: int) -> dict:
    half = max(steps // 2, 1)
    cfg = config.load(experiment, [
        *overrides, f"train.steps={2 * half}", f"train.log_every={half}", "train.eval_batches=1",
        f"train.eval_every={2 * half}", f"checkpoint.every={2 * half}", "checkpoint.async_save=false",
        "logging.tensorboard=false", "logging.progress=false",
    ])
    with tempfile.TemporaryDirectory() as run_dir:
        summary = train(cfg, Path(run_dir))
    return {**summary["final"], "params": summary["params_total"], "flops_per_token": summary["flops_per_token"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("args", nargs="*", help="experiment YAML files and key=value overrides")
    args = parser.parse_args()
    experiments = [Path(a) for a in args.args if a.endswith(".yaml")] or [
        ROOT / "experiments/dense_tiny.yaml", ROOT / "experiments/dense_small.yaml"]
    overrides = [a for a in args.args if "=" in a]

    print(f"| experiment | variant | params | tokens/s | MFU | tokens/s vs {next(iter(VARIANTS))} |")
    print("|---|---|---:|---:|---:|---:|")
    for experiment in experiments:
        base = None
        for name, extra in VARIANTS.items():
            row = measure(experiment, [*overrides, *extra], args.steps)
            base = base or row["tokens_per_sec"]
            print(f"| {experiment.stem} | {name} | {row['params']:,} | {row['tokens_per_sec']:,.0f} | "
                  f"{row['mfu']:.1%} | {row['tokens_per_sec'] / base:.2f}x |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
