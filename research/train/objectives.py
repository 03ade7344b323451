"""Training objectives: pure loss functions the step differentiates (no I/O, no host syncs).

Every objective has the signature `(params, model, batch, reference) -> (loss, metrics)`: the
loss to differentiate (including the model's auxiliary losses) and scalar metrics to log.
`reference` is the frozen parameter tree DPO compares against (None for the others).

* lm: mean next-token loss over every position of `batch["tokens"]` [B, L+1].
* sft: mean next-token loss over the learned (response) tokens only; batches of packed rows
  (see research/data/examples.py) also carry segment ids, positions and the loss mask.
* dpo: −log σ(β [(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))]) over
  pairs [B, 2, L+1] (chosen, rejected), with label smoothing ε (the assumed probability that
  a label is flipped: the loss mixes in −log σ of the opposite margin with weight ε).

Every objective also takes `z_loss`, the coefficient of the output z-loss (PaLM, OLMo 2): the
mean squared log-partition log Σ exp(logits) over the tokens its loss counts (dpo: the policy's
learned tokens), added to the loss and logged as "z_loss" (the added term) when nonzero. It
keeps the logits' normaliser near zero, which guards bf16 softmaxes against drift.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.config import DPOConfig
from research.models.decoder import layer_metrics

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
Objective = Callable[[Any, nn.Module, Batch, Any], tuple[jax.Array, Metrics]]


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token negative log-likelihood in float32, [batch, seq]."""
    return token_terms(logits, targets)[0]


def token_terms(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token negative log-likelihood and log-partition log Σ exp(logits), float32 [B, L]."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return log_z - picked, log_z


def with_z_loss(loss: jax.Array, metrics: Metrics, log_z: jax.Array, weights: jax.Array | None,
                z_loss: float) -> tuple[jax.Array, Metrics]:
    """loss + z_loss * mean(log_z²) over the tokens `weights` selects (all when None); the
    added term is logged as "z_loss". With z_loss = 0 nothing changes."""
    if not z_loss:
        return loss, metrics
    squared = jnp.square(log_z)
    mean = squared.mean() if weights is None else \
        (squared * weights).sum() / jnp.maximum(weights.sum(), 1.0)
    term = z_loss * mean
    return loss + term, {**metrics, "z_loss": term}


def lm_loss(params: Any, model: nn.Module, batch: Batch, reference: Any = None, *,
            z_loss: float = 0.0) -> tuple[jax.Array, Metrics]:
    """Mean next-token loss (+ the model's auxiliary losses, which only shape the gradient).

    The metrics are scalars: the loss, and the layers' aux values named by layer (e.g.
    "moe/layer3/drop_frac"), so the loop can log every one as a float.
    """
    tokens = batch["tokens"]
    logits, aux = model.apply({"params": params}, tokens[:, :-1])
    nll, log_z = token_terms(logits, tokens[:, 1:])
    loss = nll.mean()
    return with_z_loss(loss + aux.get("aux_loss", 0.0),
                       {"loss": loss, **layer_metrics(aux, model.cfg)}, log_z, None, z_loss)


def learned_nll(params: Any, model: nn.Module, batch: Batch
                ) -> tuple[jax.Array, jax.Array, jax.Array, dict[str, jax.Array]]:
    """Per-target negative log-likelihood [B, L], log-partition [B, L], the mask of learned
    targets [B, L] (float32), and the model's aux, for rows with segment ids and positions."""
    tokens = batch["tokens"]
    logits, aux = model.apply({"params": params}, tokens[:, :-1], batch["positions"][:, :-1],
                              segment_ids=batch["segment_ids"][:, :-1])
    nll, log_z = token_terms(logits, tokens[:, 1:])
    return nll, log_z, batch["loss_mask"][:, 1:].astype(jnp.float32), aux


def sft_loss(params: Any, model: nn.Module, batch: Batch, reference: Any = None, *,
             z_loss: float = 0.0) -> tuple[jax.Array, Metrics]:
    """Mean loss over the learned tokens; prompt and padding tokens count for nothing."""
    nll, log_z, mask, aux = learned_nll(params, model, batch)
    count = mask.sum()
    loss = (nll * mask).sum() / jnp.maximum(count, 1.0)
    metrics = {"loss": loss, "learned_tokens": count, **layer_metrics(aux, model.cfg)}
    return with_z_loss(loss + aux.get("aux_loss", 0.0), metrics, log_z, mask, z_loss)


def dpo_terms(chosen: jax.Array, rejected: jax.Array, ref_chosen: jax.Array,
              ref_rejected: jax.Array, beta: float, label_smoothing: float
              ) -> tuple[jax.Array, Metrics]:
    """The DPO loss and its metrics from sequence log-probs [pairs] of policy and reference.

    Rewards are β (log π − log π_ref) of each sequence; accuracy is the fraction of pairs whose
    chosen reward is strictly above the rejected one (0 while policy = reference).
    """
    chosen_reward = beta * (chosen - ref_chosen)
    rejected_reward = beta * (rejected - ref_rejected)
    margin = chosen_reward - rejected_reward
    losses = -(1 - label_smoothing) * jax.nn.log_sigmoid(margin) \
        - label_smoothing * jax.nn.log_sigmoid(-margin)
    return losses.mean(), {
        "loss": losses.mean(),
        "rewards/chosen": chosen_reward.mean(),
        "rewards/rejected": rejected_reward.mean(),
        "rewards/margin": margin.mean(),
        "accuracy": (margin > 0).astype(jnp.float32).mean(),
    }


def dpo_loss(params: Any, model: nn.Module, batch: Batch, reference: Any, *, beta: float,
             label_smoothing: float, z_loss: float = 0.0) -> tuple[jax.Array, Metrics]:
    """DPO over pairs [B, 2, L+1]: both sequences of a pair run as two rows of one forward
    pass (policy with gradients, the frozen reference without). A sequence's log-prob is the
    sum over its learned tokens."""
    rows = {name: value.reshape(-1, value.shape[-1]) for name, value in batch.items()}
    nll, log_z, mask, aux = learned_nll(params, model, rows)
    ref_nll, _, _, _ = learned_nll(jax.lax.stop_gradient(reference), model, rows)
    policy = -(nll * mask).sum(axis=-1).reshape(-1, 2)
    ref = -(ref_nll * mask).sum(axis=-1).reshape(-1, 2)
    loss, metrics = dpo_terms(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], beta,
                              label_smoothing)
    return with_z_loss(loss + aux.get("aux_loss", 0.0),
                       {**metrics, **layer_metrics(aux, model.cfg)}, log_z, mask, z_loss)


def make_objective(name: str, dpo: DPOConfig, z_loss: float = 0.0) -> Objective:
    """train.objective (with optim.z_loss) -> its loss function."""
    if name == "dpo":
        return functools.partial(dpo_loss, beta=dpo.beta, label_smoothing=dpo.label_smoothing,
                                 z_loss=z_loss)
    return functools.partial({"lm": lm_loss, "sft": sft_loss}[name], z_loss=z_loss)
