"""Training-stability guards computed inside the jitted step: pure functions, no host syncs.

* Spike skipping (OLMo-core's SkipStepOptimizer rule): the step's loss and gradient norm are
  compared with the mean and standard deviation (ddof 1) of the last `window` *accepted* steps;
  a step whose z-score (x − mean) / std exceeds `sigma` for either, or whose loss or gradient
  norm is non-finite, is skipped: parameters and optimizer state stay as they were. No decision
  is taken until the window holds max(2, window // 2) accepted steps. The window is part of the
  train state (`state["stability"]`), so it is checkpointed and a resume is bit-exact; every
  device computes the same decision from the same replicated scalars, so hosts agree.
* The first non-finite step: the step number after which the parameters first became
  non-finite, kept in the state so a rollback (research/train/recovery.py) knows which batch
  to skip without a host sync per step.
* Per-layer norms: gradient, update and parameter norm per decoder layer, and the
  attention-logit maximum per attention layer (a forward probe), for logging.norms_every.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.config import ExperimentConfig, ModelConfig, TrainConfig

Window = dict[str, jax.Array]


def init_state(cfg: TrainConfig) -> Window | None:
    """The stability part of a fresh train state; None when no guard needs one (the state
    then has no "stability" entry, as before these guards existed)."""
    if not cfg.skip_spikes and cfg.on_nonfinite == "stop":
        return None
    state = {"first_nonfinite": jnp.zeros((), jnp.int32)}
    if cfg.skip_spikes:
        state.update(values=jnp.zeros((cfg.spike_window, 2), jnp.float32),
                     accepted=jnp.zeros((), jnp.int32), skipped=jnp.zeros((), jnp.int32))
    return state


def spike_score(window: Window, loss: jax.Array, grad_norm: jax.Array) -> jax.Array:
    """max over (loss, grad_norm) of (x − mean) / std over the window's accepted steps; 0 until
    the window holds max(2, window // 2) of them (and where std is 0)."""
    size = window["values"].shape[0]
    n = jnp.minimum(window["accepted"], size)
    valid = (jnp.arange(size) < n)[:, None]
    count = jnp.maximum(n, 2).astype(jnp.float32)
    mean = jnp.where(valid, window["values"], 0.0).sum(0) / jnp.maximum(n, 1)
    var = jnp.where(valid, jnp.square(window["values"] - mean), 0.0).sum(0) / (count - 1)
    std = jnp.sqrt(var)
    x = jnp.stack([loss, grad_norm]).astype(jnp.float32)
    z = jnp.where(std > 0, (x - mean) / jnp.where(std > 0, std, 1.0), 0.0)
    warm = n >= max(2, size // 2)
    return jnp.where(warm, jnp.max(z), 0.0)


def spike_decision(window: Window, loss: jax.Array, grad_norm: jax.Array, sigma: float
                   ) -> tuple[jax.Array, jax.Array, Window]:
    """(skip, score, the window after this step): skip a spike or a non-finite loss/grad norm;
    an accepted step enters the ring buffer, a skipped one only counts."""
    score = spike_score(window, loss, grad_norm)
    skip = (score > sigma) | ~jnp.isfinite(loss) | ~jnp.isfinite(grad_norm)
    slot = window["accepted"] % window["values"].shape[0]
    entry = jnp.stack([loss, grad_norm]).astype(jnp.float32)
    values = jnp.where(skip, window["values"], window["values"].at[slot].set(entry))
    new = {**window, "values": values,
           "accepted": window["accepted"] + jnp.where(skip, 0, 1).astype(jnp.int32),
           "skipped": window["skipped"] + skip.astype(jnp.int32)}
    return skip, score, new


def note_nonfinite(stability: Window, step: jax.Array, param_norm: jax.Array) -> Window:
    """Record `step` as the first whose update left non-finite parameters (once)."""
    first = stability["first_nonfinite"]
    bad = (first == 0) & ~jnp.isfinite(param_norm)
    return {**stability, "first_nonfinite": jnp.where(bad, step, first).astype(jnp.int32)}


def layer_norms(tree: Any, period: int) -> dict[str, jax.Array]:
    """L2 norm per decoder layer ("layer{i}", i in the whole stack) and per top-level part
    outside the stack (embed, final_norm, lm_head) of a parameter-shaped tree.

    Scanned layers ("layers"/"block_j", leaves [repeats, ...]) give layer r * period + j;
    unrolled ones are "layer_i" subtrees.
    """
    def sum_squares(subtree: Any, keep_leading: bool) -> jax.Array:
        leaves = jax.tree.leaves(subtree)
        if keep_leading:
            return sum(jnp.square(x.astype(jnp.float32)).reshape(x.shape[0], -1).sum(1)
                       for x in leaves)
        return sum(jnp.square(x.astype(jnp.float32)).sum() for x in leaves)

    out = {}
    for name, subtree in tree.items():
        if name == "layers":
            for block, block_tree in subtree.items():
                j = int(block.removeprefix("block_"))
                norms = jnp.sqrt(sum_squares(block_tree, True))
                for r in range(norms.shape[0]):
                    out[f"layer{r * period + j}"] = norms[r]
        else:
            out[name.replace("layer_", "layer")] = jnp.sqrt(sum_squares(subtree, False))
    return out


def attention_logit_max(params: Any, model: nn.Module, batch: dict[str, jax.Array]
                        ) -> dict[str, jax.Array]:
    """The largest attention logit of each attention layer ("layer{i}") on `batch`'s rows:
    one extra forward pass that collects what the attention layers sow."""
    cfg: ModelConfig = model.cfg
    rows = {name: value.reshape(-1, value.shape[-1]) for name, value in batch.items()}
    extra = {}
    if "positions" in rows:
        extra = dict(positions=rows["positions"][:, :-1], segment_ids=rows["segment_ids"][:, :-1])
    _, sown = model.apply({"params": params}, rows["tokens"][:, :-1], **extra,
                          mutable=["intermediates"])
    period = len(cfg.period)
    out = {}
    for name, subtree in sown["intermediates"].items():
        if name == "layers":
            for block, block_tree in subtree.items():
                j = int(block.removeprefix("block_"))
                (values,) = block_tree["attention"]["logit_max"]
                for r in range(values.shape[0]):
                    out[f"layer{r * period + j}"] = values[r]
        elif "attention" in subtree:
            (value,) = subtree["attention"]["logit_max"]
            out[name.replace("layer_", "layer")] = value
    return out


@dataclass(frozen=True)
class Guards:
    """The step's static stability settings (from the config)."""

    spike_sigma: float | None = None  # None: no spike skipping
    norms_every: int | None = None  # None: no per-layer norms
    logit_probe: bool = False  # the attention-logit max per layer (with the norms)

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> Guards:
        attention = any(m == "attention" for m, _ in cfg.model.period)
        return cls(cfg.train.spike_sigma if cfg.train.skip_spikes else None,
                   cfg.logging.norms_every,
                   cfg.logging.norms_every is not None and attention and not cfg.model.qk_norm)
