"""Optimizer pieces: schedule shapes, weight-decay mask, and the traced peak learning rate."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from research.config import OptimConfig
from research.train.optim import decay_mask, lr_multiplier, make_optimizer


def reference_multiplier(cfg: OptimConfig, total: int, step: int) -> float:
    """The documented schedules, written out by hand."""
    warmup = cfg.warmup_steps
    if step < warmup:
        return step / warmup
    t, rest, floor = step - warmup, total - warmup, cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t, rest) / rest))
    if cfg.schedule == "wsd":
        decay = round(rest * cfg.decay_fraction)
        return 1.0 if t < rest - decay else 1 - (1 - floor) * min(t - (rest - decay), decay) / decay
    return 1.0


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_schedule_shapes(schedule):
    cfg = OptimConfig(schedule=schedule, warmup_steps=10, decay_fraction=0.25, min_lr_ratio=0.1)
    f = lr_multiplier(cfg, 90)
    for step in range(0, 95):
        assert float(f(step)) == pytest.approx(reference_multiplier(cfg, 90, step), abs=1e-6), step


def test_decay_mask_skips_vectors_norms_and_counts_the_layers_axis_out():
    specs = {
        "embed": P("vocab", "embed"),
        "layers": {"q": P("layers", "embed", "heads", "head_dim"), "norm": P("layers", "norm"),
                   "A_log": P("layers", "mamba_heads"), "bias": P(None)},
    }
    assert decay_mask(specs) == {"embed": True, "layers": {"q": True, "norm": False,
                                                            "A_log": False, "bias": False}}


def test_peak_lr_scaling_equals_adamw_at_that_lr():
    """chain(clip, adamw(shape)) followed by peak_lr * update == optax.adamw(peak_lr * shape)."""
    cfg = OptimConfig(lr=3e-3, warmup_steps=2, weight_decay=0.1, grad_clip=None)
    specs = {"w": P("embed", "mlp"), "b": P("mlp")}
    params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
    ours = make_optimizer(cfg, 10, specs)
    ref = optax.adamw(lambda s: cfg.lr * lr_multiplier(cfg, 10)(s), b1=cfg.beta1, b2=cfg.beta2,
                      eps=cfg.eps, weight_decay=cfg.weight_decay, mask={"w": True, "b": False})
    p_ours, p_ref = params, params
    s_ours, s_ref = ours.init(params), ref.init(params)
    for i in range(5):
        grads = jax.tree.map(lambda x: jnp.sin(x * (i + 1)), p_ours)
        u, s_ours = ours.update(grads, s_ours, p_ours)
        p_ours = optax.apply_updates(p_ours, jax.tree.map(lambda x: cfg.lr * x, u))
        u, s_ref = ref.update(jax.tree.map(lambda x: jnp.sin(x * (i + 1)), p_ref), s_ref, p_ref)
        p_ref = optax.apply_updates(p_ref, u)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), p_ours, p_ref)
