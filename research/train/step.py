"""Pure train and eval steps: no I/O, no host syncs; the loop jits them with explicit shardings."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from research.models.decoder import layer_metrics
from research.train.state import TrainState

Metrics = dict[str, jax.Array]


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token negative log-likelihood in float32, [batch, seq]."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return log_z - picked


def loss_fn(params: Any, model: nn.Module, tokens: jax.Array) -> tuple[jax.Array, Metrics]:
    """Mean next-token loss (+ the model's auxiliary losses, which only shape the gradient).

    The metrics are scalars: the loss, and the layers' aux values named by layer (e.g.
    "moe/layer3/drop_frac"), so the loop can log every one as a float.
    """
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    logits, aux = model.apply({"params": params}, inputs)
    loss = cross_entropy(logits, targets).mean()
    metrics = {"loss": loss, **layer_metrics(aux, model.cfg)}
    return loss + aux.get("aux_loss", 0.0), metrics


def _micro_batches(tokens: jax.Array, n: int) -> jax.Array:
    """[B, T] -> [n, B/n, T] taking rows i*n + k into micro-batch k.

    Interleaving keeps each device's contiguous block of rows on that device, so splitting the
    batch moves no data across devices.
    """
    batch, length = tokens.shape
    return tokens.reshape(batch // n, n, length).swapaxes(0, 1)


def train_step(state: TrainState, tokens: jax.Array, peak_lr: jax.Array, *, model: nn.Module,
               tx: optax.GradientTransformation, lr_multiplier: optax.Schedule,
               grad_accum: int) -> tuple[TrainState, Metrics]:
    """One optimizer update over `grad_accum` micro-batches of the global batch `tokens`.

    `tx` applies the schedule's shape; `peak_lr` scales its update (see optim.lr_multiplier).
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def accumulate(carry, micro):
        grads_sum, metrics_sum = carry
        (_, metrics), grads = grad_fn(state["params"], model, micro)
        return (jax.tree.map(jnp.add, grads_sum, grads),
                jax.tree.map(jnp.add, metrics_sum, metrics)), None

    micro = _micro_batches(tokens, grad_accum)
    if grad_accum == 1:
        (_, metrics), grads = grad_fn(state["params"], model, micro[0])
    else:
        zeros = jax.tree.map(jnp.zeros_like, state["params"])
        metric_shapes = jax.eval_shape(lambda: grad_fn(state["params"], model, micro[0])[0][1])
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
