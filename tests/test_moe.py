"""The MoE layer against float64 numpy references, its losses, and its sharding invariance.

Tolerances: float32 outputs against float64 references at 1e-5; two float32 paths that should
compute the same numbers (capacity vs dropless, 1 vs 8 devices) at 1e-5 relative.
"""

import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.config import MeshConfig, ModelConfig
from research.models.decoder import Decoder, layer_metrics
from research.models.moe import MoE, capacity, route, router_losses, top_indices
from research.parallel.mesh import axis_rules, batch_sharding, make_mesh
from research.train.rundir import read_metrics
from research.train.flops import flops_per_token, param_counts
from research.train.loop import train

E, K, D, F = 4, 2, 16, 24


def moe_cfg(**moe) -> ModelConfig:
    return ModelConfig(d_model=D, n_layers=2, n_heads=2, d_ff=F,
                       moe={"n_experts": E, "top_k": K, **moe})


def run(cfg: ModelConfig, x: jax.Array, params=None, decode: bool = False):
    """(y, aux, params) of one MoE layer; decode marks the cache collection mutable."""
    layer = MoE(cfg)
    if params is None:
        params = nn.unbox(layer.init(jax.random.key(1), x))["params"]
    if decode:
        (y, aux), _ = layer.apply({"params": params}, x, mutable=["cache"])
    else:
        y, aux = layer.apply({"params": params}, x)
    return y, aux, params


def inputs(b: int = 2, t: int = 12, seed: int = 0) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (b, t, D))


# ----------------------------------------------------------------------------- reference


def swiglu64(x, gate, up, down):
    h = x @ gate
    return (h / (1 + np.exp(-h)) * (x @ up)) @ down


def reference(cfg: ModelConfig, x, params, slots: int | None = None):
    """float64 MoE: every expert on every token, weighted by the renormalised top-k router
    probabilities; with `slots`, a choice is dropped once its expert already took `slots`
    choices of that sequence, counting in token order. Returns (y, dropped fraction)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = np.asarray(x, np.float64)
    logits = x @ p["router"]["kernel"]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    y = np.zeros_like(x)
    dropped = 0
    for b in range(x.shape[0]):
        taken = [0] * cfg.moe.n_experts
        for t in range(x.shape[1]):
            top = np.argsort(-probs[b, t])[:cfg.moe.top_k]
            weights = probs[b, t, top] / probs[b, t, top].sum()
            every = [swiglu64(x[b, t], p["gate"][e], p["up"][e], p["down"][e])
                     for e in range(cfg.moe.n_experts)]
            for e, w in zip(top, weights):
                taken[e] += 1
                if slots is not None and taken[e] > slots:
                    dropped += 1
                    continue
                y[b, t] += w * every[e]
    if "shared" in p:
        s = p["shared"]
        y += swiglu64(x, s["gate"]["kernel"], s["up"]["kernel"], s["down"]["kernel"])
    return y, dropped / (x.shape[0] * x.shape[1] * cfg.moe.top_k)


def close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                               rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("shared, d_expert", [(0, None), (1, 8)])
def test_dropless_equals_every_expert_on_every_token(shared, d_expert):
    cfg = moe_cfg(dispatch="dropless", n_shared_experts=shared, d_expert=d_expert)
    x = inputs()
    y, aux, params = run(cfg, x)
    assert params["gate"].shape == (E, D, d_expert or F)
    assert ("shared" in params) == bool(shared)
    want, _ = reference(cfg, x, params)
    close(y, want)
    assert float(aux["moe/drop_frac"]) == 0.0


def test_capacity_equals_dropless_when_nothing_overflows():
    x = inputs()
    roomy = moe_cfg(capacity_factor=E / K)  # C = T: every expert could take every token
    assert capacity(x.shape[1], roomy.moe) == x.shape[1]
    y, aux, params = run(roomy, x)
    dropless, dropless_aux, _ = run(moe_cfg(dispatch="dropless"), x, params)
    close(y, dropless, 1e-6)
    assert float(aux["moe/drop_frac"]) == 0.0
    # under jit too: a mean of 48 ones is 1 - 3e-8 there, so the fraction must come from a count
    _, jitted = jax.jit(lambda p, x: MoE(roomy).apply({"params": p}, x))(params, x)
    assert float(jitted["moe/drop_frac"]) == 0.0
    for key in ("moe/balance_loss", "moe/z_loss", "moe/expert_frac", "aux_loss"):
        close(aux[key], dropless_aux[key], 1e-6)


@pytest.mark.parametrize("factor", [0.5, 1.0])
def test_capacity_drops_overflow_in_token_order_and_reports_it(factor):
    cfg = moe_cfg(capacity_factor=factor)
    x = inputs(t=16)
    slots = capacity(16, cfg.moe)
    assert slots == math.ceil(factor * 16 * K / E)
    y, aux, params = run(cfg, x)
    want, dropped = reference(cfg, x, params, slots)
    assert dropped > 0.05  # the test means something: many choices overflow
    close(y, want)
    assert float(aux["moe/drop_frac"]) == pytest.approx(dropped, abs=1e-7)


def kept_in_token_order(experts: np.ndarray, n_experts: int, slots: int) -> np.ndarray:
    """[B, T, k] choices -> which of them get a slot: counted per sequence, in token order."""
    kept = np.zeros(experts.shape, bool)
    for b in range(experts.shape[0]):
        taken = [0] * n_experts
        for t, k in np.ndindex(experts.shape[1:]):
            taken[experts[b, t, k]] += 1
            kept[b, t, k] = taken[experts[b, t, k]] <= slots
    return kept


@pytest.mark.parametrize("dispatch, factor", [("capacity", 0.5), ("dropless", 1.0)])
def test_gradients_equal_autodiff_of_every_expert_on_every_token(dispatch, factor):
    """The dispatch's hand-written gradients (gathers, not scatter-adds) against autodiff of a
    gather-free float32 layer: every expert on every token, the kept choices' weights as a mask."""
    cfg = moe_cfg(dispatch=dispatch, capacity_factor=factor)
    x = inputs(t=16)
    params = run(cfg, x)[2]
    probs = jax.nn.softmax(x @ params["router"]["kernel"])
    experts = np.asarray(jax.lax.top_k(probs, K)[1])
    kept = kept_in_token_order(experts, E, capacity(16, cfg.moe) if dispatch == "capacity" else 16)
    assert (dispatch == "dropless") == kept.all()  # with drops, the dropped rows matter too
    mask = jnp.einsum("btk,btke->btke", jnp.asarray(kept, jnp.float32),
                      jax.nn.one_hot(experts, E))

    def reference(params, x):
        weights, _, _ = route(x @ params["router"]["kernel"], K)
        h = jnp.einsum("btd,edf->btef", x, params["gate"])
        every = jnp.einsum("btef,efd->bted",
                           nn.silu(h) * jnp.einsum("btd,edf->btef", x, params["up"]),
                           params["down"])
        return jnp.einsum("btk,btke,bted->btd", weights, mask, every)

    def layer(params, x):
        return MoE(cfg).apply({"params": params}, x)[0]

    cotangent = jax.random.normal(jax.random.key(2), x.shape)
    def grads(f):
        return jax.jit(jax.grad(lambda p, x: (f(p, x) * cotangent).sum(), (0, 1)))(params, x)

    jax.tree.map(close, grads(layer), grads(reference))


def collectives(hlo: str, kinds: str) -> list[str]:
    """The HLO lines of float collectives of `kinds` (a regex alternation): activations moving
    between devices (integer indices may move)."""
    return [line for line in hlo.splitlines()
            if re.search(rf"= \(?(f32|bf16)\[.*\b({kinds})(-start)?\(", line)]


@pytest.mark.parametrize("dispatch, layout", [("capacity", {"data": 8}),
                                              ("dropless", {"data": 8}),
                                              ("capacity", {"data": 2, "expert": 4})])
def test_dispatch_moves_activations_only_as_the_layout_needs(dispatch, layout):
    """With the batch split over 8 devices (2 sequences each), the layer's forward and backward
    give the values and gradients of one device, and move activations only as the layout needs.
    Data parallel: nothing moves (capacity: each sequence is a group; dropless: each device's
    slice); only the gradients are all-reduced. Expert parallel: the buffers go to their
    experts' devices and back by all-to-alls, and no gathered rows are all-reduced."""
    cfg, mesh_cfg = moe_cfg(dispatch=dispatch), MeshConfig(**layout)
    mesh, x = make_mesh(mesh_cfg), inputs(b=16)
    params = run(cfg, x)[2]

    def loss(params, x):
        y, aux = MoE(cfg).apply({"params": params}, x)
        return (y ** 2).sum() + aux["aux_loss"]

    with jax.set_mesh(mesh), nn.logical_axis_rules(axis_rules(mesh_cfg)):
        step = jax.jit(jax.value_and_grad(loss, (0, 1)),
                       in_shardings=(None, batch_sharding(mesh)))
        compiled = step.lower(params, x).compile()
        sharded = compiled(params, x)
    hlo = compiled.as_text()
    moves = collectives(hlo, "all-gather|collective-permute" + ("" if "expert" in layout
                                                                 else "|all-to-all"))
    assert not moves, moves[:3]
    gathered = [line for line in collectives(hlo, "all-reduce") if "/gather" in line]
    assert not gathered, gathered[:3]
    assert ("expert" in layout) == bool(collectives(hlo, "all-to-all"))
    jax.tree.map(close, sharded, jax.jit(jax.value_and_grad(loss, (0, 1)))(params, x))


def test_top_indices_equal_lax_top_k_with_ties():
    x = jax.random.randint(jax.random.key(3), (64, 8), 0, 4).astype(jnp.float32)  # many ties
    for k in (1, 2, 3):
        np.testing.assert_array_equal(top_indices(x, k), jax.lax.top_k(x, k)[1])


def test_decode_mode_never_drops():
    """Decoding routes few tokens at a time with C = T slots: the dropless result."""
    cfg = moe_cfg(capacity_factor=0.25)
    x = inputs(t=5)
    _, train_aux, params = run(cfg, x)
    assert float(train_aux["moe/drop_frac"]) > 0
    y, aux, _ = run(cfg, x, params, decode=True)
    close(y, run(moe_cfg(dispatch="dropless"), x, params)[0], 1e-6)
    assert float(aux["moe/drop_frac"]) == 0.0
    assert capacity(1, cfg.moe) == 1  # a single token always has a slot


def test_capacity_of_tiny_groups():
    cfg = moe_cfg(capacity_factor=1.25).moe
    assert [capacity(t, cfg) for t in (1, 2, 3, 8, 100)] == [1, 2, 2, 5, 63]


def test_balance_loss_is_one_for_uniform_routing_and_matches_its_formula():
    n, k = 8, 2
    # uniform: equal probabilities, and the choices cycle through the experts evenly
    logits = jnp.zeros((4, n, n))
    experts = jnp.broadcast_to(jnp.stack([jnp.arange(n), (jnp.arange(n) + 1) % n], -1),
                               (4, n, k))
    probs = jax.nn.softmax(logits)
    losses = router_losses(logits, probs, experts)
    assert float(losses["balance_loss"]) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(losses["expert_frac"], np.full(n, 1 / n), atol=1e-7)
    assert float(losses["z_loss"]) == pytest.approx(math.log(n) ** 2, rel=1e-6)
    # random routing, against E * sum_e f_e p_e and mean(logsumexp^2) in float64
    logits = 3 * jax.random.normal(jax.random.key(0), (3, 10, n))
    probs = jax.nn.softmax(logits)
    experts = jax.lax.top_k(probs, k)[1]
    losses = router_losses(logits, probs, experts)
    ex, lg = np.asarray(experts).reshape(-1, k), np.asarray(logits, np.float64).reshape(-1, n)
    f = np.array([(ex == e).sum() for e in range(n)]) / ex.size
    p = np.exp(lg) / np.exp(lg).sum(-1, keepdims=True)
    assert float(losses["balance_loss"]) == pytest.approx(n * (f * p.mean(0)).sum(), rel=1e-5)
    lse = np.log(np.exp(lg).sum(-1))
    assert float(losses["z_loss"]) == pytest.approx((lse**2).mean(), rel=1e-5)
    # collapsed: every token sends both choices to experts 0 and 1, nearly all mass on 0
    logits = jnp.zeros((3, 10, n)).at[..., 0].set(12.0).at[..., 1].set(6.0)
    probs = jax.nn.softmax(logits)
    collapsed = router_losses(logits, probs, jax.lax.top_k(probs, k)[1])["balance_loss"]
    p0, p1 = float(probs[0, 0, 0]), float(probs[0, 0, 1])
    assert float(collapsed) == pytest.approx(n * (0.5 * p0 + 0.5 * p1), rel=1e-6)
    assert float(collapsed) > 3.9


def test_aux_loss_weights_the_raw_losses_by_their_coefficients():
    cfg = moe_cfg(balance_coef=0.03, z_loss_coef=0.002)
    x = inputs()
    params = run(cfg, x)[2]
    params["router"]["kernel"] = jnp.zeros_like(params["router"]["kernel"])  # uniform router
    _, aux, _ = run(cfg, x, params)
    assert float(aux["moe/balance_loss"]) == pytest.approx(1.0, abs=1e-6)
    assert float(aux["moe/z_loss"]) == pytest.approx(math.log(E) ** 2, rel=1e-6)
    assert float(aux["aux_loss"]) == pytest.approx(0.03 + 0.002 * math.log(E) ** 2, rel=1e-6)


def test_expert_weights_carry_expert_axis_names():
    cfg = moe_cfg()
    boxed = jax.eval_shape(MoE(cfg).init, jax.random.key(0), inputs())["params"]
    names = {k: v.names for k, v in boxed.items() if hasattr(v, "names")}
    assert names["gate"] == names["up"] == ("expert", "embed", "mlp")
    assert names["down"] == ("expert", "mlp", "embed")


@pytest.mark.parametrize("moe", [dict(), dict(n_shared_experts=2, d_expert=8, top_k=1)])
def test_total_and_active_parameter_counts(moe):
    cfg = ModelConfig(d_model=D, n_layers=4, n_heads=2, d_ff=F,
                      layer_pattern=("attention:mlp", "attention:moe"),
                      moe={"n_experts": E, "top_k": K, **moe})
    shapes = nn.unbox(jax.eval_shape(Decoder(cfg, 64).init, jax.random.key(0),
                                     jnp.zeros((1, 4), jnp.int32)))["params"]
    moe_layer = shapes["layers"]["block_1"]["moe"]
    routed = sum(math.prod(moe_layer[name].shape) for name in ("gate", "up", "down"))
    total = sum(math.prod(a.shape) for a in jax.tree.leaves(shapes))
    counts = param_counts(cfg, 64)
    assert counts["total"] == total
    # two MoE layers (2 repeats of the period) each use top_k of their E experts per token
    unused = routed * (E - cfg.moe.top_k) // E
    assert counts["active"] == total - unused
    dense = cfg.model_copy(update={"layer_pattern": ("attention:mlp",)})
    extra_active = counts["active"] - param_counts(dense, 64)["active"]
    assert flops_per_token(cfg, 64, 32) - flops_per_token(dense, 64, 32) == 6 * extra_active


def test_layer_metrics_are_scalars_named_by_layer_of_the_whole_stack():
    cfg = ModelConfig(d_model=D, n_layers=6, n_heads=2,
                      layer_pattern=("mamba:moe", "attention:mlp", "attention:moe"))
    aux = {"aux_loss": jnp.float32(0.5), "moe/drop_frac": jnp.array([0.1, 0.2, 0.3, 0.4]),
           "moe/expert_frac": jnp.arange(8.0).reshape(4, 2)}
    named = {k: float(v) for k, v in layer_metrics(aux, cfg).items()}
    assert named == pytest.approx({
        "moe/layer0/drop_frac": 0.1, "moe/layer2/drop_frac": 0.2,
        "moe/layer3/drop_frac": 0.3, "moe/layer5/drop_frac": 0.4,
        **{f"moe/layer{i}/expert_frac/{e}": 2.0 * j + e
           for j, i in enumerate((0, 2, 3, 5)) for e in (0, 1)}})


def losses(run_dir, prefix="") -> dict[str, dict[int, float]]:
    rows = read_metrics(run_dir)
    keys = {k for row in rows for k in row if k.startswith(prefix)}
    return {k: {row["step"]: row[k] for row in rows if k in row} for k in keys}


def test_same_losses_and_router_metrics_on_one_and_eight_devices(tiny, tmp_path):
    """Expert parallelism moves tokens, not numbers (float32, 1e-5 relative)."""
    moe = ("model.layer_pattern=[attention:mlp,attention:moe]", "model.moe.n_experts=8",
           "train.steps=3", "checkpoint.every=100")
    reference = train(tiny(*moe, "mesh.data=1"), tmp_path / "one", devices=jax.devices()[:1])
    one = losses(tmp_path / "one")
    names = {k for k in one if k.startswith("moe/")}
    assert names == {f"moe/layer1/{m}" for m in ("balance_loss", "z_loss", "drop_frac",
                               *(f"expert_frac/{e}" for e in range(8)))}
    assert reference["params_active"] < reference["params_total"]
    for layout in (("mesh.data=1", "mesh.expert=8"), ("mesh.data=2", "mesh.expert=4")):
        run_dir = tmp_path / "-".join(layout)
        train(tiny(*moe, *layout), run_dir)
        eight = losses(run_dir)
        for key in ("loss", "eval_loss", *names):
            np.testing.assert_allclose(list(eight[key].values()), list(one[key].values()),
                                       rtol=1e-5, atol=1e-7, err_msg=f"{key} {layout}")
