"""Optimizers (AdamW, Muon, Lion, Adafactor) behind global-norm clipping, a learning-rate
schedule (and a branch's cooldown), a weight-decay mask, and the parameterization's per-parameter
lr, weight decay and ε multipliers. docs/optimizers.md has the rules and their sources."""

from __future__ import annotations

import math
from typing import Any

import jax
import optax
import optax.contrib
from jax.sharding import PartitionSpec
from optax.contrib import MuonDimensionNumbers

from research.config import OptimConfig
from research.models.parameterization import Rule, is_identity, kind, matrix_axes

# Logical axis names that never count as a "matrix" dimension for weight decay.
_NOT_MATRIX_AXES = {"layers", None}


def lr_multiplier(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """The schedule's shape, peaking at 1: linear warmup, then cosine to min_lr_ratio,
    warmup-stable-decay (WSD), or constant; laid out for `optim.schedule_steps` (default: the
    run's `total_steps`), and from `optim.cooldown_from` on a linear decay from the value there
    to min_lr_ratio at `total_steps` (a cooldown branch).

    The peak `optim.lr` multiplies it inside the step as a traced argument, so runs that differ
    only in learning rate share one compiled program (and a sweep's compilation cache).
    """
    shape = _shape(cfg, cfg.schedule_steps or total_steps)
    if cfg.cooldown_from is None:
        return shape
    start = cfg.cooldown_from
    cooldown = optax.linear_schedule(float(shape(start)), cfg.min_lr_ratio, total_steps - start)
    return optax.join_schedules([shape, cooldown], [start])


def _shape(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
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


def _is_rule(x: Any) -> bool:
    return isinstance(x, Rule)


def _is_spec(x: Any) -> bool:
    return isinstance(x, PartitionSpec)


def _is_dims(x: Any) -> bool:
    """A leaf of `muon_dimensions`' tree (None: not a Muon matrix)."""
    return x is None or isinstance(x, MuonDimensionNumbers)


def muon_dimensions(param_specs: Any) -> Any:
    """Per parameter: MuonDimensionNumbers (input and output axes) for the hidden matrices,
    None for what Muon leaves to AdamW (embeddings, the head, norms and other vectors)."""
    def one(spec: PartitionSpec) -> MuonDimensionNumbers | None:
        if kind(list(spec)) != "hidden":
            return None
        inputs, outputs = matrix_axes(list(spec))
        return MuonDimensionNumbers(inputs, outputs)

    return jax.tree.map(one, param_specs, is_leaf=_is_spec)


def _scale_by_shape(dimensions: Any) -> optax.GradientTransformation:
    """Each orthogonalized matrix x sqrt(max(1, fan_out / fan_in)) (Keller Jordan's Muon, as
    optax.contrib.muon scales it; that helper is not exported)."""
    def factor(dims: MuonDimensionNumbers, shape: tuple[int, ...]) -> float:
        fan_in = math.prod(shape[i] for i in dims.reduction_axis)
        return math.sqrt(max(1.0, math.prod(shape[i] for i in dims.output_axis) / fan_in))

    def update(updates: Any, state: optax.EmptyState, params: Any = None) -> tuple[Any, Any]:
        return jax.tree.map(lambda dims, u: u if dims is None else u * factor(dims, u.shape),
                            dimensions, updates, is_leaf=_is_dims), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _muon_direction(cfg: OptimConfig, dimensions: Any) -> optax.GradientTransformation:
    """optax.contrib's Muon update (Nesterov momentum, Newton-Schulz, sqrt(max(1, out/in))
    shape scale) for the matrices, Adam's for the rest; no lr or weight decay (added after)."""
    def matrices(updates: Any) -> Any:  # the partition hands Muon a tree masked to its leaves
        return jax.tree.map(lambda dims, u: u if dims is None else dims, dimensions, updates,
                            is_leaf=_is_dims)

    labels = jax.tree.map(lambda dims: "adam" if dims is None else "muon", dimensions,
                          is_leaf=_is_dims)
    muon = cfg.muon
    return optax.partition({
        "muon": optax.chain(
            optax.contrib.scale_by_muon(ns_steps=muon.ns_steps, beta=muon.momentum,
                                        nesterov=muon.nesterov, weight_dimension_numbers=matrices),
            _scale_by_shape(dimensions)),
        "adam": optax.scale_by_adam(b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps),
    }, labels)


def _adafactor_direction(cfg: OptimConfig) -> optax.GradientTransformation:
    """Adafactor's update as optax.adafactor builds it, without its lr, momentum and decay."""
    a = cfg.adafactor
    parts = [optax.scale_by_factored_rms(a.factored, a.decay_rate, 0, a.min_dim_size_to_factor,
                                         a.eps)]
    if a.clipping_threshold is not None:
        parts.append(optax.clip_by_block_rms(a.clipping_threshold))
    if a.multiply_by_parameter_scale:
        parts.append(optax.scale_by_param_block_rms())
    return optax.chain(*parts)


def per_leaf_optimizer(cfg: OptimConfig, schedule: optax.Schedule, mask: Any, multipliers: Any,
                       param_specs: Any) -> optax.GradientTransformation:
    """optim.name's update with each parameter's lr, weight decay and ε multiplied by its Rule's:
    chain(gradient scale, direction, decoupled decay, lr multiplier, schedule).

    Adam's update m̂/(sqrt(v̂) + ε) is invariant to scaling the gradient except through ε:
    dividing a gradient by c gives m̂/(sqrt(v̂) + c ε), so a per-parameter ε is a gradient scale
    in front of the stock scale_by_adam (Adafactor's ε, added to g², then scales by c²). Lion's
    sign and Muon's normalized Newton-Schulz ignore the gradient's scale, so they get none.
    Muon's matrices take `spectral_lr`, and the weight decay that keeps lr x wd (the decay's
    timescale) what it is for Adam's multipliers; its AdamW part is scaled by adam_lr_ratio.
    """
    pick = lambda field: jax.tree.map(lambda rule: getattr(rule, field), multipliers,  # noqa: E731
                                      is_leaf=_is_rule)
    ones = jax.tree.map(lambda rule: 1.0, multipliers, is_leaf=_is_rule)
    lrs, wds, grad_scale = pick("lr"), pick("wd"), jax.tree.map(lambda e: 1 / e, pick("eps"))
    if cfg.name == "adamw":
        direction = optax.scale_by_adam(b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps)
    elif cfg.name == "lion":
        direction, grad_scale = optax.scale_by_lion(b1=cfg.lion.beta1, b2=cfg.lion.beta2), ones
    elif cfg.name == "adafactor":
        direction = _adafactor_direction(cfg)
    else:
        dimensions = muon_dimensions(param_specs)
        is_matrix = jax.tree.map(lambda dims: dims is not None, dimensions, is_leaf=_is_dims)
        direction = _muon_direction(cfg, dimensions)
        wds = jax.tree.map(lambda m, rule: rule.wd * rule.lr / rule.spectral_lr if m else rule.wd,
                           is_matrix, multipliers, is_leaf=_is_rule)
        lrs = jax.tree.map(lambda m, rule: rule.spectral_lr if m else
                           rule.lr * cfg.muon.adam_lr_ratio, is_matrix, multipliers,
                           is_leaf=_is_rule)
        grad_scale = jax.tree.map(lambda m, s: 1.0 if m else s, is_matrix, grad_scale)
    rates = jax.tree.map(lambda wd, decays: cfg.weight_decay * wd if decays else 0.0, wds, mask)
    return optax.chain(
        scale_per_leaf(grad_scale),
        direction,
        decay_per_leaf(rates),
        scale_per_leaf(lrs),
        optax.scale_by_learning_rate(schedule),
    )


def make_optimizer(cfg: OptimConfig, total_steps: int, param_specs: Any,
                   multipliers: Any = None) -> optax.GradientTransformation:
    """Clipping + optim.name's update with the schedule's shape; the step scales the update by
    the peak lr.

    `multipliers` (a parameterization.Rule per param) give per-parameter lr, wd and ε; AdamW
    without them, or when all are 1 (standard), is the stock optax.adamw, op for op.
    """
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip else []
    schedule, mask = lr_multiplier(cfg, total_steps), decay_mask(param_specs)
    if cfg.name == "adamw" and (multipliers is None or is_identity(multipliers)):
        parts.append(optax.adamw(schedule, b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps,
                                 weight_decay=cfg.weight_decay, mask=mask))
    else:
        if multipliers is None:
            multipliers = jax.tree.map(lambda spec: Rule(), param_specs, is_leaf=_is_spec)
        parts.append(per_leaf_optimizer(cfg, schedule, mask, multipliers, param_specs))
    return optax.chain(*parts)


def state_bytes(opt_state: Any, params: Any) -> tuple[int, float]:
    """The optimizer state's bytes, in total and per parameter (of shapes or arrays)."""
    size = lambda tree: sum(leaf.size * leaf.dtype.itemsize  # noqa: E731
                            for leaf in jax.tree.leaves(tree))
    total = size(opt_state)
    return total, total / max(sum(leaf.size for leaf in jax.tree.leaves(params)), 1)
