"""Mamba-2: the chunked SSD against the sequential recurrence, and mamba_tiny's train step.

    PYTHONPATH=. python bench/mamba.py [--seq-len 2048] [--batch 2] [--chunks 32 64 128]
        [--steps 3] [--repeats 5] [key=value ...]

Part 1 times forward + backward (gradients w.r.t. x, dt, A, B, C) of `ssd_chunked` at several
chunk sizes and of `ssd_sequential` (lax.scan over steps) on the same float32 inputs, shaped
like one mamba_tiny layer, and checks they agree; the compiled calls take turns, `--repeats`
rounds, so machine load hits them alike. Part 2 times experiments/mamba_tiny.yaml's real train
step (plus any key=value overrides) with bench/sidebyside.py's `alternate` (`--steps` steps per
round) and its MFU by the loop's FLOPs formula. Ends with one `result:` line per headline figure
and its target (issue #25): the speed-up at the experiment's own chunk size, and the MFU.
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

from bench.sidebyside import alternate, mfu
from research import config
from research.launch import allocator
from research.models.mamba import ssd_chunked, ssd_sequential

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = ROOT / "experiments/mamba_tiny.yaml"


def seconds(fns: dict[str, Callable], args: tuple, repeats: int) -> dict[str, float]:
    """Median wall time of each compiled call (compilation excluded), the calls taking turns;
    each turn times its second call, as `alternate` does (the first after another program pays
    for fresh buffers, which a training run does not)."""
    for fn in fns.values():
        jax.block_until_ready(fn(*args))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            jax.block_until_ready(fn(*args))
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


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
    parser.add_argument("--chunks", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("overrides", nargs="*", help="key=value overrides of mamba_tiny")
    args = parser.parse_args()
    cfg = config.load(EXPERIMENT, args.overrides)
    m = cfg.model.mamba
    chunks = sorted({*args.chunks, m.chunk_size})
    inputs = ssd_inputs(args.batch, args.seq_len, cfg.model)
    tokens = args.batch * args.seq_len
    print(f"SSD forward+backward, float32, batch {args.batch} x {args.seq_len} tokens, "
          f"{m.n_heads(cfg.model.d_model)} heads x {m.head_dim}, state {m.d_state}, "
          f"{m.n_groups} group(s), {jax.devices()[0].device_kind}, {allocator()}, median of "
          f"{args.repeats}")
    fns = {"sequential": forward_backward(ssd_sequential)}
    fns.update({q: forward_backward(lambda *a, q=q: ssd_chunked(*a, q)) for q in chunks})
    times = seconds(fns, inputs, args.repeats)
    y_ref = ssd_sequential(*inputs)[0]
    base = times["sequential"]
    print("| algorithm | ms | tokens/s | speed vs sequential | max rel. diff of y |")
    print("|---|---:|---:|---:|---:|")
    print(f"| sequential (lax.scan) | {base * 1e3:.1f} | {tokens / base:,.0f} | 1.00x | - |")
    for q in chunks:
        y = ssd_chunked(*inputs, q)[0]
        diff = float(jnp.max(jnp.abs(y - y_ref)) / jnp.max(jnp.abs(y_ref)))
        print(f"| chunked, Q={q} | {times[q] * 1e3:.1f} | {tokens / times[q]:,.0f} | "
              f"{base / times[q]:.2f}x | {diff:.1e} |")

    step = alternate({EXPERIMENT.stem: cfg}, args.steps, args.repeats)[EXPERIMENT.stem]
    step_tokens = cfg.train.batch_size * cfg.train.seq_len
    print(f"\n{EXPERIMENT.stem} train step (median of {args.repeats} x {args.steps} steps)")
    print("| step ms | tokens/s | MFU |\n|---:|---:|---:|")
    print(f"| {step['step_time'] * 1e3:.1f} | {step_tokens / step['step_time']:,.0f} | "
          f"{mfu(cfg, step['step_time']):.1%} |")
    print(f"result: mamba chunked/sequential T={args.seq_len} "
          f"{base / times[m.chunk_size]:.1f} (target >= 10)")
    print(f"result: {EXPERIMENT.stem} MFU {mfu(cfg, step['step_time']):.1%} (target >= 40)")


if __name__ == "__main__":
    sys.exit(main())
