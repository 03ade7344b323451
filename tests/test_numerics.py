"""The numbers a run reports, against references computed outside the code under test: the
loss (target shift, aux loss), eval loss and bits per byte (float64 numpy), the logged learning
rate (the schedule's formula), MFU (its definition), gradient clipping (Adam's first moment);
and end to end: training lowers the loss, bf16 trains, dropless MoE and remat with MoE and Mamba
train exactly as their reference paths do. Four tiny runs in all (one compile each)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from research.config import OptimConfig
from research.data.pipeline import eval_batches
from research.train import flops
from research.train.checkpoint import Checkpointer
from research.train.loop import evaluate, prepare, train
from research.train.rundir import read_metrics
from research.train.optim import make_optimizer
from research.train.state import init_state
from research.train.objectives import lm_loss

DENSE = ("train.steps=12", "train.eval_every=100", "checkpoint.every=100", "optim.lr=3e-3",
         "optim.warmup_steps=2", "optim.schedule=cosine", "optim.min_lr_ratio=0.1")
# Mamba + MoE in layer 0, attention + MLP in layer 1
HYBRID = ("train.steps=3", "train.eval_every=100", "checkpoint.every=100",
          "model.layer_pattern=[mamba:moe,attention:mlp]", "model.mamba.head_dim=16",
          "model.mamba.chunk_size=8", "model.moe.n_experts=4", "model.moe.top_k=2",
          "model.moe.balance_coef=0.1", "model.moe.z_loss_coef=0.01")


def rows(run_dir, key: str) -> list[dict]:
    return [r for r in read_metrics(run_dir) if key in r]


def nll64(logits, targets) -> np.ndarray:
    """float64 per-token negative log-likelihood."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(-1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -np.take_along_axis(log_probs, np.asarray(targets)[..., None], -1)[..., 0]


def final_params(cfg, run_dir):
    setup = prepare(cfg)
    with setup.context():
        state, _ = Checkpointer(run_dir / "checkpoints", cfg.checkpoint, read_only=True).restore(
            None, setup.spec.abstract)
    return setup, state["params"]


@pytest.fixture(scope="module")
def dense_runs(tmp_path_factory, token_cache_dir):
    from research import config
    from conftest import TINY

    base = [*TINY, f"data.cache_dir={token_cache_dir}", *DENSE]
    out = {}
    for dtype in ("float32", "bfloat16"):
        cfg = config.load(None, [*base, f"model.compute_dtype={dtype}"])
        run_dir = tmp_path_factory.mktemp(dtype) / "run"
        train(cfg, run_dir)
        out[dtype] = cfg, run_dir
    return out


def test_logged_lr_and_mfu_follow_their_definitions(dense_runs):
    cfg, run_dir = dense_runs["float32"]
    train_rows = rows(run_dir, "loss")
    assert [r["step"] for r in train_rows] == list(range(1, 13))
    for r in train_rows:
        t = r["step"] - 1  # the update of step s uses the schedule at s - 1
        shape = t / 2 if t < 2 else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (t - 2) / 10))
        assert r["lr"] == pytest.approx(3e-3 * shape, rel=1e-6, abs=1e-12), r["step"]
        tokens_per_sec = 8 * 32 / r["step_time"]
        assert r["tokens_per_sec"] == pytest.approx(tokens_per_sec, rel=1e-9)
        vocab = 384  # 257 byte tokens padded to a multiple of 128
        peak = 1e12 * len(jax.devices())  # logging.peak_flops is per device
        assert r["mfu"] == pytest.approx(
            flops.flops_per_token(cfg.model, vocab, 32) * tokens_per_sec / peak, rel=1e-9)


def test_eval_loss_and_bits_per_byte_against_float64(dense_runs):
    cfg, run_dir = dense_runs["float32"]
    setup, params = final_params(cfg, run_dir)
    batches = eval_batches(setup.data.caches["main"], seq_len=32, global_batch=8, n_batches=2)
    logits_fn = jax.jit(lambda p, t: setup.model.apply({"params": p}, t)[0])
    with setup.context():
        nll = [nll64(logits_fn(params, jnp.asarray(t[:, :-1])), t[:, 1:]) for t in batches]
    loss = float(np.mean(nll))
    heldout = np.asarray(setup.data.caches["main"].heldout)
    bytes_per_token = np.count_nonzero(heldout != 256) / len(heldout)  # byte tokens: 1 byte each
    logged = rows(run_dir, "eval_loss")[-1]
    assert logged["step"] == 12
    assert logged["eval_loss"] == pytest.approx(loss, rel=1e-5)
    assert logged["eval_bpb"] == pytest.approx(loss / math.log(2) / bytes_per_token, rel=1e-5)

    # training lowers the loss: the same held-out batches under the initial parameters
    with setup.context():
        init = init_state(setup.model, setup.tx, jnp.zeros((1, 32), jnp.int32), setup.spec,
                          cfg.train.seed)
    assert evaluate(setup, init["params"], {"main": batches})["eval_loss"] > loss + 0.3


def test_bf16_training_tracks_float32(dense_runs):
    f32 = rows(dense_runs["float32"][1], "loss")
    bf16 = rows(dense_runs["bfloat16"][1], "loss")
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in bf16)
    assert bf16[0]["loss"] == pytest.approx(f32[0]["loss"], rel=1e-2)  # same init, same batch
    assert bf16[-1]["loss"] < bf16[0]["loss"] - 0.3


def test_gradient_clipping_scales_the_gradient_adam_sees():
    """Clip at global norm 1: Adam's first moment after one update is (1 - b1) * g / max(1, |g|)."""
    params = {"w": jnp.zeros((3, 4)), "b": jnp.zeros((4,))}
    specs = {"w": jax.sharding.PartitionSpec("embed", "mlp"), "b": jax.sharding.PartitionSpec(None)}
    tx = make_optimizer(OptimConfig(grad_clip=1.0), 10, specs)
    rng = np.random.default_rng(0)
    for scale in (0.1, 5.0):
        grads = {k: jnp.asarray(rng.normal(size=v.shape) * scale, jnp.float32)
                 for k, v in params.items()}
        norm = math.sqrt(sum(float(np.sum(np.asarray(g, np.float64) ** 2)) for g in grads.values()))
        _, state = tx.update(grads, tx.init(params), params)
        mu = optax.tree_utils.tree_get(state, "mu")
        for key, g in grads.items():
            want = (1 - 0.9) * np.asarray(g, np.float64) / max(1.0, norm)
            np.testing.assert_allclose(np.asarray(mu[key]), want, rtol=1e-5, atol=1e-9)


@pytest.fixture(scope="module")
def hybrid_runs(tmp_path_factory, token_cache_dir):
    """Dropless MoE with full remat, and the capacity path with room for every token and no
    remat (the reference: same function, other code paths)."""
    from research import config
    from conftest import TINY

    base = [*TINY, f"data.cache_dir={token_cache_dir}", *HYBRID]
    out = {}
    for name, extra in {"dropless_remat": ("model.moe.dispatch=dropless", "model.remat=full"),
                        "capacity": ("model.moe.dispatch=capacity", "model.moe.capacity_factor=2",
                                     "model.remat=none")}.items():
        cfg = config.load(None, [*base, *extra])
        run_dir = tmp_path_factory.mktemp(name) / "run"
        train(cfg, run_dir, devices=jax.devices()[:1])  # one device: the cheapest compile
        out[name] = cfg, run_dir
    return out


def test_dropless_moe_and_remat_with_mamba_train_like_the_reference(hybrid_runs):
    got = rows(hybrid_runs["dropless_remat"][1], "loss")
    want = rows(hybrid_runs["capacity"][1], "loss")
    assert [r["step"] for r in got] == [1, 2, 3]
    assert want[0]["moe/layer0/drop_frac"] == 0.0  # the reference drops nothing
    for key in ("loss", "grad_norm", "param_norm", "moe/layer0/balance_loss"):
        np.testing.assert_allclose([r[key] for r in got], [r[key] for r in want], rtol=2e-5,
                                   err_msg=key)


def test_training_loss_is_shifted_cross_entropy_plus_aux(hybrid_runs):
    cfg, run_dir = hybrid_runs["dropless_remat"]
    setup, params = final_params(cfg, run_dir)
    tokens = np.asarray(eval_batches(setup.data.caches["main"], seq_len=32, global_batch=8,
                                     n_batches=1)[0])
    with setup.context():
        total, metrics = lm_loss(params, setup.model, {"tokens": jnp.asarray(tokens)})
        logits, aux = setup.model.apply({"params": params}, jnp.asarray(tokens[:, :-1]))
    ce = float(nll64(logits, tokens[:, 1:]).mean())  # position t predicts token t + 1
    moe = {k: float(np.asarray(v).sum()) for k, v in aux.items() if k.startswith("moe/")}
    aux_ref = 0.1 * moe["moe/balance_loss"] + 0.01 * moe["moe/z_loss"]
    assert aux_ref > 1e-3  # the aux term is visible at this tolerance
    assert float(metrics["loss"]) == pytest.approx(ce, rel=1e-5)
    assert float(total) == pytest.approx(ce + aux_ref, rel=1e-5)
