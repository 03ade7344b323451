"""Optimizer: AdamW behind global-norm clipping, a learning-rate schedule, a weight-decay mask,
and the parameterization's per-parameter lr, weight decay and Adam ε multipliers."""

from __future__ import annotations

from typing import Any

import jax
import optax
from jax.sharding import PartitionSpec

from research.config import OptimConfig
from research.models.parameterization import Rule, is_identity

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


def scale_per_leaf(factors: Any) -> optax.GradientTransformation:
    """Multiply each update by its own constant (a tree of floats shaped like the params)."""

    def update(updates: Any, state: optax.EmptyState, params: Any = None) -> tuple[Any, Any]:
        return jax.tree.map(lambda u, f: u if f == 1.0 else u * f, updates, factors), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def decay_per_leaf(rates: Any) -> optax.GradientTransformation:
    """Decoupled weight decay with its own rate per parameter: update + rate * param."""

    def update(updates: Any, state: optax.EmptyState, params: Any = None) -> tuple[Any, Any]:
        return jax.tree.map(lambda u, p, r: u if r == 0.0 else u + r * p,
                            updates, params, rates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def adamw_per_leaf(cfg: OptimConfig, schedule: optax.Schedule, mask: Any,
                   multipliers: Any) -> optax.GradientTransformation:
    """optax.adamw with each parameter's lr, weight decay and ε multiplied by its Rule's.

    Adam's update m̂/(sqrt(v̂) + ε) is invariant to scaling the gradient except through ε:
    dividing a gradient by c gives m̂/(sqrt(v̂) + c ε), so a per-parameter ε is a gradient scale
    in front of the stock scale_by_adam. With every multiplier 1 this is optax.adamw, op for op.
    """
    pick = lambda field: jax.tree.map(  # noqa: E731
        lambda rule: getattr(rule, field), multipliers, is_leaf=lambda x: isinstance(x, Rule))
    rates = jax.tree.map(lambda wd, decays: cfg.weight_decay * wd if decays else 0.0,
                         pick("wd"), mask)
    return optax.chain(
        scale_per_leaf(jax.tree.map(lambda eps: 1 / eps, pick("eps"))),
        optax.scale_by_adam(b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps),
        decay_per_leaf(rates),
        scale_per_leaf(pick("lr")),
        optax.scale_by_learning_rate(schedule),
    )


def make_optimizer(cfg: OptimConfig, total_steps: int, param_specs: Any,
                   multipliers: Any = None) -> optax.GradientTransformation:
    """Clipping + AdamW with the schedule's shape; the step scales the update by the peak lr.

    `multipliers` (a parameterization.Rule per param) give per-parameter lr, wd and ε; without
    them, or when all are 1 (standard), the chain is the stock optax.adamw.
    """
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip else []
    schedule, mask = lr_multiplier(cfg, total_steps), decay_mask(param_specs)
    if multipliers is None or is_identity(multipliers):
        parts.append(optax.adamw(schedule, b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps,
                                 weight_decay=cfg.weight_decay, mask=mask))
    else:
        parts.append(adamw_per_leaf(cfg, schedule, mask, multipliers))
    return optax.chain(*parts)
