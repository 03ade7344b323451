"""Pure train and eval steps: no I/O, no host syncs; the loop jits them with explicit shardings."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from research.train import stability
from research.train.objectives import Batch, Metrics, Objective, cross_entropy
from research.train.state import TrainState


def _micro_batches(rows: jax.Array, n: int) -> jax.Array:
    """[B, ...] -> [n, B/n, ...] taking rows i*n + k into micro-batch k.

    Interleaving keeps each device's contiguous block of rows on that device, so splitting the
    batch moves no data across devices.
    """
    return rows.reshape(rows.shape[0] // n, n, *rows.shape[1:]).swapaxes(0, 1)


Controls = dict[str, jax.Array]


def controls(lr: float, loss_scale: float = 1.0) -> Controls:
    """The step's traced scalars: the peak lr (see optim.lr_multiplier; a rollback may lower
    it) and a factor on the loss (1; the fault injector's 1e4 or NaN). Traced, so changing them
    never recompiles."""
    return {"lr": jnp.asarray(lr, jnp.float32), "loss_scale": jnp.asarray(loss_scale, jnp.float32)}


def train_step(state: TrainState, batch: Batch, knobs: Controls, *, model: nn.Module,
               tx: optax.GradientTransformation, lr_multiplier: optax.Schedule,
               grad_accum: int, objective: Objective,
               guards: stability.Guards = stability.Guards()) -> tuple[TrainState, Metrics]:
    """One optimizer update of `objective` over `grad_accum` micro-batches of the global batch.

    `tx` applies the schedule's shape; `knobs["lr"]` scales its update (see
    optim.lr_multiplier). Metrics are means over the micro-batches. A frozen
    `state["reference"]` (DPO) is passed to the objective and never updated. With spike
    skipping (`guards.spike_sigma`) a spike leaves params and optimizer state as they were
    (research/train/stability.py); `state["stability"]` tracks the guards' statistics.
    """
    def scaled(params: Any, model: nn.Module, micro: Batch, reference: Any
               ) -> tuple[jax.Array, Metrics]:
        loss, metrics = objective(params, model, micro, reference)
        return loss * knobs["loss_scale"], {**metrics, "loss": metrics["loss"] * knobs["loss_scale"]}

    grad_fn = jax.value_and_grad(scaled, has_aux=True)
    reference = state.get("reference")

    def accumulate(carry, micro):
        grads_sum, metrics_sum = carry
        (_, metrics), grads = grad_fn(state["params"], model, micro, reference)
        return (jax.tree.map(jnp.add, grads_sum, grads),
                jax.tree.map(jnp.add, metrics_sum, metrics)), None

    micro = jax.tree.map(lambda rows: _micro_batches(rows, grad_accum), batch)
    first = jax.tree.map(lambda rows: rows[0], micro)
    if grad_accum == 1:
        (_, metrics), grads = grad_fn(state["params"], model, first, reference)
    else:
        zeros = jax.tree.map(jnp.zeros_like, state["params"])
        metric_shapes = jax.eval_shape(
            lambda: grad_fn(state["params"], model, first, reference)[0][1])
        zero_metrics = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes)
        (grads, metrics), _ = jax.lax.scan(accumulate, (zeros, zero_metrics), micro)
        grads = jax.tree.map(lambda g: g / grad_accum, grads)
        metrics = jax.tree.map(lambda m: m / grad_accum, metrics)

    def update(params: Any, opt_state: Any) -> tuple[Any, Any, Any]:
        updates, opt_state = tx.update(grads, opt_state, params)
        updates = jax.tree.map(lambda u: knobs["lr"] * u, updates)
        return optax.apply_updates(params, updates), opt_state, updates

    grad_norm = optax.tree.norm(grads)
    guarded = dict(state.get("stability", {}))
    if guards.spike_sigma is None:
        params, opt_state, updates = update(state["params"], state["opt_state"])
    else:
        skip, score, guarded = stability.spike_decision(guarded, metrics["loss"], grad_norm,
                                                        guards.spike_sigma)
        params, opt_state, updates = jax.lax.cond(
            skip, lambda p, o: (p, o, jax.tree.map(jnp.zeros_like, p)), update,
            state["params"], state["opt_state"])
        metrics = {**metrics, "spike/skipped": guarded["skipped"].astype(jnp.float32),
                   "spike/score": score}
    metrics = {
        **metrics,
        "grad_norm": grad_norm,
        "param_norm": optax.tree.norm(params),
        "lr": knobs["lr"] * lr_multiplier(state["step"]),
    }
    if guards.norms_every is not None:
        metrics.update(_layer_norms(state, grads, updates, params, first, model, guards))
    new_state = {**state, "params": params, "opt_state": opt_state, "step": state["step"] + 1}
    if "stability" in state:
        new_state["stability"] = stability.note_nonfinite(guarded, new_state["step"],
                                                          metrics["param_norm"])
    return new_state, metrics


def _layer_norms(state: TrainState, grads: Any, updates: Any, params: Any, batch: Batch,
                 model: nn.Module, guards: stability.Guards) -> Metrics:
    """"norms/{grad,update,param}/layer{i}" (and "norms/logit_max/layer{i}") on steps that are
    multiples of guards.norms_every, zeros (not logged) on the others: computed under a
    lax.cond, so the other steps do not pay for them."""
    period = len(model.cfg.period)

    def compute() -> Metrics:
        out = {}
        for kind, tree in (("grad", grads), ("update", updates), ("param", params)):
            out.update({f"norms/{kind}/{k}": v for k, v in
                        stability.layer_norms(tree, period).items()})
        if guards.logit_probe:
            out.update({f"norms/logit_max/{k}": v for k, v in stability.attention_logit_max(
                state["params"], model, batch).items()})
        return out

    shapes = jax.eval_shape(compute)
    due = (state["step"] + 1) % guards.norms_every == 0
    return jax.lax.cond(due, compute,
                        lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))


def eval_step(params: Any, tokens: jax.Array, *, model: nn.Module) -> Metrics:
    """Summed loss and token count, so batches of any number can be combined exactly."""
    logits, _ = model.apply({"params": params}, tokens[:, :-1])
    nll = cross_entropy(logits, tokens[:, 1:])
    return {"loss_sum": nll.sum(), "tokens": jnp.asarray(nll.size, jnp.float32)}
