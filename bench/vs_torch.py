"""Our dense decoder against an idiomatic PyTorch implementation of the same model, side by side.

    PYTHONPATH=. python bench/vs_torch.py [--steps 4] [--repeats 5] [--variants ...] [EXPERIMENT.yaml ...]

PyTorch is a bench-only extra (`pip install '.[bench]'`). For each experiment (default
dense_tiny and dense_small) both frameworks start from the same weights (ours, copied into the
PyTorch modules), and the script checks that the parameter counts are equal and that the loss
of the first batch agrees within 1e-4 relative in float32 (2e-2 in bfloat16) before timing.
Every variant runs in its own process (one process works while the others wait: two
frameworks' thread pools in one process take the cores from each other) and trains on the same
batches (AdamW, global-norm clipping at 1.0), in turns: `--steps` steps each per round,
`--repeats` rounds after a warm-up round (compilation excluded). The script prints the median
tokens/s and our speed relative to each variant.

Variants: jax (our train step, model.projection as configured), jax-plain (projection=plain),
torch (eager), torch-compile (torch.compile of the model), each in float32 and in bfloat16
(ours: bf16 matmul operands with float32 accumulation; PyTorch: CPU autocast to bf16).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.sidebyside import compiled_step, initial_state
from research import config
from research.config import ModelConfig
from research.models.decoder import Decoder
from research.train.objectives import lm_loss

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("jax", "jax-plain", "torch", "torch-compile")


class Block(nn.Module):
    """Pre-norm Llama block: GQA attention with rotary positions, then a SwiGLU MLP."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, n, kv, h, f = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_size, cfg.ff_size
        self.n, self.kv, self.h = n, kv, h
        self.attn_norm, self.mlp_norm = nn.RMSNorm(d, eps=cfg.norm_eps), nn.RMSNorm(d, eps=cfg.norm_eps)
        self.q, self.k = nn.Linear(d, n * h, bias=False), nn.Linear(d, kv * h, bias=False)
        self.v, self.o = nn.Linear(d, kv * h, bias=False), nn.Linear(n * h, d, bias=False)
        self.gate, self.up = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False)
        self.down = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        y = self.attn_norm(x)
        q = self.q(y).view(b, t, self.n, self.h).transpose(1, 2)
        k = self.k(y).view(b, t, self.kv, self.h).transpose(1, 2)
        v = self.v(y).view(b, t, self.kv, self.h).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.o(y.transpose(1, 2).reshape(b, t, -1))
        y = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(y)) * self.up(y))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split rotary (Hugging Face Llama's rotate_half)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class TorchDecoder(nn.Module):
    """The same decoder as research.models.decoder.Decoder (tied embeddings)."""

    def __init__(self, cfg: ModelConfig, vocab: int):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(vocab, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.cfg.head_size
        freq = self.cfg.rope_theta ** (-torch.arange(h // 2, dtype=torch.float32) / (h // 2))
        angle = torch.arange(tokens.shape[1], dtype=torch.float32)[:, None] * freq
        cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return F.linear(self.norm(x), self.embed.weight)


def copy_weights(module: TorchDecoder, params: dict) -> None:
    """Our (tied) params, scanned or unrolled layers -> the PyTorch modules' weights."""
    t = lambda a: torch.from_numpy(np.array(a, np.float32))  # noqa: E731 (a writable copy)
    with torch.no_grad():
        module.embed.weight.copy_(t(params["embed"]["embedding"]))
        module.norm.weight.copy_(t(params["final_norm"]["scale"]))
        for i, layer in enumerate(module.layers):
            block = (jax.tree.map(lambda a, i=i: a[i], params["layers"]["block_0"])
                     if "layers" in params else params[f"layer_{i}"])
            attn, mlp = block["attention"], block["mlp"]
            layer.attn_norm.weight.copy_(t(block["mixer_norm"]["scale"]))
            layer.mlp_norm.weight.copy_(t(block["ffn_norm"]["scale"]))
            for name in ("q", "k", "v"):  # [D, heads, H] -> Linear.weight [heads * H, D]
                kernel = attn[name]["kernel"]
                getattr(layer, name).weight.copy_(t(kernel.reshape(kernel.shape[0], -1).T))
            layer.o.weight.copy_(t(attn["o"]["kernel"].reshape(-1, module.cfg.d_model).T))
            for name in ("gate", "up", "down"):
                getattr(layer, name).weight.copy_(t(mlp[name]["kernel"].T))


def torch_step(model: nn.Module, cfg: config.ExperimentConfig, bf16: bool):
    """One AdamW step on tokens [B, T+1] (numpy), like train_step; returns the loss."""
    o = cfg.optim
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                            weight_decay=o.weight_decay)

    def step(tokens: np.ndarray) -> float:
        tokens = torch.from_numpy(tokens).long()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if o.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        return loss.detach()

    return step


def _jax_runner(cfg: config.ExperimentConfig):
    """(run(tokens) -> loss, first-batch loss, parameter count) of our compiled train step."""
    step, state, data = compiled_step(cfg)
    params = jax.device_get(state["params"])
    model = Decoder(cfg.model, params["embed"]["embedding"].shape[0])
    batch = next(data)["tokens"]
    first = float(lm_loss(params, model, {"tokens": jnp.asarray(batch)})[1]["loss"])
    holder = {"state": state}

    def run(tokens: np.ndarray) -> jax.Array:
        holder["state"], metrics = step(holder["state"], tokens)
        return metrics["loss"]

    return run, first, sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)), data


def _torch_runner(cfg: config.ExperimentConfig, compiled: bool):
    """The same for the PyTorch model, from our initial weights (same seed, same init)."""
    _, state, data = initial_state(cfg)
    params = jax.device_get(state["params"])
    model = TorchDecoder(cfg.model, params["embed"]["embedding"].shape[0])
    copy_weights(model, params)
    count = sum(p.numel() for p in model.parameters())
    if compiled:
        model = torch.compile(model)
    bf16 = cfg.model.compute_dtype != "float32"
    batch = next(data)["tokens"]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        tokens = torch.from_numpy(batch).long()
        logits = model(tokens[:, :-1]).float()
        first = float(F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()))
    return torch_step(model, cfg, bf16), first, count, data


def _worker(conn, experiment: Path, variant: str, dtype: str) -> None:
    """One variant in its own process: build it, report (first loss, parameter count), then
    answer every `steps` request with the seconds those steps took on the next batches.

    Separate processes, because the two frameworks' thread pools in one process steal the
    cores from each other: measured in one process, our dense_tiny step took 203 ms next to
    PyTorch and 144 ms alone.
    """
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    base = config.load(experiment, [f"model.compute_dtype={dtype}"])
    if variant.startswith("jax"):
        projection = "plain" if variant == "jax-plain" else base.model.projection
        cfg = config.load(experiment, [f"model.compute_dtype={dtype}",
                                       f"model.projection={projection}"])
        run, first, count, data = _jax_runner(cfg)
        done = jax.block_until_ready
    else:
        run, first, count, data = _torch_runner(base, compiled=variant == "torch-compile")
        done = float
    conn.send((first, count))
    while (steps := conn.recv()) is not None:
        batches = [next(data)["tokens"] for _ in range(steps)]
        start = time.perf_counter()
        for tokens in batches:
            loss = run(tokens)
        done(loss)
        conn.send(time.perf_counter() - start)


def compare(experiment: Path, variants: list[str], dtype: str, steps: int, repeats: int) -> None:
    """Start one worker per variant, check them against ours, then time them in turns."""
    context = multiprocessing.get_context("spawn")
    workers = {}
    for name in variants:
        parent, child = context.Pipe()
        process = context.Process(target=_worker, args=(child, experiment, name, dtype))
        process.start()
        workers[name] = (process, parent)
    checks = {name: conn.recv() for name, (_, conn) in workers.items()}  # built one at a time
    first_losses = {name: loss for name, (loss, _) in checks.items()}
    tol = 1e-4 if dtype == "float32" else 2e-2
    for name, (loss, count) in checks.items():
        assert count == checks["jax"][1], \
            f"{name}: {count} parameters, ours {checks['jax'][1]}"
        assert math.isclose(loss, first_losses["jax"], rel_tol=tol), \
            f"{name}: first-batch loss {loss:.6f} vs ours {first_losses['jax']:.6f} (tol {tol})"

    times: dict[str, list[float]] = {name: [] for name in workers}
    for round_ in range(repeats + 1):  # round 0: compilation and warm-up
        for name, (_, conn) in workers.items():  # one process works, the others wait
            conn.send(steps)
            seconds = conn.recv()
            if round_:
                times[name].append(seconds / steps)
    for process, conn in workers.values():
        conn.send(None)
        process.join()
    train = config.load(experiment).train
    tokens_per_step = train.batch_size * train.seq_len
    ours = float(np.median(times["jax"]))
    for name, t in times.items():
        median = float(np.median(t))
        print(f"| {experiment.stem} | {dtype} | {name} | {median * 1e3:.0f} | "
              f"{tokens_per_step / median:,.0f} | {median / ours:.2f}x | {first_losses[name]:.5f} |",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--dtypes", nargs="+", choices=("float32", "bfloat16"),
                        default=["float32", "bfloat16"])
    parser.add_argument("experiments", nargs="*", type=Path)
    args = parser.parse_args()
    variants = ["jax", *[v for v in args.variants if v != "jax"]]  # ours first: the reference
    experiments = args.experiments or [ROOT / "experiments/dense_tiny.yaml",
                                       ROOT / "experiments/dense_small.yaml"]
    print(f"{jax.devices()[0].device_kind}, torch {torch.__version__} "
          f"({len(os.sched_getaffinity(0))} threads), one process per variant, {args.repeats} "
          f"rounds of {args.steps} steps each, in turns")
    print("| experiment | dtype | variant | step ms | tokens/s | ours vs it (speed) | first loss |")
    print("|---|---|---|---:|---:|---:|---:|")
    for experiment in experiments:
        for dtype in args.dtypes:
            compare(experiment, variants, dtype, args.steps, args.repeats)


if __name__ == "__main__":
    sys.exit(main())
