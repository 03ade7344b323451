"""MoE step time against a dense model with the same active parameters, and the two dispatch
paths, measured side by side in one run.

    PYTHONPATH=. python bench/moe.py [--steps 4] [--repeats 5] [EXPERIMENT.yaml] [key=value ...]

Rows (default experiment: experiments/moe_tiny.yaml, 8 experts, top-2):
- dense: every MoE feed-forward replaced by a SwiGLU MLP of width (top_k + n_shared) * d_expert,
  i.e. the feed-forward weights one token actually uses (the router's d_model * E is the only
  difference in active parameters);
- capacity and dropless: the experiment with `model.moe.dispatch` set to each path.
The rows' real train steps are compiled first and then take turns, `--steps` steps each per
round for `--repeats` rounds (`alternate` from bench/sidebyside.py), so machine load hits them
alike: the ratios are the robust figures on a shared machine. MFU counts active-parameter FLOPs
only (`research.train.flops`, the loop's formula), so capacity padding and dispatch show up as
lower MFU. Ends with one `result:` line per headline ratio and its target (issue #25).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax

from bench.sidebyside import alternate, mfu
from research import config
from research.data.tokenizer import load_tokenizer
from research.launch import allocator
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
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("args", nargs="*", help="an experiment YAML and key=value overrides")
    args = parser.parse_args()
    experiment = next((Path(a) for a in args.args if a.endswith(".yaml")),
                      ROOT / "experiments/moe_tiny.yaml")
    overrides = [a for a in args.args if "=" in a]
    base = config.load(experiment, overrides)
    cfgs = {name: config.load(experiment, [*overrides, *extra]) for name, extra in {
        "dense (same active)": dense_equivalent(base),
        "moe, capacity": ["model.moe.dispatch=capacity"],
        "moe, dropless": ["model.moe.dispatch=dropless"],
    }.items()}
    vocab = padded_vocab(base.model, load_tokenizer(base.data.tokenizer).vocab_size)
    tokens = base.train.batch_size * base.train.seq_len
    times = {name: r["step_time"] for name, r in alternate(cfgs, args.steps, args.repeats).items()}

    print(f"{jax.devices()[0].device_kind}, {allocator()}")
    print(f"| {experiment.stem} (median of {args.repeats} x {args.steps} steps) | params | active "
          "| step ms | tokens/s | MFU | step time vs dense |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    dense, capacity, dropless = times.values()
    for name, cfg in cfgs.items():
        counts = param_counts(cfg.model, vocab)
        print(f"| {name} | {counts['total']:,} | {counts['active']:,} | {times[name] * 1e3:.0f} | "
              f"{tokens / times[name]:,.0f} | {mfu(cfg, times[name]):.1%} | "
              f"{times[name] / dense:.2f}x |")
    print(f"result: moe dropless/capacity step {dropless / capacity:.2f} (target <= 1.5)")
    print(f"result: moe capacity/dense step {capacity / dense:.2f} (target <= 1.2)")


if __name__ == "__main__":
    sys.exit(main())
