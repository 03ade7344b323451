"""XLA's matmuls against PyTorch's at a dense experiment's projection shapes: the forward x w,
the input gradient g w^T and the weight gradient x^T g (contracting the token axis), in GFLOP/s.

    PYTHONPATH=. python bench/matmul.py [EXPERIMENT.yaml] [--dtype float32|bfloat16] [--calls 50]

Why: what a dense train step does besides its matmuls is fused by XLA, so the step's speed
against PyTorch (bench/vs_torch.py) is largely these kernels' speed at the model's shapes
(docs/performance.md). Each kernel is jitted and timed alone on arrays passed in (median of
`--calls` calls); all of XLA's first, then all of PyTorch's (with as many threads as the process
may use), so neither framework's idle threads take the cores from the other. bfloat16 means
bf16 operands with a float32 result on both sides. The last line is the geometric mean of the
ratios, XLA over PyTorch (no target: this says where the step's time goes, it is not one).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch

from research import config

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("forward x w", "input gradient g w^T", "weight gradient x^T g")


def shapes(cfg: config.ExperimentConfig) -> dict[str, tuple[int, int, int]]:
    """(tokens, in, out) of each distinct projection of the experiment's dense layer."""
    m, tokens = cfg.model, cfg.train.batch_size * cfg.train.seq_len
    widths = {"q": m.n_heads * m.head_size, "k, v": m.kv_heads * m.head_size,
              "gate, up": m.ff_size}
    out = {name: (tokens, m.d_model, width) for name, width in widths.items()}
    out["o"] = (tokens, m.n_heads * m.head_size, m.d_model)
    out["down"] = (tokens, m.ff_size, m.d_model)
    return out


def median_seconds(call: Callable[[], object], calls: int) -> float:
    call()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def jax_kernels(x, w, g, dtype) -> list[Callable[[], object]]:
    dims = {"forward x w": (((1,), (0,)), (x, w)), "input gradient g w^T": (((1,), (1,)), (g, w)),
            "weight gradient x^T g": (((0,), (0,)), (x, g))}
    kernels = []
    for kind in KINDS:
        contract, (a, b) = dims[kind]
        a, b = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
        f = jax.jit(lambda a, b, c=contract: jax.lax.dot_general(
            a, b, (c, ((), ())), preferred_element_type=jnp.float32))
        kernels.append(lambda f=f, a=a, b=b: f(a, b).block_until_ready())
    return kernels


def torch_kernels(x, w, g, dtype) -> list[Callable[[], object]]:
    tx, tw, tg = (torch.from_numpy(a).to(dtype) for a in (x, w, g))
    pairs = {"forward x w": (tx, tw), "input gradient g w^T": (tg, tw.t()),
             "weight gradient x^T g": (tx.t(), tg)}
    # bf16 x bf16 -> float32 as autocast's matmuls feed a float32 consumer
    return [lambda a=a, b=b: torch.mm(a, b).float() for a, b in (pairs[k] for k in KINDS)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", nargs="?", type=Path,
                        default=ROOT / "experiments/dense_tiny.yaml")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    try:
        cfg = config.load(args.experiment, [])
        if set(cfg.model.period) != {("attention", "mlp")}:
            raise config.ConfigError(f"{args.experiment}: model.layer_pattern "
                                     f"{list(cfg.model.layer_pattern)} is not dense (allowed: "
                                     "attention:mlp layers only)")
    except config.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    rng = np.random.default_rng(0)
    arrays = {name: tuple(rng.standard_normal(s, dtype=np.float32)
                          for s in ((t, i), (i, o), (t, o)))
              for name, (t, i, o) in shapes(cfg).items()}
    jdtype, tdtype = jnp.dtype(args.dtype), getattr(torch, args.dtype)
    ours = {name: [median_seconds(k, args.calls) for k in jax_kernels(*a, jdtype)]
            for name, a in arrays.items()}
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    theirs = {name: [median_seconds(k, args.calls) for k in torch_kernels(*a, tdtype)]
              for name, a in arrays.items()}
    print(f"{args.experiment.stem}, {args.dtype}, {jax.devices()[0].device_kind}, torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads), median of {args.calls} calls")
    print("| projection | tokens x in x out | kernel | XLA GFLOP/s | PyTorch GFLOP/s | XLA / PyTorch |")
    print("|---|---|---|---:|---:|---:|")
    ratios = []
    for name, (t, i, o) in shapes(cfg).items():
        flops = 2 * t * i * o
        for kind, ours_s, theirs_s in zip(KINDS, ours[name], theirs[name]):
            ratios.append(theirs_s / ours_s)
            print(f"| {name} | {t} x {i} x {o} | {kind} | {flops / ours_s / 1e9:.0f} | "
                  f"{flops / theirs_s / 1e9:.0f} | {ratios[-1]:.2f} |")
    print(f"matmul speed XLA / PyTorch, geometric mean over {len(ratios)} kernels: "
          f"{np.exp(np.mean(np.log(ratios))):.2f}")


if __name__ == "__main__":
    main()
