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
from research.models.parameterization import Rule
from research.train.optim import decay_mask, lr_multiplier, make_optimizer, per_leaf_optimizer


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


def _adam_reference(cfg: OptimConfig, steps: int, lr: float, params: dict, rules: dict,
                    decays: dict) -> dict:
    """AdamW in float64 numpy, per parameter lr, wd and eps multipliers, constant schedule."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t in range(1, steps + 1):
        for k in p:
            g = np.sin(p[k] * t)
            m[k] = cfg.beta1 * m[k] + (1 - cfg.beta1) * g
            v[k] = cfg.beta2 * v[k] + (1 - cfg.beta2) * g * g
            m_hat, v_hat = m[k] / (1 - cfg.beta1 ** t), v[k] / (1 - cfg.beta2 ** t)
            update = m_hat / (np.sqrt(v_hat) + cfg.eps * rules[k].eps)
            if decays[k]:
                update = update + cfg.weight_decay * rules[k].wd * p[k]
            p[k] = p[k] - lr * rules[k].lr * update
    return p


def _run(tx, lr: float, params: dict, steps: int) -> dict:
    state = tx.init(params)
    for t in range(1, steps + 1):
        grads = jax.tree.map(lambda x: jnp.sin(x * t), params)
        u, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, jax.tree.map(lambda x: lr * x, u))
    return params


def test_per_parameter_lr_wd_and_eps_match_a_float64_adamw():
    """Each leaf moves as AdamW with its own lr, wd and eps (eps large enough to matter)."""
    cfg = OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant", weight_decay=0.1, eps=1e-3,
                      grad_clip=None)
    specs = {"w": P("embed", "mlp"), "e": P("vocab", "embed"), "b": P("norm")}
    params = {"w": jnp.linspace(-1, 1, 12).reshape(4, 3), "e": jnp.linspace(0.5, 2, 6).reshape(3, 2),
              "b": jnp.linspace(-0.3, 0.3, 3)}
    rules = {"w": Rule(lr=0.25, wd=4.0, eps=1 / 16), "e": Rule(eps=0.5), "b": Rule(lr=2.0, eps=3.0)}
    ours = _run(make_optimizer(cfg, 10, specs, rules), cfg.lr, params, 6)
    ref = _adam_reference(cfg, 6, cfg.lr, params, rules, {"w": True, "e": True, "b": False})
    for k in params:
        np.testing.assert_allclose(ours[k], ref[k], rtol=2e-6, atol=1e-7, err_msg=k)


def test_per_parameter_chain_with_unit_multipliers_is_adamw_bit_for_bit():
    """The machinery itself is exact at multiplier 1 (standard also skips it altogether)."""
    cfg = OptimConfig(lr=3e-3, warmup_steps=2, weight_decay=0.1, grad_clip=None)
    specs = {"w": P("embed", "mlp"), "b": P("mlp")}
    params = {"w": jnp.linspace(-1, 1, 12).reshape(4, 3), "b": jnp.ones(3)}
    ones = {"w": Rule(), "b": Rule()}
    stock = make_optimizer(cfg, 10, specs, ones)
    assert len(stock.init(params)[0]) == 3  # optax.adamw's own (adam, decay, lr) states
    chain = per_leaf_optimizer(cfg, lr_multiplier(cfg, 10), decay_mask(specs), ones, specs)
    a, b = _run(stock, cfg.lr, params, 5), _run(optax.chain(chain), cfg.lr, params, 5)
    assert jax.tree.all(jax.tree.map(np.array_equal, a, b))
