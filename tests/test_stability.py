"""Training-stability guards: QK-norm and z-loss against float64 numpy, the spike statistics
against a naive loop, a skipped update leaves the state bit-identical, spike skipping end to
end (and on 8 devices as on 1), rollback after a NaN (and a SIGKILL during it), bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import config
from research.config import ConfigError, ModelConfig
from research.models.attention import Attention
from research.models.decoder import Decoder
from research.train import recovery, stability
from research.train.rundir import read_metrics
from research.train.optim import lr_multiplier
from research.train.objectives import lm_loss, sft_loss
from tests.conftest import newest_checkpoint, xla_flags
from tests.test_models import close, ref_attention, ref_rmsnorm, ref_rotary
from tests.test_train import ROOT, final_params, losses

VOCAB = 64


def _random_params(params: dict, seed: int) -> dict:
    """Every leaf replaced by normal draws (norm scales away from 1, so a test can fail)."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, x.shape) + (x == 1.0)
                                     for k, x in zip(keys, leaves)])


def test_qk_norm_attention_and_its_logit_max_match_float64_reference():
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, qk_norm=True,
                      rope_theta=100.0, norm_eps=1e-5)
    x = jax.random.normal(jax.random.key(0), (2, 7, 32))
    positions = jnp.arange(7)[None]
    attn = Attention(cfg)
    params = {"params": _random_params(nn.unbox(jax.jit(attn.init)(jax.random.key(1), x,
                                                                   positions))["params"], 2)}
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
    xf = np.asarray(x, np.float64)
    q = ref_rmsnorm(np.einsum("btd,dnh->btnh", xf, p["q"]["kernel"]), p["q_norm"]["scale"], 1e-5)
    k = ref_rmsnorm(np.einsum("btd,dkh->btkh", xf, p["k"]["kernel"]), p["k_norm"]["scale"], 1e-5)
    q, k = ref_rotary(q, positions, 100.0), ref_rotary(k, positions, 100.0)
    v = np.einsum("btd,dkh->btkh", xf, p["v"]["kernel"])
    want = np.einsum("btnh,nhd->btd", ref_attention(q, k, v), p["o"]["kernel"])
    (y, aux), sown = jax.jit(lambda p, x: attn.apply(p, x, positions, mutable=["intermediates"])
                             )(params, x)
    close(y, want)
    # the diagnostic: the largest causal logit q·k/sqrt(H), float64
    scores = np.einsum("btnh,bsnh->bnts", q, np.repeat(k, 2, axis=2)) / np.sqrt(8)
    causal = np.tril(np.ones((7, 7), bool))
    close(sown["intermediates"]["logit_max"][0], scores[..., causal].max())
    assert attn.apply(params, x, positions)[1] == {}  # no probe unless asked for


@pytest.fixture(scope="module")
def decoder():
    """A hybrid MoE/Mamba/attention decoder under CompleteP with QK-norm: the guards apply to
    every family and parameterization."""
    cfg = ModelConfig(d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=48, qk_norm=True,
                      layer_pattern=("attention:moe", "mamba:none"), parameterization="completep",
                      base_d_model=16, base_n_layers=2, mamba={"head_dim": 16, "chunk_size": 4},
                      moe={"n_experts": 4, "top_k": 2})
    model = Decoder(cfg, VOCAB)
    tokens = jax.random.randint(jax.random.key(0), (2, 13), 0, VOCAB)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(1), tokens[:, :-1]))["params"]
    return model, params, tokens


def test_z_loss_matches_float64_reference(decoder):
    """lm: CE + c·mean(logZ²) over every token; sft: over the learned tokens only."""
    model, params, tokens = decoder
    logits, aux = jax.jit(model.apply)({"params": params}, tokens[:, :-1])
    z = np.asarray(logits, np.float64)
    log_z = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    nll = log_z - np.take_along_axis(z, np.asarray(tokens[:, 1:])[..., None], -1)[..., 0]
    coef = 1e-2
    loss, metrics = jax.jit(lambda p: lm_loss(p, model, {"tokens": tokens}, z_loss=coef))(params)
    close(metrics["loss"], nll.mean())
    close(metrics["z_loss"], coef * (log_z ** 2).mean())
    close(loss, nll.mean() + float(aux["aux_loss"]) + coef * (log_z ** 2).mean())
    assert "z_loss" not in jax.eval_shape(lambda: lm_loss(params, model, {"tokens": tokens}))[1]

    mask = np.random.default_rng(0).random(tokens.shape) < 0.5
    batch = {"tokens": tokens, "positions": jnp.broadcast_to(jnp.arange(13), tokens.shape),
             "segment_ids": jnp.ones_like(tokens), "loss_mask": jnp.asarray(mask, jnp.int32)}
    _, metrics = jax.jit(lambda p, b: sft_loss(p, model, b, z_loss=coef))(params, batch)
    learned = mask[:, 1:]
    close(metrics["loss"], nll[learned].mean())
    close(metrics["z_loss"], coef * (log_z[learned] ** 2).mean())


def test_per_layer_norms_and_logit_probe_name_the_layers(decoder):
    """Scanned [repeats, ...] leaves -> layer r * period + j, against float64 numpy per layer;
    the logit probe reports the attention layers only (0 and 2 of attention, mamba, ...)."""
    model, params, tokens = decoder
    norms = jax.jit(lambda p: stability.layer_norms(p, period=2))(params)
    assert set(norms) == {"embed", "final_norm", "layer0", "layer1", "layer2", "layer3"}
    for r in range(2):
        for j in range(2):
            leaves = jax.tree.leaves(params["layers"][f"block_{j}"])
            want = np.sqrt(sum((np.asarray(x[r], np.float64) ** 2).sum() for x in leaves))
            close(norms[f"layer{r * 2 + j}"], want)
    assert "q_norm" in params["layers"]["block_0"]["attention"]
    logit_max = jax.jit(lambda p, t: stability.attention_logit_max(p, model, {"tokens": t})
                        )(params, tokens)
    assert set(logit_max) == {"layer0", "layer2"}
    assert all(np.isfinite(float(v)) for v in logit_max.values())


def naive_spike_guard(values: list[tuple[float, float]], window: int, sigma: float
                      ) -> list[tuple[bool, float]]:
    """(skipped, score) per step: mean and sample std of the last `window` accepted steps."""
    accepted, out = [], []
    for loss, grad_norm in values:
        recent = np.array(accepted[-window:], np.float64)
        score = 0.0
        if len(recent) >= max(2, window // 2):
            mean, std = recent.mean(0), recent.std(0, ddof=1)
            score = max((x - m) / s for x, m, s in zip((loss, grad_norm), mean, std))
        skip = score > sigma or not np.isfinite(loss)
        out.append((skip, score))
        if not skip:
            accepted.append((loss, grad_norm))
    return out


def test_spike_decision_matches_a_naive_loop():
    rng = np.random.default_rng(0)
    values = [(5 + rng.normal(0, 0.1), 1 + rng.normal(0, 0.05)) for _ in range(30)]
    values[12] = (9.0, 1.0)  # a loss spike
    values[20] = (5.0, 3.0)  # a gradient-norm spike
    values[25] = (float("nan"), 1.0)
    cfg = config.TrainConfig(skip_spikes=True, spike_window=8)
    window = stability.init_state(cfg)
    decide = jax.jit(stability.spike_decision, static_argnums=3)
    got = []
    for loss, grad_norm in values:
        skip, score, window = decide(window, jnp.float32(loss), jnp.float32(grad_norm), 4.0)
        got.append((bool(skip), float(score)))
    want = naive_spike_guard(values, 8, 4.0)
    assert [s for s, _ in got] == [s for s, _ in want]
    assert [i for i, (s, _) in enumerate(want) if s] == [12, 20, 25]
    np.testing.assert_allclose([s for _, s in got if np.isfinite(s)],
                               [s for _, s in want if np.isfinite(s)], rtol=1e-4, atol=1e-4)
    assert int(window["skipped"]) == 3 and int(window["accepted"]) == 27


def test_a_skipped_step_leaves_params_and_optimizer_state_bit_identical(tiny):
    from research.train.loop import compile_train_step, prepare
    from research.train.state import init_state
    from research.train.step import controls

    cfg = tiny("train.skip_spikes=true", "train.spike_window=4", "mesh.data=2", "mesh.tensor=4")
    setup = prepare(cfg)
    rows = np.random.default_rng(0).integers(0, 256, (8, 33), dtype=np.int32)
    with setup.context():
        state = init_state(setup.model, setup.tx, jnp.zeros((1, 32), jnp.int32), setup.spec, 0)
        step_fn, knobs = compile_train_step(setup)
        batch = {"tokens": setup.global_array(rows)}
        for _ in range(3):  # the window needs 2 accepted steps before it decides
            state, out = step_fn(state, batch, knobs)
        before = jax.device_get(state)
        state, out = step_fn(state, batch, controls(cfg.optim.lr, 1e4))
        after = jax.device_get(state)
        assert float(out["spike/skipped"]) == 1.0 and float(out["spike/score"]) > 1e3
        for part in ("params", "opt_state"):
            assert jax.tree.all(jax.tree.map(np.array_equal, before[part], after[part])), part
        assert after["step"] == before["step"] + 1
        state, out = step_fn(state, batch, knobs)  # the next normal step updates again
        assert float(out["spike/skipped"]) == 1.0
        assert not np.array_equal(jax.device_get(state["params"]["embed"]["embedding"]),
                                  after["params"]["embed"]["embedding"])


def spike_lines(run_dir: Path) -> list[tuple[int, int]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["spike_skipped_batch"]) for r in rows if "spike_skipped_batch" in r]


def test_an_injected_spike_is_skipped_the_same_on_one_and_eight_devices(tiny, tmp_path):
    """Without the guard the spike (loss x 1e4, no clipping) inflates Adam's second moment and
    the run ends far from the clean one; with it the update is skipped and the final loss is
    within 1% of the clean run's. Decisions and losses on 8 devices equal 1 device's."""
    from research.train.loop import train

    common = ("train.steps=12", "train.spike_window=6", "train.spike_sigma=20",
              "optim.grad_clip=null", "checkpoint.every=100", "train.eval_every=100")
    guarded = (*common, "train.skip_spikes=true")
    fault = ("train.fault_steps=[5]",)
    clean = train(tiny(*guarded), tmp_path / "clean")
    eight = train(tiny(*guarded, *fault, "mesh.data=8", "logging.norms_every=4"),
                  tmp_path / "eight")
    one = train(tiny(*guarded, *fault, "mesh.data=1"), tmp_path / "one",
                devices=jax.devices()[:1])
    unguarded = train(tiny(*common, *fault), tmp_path / "unguarded")

    assert spike_lines(tmp_path / "eight") == spike_lines(tmp_path / "one") == [(5, 5)]
    assert spike_lines(tmp_path / "clean") == []
    assert eight["final"]["spike/skipped"] == 1.0 and clean["final"]["spike/skipped"] == 0.0
    a, b = losses(tmp_path / "one"), losses(tmp_path / "eight")
    np.testing.assert_allclose([b[s] for s in a], list(a.values()), rtol=1e-5)
    assert eight["final"]["loss"] == pytest.approx(clean["final"]["loss"], rel=0.01)
    assert unguarded["final"]["loss"] > 1.01 * clean["final"]["loss"]
    norms = [r for r in read_metrics(tmp_path / "eight") if "norms/grad/layer0" in r]
    assert [r["step"] for r in norms] == [4, 8, 12]
    for kind in ("grad", "update", "param", "logit_max"):
        assert all(r[f"norms/{kind}/layer1"] > 0 for r in norms), kind


def test_batch_skipping_reads_every_other_batch_in_order():
    """Step k reads the k-th batch not skipped, counting from 1 (a naive filter of the stream)."""
    skipped = frozenset({3, 4, 9})
    data = iter(range(1, 100))
    drawn, got = recovery.batch_of_step(0, skipped), []
    for _ in range(10):
        batch, drawn = recovery.next_batch(data, drawn, skipped)
        assert batch == drawn
        got.append(batch)
    assert got == [b for b in range(1, 100) if b not in skipped][:10]
    assert [recovery.batch_of_step(k, skipped) for k in range(1, 11)] == got


def _start(run_dir: Path, overrides: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "research", "train", "--run-dir", str(run_dir), *overrides],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "XLA_FLAGS": xla_flags(2)})


def test_rollback_after_a_nan_finishes_and_a_kill_during_recovery_resumes_exactly(
        tmp_path, tiny_overrides):
    """A NaN loss at step 8, noticed at step 10 (log_every=5) after checkpoint 9 saved the
    diverged state: the run restores checkpoint 6, sets 9 aside, skips batch 8, halves the lr
    for steps 7-10 and finishes; killed as soon as it has rolled back, the restarted run
    honours the record and ends bit-identical to the uninterrupted one."""
    overrides = ["experiments/dense_tiny.yaml", *tiny_overrides, "train.steps=30",
                 "train.log_every=5", "checkpoint.every=3", "train.eval_every=100",
                 "train.on_nonfinite=rollback",
                 "train.fault=nan", "train.fault_steps=[8]", "train.rollback_lr_factor=0.5",
                 "train.rollback_lr_steps=4"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    uninterrupted = _start(straight, overrides)
    out, err = uninterrupted.communicate(timeout=300)
    assert uninterrupted.returncode == 0, err
    assert "step 8: non-finite loss; rolled back to step 6, skipping batch 8" in out
    records = json.loads((straight / "rollbacks.json").read_text())
    assert records == [{"failed_step": 8, "batch": 8, "restored_step": 6, "lr_until": 10}]
    rows = losses(straight)
    assert sorted(rows) == [5, 10, 15, 20, 25, 30] and all(np.isfinite(list(rows.values())))
    cfg = config.load("experiments/dense_tiny.yaml", tiny_overrides)
    schedule = lr_multiplier(cfg.optim, 30)
    for step, lr in losses(straight, "lr").items():  # halved for steps 7..10 only
        want = cfg.optim.lr * float(schedule(step - 1)) * (0.5 if 6 < step <= 10 else 1.0)
        assert lr == pytest.approx(want, rel=1e-6), step
    assert [p.name for p in (straight / "checkpoints" / "diverged").iterdir()] == ["9"]

    proc = _start(killed, overrides)
    deadline = time.time() + 300
    while not (killed / "rollbacks.json").exists():
        assert time.time() < deadline and proc.poll() is None, "no rollback happened"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed_from = newest_checkpoint(killed)
    assert resumed_from < 30
    restarted = _start(killed, overrides)
    out, err = restarted.communicate(timeout=300)
    assert restarted.returncode == 0, err
    assert f"resuming from step {resumed_from}" in out and "non-finite" not in out
    assert losses(killed) == losses(straight)
    assert json.loads((killed / "rollbacks.json").read_text()) == records
    a, b = final_params(straight), final_params(killed)
    assert jax.tree.all(jax.tree.map(np.array_equal, a, b))


@pytest.mark.parametrize("overrides, message", [
    (["train.spike_window=-1"], "train.spike_window"),
    (["train.spike_sigma=-2"], "train.spike_sigma"),
    (["train.fault_steps=[7]"], "train.fault_steps=[7]: 7 is outside the run"),
    (["train.on_nonfinite=rollback", "train.fault_steps=[2]"],
     "train.fault_steps: step 2 comes before the first checkpoint"),
    (["train.on_nonfinite=rollback", "checkpoint.every=6"], "train.on_nonfinite=rollback: "
     "checkpoint.every=6 leaves no checkpoint"),
    (["model.layer_pattern=[mamba:none]", "model.qk_norm=true"], "model.qk_norm=true needs"),
])
def test_bad_stability_settings_are_one_line(tiny, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        tiny(*overrides)


def test_bad_input_exits_2_and_writes_nothing(tmp_path, tiny_overrides):
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "research", "train", "--run-dir", str(run_dir),
                             "experiments/dense_tiny.yaml", *tiny_overrides,
                             "train.fault_steps=[99]"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: train.fault_steps=[99]: 99 is outside the run (allowed: 1..train.steps=6)"]
    assert not run_dir.exists()
