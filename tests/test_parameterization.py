"""Parameterizations: the per-parameter table against the paper's rules written out by hand,
standard as the identity, the base shape as standard, and a coordinate check that can fail."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from research import config
from research.models import parameterization
from research.models.decoder import Decoder
from research.train.state import _init_fn, param_multipliers

ALPHA = {"mup": 0.0, "depth_mup": 0.5, "completep": 1.0}
SHAPE = ["model.layer_pattern=[attention:mlp, mamba:moe]", "model.d_model=64",
         "model.base_d_model=32", "model.n_layers=8", "model.base_n_layers=2", "model.n_heads=4",
         "model.n_kv_heads=2", "model.d_ff=256", "model.base_d_ff=64", "model.moe.n_experts=4",
         "model.moe.d_expert=64", "model.moe.n_shared_experts=1", "model.mamba.head_dim=16",
         "model.mamba.d_state=8", "model.mamba.chunk_size=8", "model.tie_embeddings=false"]
M_N, M_L = 2.0, 4.0  # 64 / 32, 8 / 2
# Every hidden matrix of SHAPE: its fan-in ratio (worked out by hand from the shapes) and whether
# it writes into the residual stream (whose standard init carries 1/sqrt(2 n_layers)).
HIDDEN = {
    "attention/q/kernel": (2, False), "attention/k/kernel": (2, False),
    "attention/v/kernel": (2, False), "attention/o/kernel": (2, True),  # 4 heads x 16 vs x 8
    "mlp/gate/kernel": (2, False), "mlp/up/kernel": (2, False),
    "mlp/down/kernel": (4, True),  # d_ff 256 vs 64
    "moe/gate": (2, False), "moe/up": (2, False), "moe/down": (2, True),  # d_expert 64 vs 32
    "moe/shared/gate/kernel": (2, False), "moe/shared/up/kernel": (2, False),
    "moe/shared/down/kernel": (2, True),
    "mamba/in_zxdt/kernel": (2, False), "mamba/in_bc/kernel": (2, False),
    "mamba/out/kernel": (2, True),  # 8 heads x 16 vs 4 x 16
}
BLOCK_VECTORS = {"mixer_norm/scale", "ffn_norm/scale", "moe/router/kernel", "mamba/A_log",
                 "mamba/D", "mamba/dt_bias", "mamba/conv_x/kernel", "mamba/conv_x/bias",
                 "mamba/conv_bc/kernel", "mamba/conv_bc/bias", "mamba/norm"}
EMBEDDINGS = {"embed/embedding", "lm_head/kernel"}


def expected(name: str, p: str) -> tuple[float, float, float, float]:
    """(init, lr, wd, eps) multipliers from CompleteP's Table 1 (μP: no depth terms)."""
    alpha, m_l = ALPHA[p], (M_L if p != "mup" else 1.0)
    if name in HIDDEN:
        r, out = HIDDEN[name]
        return (r ** -0.5 * (math.sqrt(m_l) if out else 1.0), m_l ** (alpha - 1) / r, r,
                m_l ** -alpha / r)
    if name in BLOCK_VECTORS:
        return 1.0, m_l ** (alpha - 1), 1.0, m_l ** -alpha
    if name in EMBEDDINGS:
        return 1.0, 1.0, 1.0, 1 / M_N
    assert name == "final_norm/scale", name
    return 1.0, 1.0, 1.0, 1.0


def leaves(tree) -> list[tuple[str, object]]:
    """(name, leaf) per leaf; names like "attention/q/kernel" (block prefix dropped)."""
    out = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(
            tree, is_leaf=lambda x: isinstance(x, parameterization.Rule)):
        keys = [str(getattr(k, "key", k)) for k in path]
        out.append(("/".join(keys[2:] if keys[0] == "layers" else keys), leaf))
    return out


@pytest.fixture(scope="module")
def example():
    return jnp.zeros((1, 16), jnp.int32)


@pytest.mark.parametrize("p", ["mup", "depth_mup", "completep"])
def test_every_parameter_gets_the_table_entry(p, example):
    cfg = config.load(None, [*SHAPE, f"model.parameterization={p}"])
    rules = leaves(param_multipliers(Decoder(cfg.model, 384), example))
    assert {n for n, _ in rules} == set(HIDDEN) | BLOCK_VECTORS | EMBEDDINGS | {"final_norm/scale"}
    for name, rule in rules:
        got = (rule.init, rule.lr, rule.wd, rule.eps)
        np.testing.assert_allclose(got, expected(name, p), rtol=1e-12, err_msg=name)


def test_init_draws_at_the_scaled_std(example):
    """The drawn weights have std init_std * sqrt(base fan-in / fan-in), and residual outputs
    init_std / sqrt(2 base_n_layers) times that (within 3%: >= 16k draws each). Dense layers
    only: the rule itself is checked for every parameter above."""
    dense = [o for o in SHAPE if not o.startswith(("model.layer_pattern", "model.moe"))]
    cfg = config.load(None, [*dense, "model.parameterization=completep"]).model
    model = Decoder(cfg, 384)
    init = _init_fn(model, optax.identity(), example, param_multipliers(model, example),
                    reference=False)
    params = dict(leaves(nn.meta.unbox(jax.jit(init)(jax.random.key(0)))["params"]))
    for name in ("attention/q/kernel", "attention/o/kernel", "mlp/up/kernel", "mlp/down/kernel"):
        r, out = HIDDEN[name]
        std = cfg.init_std / (math.sqrt(2 * cfg.base_n_layers) if out else 1.0) / math.sqrt(r)
        assert float(np.std(params[name])) == pytest.approx(std, rel=0.03), name


def test_standard_is_the_identity(example):
    """Standard: every multiplier exactly 1, forward multipliers no-ops (`scale` returns its input
    itself, so the traced program is the one without them) and the stock optax.adamw chain (see
    test_optim). What this proves: the machinery adds nothing to the standard path; that path's
    losses were also compared bit for bit against the code before parameterizations existed
    (dense, MoE, Mamba; docs/transfer.md), which a test cannot rerun."""
    cfg = config.load(None, [*SHAPE, "model.base_d_model=null", "model.base_n_layers=null",
                             "model.base_d_ff=null"]).model
    assert cfg.parameterization == "standard"
    rules = leaves(param_multipliers(Decoder(cfg, 384), example))
    assert all(rule == parameterization.Rule() for _, rule in rules)
    assert parameterization.forward(cfg) == parameterization.Forward(1.0, 1.0, 1.0, None)
    x = jnp.ones(3)
    assert parameterization.scale(x, 1.0) is x


def test_at_the_base_shape_completep_is_standard(tiny):
    """m_N = m_L = 1: the same initial parameters, multipliers all 1 (so the same stock AdamW),
    and the same logits: CompleteP's attention scale sqrt(base head_dim)/head_dim is then
    1/sqrt(head_dim). One model with attention, MLP, MoE and Mamba layers."""
    hybrid = ["model.layer_pattern=[attention:mlp, mamba:moe]", "model.mamba.head_dim=16",
              "model.mamba.chunk_size=8", "model.moe.n_experts=4", "model.n_heads=4"]
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16)), jnp.int32)
    out = {}
    for p in ("standard", "completep"):
        cfg = tiny(*hybrid, f"model.parameterization={p}", "model.base_d_model=32",
                   "model.base_n_layers=2").model
        model = Decoder(cfg, 256)
        mult = param_multipliers(model, tokens)
        assert all(rule == parameterization.Rule() for _, rule in leaves(mult))
        params = nn.meta.unbox(jax.jit(_init_fn(model, optax.identity(), tokens, mult, reference=False))(
            jax.random.key(0)))["params"]
        out[p] = params, jax.jit(model.apply)({"params": params}, tokens)[0]
    assert jax.tree.all(jax.tree.map(np.array_equal, out["standard"][0], out["completep"][0]))
    np.testing.assert_allclose(out["completep"][1], out["standard"][1], rtol=1e-6, atol=1e-6)
    assert parameterization.forward(tiny(*hybrid, "model.parameterization=completep").model
                                    ).attention_scale == pytest.approx(1 / math.sqrt(8))


def test_coordinate_check_separates_standard_from_completep(tiny_overrides, tmp_path):
    """Widths 32 and 256 after 2 steps at lr 1e-2: under standard the logits and the residual
    stream grow with width; under CompleteP every hidden row and the logits stay flat."""
    from research.analysis import coordcheck

    overrides = [*tiny_overrides, "model.n_layers=1", "model.n_heads=4", "train.batch_size=4",
                 "train.seq_len=16", "optim.warmup_steps=0", "optim.lr=1e-2"]
    checks = coordcheck.run(None, overrides, ["standard", "completep"], [32, 256], [], 2)
    rows = {(r["parameterization"], r["activation"]): r["slope"]
            for r in coordcheck.write(checks, tmp_path, 0.25)}
    assert rows[("standard", "logits")] > 0.5 and rows[("standard", "residual")] > 1.0
    for row in ("attention", "mlp", "residual", "logits"):
        assert abs(rows[("completep", row)]) < 0.3, row
    assert (tmp_path / "coordcheck_completep_width.png").stat().st_size > 0
    assert "| completep | width | logits |" in (tmp_path / "slopes.md").read_text()


# ----------------------------------------------------------------------------- away from the base
# m_N = 4 (d_model 128 over 32, d_ff 512 over 128) and m_L = 4 (4 layers over 1); every number
# below is worked out by hand from CompleteP's Table 1 (docs/transfer.md), none by the code's
# helpers. head_dim 32, base head_dim 8; α_out = 2, α_emb = 3.
AWAY = ["model.d_model=128", "model.base_d_model=32", "model.n_layers=4", "model.base_n_layers=1",
        "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=512", "model.base_d_ff=128",
        "model.tie_embeddings=false", "model.output_multiplier=2", "model.embedding_multiplier=3"]
IN, OUT = ("q", "k", "v", "gate", "up"), ("o", "down")  # reads the residual stream / writes it
# (init, lr, wd, eps) of: hidden reading the stream, hidden writing it, block norm, embedding and
# head; then the forward multipliers (embedding, residual branch, logits, attention scale).
BY_HAND = {
    "completep": ((0.5, 0.25, 4, 1 / 16), (1.0, 0.25, 4, 1 / 16), (1, 1, 1, 0.25),
                  (1, 1, 1, 0.25), (3, 0.25, 0.5, 0.08838834764831845)),
    "depth_mup": ((0.5, 0.125, 4, 0.125), (1.0, 0.125, 4, 0.125), (1, 0.5, 1, 0.5),
                  (1, 1, 1, 0.25), (3, 0.5, 0.5, 0.08838834764831845)),
    "mup": ((0.5, 0.25, 4, 0.25), (0.5, 0.25, 4, 0.25), (1, 1, 1, 1),
            (1, 1, 1, 0.25), (3, 1.0, 0.5, 0.08838834764831845)),
}


def by_hand(name: str, p: str) -> tuple[float, float, float, float]:
    hidden_in, hidden_out, block_norm, embedding, _ = BY_HAND[p]
    layer = name.split("/")[-2] if name.endswith("/kernel") else ""
    if layer in IN:
        return hidden_in
    if layer in OUT:
        return hidden_out
    if name in ("mixer_norm/scale", "ffn_norm/scale"):
        return block_norm
    if name in ("embed/embedding", "lm_head/kernel"):
        return embedding
    assert name == "final_norm/scale", name
    return 1, 1, 1, 1


@pytest.mark.parametrize("p", ["mup", "depth_mup", "completep"])
def test_multipliers_at_4x_width_and_depth_by_hand(p, example):
    """Per-parameter init, lr, wd and ε, the forward multipliers, and the lr each parameter's
    first AdamW update actually moves by (all-ones gradients: Adam's first step is lr x sign),
    against the hand-computed values at m_N = m_L = 4."""
    from research.train.optim import make_optimizer

    cfg = config.load(None, [*AWAY, f"model.parameterization={p}",
                             "optim.schedule=constant", "optim.warmup_steps=0",
                             "optim.weight_decay=0", "optim.grad_clip=null"])
    model = Decoder(cfg.model, 256)
    multipliers = param_multipliers(model, example)
    rules = leaves(multipliers)
    assert len(rules) == 12  # 9 per layer (stacked) + embedding, head, final norm
    for name, rule in rules:
        np.testing.assert_allclose((rule.init, rule.lr, rule.wd, rule.eps), by_hand(name, p),
                                   rtol=1e-12, err_msg=name)
    embedding, residual, logits, attention = BY_HAND[p][4]
    f = parameterization.forward(cfg.model)
    np.testing.assert_allclose((f.embedding, f.residual, f.logits, f.attention_scale),
                               (embedding, residual, logits, attention), rtol=1e-12)

    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), example)["params"])
    specs, ones = nn.get_partition_spec(shapes), jax.tree.map(
        lambda s: jnp.ones(s.shape), nn.meta.unbox(shapes))
    tx = make_optimizer(cfg.optim, 10, specs, multipliers)
    updates, _ = tx.update(ones, tx.init(ones), ones)
    for (name, update), (_, rule) in zip(leaves(updates), rules):
        np.testing.assert_allclose(np.asarray(update), -by_hand(name, p)[1], rtol=1e-6,
                                   err_msg=name)


def test_forward_multipliers_are_applied_where_the_table_says(example):
    """CompleteP at m_N = m_L = 4 computes standard's function of rescaled weights, rescaled by
    hand: embedding table x α_emb, every residual branch's output matrix (o, down) x m_L^-1,
    q x (sqrt(8)/32) / (1/sqrt(32)) = 1/2 for the attention scale, and the head x α_out/m_N.
    Leaving out any one multiplier in the model (or here) breaks the equality."""
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16)), jnp.int32)
    completep = config.load(None, [*AWAY, "model.parameterization=completep"]).model
    standard = config.load(None, [*AWAY, "model.output_multiplier=1",
                                  "model.embedding_multiplier=1", "model.base_d_model=null",
                                  "model.base_n_layers=null", "model.base_d_ff=null"]).model
    model = Decoder(completep, 256)
    params = nn.meta.unbox(model.init(jax.random.key(1), tokens)["params"])
    factor = {"embedding": 3.0, "o": 0.25, "down": 0.25, "q": 0.5, "lm_head": 0.5}

    def rescale(path, w):
        keys = [str(getattr(k, "key", k)) for k in path]
        hits = [factor[k] for k in keys if k in factor]
        return w * hits[0] if hits else w

    rescaled = jax.tree_util.tree_map_with_path(rescale, params)
    ours = model.apply({"params": params}, tokens)[0]
    reference = Decoder(standard, 256).apply({"params": rescaled}, tokens)[0]
    np.testing.assert_allclose(ours, reference, rtol=2e-5, atol=2e-5)
    unscaled = Decoder(standard, 256).apply({"params": params}, tokens)[0]
    assert float(jnp.max(jnp.abs(ours - unscaled))) > 0.1  # the multipliers are not small
