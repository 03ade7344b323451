"""The accelerator check, run by bench/accelerator.sh: a fixed set of bfloat16 training steps on
this machine's GPU, each attention implementation, MFU against the device's peak, and PyTorch
on the same GPU, as one table.

    bench/accelerator.sh [--dry-run] [--steps N] [--repeats N]

The set: dense_small and moe_tiny with model.attention_impl chunked, xla and cudnn (and
dense_small with the CPU's custom-backward projections instead of auto's plain ones: does that
choice hold on a GPU?), mamba_tiny (no attention layer) as configured; every model also with
its backward matmuls in bf16 (jax-autocast, model.backward_dtype=bfloat16: the backward's
float32 cotangent otherwise makes two thirds of the matmul FLOPs run at TF32 or float32 rates
instead of bf16's); each against PyTorch
eager and torch.compile of the same model from the same weights (bench/vs_torch.py: one
process per variant, equal parameter counts and first losses checked, timed in turns). MFU
counts the training FLOPs of research.train.flops (active parameters, attention scores, the
SSD) against research.train.metrics.peak_flops (the vendor's dense bf16 peak: H100/H200 989
TFLOP/s).
`--dry-run` checks the script on CPU: tiny shapes, 1 step, 1 round, without cuDNN (refused on
CPU) and without torch.compile (minutes of compilation on a CPU).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax

from research import config
from research.data.tokenizer import load_tokenizer
from research.models.decoder import padded_vocab
from research.train.flops import flops_per_token
from research.train.metrics import peak_flops

ROOT = Path(__file__).resolve().parents[1]
ATTENTION = ["jax-chunked", "jax-xla", "jax-cudnn"]
SET = {"dense_small": [*ATTENTION, "jax-custom", "jax-autocast"],
       "moe_tiny": [*ATTENTION, "jax-autocast"], "mamba_tiny": ["jax", "jax-autocast"]}
TORCH = ["torch", "torch-compile"]
DRY_RUN = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
           "model.d_ff=128", "train.batch_size=2", "train.seq_len=64"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    gpu = jax.default_backend() == "gpu"
    if not gpu and not args.dry_run:
        print(f"error: no GPU here (JAX backend {jax.default_backend()}); "
              "bench/accelerator.sh --dry-run checks the script on CPU", file=sys.stderr)
        sys.exit(2)
    from bench.vs_torch import compare  # PyTorch takes seconds to import: after the refusals

    overrides = ["model.compute_dtype=bfloat16", *([] if gpu else DRY_RUN)]
    steps, repeats = (args.steps, args.repeats) if not args.dry_run else (1, 1)
    peak = peak_flops("bfloat16")
    print(f"{jax.devices()[0].device_kind}, bfloat16, peak {peak / 1e12:.3g} TFLOP/s"
          f"{' (measured matmul peak)' if not gpu else ''}; median of {repeats} rounds of "
          f"{steps} steps{'; DRY RUN: tiny shapes, no cudnn, no torch.compile' * args.dry_run}")
    print("| experiment | variant | step ms | tokens/s | MFU | vs PyTorch eager | "
          "vs torch.compile |\n|---|---|---:|---:|---:|---:|---:|")
    for name, ours in SET.items():
        experiment = ROOT / f"experiments/{name}.yaml"
        cfg = config.load(experiment, overrides)
        variants = [v for v in [*ours, *TORCH]
                    if gpu or v not in ("jax-cudnn", "torch-compile")]
        rows = compare(experiment, overrides, variants, "bfloat16", steps, repeats)
        vocab = padded_vocab(cfg.model, load_tokenizer(cfg.data.tokenizer).vocab_size)
        tokens = cfg.train.batch_size * cfg.train.seq_len
        flops = flops_per_token(cfg.model, vocab, cfg.train.seq_len) * tokens
        for variant, row in rows.items():
            seconds = row["step_time"]
            vs = [f"{rows[t]['step_time'] / seconds:.2f}x" if t in rows and variant not in TORCH
                  else "" for t in TORCH]
            print(f"| {name} | {variant} | {seconds * 1e3:.1f} | {tokens / seconds:,.0f} | "
                  f"{flops / seconds / peak:.1%} | {' | '.join(vs)} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
