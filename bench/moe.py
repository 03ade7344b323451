"""MoE step time against a dense model with the same active parameters, and the two dispatch
paths, measured side by side in one run.

    PYTHONPATH=. python bench/moe.py [--steps 20] [EXPERIMENT.yaml] [key=value ...]

Rows (default experiment: experiments/moe_tiny.yaml, 8 experts, top-2):
- dense: every MoE feed-forward replaced by a SwiGLU MLP of width (top_k + n_shared) * d_expert,
  i.e. the feed-forward weights one token actually uses (the router's d_model * E is the only
  difference in active parameters);
- capacity and dropless: the experiment with `model.moe.dispatch` set to each path.
Each row trains through the real loop (`measure` from bench/throughput.py: steady-state
tokens/s of the second half of the steps). MFU counts active-parameter FLOPs only, so capacity
padding and dispatch show up as lower MFU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.throughput import measure
from research import config
from research.data.tokenizer import load_tokenizer
from research.models.decoder import padded_vocab
from research.train.flops import param_counts

ROOT = Path(__file__).resolve().parents[1]


def dense_equivalent(cfg: config.ExperimentConfig) -> list[str]:
    """Overrides turning each MoE feed-forward into an MLP with the same active weights."""
    moe = cfg.model.moe
    width = (moe.top_k + moe.n_shared_experts) * (moe.d_expert or cfg.model.ff_size)
    pattern = ",".join(entry.replace(":moe", ":mlp") for entry in cfg.model.layer_pattern)
    return [f"model.layer_pattern=[{pattern}]", f"model.d_ff={width}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("args", nargs="*", help="an experiment YAML and key=value overrides")
    args = parser.parse_args()
    experiment = next((Path(a) for a in args.args if a.endswith(".yaml")),
                      ROOT / "experiments/moe_tiny.yaml")
    overrides = [a for a in args.args if "=" in a]
    cfg = config.load(experiment, overrides)
    rows = {
        "dense (same active)": dense_equivalent(cfg),
        "moe, capacity": ["model.moe.dispatch=capacity"],
        "moe, dropless": ["model.moe.dispatch=dropless"],
    }
    vocab = padded_vocab(cfg.model, load_tokenizer(cfg.data.tokenizer).vocab_size)

    print(f"| {experiment.stem} | params | active | step ms | tokens/s | MFU | "
          "step time vs dense |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    dense_time = None
    for name, extra in rows.items():
        counts = param_counts(config.load(experiment, [*overrides, *extra]).model, vocab)
        row = measure(experiment, [*overrides, *extra], args.steps)
        dense_time = dense_time or row["step_time"]
        print(f"| {name} | {counts['total']:,} | {counts['active']:,} | "
              f"{row['step_time'] * 1e3:.0f} | {row['tokens_per_sec']:,.0f} | {row['mfu']:.1%} | "
              f"{row['step_time'] / dense_time:.2f}x |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
