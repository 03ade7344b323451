"""The decoder against independent float64 numpy references, and its invariances.

Tolerances: float32 paths are compared at 1e-5 (relative + absolute) with float64 references;
code paths that should compute the same float32 numbers (scan/loop, remat policies, sharding)
at 1e-6 or tighter.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec

from research.config import DEFAULT_AXIS_RULES, ConfigError, ModelConfig
from research.models import decoder
from research.models.attention import Attention, causal_attention
from research.models.decoder import Decoder, padded_vocab
from research.models.layers import MLP, RMSNorm, matmul, rotary

VOCAB = 64
TINY = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48)


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{**TINY, **kw})


def tokens(b: int = 2, t: int = 12, seed: int = 0) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (b, t), 0, VOCAB, dtype=jnp.int32)


def init(model: nn.Module, *args) -> dict:
    return nn.unbox(jax.jit(model.init)(jax.random.key(1), *args))


def loss_fn(model: Decoder, params: dict, toks: jax.Array) -> jax.Array:
    logits, aux = model.apply(params, toks[:, :-1])
    logp = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(logp, toks[:, 1:, None], axis=-1).mean() + aux.get("aux_loss", 0.0)


# ----------------------------------------------------------------------------- references


def ref_attention(q, k, v, window=None):
    """softmax(q k^T / sqrt(H) + mask) v in float64, kv heads repeated to the query heads."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    n, kv = q.shape[2], k.shape[2]
    k, v = np.repeat(k, n // kv, axis=2), np.repeat(v, n // kv, axis=2)
    scores = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    t = np.arange(q.shape[1])
    allowed = t[:, None] >= t[None, :]
    if window is not None:
        allowed &= t[:, None] - t[None, :] < window
    scores = np.where(allowed, scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", p, v)


def ref_rotary(x, positions, theta):
    """Rotation of the complex numbers x[i] + i x[i + H/2] by pos * theta^(-2i/H), float64."""
    x = np.asarray(x, np.float64)
    half = x.shape[-1] // 2
    z = x[..., :half] + 1j * x[..., half:]
    freq = theta ** (-2.0 * np.arange(half) / x.shape[-1])
    angle = np.asarray(positions, np.float64)[..., None] * freq
    z = z * np.exp(1j * angle)[..., None, :]
    return np.concatenate([z.real, z.imag], axis=-1)


def ref_rmsnorm(x, scale, eps):
    x = np.asarray(x, np.float64)
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * np.asarray(scale, np.float64)


def close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                               rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- layers


def test_rmsnorm_matches_float64_reference():
    x = 3.0 * jax.random.normal(jax.random.key(0), (2, 5, 16))
    norm = RMSNorm(eps=1e-5)
    params = {"params": {"scale": jax.random.normal(jax.random.key(2), (16,))}}
    close(norm.apply(params, x), ref_rmsnorm(x, params["params"]["scale"], 1e-5))
    # float32 inside even for a bf16 input
    assert norm.apply(params, x.astype(jnp.bfloat16)).dtype == jnp.float32


def test_rotary_matches_float64_reference_at_explicit_positions():
    x = jax.random.normal(jax.random.key(0), (2, 6, 3, 8))
    positions = jnp.array([[0, 1, 2, 3, 4, 5], [7, 100, 3, 2000, 0, 9]])
    close(rotary(x, positions, 10000.0), ref_rotary(x, positions, 10000.0))
    assert rotary(x.astype(jnp.bfloat16), positions, 10000.0).dtype == jnp.bfloat16


def test_rotary_scores_depend_only_on_relative_position():
    q = jax.random.normal(jax.random.key(0), (1, 1, 1, 8))
    k = jax.random.normal(jax.random.key(1), (1, 1, 1, 8))

    def score(m, n):
        qm, kn = rotary(q, jnp.array([[m]]), 500.0), rotary(k, jnp.array([[n]]), 500.0)
        return float(jnp.sum(qm * kn))

    assert score(7, 3) == pytest.approx(score(104, 100), abs=1e-5)
    assert score(7, 3) != pytest.approx(score(7, 4), abs=1e-3)


def test_mlp_is_swiglu():
    cfg = tiny()
    x = jax.random.normal(jax.random.key(0), (2, 3, 32))
    mlp = MLP(cfg)
    params = init(mlp, x)
    p = {k: np.asarray(v["kernel"], np.float64) for k, v in params["params"].items()}
    gate, up = np.asarray(x, np.float64) @ p["gate"], np.asarray(x, np.float64) @ p["up"]
    want = (gate / (1 + np.exp(-gate)) * up) @ p["down"]
    y, aux = mlp.apply(params, x)
    close(y, want)
    assert aux == {}


def test_bf16_matmul_takes_bf16_operands_and_returns_f32():
    x = jax.random.normal(jax.random.key(0), (16, 32))
    w = jax.random.normal(jax.random.key(1), (32, 24))
    jaxpr = jax.make_jaxpr(lambda x, w: matmul("td,df->tf", x, w, jnp.bfloat16))(x, w)
    (dot,) = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    assert [v.aval.dtype for v in dot.invars] == [jnp.bfloat16] * 2
    assert dot.outvars[0].aval.dtype == jnp.float32
    # bf16 rounding of the operands only: relative L2 error well under 1e-2.
    got, want = matmul("td,df->tf", x, w, jnp.bfloat16), np.asarray(x, np.float64) @ np.asarray(w)
    assert np.linalg.norm(got - want) < 1e-2 * np.linalg.norm(want)


# ----------------------------------------------------------------------------- attention


@pytest.mark.parametrize("n_kv, window", [(4, None), (2, None), (1, None), (2, 3), (4, 1)],
                         ids=["mha", "gqa", "mqa", "gqa-window3", "mha-window1"])
def test_causal_attention_matches_naive_reference(n_kv, window):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (2, 9, 4, 8))
    k, v = (jax.random.normal(key, (2, 9, n_kv, 8)) for key in keys[1:])
    close(causal_attention(q, k, v, window), ref_attention(q, k, v, window))


@pytest.mark.parametrize("window, segments", [(None, False), (3, False), (None, True), (5, True)],
                         ids=["causal", "window3", "segments", "window5-segments"])
def test_chunked_attention_values_and_gradients_match_an_independent_implementation(window,
                                                                                     segments):
    """Query chunks of 4 over T=11 (the last one short, windows starting mid-chunk) against
    jax.nn.dot_product_attention (whole score matrix, its own autodiff) at 1e-5."""
    b, t, n, kv, h = 2, 11, 4, 2, 8
    keys = jax.random.split(jax.random.key(3), 4)
    q = jax.random.normal(keys[0], (b, t, n, h))
    k, v = (jax.random.normal(key, (b, t, kv, h)) for key in keys[1:3])
    weights = jax.random.normal(keys[3], (b, t, n, h))
    segment_ids = jnp.array([[1] * 4 + [2] * 7, [1] * 9 + [2] * 2]) if segments else None
    mask = None if segment_ids is None else \
        (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    local = None if window is None else (window - 1, 0)

    def ours(q, k, v):
        return causal_attention(q, k, v, window, None, segment_ids, query_chunk=4)

    def theirs(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True,
                                            local_window_size=local)

    def weighted(attention):
        return lambda q, k, v: jnp.sum(attention(q, k, v) * weights)

    close(ours(q, k, v), theirs(q, k, v))
    for got, want in zip(jax.grad(weighted(ours), (0, 1, 2))(q, k, v),
                         jax.grad(weighted(theirs), (0, 1, 2))(q, k, v)):
        close(got, want)


def test_attention_backward_runs_in_bfloat16_on_this_backend():
    """bf16 operands, float32 scores: XLA:CPU rejects some bf16 x bf16 -> f32 gradient dots, so
    the backward must compile here; its gradients follow float32's to bf16 precision."""
    keys = jax.random.split(jax.random.key(4), 3)
    q = jax.random.normal(keys[0], (2, 40, 4, 8))
    k, v = (jax.random.normal(key, (2, 40, 2, 8)) for key in keys[1:])
    loss = lambda q, k, v: jnp.sum(causal_attention(q, k, v).astype(jnp.float32) ** 2)  # noqa: E731
    want = jax.grad(loss, (0, 1, 2))(q, k, v)
    got = jax.jit(jax.grad(loss, (0, 1, 2)))(*(a.astype(jnp.bfloat16) for a in (q, k, v)))
    for g, w in zip(got, want):
        assert g.dtype == jnp.bfloat16
        assert np.linalg.norm(np.asarray(g, np.float32) - w) < 3e-2 * np.linalg.norm(w)


@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("impl", ["chunked", "xla"])
def test_attention_module_matches_reference_projections(window, impl):
    cfg = tiny(sliding_window=window, rope_theta=100.0, attention_impl=impl)
    x = jax.random.normal(jax.random.key(0), (2, 7, 32))
    positions = jnp.arange(7)[None]
    attn = Attention(cfg)
    params = init(attn, x, positions)
    p = {k: np.asarray(v["kernel"], np.float64) for k, v in params["params"].items()}
    xf = np.asarray(x, np.float64)
    q = ref_rotary(np.einsum("btd,dnh->btnh", xf, p["q"]), positions, 100.0)
    k = ref_rotary(np.einsum("btd,dkh->btkh", xf, p["k"]), positions, 100.0)
    v = np.einsum("btd,dkh->btkh", xf, p["v"])
    want = np.einsum("btnh,nhd->btd", ref_attention(q, k, v, window), p["o"])
    y, aux = attn.apply(params, x, positions)
    close(y, want)
    assert aux == {}


# ----------------------------------------------------------------------------- decoder


@pytest.mark.parametrize("kw", [{}, {"sliding_window": 3}, {"scan_layers": False}])
def test_decoder_is_causal(kw):
    model = Decoder(tiny(**kw), VOCAB)
    toks = tokens()
    params = init(model, toks)
    logits, aux = jax.jit(model.apply)(params, toks)
    assert logits.shape == (2, 12, VOCAB) and logits.dtype == jnp.float32 and aux == {}
    t = 5
    changed = toks.at[:, t + 1:].set((toks[:, t + 1:] + 1) % VOCAB)
    other, _ = jax.jit(model.apply)(params, changed)
    np.testing.assert_allclose(other[:, : t + 1], logits[:, : t + 1], rtol=0, atol=1e-6)
    assert not np.allclose(other[:, t + 1:], logits[:, t + 1:], atol=1e-4)


def scan_to_loop(params: dict, cfg: ModelConfig, period_len: int) -> dict:
    """Scanned params {layers: {block_j: [R, ...]}} -> loop params {layer_i: ...}."""
    out = {k: v for k, v in params["params"].items() if k != "layers"}
    for i in range(cfg.n_layers):
        out[f"layer_{i}"] = jax.tree.map(lambda a: a[i // period_len],
                                         params["params"]["layers"][f"block_{i % period_len}"])
    return {"params": out}


def test_scan_and_loop_compute_the_same_function():
    """Untied here; the tied head goes through both layouts in the period test below."""
    toks = tokens()
    scanned = Decoder(tiny(n_layers=3, tie_embeddings=False), VOCAB)
    looped = Decoder(tiny(n_layers=3, tie_embeddings=False, scan_layers=False), VOCAB)
    params = init(scanned, toks)
    loop_params = scan_to_loop(params, scanned.cfg, 1)
    assert jax.tree.structure(loop_params) == jax.tree.structure(
        nn.unbox(jax.eval_shape(looped.init, jax.random.key(0), toks)))
    want = jax.jit(scanned.apply)(params, toks)[0]
    close(jax.jit(looped.apply)(loop_params, toks)[0], want, 1e-6)


class ToyAuxFFN(nn.Module):
    """An MLP that reports an aux loss and a metric: stands in for a MoE layer."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        y, _ = MLP(self.cfg, name="mlp")(x)
        score = jnp.mean(y**2)
        return y, {"aux_loss": score, "toy_score": score}


def test_period_seam_mixes_ffns_and_stacks_aux_in_layer_order(monkeypatch):
    monkeypatch.setitem(decoder.FFNS, "toy", ToyAuxFFN)
    pattern = {"layer_pattern": ("attention:mlp", "attention:toy")}  # past the config's checks
    toks = tokens()
    scanned = Decoder(tiny(n_layers=4).model_copy(update=pattern), VOCAB)
    looped = Decoder(tiny(n_layers=4, scan_layers=False).model_copy(update=pattern), VOCAB)
    params = init(scanned, toks)
    assert "toy" in params["params"]["layers"]["block_1"]
    assert params["params"]["layers"]["block_1"]["toy"]["mlp"]["up"]["kernel"].shape[0] == 2
    logits, aux = jax.jit(scanned.apply)(params, toks)
    loop_logits, loop_aux = jax.jit(looped.apply)(scan_to_loop(params, scanned.cfg, 2), toks)
    close(loop_logits, logits, 1e-6)
    assert set(aux) == {"aux_loss", "toy_score"}
    assert aux["toy_score"].shape == (2,)  # layers 1 and 3
    close(aux["aux_loss"], aux["toy_score"].sum(), 1e-6)
    close(loop_aux["toy_score"], aux["toy_score"], 1e-6)
    assert aux["aux_loss"].shape == ()
    # Layer order: silence layer 3's toy output and only the second score drops to zero.
    down = params["params"]["layers"]["block_1"]["toy"]["mlp"]["down"]
    down["kernel"] = down["kernel"].at[1].set(0.0)
    scores = jax.jit(scanned.apply)(params, toks)[1]["toy_score"]
    assert scores[0] > 0 and scores[1] == 0


def test_every_configurable_sublayer_is_registered():
    """The config validates layer_pattern names; the decoder must know all of them."""
    from research import config

    assert set(decoder.MIXERS) == set(config.MIXERS)
    assert set(decoder.FFNS) | {"none"} == set(config.FFNS)


def test_remat_policies_give_the_same_loss_and_gradients():
    toks = tokens(t=9)
    params = init(Decoder(tiny(), VOCAB), toks[:, :-1])

    def run(remat: str, scan: bool) -> tuple[jax.Array, dict]:
        model = Decoder(tiny(remat=remat, scan_layers=scan), VOCAB)
        p = params if scan else scan_to_loop(params, model.cfg, 1)
        return jax.jit(jax.value_and_grad(lambda p: loss_fn(model, p, toks)))(p)

    loss, grads = run("none", True)
    for remat, scan in [("full", True), ("dots", True), ("dots", False)]:
        other_loss, other_grads = run(remat, scan)
        close(other_loss, loss, 1e-6)
        want = grads if scan else scan_to_loop(grads, tiny(), 1)
        jax.tree.map(lambda a, b: close(a, b, 1e-6), other_grads, want)


def test_remat_dots_saves_the_projection_outputs_and_full_saves_none():
    """What the backward pass keeps (jax's own account of the residuals): under "dots" each
    layer's named projection outputs it needs (q, k, v and o; the MLP's gate and up; its down
    output is only added), under "full" none of them. Dropping the checkpoint_name in
    layers.project or the policy's name rule leaves "dots" saving no projection at all."""
    import contextlib
    import io

    from jax.ad_checkpoint import print_saved_residuals

    toks = tokens(t=9)[:, :-1]  # 2 x 8 = 16 tokens

    def named_projections(remat: str) -> list[tuple[int, ...]]:
        model = Decoder(tiny(remat=remat, scan_layers=False), VOCAB)
        params = init(model, toks)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            print_saved_residuals(lambda p: model.apply(p, toks)[0].sum(), params)
        return sorted(tuple(int(n) for n in line.split("[", 1)[1].split("]")[0].split(","))
                      for line in out.getvalue().splitlines() if "named 'projection'" in line)

    heads, kv, head_size, d_ff = TINY["n_heads"], TINY["n_kv_heads"], 32 // TINY["n_heads"], TINY["d_ff"]
    per_layer = [(16, heads * head_size), (16, kv * head_size), (16, kv * head_size),  # q k v
                 (16, 32), (16, d_ff), (16, d_ff)]  # o, gate, up
    assert named_projections("dots") == sorted(per_layer * TINY["n_layers"])
    assert named_projections("full") == []


def test_bfloat16_compute_stays_close_to_float32():
    """bf16 operands (8-bit mantissa) with f32 accumulation: logits within 3% relative L2 of
    float32, loss within 1e-3 relative, gradients within 5% relative L2."""
    toks = tokens(t=17)
    params = init(Decoder(tiny(init_std=0.2), VOCAB), toks[:, :-1])

    def run(dtype: str):
        model = Decoder(tiny(init_std=0.2, compute_dtype=dtype), VOCAB)
        def f(p):
            return loss_fn(model, p, toks), model.apply(p, toks)[0]
        return jax.jit(jax.value_and_grad(f, has_aux=True))(params)

    (la, a), ga = run("float32")
    (lb, b), gb = run("bfloat16")
    assert b.dtype == jnp.float32
    assert jnp.linalg.norm(a - b) < 3e-2 * jnp.linalg.norm(a)
    assert abs(la - lb) < 1e-3 * abs(la)
    flat_a, flat_b = (jnp.concatenate([g.ravel() for g in jax.tree.leaves(g)]) for g in (ga, gb))
    assert jnp.linalg.norm(flat_a - flat_b) < 5e-2 * jnp.linalg.norm(flat_a)


@pytest.mark.parametrize("scan, tie", [(True, True), (False, False)])
def test_every_param_has_logical_axis_names_of_its_rank(scan, tie):
    model = Decoder(tiny(scan_layers=scan, tie_embeddings=tie), VOCAB)
    boxed = jax.eval_shape(model.init, jax.random.key(0), tokens())
    specs = nn.get_partition_spec(boxed)
    shapes = nn.unbox(boxed)
    param_names = {name for name, _ in DEFAULT_AXIS_RULES if not name.startswith("act_")}
    leaves = jax.tree_util.tree_leaves_with_path(shapes)
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, PartitionSpec))
    assert len(leaves) == len(spec_leaves) > 10
    for (path, shape), spec in zip(leaves, spec_leaves):
        name = jax.tree_util.keystr(path)
        assert len(spec) == len(shape.shape), name
        assert set(spec) <= param_names, name
        assert (spec[0] == "layers") == ("layers" in name), name
    assert ("lm_head" in str(specs)) != tie


def test_sharded_forward_and_gradient_equal_unsharded():
    """Runs every logical constraint under DEFAULT_AXIS_RULES on a data x fsdp x tensor mesh."""
    n = jax.device_count()
    shape = (2, 2, 1, 2) if n >= 8 else (n, 1, 1, 1)
    mesh = jax.make_mesh(shape, ("data", "fsdp", "expert", "tensor"),
                         axis_types=(AxisType.Auto,) * 4)
    model = Decoder(tiny(n_heads=4, n_kv_heads=2), VOCAB)
    toks = tokens(b=4, t=9)
    params = init(model, toks[:, :-1])
    want = jax.jit(jax.value_and_grad(lambda p: loss_fn(model, p, toks)))(params)
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_AXIS_RULES):
        specs = nn.get_partition_spec(jax.eval_shape(model.init, jax.random.key(0), toks))
        shardings = nn.logical_to_mesh_sharding(specs, mesh, DEFAULT_AXIS_RULES)
        sharded = jax.device_put(params, shardings)
        got = jax.jit(jax.value_and_grad(lambda p: loss_fn(model, p, toks)))(sharded)
    close(got[0], want[0], 1e-6)
    jax.tree.map(lambda a, b: close(a, b, 1e-5), got[1], want[1])


def test_padded_vocab():
    assert padded_vocab(ModelConfig(), 256) == 256
    assert padded_vocab(ModelConfig(), 50257) == 50304
    assert padded_vocab(ModelConfig(vocab_size=300), 256) == 300
    with pytest.raises(ConfigError, match="model.vocab_size=200 is smaller"):
        padded_vocab(ModelConfig(vocab_size=200), 256)
