"""Mamba-2: the chunked SSD against the sequential recurrence, and mamba_tiny through the real loop.

    python bench/mamba.py [--seq-len 2048] [--batch 2] [--steps 20] [key=value ...]

Part 1 times forward + backward (gradients w.r.t. x, dt, A, B, C) of `ssd_chunked` at several
chunk sizes and of `ssd_sequential` (lax.scan over steps) side by side on the same float32
inputs, shaped like one mamba_tiny layer, and checks they agree. Part 2 trains
experiments/mamba_tiny.yaml (plus any key=value overrides) for --steps steps through the real
loop with bench/throughput.py's `measure`: steady-state tokens/s and MFU.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from research import config
from research.models.mamba import ssd_chunked, ssd_sequential
from throughput import measure

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = ROOT / "experiments/mamba_tiny.yaml"


def seconds(fn, *args, repeats: int = 5) -> float:
    """Median wall time of a compiled call (compilation excluded)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def ssd_inputs(batch: int, seq_len: int, cfg: config.ModelConfig) -> tuple[jax.Array, ...]:
    m = cfg.mamba
    heads = m.expand * cfg.d_model // m.head_dim
    k = jax.random.split(jax.random.key(0), 5)
    return (jax.random.normal(k[0], (batch, seq_len, heads, m.head_dim)),
            jax.random.uniform(k[1], (batch, seq_len, heads), minval=m.dt_min, maxval=m.dt_max),
            -jax.random.uniform(k[2], (heads,), minval=m.a_init_min, maxval=m.a_init_max),
            jax.random.normal(k[3], (batch, seq_len, m.n_groups, m.d_state)),
            jax.random.normal(k[4], (batch, seq_len, m.n_groups, m.d_state)))


def forward_backward(ssd: Callable[..., tuple[jax.Array, jax.Array]]) -> Callable[..., tuple]:
    """jit of (inputs) -> (y, grads w.r.t. x, dt, A, B, C) for a loss sum(y^2)."""
    loss = lambda *inputs: jnp.sum(ssd(*inputs)[0] ** 2)  # noqa: E731
    return jax.jit(jax.value_and_grad(loss, argnums=range(5)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--chunks", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("overrides", nargs="*", help="key=value overrides of mamba_tiny")
    args = parser.parse_args()
    cfg = config.load(EXPERIMENT, args.overrides).model
    inputs = ssd_inputs(args.batch, args.seq_len, cfg)
    tokens = args.batch * args.seq_len
    m = cfg.mamba
    print(f"SSD forward+backward, float32, batch {args.batch} x {args.seq_len} tokens, "
          f"{m.expand * cfg.d_model // m.head_dim} heads x {m.head_dim}, state {m.d_state}, "
          f"{m.n_groups} group(s), {jax.devices()[0].device_kind}")
    print("| algorithm | ms | tokens/s | speed vs sequential | max rel. diff of y |")
    print("|---|---:|---:|---:|---:|")
    sequential = forward_backward(ssd_sequential)
    base = seconds(sequential, *inputs)
    y_ref = ssd_sequential(*inputs)[0]
    print(f"| sequential (lax.scan) | {base * 1e3:.1f} | {tokens / base:,.0f} | 1.00x | - |",
          flush=True)
    for chunk in args.chunks:
        chunked = forward_backward(lambda *a, q=chunk: ssd_chunked(*a, q))
        t = seconds(chunked, *inputs)
        y = ssd_chunked(*inputs, chunk)[0]
        diff = float(jnp.max(jnp.abs(y - y_ref)) / jnp.max(jnp.abs(y_ref)))
        print(f"| chunked, Q={chunk} | {t * 1e3:.1f} | {tokens / t:,.0f} | {base / t:.2f}x | "
              f"{diff:.1e} |", flush=True)

    row = measure(EXPERIMENT, args.overrides, args.steps)
    print(f"\n{EXPERIMENT.stem} through the training loop ({args.steps} steps, second half timed)")
    print("| params | FLOPs/token | tokens/s | MFU |\n|---:|---:|---:|---:|")
    print(f"| {row['params']:,} | {row['flops_per_token']:,.0f} | {row['tokens_per_sec']:,.0f} | "
          f"{row['mfu']:.1%} |")


if __name__ == "__main__":
    sys.exit(main())
