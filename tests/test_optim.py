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


# ----------------------------------------------------------------------------- other optimizers
# A parameter of each kind: a hidden matrix, a scanned matrix writing the residual stream (its
# "layers" axis stacks two matrices), an embedding and a norm; non-trivial multipliers (μP-like).
SPECS = {"w": P("embed", "mlp"), "o": P("layers", "mlp", "embed"), "e": P("vocab", "embed"),
         "n": P("norm")}
PARAMS = {"w": np.linspace(-1, 1, 24).reshape(4, 6), "o": np.linspace(-0.5, 0.7, 48).reshape(2, 6, 4),
          "e": np.linspace(0.5, 2, 20).reshape(5, 4), "n": np.linspace(-0.3, 0.3, 4)}
RULES = {"w": Rule(lr=0.5, wd=2.0, eps=0.25, spectral_lr=0.8),
         "o": Rule(lr=0.25, wd=4.0, eps=1 / 16, spectral_lr=0.6),
         "e": Rule(eps=0.5), "n": Rule(lr=2.0, eps=3.0)}
DECAYS = {"w": True, "o": True, "e": True, "n": False}


def _run_ours(cfg: OptimConfig, steps: int) -> dict:
    params = {k: jnp.asarray(v, jnp.float32) for k, v in PARAMS.items()}
    return _run(make_optimizer(cfg, 10, SPECS, RULES), cfg.lr, params, steps)


def _reference(cfg: OptimConfig, steps: int, direction) -> dict:
    """θ ← θ - lr·lr_k·(direction_k + wd·wd_k·θ) in float64, with direction(k, g, state, t)."""
    p = {k: v.astype(np.float64) for k, v in PARAMS.items()}
    state: dict = {k: {} for k in p}
    for t in range(1, steps + 1):
        for k in p:
            u, lr_k, wd_k = direction(k, np.sin(p[k] * t), state[k], t)
            if DECAYS[k]:
                u = u + cfg.weight_decay * wd_k * p[k]
            p[k] = p[k] - cfg.lr * lr_k * u
    return p


def _check(ours: dict, ref: dict, rtol: float) -> None:
    for k in ref:
        np.testing.assert_allclose(ours[k], ref[k], rtol=rtol, atol=rtol * 1e-2, err_msg=k)


def test_lion_matches_its_published_rule_in_float64():
    """Chen et al. 2023, Algorithm 2: u = sign(β1 m + (1-β1) g), m ← β2 m + (1-β2) g; per
    parameter lr and wd (no ε: the sign ignores the gradient's scale)."""
    cfg = OptimConfig(name="lion", lr=1e-2, warmup_steps=0, schedule="constant", grad_clip=None,
                      lion={"beta1": 0.8, "beta2": 0.95})

    def lion(k, g, s, t):
        m = s.get("m", np.zeros_like(g))
        u = np.sign(0.8 * m + 0.2 * g)
        s["m"] = 0.95 * m + 0.05 * g
        return u, RULES[k].lr, RULES[k].wd

    _check(_run_ours(cfg, 4), _reference(cfg, 4, lion), 1e-6)


def test_adafactor_matches_its_published_rule_in_float64():
    """Shazeer & Stern 2018, Algorithm 4 without momentum or relative step: β2_t = 1 - t^-0.8,
    row and column means of g² + ε1 (each "layers" slice of a stacked matrix on its own, a
    vector unfactored), V = R C / mean(R), U = g / sqrt(V) clipped to RMS <= d. The ε rule
    divides the gradient by ε_k first (so ε1 scales by ε_k²)."""
    cfg = OptimConfig(name="adafactor", lr=1e-2, warmup_steps=0, schedule="constant",
                      grad_clip=None, adafactor={"min_dim_size_to_factor": 4, "eps": 1e-3,
                                                 "clipping_threshold": 0.5})

    def adafactor(k, g, s, t):
        g = g / RULES[k].eps
        beta = 1 - t ** -0.8
        g2 = g * g + 1e-3
        if g.ndim == 1:
            s["v"] = beta * s.get("v", 0) + (1 - beta) * g2
            v = s["v"]
        else:  # the two longest axes are the matrix (ties: the later ones)
            rows, cols = (np.argsort(g.shape, kind="stable")[-2:])
            s["r"] = beta * s.get("r", 0) + (1 - beta) * g2.mean(axis=cols, keepdims=True)
            s["c"] = beta * s.get("c", 0) + (1 - beta) * g2.mean(axis=rows, keepdims=True)
            v = s["r"] * s["c"] / s["r"].mean(axis=rows, keepdims=True)
        u = g / np.sqrt(v)
        u = u / max(1.0, np.sqrt(np.mean(u * u)) / 0.5)
        return u, RULES[k].lr, RULES[k].wd

    _check(_run_ours(cfg, 4), _reference(cfg, 4, adafactor), 2e-5)


def _newton_schulz(x: np.ndarray, steps: int) -> np.ndarray:
    """Keller Jordan's quintic iteration on one matrix (optax.contrib's coefficients)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    wide = x.shape[0] <= x.shape[1]
    x = x if wide else x.T
    x = x / (np.linalg.norm(x) + 1e-8)
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x if wide else x.T


def test_muon_matches_its_rule_in_float64():
    """Muon as optax.contrib wires it (Jordan 2024): bias-corrected Nesterov momentum,
    Newton-Schulz on each matrix (input axes x output axes, per "layers" slice), scaled by
    sqrt(max(1, fan_out/fan_in)), with spectral_lr and the wd that keeps lr·wd; the embedding
    and the norm take AdamW at adam_lr_ratio x lr with their lr, wd and ε multipliers."""
    cfg = OptimConfig(name="muon", lr=2e-2, warmup_steps=0, schedule="constant", grad_clip=None,
                      eps=1e-3, muon={"momentum": 0.9, "ns_steps": 5, "adam_lr_ratio": 0.25})
    beta = 0.9

    def muon(k, g, s, t):
        rule = RULES[k]
        if k in ("e", "n"):
            s["m"] = cfg.beta1 * s.get("m", 0) + (1 - cfg.beta1) * g
            s["v"] = cfg.beta2 * s.get("v", 0) + (1 - cfg.beta2) * g * g
            m_hat, v_hat = s["m"] / (1 - cfg.beta1 ** t), s["v"] / (1 - cfg.beta2 ** t)
            return m_hat / (np.sqrt(v_hat) + cfg.eps * rule.eps), rule.lr * 0.25, rule.wd
        s["m"] = beta * s.get("m", 0) + (1 - beta) * g
        m_hat = beta * s["m"] / (1 - beta ** (t + 1)) + (1 - beta) * g / (1 - beta ** t)
        if k == "w":  # [embed (in), mlp (out)]
            u = _newton_schulz(m_hat, 5) * np.sqrt(max(1, 6 / 4))
        else:  # [layers, mlp (in), embed (out)]: each layer's matrix on its own
            u = np.stack([_newton_schulz(m, 5) for m in m_hat]) * 1.0
        return u, rule.spectral_lr, rule.wd * rule.lr / rule.spectral_lr

    _check(_run_ours(cfg, 3), _reference(cfg, 3, muon), 2e-4)


def test_muon_orthogonalizes_each_matrix():
    """Its update has singular values near 1 (the quintic's band, about 0.7-1.2) however
    spread the gradient's are (here over 200x)."""
    cfg = OptimConfig(name="muon", warmup_steps=0, schedule="constant", grad_clip=None,
                      weight_decay=0.0)
    specs = {"w": P("embed", "mlp")}
    grad = {"w": jax.random.normal(jax.random.key(0), (32, 64)) * jnp.logspace(-2, 1, 64)}
    tx = make_optimizer(cfg, 10, specs)
    update, _ = tx.update(grad, tx.init(grad), grad)
    spread = np.linalg.svd(np.asarray(grad["w"]), compute_uv=False)
    assert spread[0] / spread[-1] > 100
    singular = np.linalg.svd(np.asarray(update["w"]) / -np.sqrt(64 / 32), compute_uv=False)
    assert 0.6 < singular.min() and singular.max() < 1.25, singular


def test_each_optimizer_state_memory_per_parameter():
    """AdamW keeps two moments, Lion and Muon's matrices one, Adafactor factored statistics."""
    from research.train.optim import state_bytes

    params = {"w": jnp.zeros((256, 512)), "n": jnp.zeros(512)}
    specs = {"w": P("embed", "mlp"), "n": P("norm")}
    per_param = {}
    for name in ("adamw", "muon", "lion", "adafactor"):
        tx = make_optimizer(OptimConfig(name=name), 10, specs)
        per_param[name] = state_bytes(jax.eval_shape(tx.init, params), params)[1]
    assert per_param["adamw"] == pytest.approx(8, abs=0.01)
    assert per_param["lion"] == pytest.approx(4, abs=0.01)
    assert per_param["muon"] == pytest.approx((4 * 256 * 512 + 8 * 512) / (256 * 512 + 512), abs=0.01)
    assert per_param["adafactor"] < 0.05
