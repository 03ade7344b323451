"""Optimizer: AdamW behind global-norm clipping, a learning-rate schedule, a weight-decay mask."""

from __future__ import annotations

from typing import Any

import jax
import optax
from jax.sharding import PartitionSpec

from research.config import OptimConfig

# Logical axis names that never count as a "matrix" dimension for weight decay.
_NOT_MATRIX_AXES = {"layers", None}


def lr_multiplier(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """The schedule's shape, peaking at 1: linear warmup, then cosine to min_lr_ratio,
    warmup-stable-decay (WSD), or constant.

    The peak `optim.lr` multiplies it inside the step as a traced argument, so runs that differ
    only in learning rate share one compiled program (and a sweep's compilation cache).
    """
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    floor = cfg.min_lr_ratio
    ramp = optax.linear_schedule(0.0 if warmup else 1.0, 1.0, max(warmup, 1))
    rest = max(total_steps - warmup, 1)
    if cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(1.0, rest, alpha=floor)
    elif cfg.schedule == "wsd":
        decay = max(int(round(rest * cfg.decay_fraction)), 1)
        after = optax.join_schedules(
            [optax.constant_schedule(1.0), optax.linear_schedule(1.0, floor, decay)],
            [rest - decay],
        )
    else:
        after = optax.constant_schedule(1.0)
    return optax.join_schedules([ramp, after], [warmup])


def decay_mask(param_specs: Any) -> Any:
    """True for weight matrices; False for norms, biases, and per-channel vectors (A_log, D, ...).

    Decided from logical axis names so it holds for scanned layers too (whose extra leading
    "layers" axis would fool a plain `ndim >= 2` test).
    """

    def is_matrix(spec: PartitionSpec) -> bool:
        names = [name for name in spec if name not in _NOT_MATRIX_AXES]
        return len(names) >= 2 and "norm" not in names

    return jax.tree.map(is_matrix, param_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def make_optimizer(cfg: OptimConfig, total_steps: int, param_specs: Any) -> optax.GradientTransformation:
    """Clipping + AdamW with the schedule's shape; the step scales the update by the peak lr."""
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip else []
    parts.append(
        optax.adamw(
            lr_multiplier(cfg, total_steps),
            b1=cfg.beta1,
            b2=cfg.beta2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask(param_specs),
        )
    )
    return optax.chain(*parts)
