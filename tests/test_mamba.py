"""Mamba-2: the chunked SSD against a float64 step-by-step recurrence (values and gradients), its
FLOP count against its own matmuls, and the block: causality, decode against the parallel form,
init, parameter count, weight-decay mask, sharding invariance of training."""

from __future__ import annotations

import math
from pathlib import Path

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from research.config import ModelConfig
from research.models import mamba
from research.models.mamba import Mamba2, ssd_chunked, ssd_sequential
from research.train.flops import mamba_params, ssd_flops
from research.train.loop import train
from research.train.rundir import read_metrics
from research.train.optim import decay_mask

CFG = ModelConfig(d_model=32, n_layers=2, n_heads=4, init_std=0.3, layer_pattern=("mamba:mlp",),
                  mamba=dict(d_state=8, head_dim=8, n_groups=2, chunk_size=4))  # 8 heads


def ssd_inputs(T: int, H: int, G: int, P: int = 3, N: int = 5, b: int = 2, seed: int = 0):
    """float64 numpy x, dt, A, B, C, initial state; decays strong enough to matter, weak enough
    that a state survives a few chunks."""
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(b, T, H, P)), rng.uniform(0.01, 0.5, (b, T, H)),
            -rng.uniform(0.5, 4.0, H), rng.normal(size=(b, T, G, N)),
            rng.normal(size=(b, T, G, N)), rng.normal(size=(b, H, P, N)))


def recurrence(x, dt, A, B, C, h0):
    """h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t = h_t C_t: a plain float64 loop."""
    b, T, H, P = x.shape
    R = H // B.shape[2]
    h, y = h0.copy(), np.zeros_like(x)
    for t in range(T):
        for head in range(H):
            g = head // R
            h[:, head] = (np.exp(dt[:, t, head] * A[head])[:, None, None] * h[:, head]
                          + (dt[:, t, head, None] * x[:, t, head])[:, :, None] * B[:, t, g, None])
            y[:, t, head] = np.einsum("bpn,bn->bp", h[:, head], C[:, t, g])
    return y, h


@pytest.mark.parametrize("T, chunk, H, G", [
    (32, 8, 2, 1),  # whole chunks
    (37, 8, 4, 2),  # a partial last chunk, groups
    (5, 8, 4, 4),   # shorter than one chunk
])
def test_ssd_chunked_equals_float64_recurrence(T, chunk, H, G):
    inputs = ssd_inputs(T, H, G)
    y_ref, h_ref = recurrence(*inputs)
    chunked = jax.jit(ssd_chunked, static_argnums=5)
    with jax.enable_x64(True):
        y, h = chunked(*inputs[:5], chunk, inputs[5])
        y_seq, h_seq = jax.jit(ssd_sequential)(*inputs)
        y0, h0 = chunked(*inputs[:5], chunk)  # no initial state = zeros
    y0_ref, h0_ref = recurrence(*inputs[:5], np.zeros_like(inputs[5]))
    for got, want in ((y, y_ref), (h, h_ref), (y_seq, y_ref), (h_seq, h_ref), (y0, y0_ref),
                      (h0, h0_ref)):
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    # float32 inputs: float32 throughout, within 1e-5 of the output's scale
    y32, h32 = chunked(*(jnp.asarray(v, jnp.float32) for v in inputs[:5]), chunk,
                       jnp.asarray(inputs[5], jnp.float32))
    assert y32.dtype == h32.dtype == jnp.float32
    np.testing.assert_allclose(y32, y_ref, atol=1e-5 * np.abs(y_ref).max())
    np.testing.assert_allclose(h32, h_ref, atol=1e-5 * np.abs(h_ref).max())


@pytest.mark.parametrize("T, chunk, H, G, initial", [
    (21, 8, 4, 2, True),   # a partial last chunk, groups, an initial state
    (24, 8, 8, 1, False),  # whole chunks, one group of 8 heads (mamba_tiny's layout), zeros
    (5, 8, 4, 4, True),    # shorter than one chunk
])
def test_ssd_chunked_gradients_equal_the_recurrence_and_autodiff(T, chunk, H, G, initial):
    """The hand-written backward: d/d(x, dt, A, B, C, initial state) of a random functional of
    (y, final state), float64, against autodiff of the step-by-step scan and of the chunked
    forward itself (the same values as `ssd_chunked`'s, differentiated by jax)."""
    inputs = ssd_inputs(T=T, H=H, G=G, seed=1)
    rng = np.random.default_rng(2)
    wy, wh = rng.normal(size=inputs[0].shape), rng.normal(size=inputs[5].shape)

    def loss(fn):
        def f(*args):
            y, h = fn(*args) if initial else fn(*args[:5])
            return jnp.sum(wy * jnp.tanh(y)) + jnp.sum(wh * h)
        return jax.jit(jax.grad(f, argnums=tuple(range(6 if initial else 5))))

    def autodiff(x, dt, A, B, C, h0=None):
        h0 = jnp.zeros((x.shape[0], H, x.shape[3], B.shape[3])) if h0 is None else h0
        return mamba._output(mamba._ssd_forward(x, dt, A, B, C, h0, chunk), T)

    with jax.enable_x64(True):
        chunked = loss(lambda *args: ssd_chunked(*args[:5], chunk, *args[5:]))(*inputs)
        sequential = loss(ssd_sequential)(*inputs)
        reference = loss(autodiff)(*inputs)
    for name, got, want, also in zip(["x", "dt", "A", "B", "C", "h0"], chunked, sequential,
                                     reference):
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11, err_msg=name)
        np.testing.assert_allclose(got, also, rtol=1e-9, atol=1e-11, err_msg=name)


def dot_flops(jaxpr) -> int:
    """FLOPs (2 per multiply-add) of the matmuls in a jaxpr, nested jaxprs included: the
    dot_generals that contract something (ssd_chunked also writes elementwise products as
    einsums)."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general" and eqn.params["dimension_numbers"][0][0]:
            (contract, _), _ = eqn.params["dimension_numbers"]
            k = math.prod(eqn.invars[0].aval.shape[d] for d in contract)
            total += 2 * k * math.prod(eqn.outvars[0].aval.shape)
    return total + sum(dot_flops(sub) for sub in jax.extend.core.subjaxprs(jaxpr))


@pytest.mark.parametrize("T", [64, 50, 6])
def test_ssd_flops_count_its_matmuls(T):
    m = CFG.mamba
    H = m.expand * CFG.d_model // m.head_dim
    x = jnp.zeros((1, T, H, m.head_dim))
    dt = jnp.zeros((1, T, H))
    bc = jnp.zeros((1, T, m.n_groups, m.d_state))
    jaxpr = jax.make_jaxpr(ssd_chunked, static_argnums=5)(x, dt, jnp.zeros(H), bc, bc, 16)
    cfg = CFG.model_copy(update=dict(mamba=m.model_copy(update=dict(chunk_size=16))))
    assert dot_flops(jaxpr.jaxpr) == pytest.approx(ssd_flops(cfg, T) * T, rel=1e-12)


def init(cfg: ModelConfig = CFG, T: int = 13):
    u = jax.random.normal(jax.random.key(1), (2, T, cfg.d_model))
    positions = jnp.arange(T)[None]
    variables = jax.jit(Mamba2(cfg).init)(jax.random.key(0), u, positions)
    return nn.unbox(variables), u, positions


def test_block_is_causal():
    variables, u, positions = init(T=14)
    apply = jax.jit(Mamba2(CFG).apply)
    y, _ = apply(variables, u, positions)
    changed = u.at[:, 6:].add(jax.random.normal(jax.random.key(9), u[:, 6:].shape))
    y2, _ = apply(variables, changed, positions)
    np.testing.assert_array_equal(y2[:, :6], y[:, :6])
    assert np.abs(y2[:, 6:] - y[:, 6:]).min() > 0


def test_decode_equals_parallel_forward():
    """Token by token, and a prefill of 6 then 3 then single tokens, through the cache."""
    variables, u, positions = init(T=13)
    model = Mamba2(CFG)
    parallel, _ = jax.jit(model.apply)(variables, u, positions)
    cache0 = jax.jit(model.init, static_argnames="decode")(jax.random.key(0), u, positions,
                                                          decode=True)["cache"]
    assert all(np.all(np.asarray(leaf) == 0) for leaf in jax.tree.leaves(cache0))
    assert cache0["ssm"].shape == (2, 8, 8, 8) and cache0["ssm"].dtype == jnp.float32
    step = jax.jit(lambda cache, x, pos: model.apply({**variables, "cache": cache}, x, pos,
                                                     decode=True, mutable=["cache"]))
    for splits in ([1] * 13, [6, 3, 1, 1, 1, 1]):
        cache, outs, start = cache0, [], 0
        for n in splits:
            (y, aux), mutated = step(cache, u[:, start:start + n], positions[:, start:start + n])
            cache, start = mutated["cache"], start + n
            outs.append(y)
            assert aux == {}
        np.testing.assert_allclose(np.concatenate(outs, 1), parallel, rtol=1e-5, atol=1e-5)


def test_init_follows_mamba2():
    cfg = CFG.model_copy(update=dict(mamba=CFG.mamba.model_copy(update=dict(
        head_dim=2, dt_min=0.01, dt_max=0.05, a_init_min=2.0, a_init_max=3.0))))  # 32 heads
    params = init(cfg)[0]["params"]
    dt = jax.nn.softplus(params["dt_bias"])
    assert params["dt_bias"].shape == (32,)
    assert 0.01 <= dt.min() < 0.02 and 0.04 < dt.max() <= 0.05
    A = -np.exp(params["A_log"])
    assert -3.0 <= A.min() < -2.8 and -2.2 < A.max() <= -2.0
    np.testing.assert_array_equal(params["D"], 1.0)
    np.testing.assert_array_equal(params["norm"], 1.0)


def test_param_count_equals_flops_formula():
    params = init()[0]["params"]
    assert sum(math.prod(a.shape) for a in jax.tree.leaves(params)) == mamba_params(CFG)[0]


def test_no_weight_decay_on_A_log_D_dt_bias_biases_norm():
    variables = jax.eval_shape(Mamba2(CFG).init, jax.random.key(0), jnp.zeros((1, 4, 32)),
                               jnp.zeros((1, 4)))
    mask = decay_mask(nn.get_partition_spec(variables)["params"])
    assert mask == {
        "A_log": False, "D": False, "dt_bias": False, "norm": False,
        "conv_x": {"kernel": True, "bias": False}, "conv_bc": {"kernel": True, "bias": False},
        "in_zxdt": {"kernel": True}, "in_bc": {"kernel": True}, "out": {"kernel": True},
    }


def logged(run_dir: Path, key: str) -> dict[int, float]:
    return {row["step"]: row[key] for row in read_metrics(run_dir) if key in row}


def test_mamba_model_same_losses_on_one_and_eight_devices(tiny, tmp_path):
    """Data parallel x Mamba heads split over 4 tensor shards (float32, 1e-5 relative);
    chunk 12 leaves a padded last chunk in the 32-token sequences."""
    mamba = ("model.layer_pattern=[mamba:mlp]", "model.mamba.head_dim=8", "model.mamba.d_state=8",
             "model.mamba.n_groups=2", "model.mamba.chunk_size=12", "train.steps=3",
             "checkpoint.every=100")
    one = train(tiny(*mamba, "mesh.data=1"), tmp_path / "one", devices=jax.devices()[:1])
    eight = train(tiny(*mamba, "mesh.data=2", "mesh.tensor=4"), tmp_path / "eight")
    assert one["step"] == eight["step"] == 3
    for key in ("loss", "eval_loss"):
        a, b = logged(tmp_path / "one", key), logged(tmp_path / "eight", key)
        assert a.keys() == b.keys() and a
        np.testing.assert_allclose([b[s] for s in a], list(a.values()), rtol=1e-5)
