"""Pure train and eval steps: no I/O, no host syncs; the loop jits them with explicit shardings."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from research.train.objectives import Batch, Metrics, Objective, cross_entropy
from research.train.state import TrainState


def _micro_batches(rows: jax.Array, n: int) -> jax.Array:
    """[B, ...] -> [n, B/n, ...] taking rows i*n + k into micro-batch k.

    Interleaving keeps each device's contiguous block of rows on that device, so splitting the
    batch moves no data across devices.
    """
    return rows.reshape(rows.shape[0] // n, n, *rows.shape[1:]).swapaxes(0, 1)


def train_step(state: TrainState, batch: Batch, peak_lr: jax.Array, *, model: nn.Module,
               tx: optax.GradientTransformation, lr_multiplier: optax.Schedule,
               grad_accum: int, objective: Objective) -> tuple[TrainState, Metrics]:
    """One optimizer update of `objective` over `grad_accum` micro-batches of the global batch.

    `tx` applies the schedule's shape; `peak_lr` scales its update (see optim.lr_multiplier).
    Metrics are means over the micro-batches. A frozen `state["reference"]` (DPO) is passed to
    the objective and never updated.
    """
    grad_fn = jax.value_and_grad(objective, has_aux=True)
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

    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], jax.tree.map(lambda u: peak_lr * u, updates))
    metrics = {
        **metrics,
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(params),
        "lr": peak_lr * lr_multiplier(state["step"]),
    }
    new_state = {**state, "params": params, "opt_state": opt_state, "step": state["step"] + 1}
    return new_state, metrics


def eval_step(params: Any, tokens: jax.Array, *, model: nn.Module) -> Metrics:
    """Summed loss and token count, so batches of any number can be combined exactly."""
    logits, _ = model.apply({"params": params}, tokens[:, :-1])
    nll = cross_entropy(logits, tokens[:, 1:])
    return {"loss_sum": nll.sum(), "tokens": jnp.asarray(nll.size, jnp.float32)}
