"""The custom-gradient projection (`layers.project`) against float64 references and autodiff.

Tolerances: float32 against float64 numpy at 1e-5; the custom and the plain (einsum + autodiff)
paths compute the same float32 numbers up to summation order, so they agree at 1e-5 (loss and
gradients) and over a few training steps at 1e-5 relative.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.config import ModelConfig
from research.models import moe
from research.models.decoder import Decoder
from research.models.layers import Einsum, matmul, projection_dims
from research.train.loop import train
from research.train.rundir import read_metrics

VOCAB = 64


def close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                               rtol=tol, atol=tol)


@pytest.mark.parametrize("spec, want", [
    ("btd,dnh->btnh", (1, False)), ("btnh,nhd->btd", (2, False)), ("btd,vd->btv", (1, True)),
    ("td,df->tf", (1, False)), ("bthp,hpd->btd", (2, False)),
])
def test_projection_dims_of_the_model_specs(spec, want):
    assert projection_dims(spec) == want


@pytest.mark.parametrize("spec", ["egi,eio->ego", "btd,df->bft", "bdt,df->btf", "btnh,hnd->btd"])
def test_non_projections_are_refused(spec):
    with pytest.raises(ValueError, match="not a projection"):
        projection_dims(spec)


@pytest.mark.parametrize("spec, w_shape", [
    ("btd,dnh->btnh", (6, 3, 4)), ("btnh,nhd->btd", (3, 4, 5)), ("btd,vd->btv", (7, 6)),
])
def test_custom_projection_values_and_gradients_match_float64(spec, w_shape):
    """y, dL/dx and dL/dw for a random cotangent, against numpy float64 einsums."""
    xs, ws = spec.split("->")[0].split(",")
    sizes = dict(zip(ws, w_shape)) | {"b": 2, "t": 5}
    x_shape = tuple(sizes[c] for c in xs)
    out = spec.split("->")[1]
    keys = jax.random.split(jax.random.key(0), 3)
    x, w = jax.random.normal(keys[0], x_shape), jax.random.normal(keys[1], w_shape)
    g = jax.random.normal(keys[2], tuple(sizes[c] for c in out))
    y, vjp = jax.vjp(lambda x, w: matmul(spec, x, w, jnp.float32, "custom"), x, w)
    dx, dw = vjp(g)
    x64, w64, g64 = (np.asarray(a, np.float64) for a in (x, w, g))
    close(y, np.einsum(spec, x64, w64))
    close(dx, np.einsum(f"{out},{ws}->{xs}", g64, w64))
    close(dw, np.einsum(f"{xs},{out}->{ws}", x64, g64))
    assert dx.dtype == x.dtype and dw.dtype == w.dtype


@pytest.mark.parametrize("projection", ["custom", "plain"])
def test_split_projection_is_the_parts_of_one_kernel(projection):
    """Einsum(splits=...) returns the parts of the unsplit output along the kernel's last axis,
    with one "kernel" param; its gradients (x and kernel) against numpy float64."""
    spec, sizes = "btd,dhc->bthc", (3, 1, 2)
    module = Einsum(spec, (4, 2, sum(sizes)), ("embed", None, None), 1.0, "float32",
                    projection=projection, splits=sizes)
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (2, 5, 4))
    params = module.init(keys[1], x)
    assert jax.tree.structure(params) == jax.tree.structure(
        module.clone(splits=()).init(keys[1], x))
    gs = [jax.random.normal(k, (2, 5, 2, n)) for k, n in zip(jax.random.split(keys[2], 3), sizes)]
    parts, vjp = jax.vjp(lambda p, x: module.apply(p, x), params, x)
    d_params, dx = vjp(tuple(gs))
    w64 = np.asarray(nn.meta.unbox(params)["params"]["kernel"], np.float64)
    x64, g64 = np.asarray(x, np.float64), np.concatenate([np.asarray(g) for g in gs], -1)
    whole = np.einsum(spec, x64, w64)
    assert [p.shape[-1] for p in parts] == list(sizes)
    close(np.concatenate([np.asarray(p) for p in parts], -1), whole)
    close(dx, np.einsum("bthc,dhc->btd", g64, w64))
    close(nn.meta.unbox(d_params)["params"]["kernel"], np.einsum("btd,bthc->dhc", x64, g64))


def test_custom_projection_in_bfloat16_is_as_close_to_float64_as_plain():
    """bf16 operands, float32 result; the custom backward runs in float32 (autodiff's rounds the
    gradients to bf16), so its gradients are within 1e-2 relative L2 of float64 and no further
    from it than the plain path's."""
    x = jax.random.normal(jax.random.key(0), (2, 5, 32))
    w = jax.random.normal(jax.random.key(1), (32, 24))
    g = jax.random.normal(jax.random.key(2), (2, 5, 24))
    x64, w64, g64 = (np.asarray(a, np.float64) for a in (x, w, g))
    want = [np.einsum("btd,df->btf", x64, w64), np.einsum("btf,df->btd", g64, w64),
            np.einsum("btd,btf->df", x64, g64)]
    errors = {}
    for kind in ("custom", "plain"):
        y, vjp = jax.vjp(lambda x, w: matmul("btd,df->btf", x, w, jnp.bfloat16, kind), x, w)
        assert y.dtype == jnp.float32
        errors[kind] = [np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b)
                        for a, b in zip([y, *vjp(g)], want)]
    assert max(errors["custom"]) < 1e-2
    assert all(c <= p * 1.01 for c, p in zip(errors["custom"], errors["plain"])), errors


def bf16(a: jax.Array) -> np.ndarray:
    """a rounded to bfloat16, as float64."""
    return np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64)


@pytest.mark.parametrize("spec, projection", [
    ("btd,df->btf", "custom"), ("btd,df->btf", "plain"), ("btnh,nhd->btd", "custom"),
    ("btnh,nhd->btd", "plain"), ("btd,vd->btv", "custom"), ("btd,vd->btv", "plain"),
    ("egi,eio->ego", "plain"),  # MoE's batched expert matmul
])
def test_bfloat16_backward_multiplies_the_rounded_cotangent(spec, projection):
    """backward_dtype=bfloat16: dx and dw are float64 einsums of the bf16-rounded cotangent and
    operands (to 1e-5: bf16 products are exact in float32, the sums float32), and differ from
    the float32 backward's by the cotangent's rounding (far above 1e-5). The forward is the
    float32 backward's, bit for bit."""
    xs, ws = spec.split("->")[0].split(",")
    out = spec.split("->")[1]
    sizes = {c: n for c, n in zip("btdfnhveiog", (2, 5, 16, 12, 3, 4, 10, 4, 6, 8, 7))}
    keys = jax.random.split(jax.random.key(0), 3)
    x, w, g = (jax.random.normal(k, tuple(sizes[c] for c in s))
               for k, s in zip(keys, (xs, ws, out)))
    results = {}
    for backward in (jnp.float32, jnp.bfloat16):
        y, vjp = jax.vjp(lambda x, w, b=backward: matmul(spec, x, w, jnp.bfloat16, projection,
                                                         backward_dtype=b), x, w)
        results[backward] = (y, *vjp(g))
    y, dx, dw = results[jnp.bfloat16]
    assert y.dtype == dx.dtype == dw.dtype == jnp.float32
    np.testing.assert_array_equal(y, results[jnp.float32][0])
    close(dx, np.einsum(f"{out},{ws}->{xs}", bf16(g), bf16(w)))
    close(dw, np.einsum(f"{xs},{out}->{ws}", bf16(x), bf16(g)))
    for new, old in zip((dx, dw), results[jnp.float32][1:]):
        assert np.abs(np.asarray(new) - np.asarray(old)).max() > 1e-4


@pytest.mark.parametrize("spec", ["btd,df->btf", "egi,eio->ego"])
def test_remat_dots_saves_the_same_with_either_backward_dtype(spec):
    """Under remat "dots" the plain path's bf16 backward (a custom_vjp) keeps what autodiff's
    einsum keeps: a projection's output, not a batched expert matmul's."""
    import contextlib
    import io

    from jax.ad_checkpoint import print_saved_residuals

    from research.models.decoder import REMAT_POLICIES

    x, w = jnp.ones((4, 5, 6)), jnp.ones((4, 6, 3) if spec.startswith("egi") else (6, 3))

    def saved(backward) -> list[str]:
        f = jax.checkpoint(lambda x, w: jnp.sin(matmul(spec, x, w, jnp.bfloat16, "plain",
                                                        backward_dtype=backward)).sum(),
                           policy=REMAT_POLICIES["dots"])
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            print_saved_residuals(f, x, w)
        return sorted(line.split(" ")[0] for line in out.getvalue().splitlines()
                      if "from the argument" not in line)

    assert saved(jnp.bfloat16) == saved(jnp.float32)
    assert ("f32[4,5,3]" in saved(jnp.float32)) == (spec == "btd,df->btf")


def test_backward_dtype_reaches_every_projection(monkeypatch):
    """model.backward_dtype reaches every Einsum of attention, MLP, MoE, Mamba-2 and the output
    head but the router (float32 by design), and MoE's expert matmuls."""
    einsums, experts = [], []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, Einsum) and context.method_name == "__call__":
            einsums.append((context.module.name, context.module.backward_dtype))
        return next_fun(*args, **kwargs)

    real = moe.expert_matmul
    monkeypatch.setattr(moe, "expert_matmul", lambda *a, **kw: experts.append(
        kw["backward_dtype"]) or real(*a, **kw))
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                      layer_pattern=("attention:moe", "mamba:mlp"), tie_embeddings=False,
                      compute_dtype="bfloat16", backward_dtype="bfloat16")
    toks = jnp.zeros((1, 8), jnp.int32)
    with nn.intercept_methods(record):
        Decoder(cfg, VOCAB).init(jax.random.key(0), toks)
    names = {name for name, _ in einsums}
    assert {"q", "k", "v", "o", "gate", "up", "down", "in_zxdt", "lm_head", "router"} <= names
    assert {b for name, b in einsums if name != "router"} == {"bfloat16"}
    assert {b for name, b in einsums if name == "router"} == {"float32"}
    assert experts and set(experts) == {jnp.dtype(jnp.bfloat16)}


@pytest.mark.parametrize("kw", [
    dict(), dict(layer_pattern=("attention:moe",)), dict(layer_pattern=("mamba:none",)),
], ids=["dense", "moe", "mamba"])
def test_custom_and_plain_models_give_the_same_loss_and_gradients(kw):
    cfg = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, **kw)
    toks = jax.random.randint(jax.random.key(0), (2, 9), 0, VOCAB, dtype=jnp.int32)
    models = {p: Decoder(ModelConfig(**cfg, projection=p), VOCAB) for p in ("custom", "plain")}
    params = nn.unbox(models["plain"].init(jax.random.key(1), toks[:, :-1]))

    def loss(model, p):
        logits, aux = model.apply(p, toks[:, :-1])
        logp = jax.nn.log_softmax(logits)
        return -jnp.take_along_axis(logp, toks[:, 1:, None], -1).mean() + aux.get("aux_loss", 0.)

    (la, ga), (lb, gb) = (jax.jit(jax.value_and_grad(lambda p, m=m: loss(m, p)))(params)
                          for m in models.values())
    close(la, lb)
    jax.tree.map(close, ga, gb)


def test_training_losses_equal_the_plain_path(tiny, tmp_path):
    """Four AdamW steps of the tiny dense model: the logged losses agree at 1e-5 relative."""
    runs = {}
    for projection in ("custom", "plain"):
        train(tiny(f"model.projection={projection}", "logging.tensorboard=false",
                   "train.steps=4"),
              tmp_path / projection)
        runs[projection] = [row["loss"] for row in read_metrics(tmp_path / projection)
                            if "loss" in row]
    assert len(runs["custom"]) == 4
    np.testing.assert_allclose(runs["custom"], runs["plain"], rtol=1e-5)
