"""End-to-end training: sharding invariance, exact resume after SIGKILL, run directory, eval."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from research import config
from research.train.checkpoint import Checkpointer
from research.train.loop import prepare, train
from research.train.rundir import RunDir, read_metrics
from conftest import newest_checkpoint, xla_flags

ROOT = Path(__file__).resolve().parents[1]
# CompleteP at twice the base width and depth: per-parameter init, lr, wd, eps and multipliers
COMPLETEP = ("model.parameterization=completep", "model.base_d_model=16", "model.base_n_layers=1")


def losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    return {row["step"]: row[key] for row in read_metrics(run_dir) if key in row}


def final_params(run_dir: Path):
    cfg = RunDir(run_dir).config()
    setup = prepare(cfg)
    checkpoints = Checkpointer(run_dir / "checkpoints", cfg.checkpoint, read_only=True)
    with setup.context():
        state, _ = checkpoints.restore(None, setup.spec.abstract)
    return jax.device_get(state)


def initial_params(run_dir: Path):
    """The step-0 params of a run started from scratch (its seed's initialisation)."""
    from research.train.state import init_state

    cfg = RunDir(run_dir).config()
    setup = prepare(cfg)
    with setup.context():
        state = init_state(setup.model, setup.tx, jax.numpy.zeros((1, cfg.train.seq_len), "int32"),
                           setup.spec, cfg.train.seed)
    return jax.device_get(state["params"])


@pytest.mark.parametrize("layout", [
    ("mesh.data=8",),
    ("mesh.data=1", "mesh.fsdp=8"),
    ("mesh.data=2", "mesh.tensor=4"),
    ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", *COMPLETEP),
])
def test_same_losses_on_one_and_eight_devices(tiny, tmp_path, layout):
    """Sharding changes where numbers live, not what they are (float32, 1e-5 relative)."""
    steps = ("train.steps=4", "checkpoint.every=100", *(o for o in layout if o.startswith("model.")))
    reference = train(tiny(*steps, "mesh.data=1"), tmp_path / "one", devices=jax.devices()[:1])
    sharded = train(tiny(*steps, *layout), tmp_path / "eight")
    assert reference["step"] == sharded["step"] == 4
    one, eight = losses(tmp_path / "one"), losses(tmp_path / "eight")
    assert one.keys() == eight.keys() == {1, 2, 3, 4}
    np.testing.assert_allclose([eight[s] for s in one], list(one.values()), rtol=1e-5)
    np.testing.assert_allclose(losses(tmp_path / "eight", "eval_loss")[4],
                               losses(tmp_path / "one", "eval_loss")[4], rtol=1e-5)


def test_grad_accumulation_matches_full_batch(tiny, tmp_path):
    full = train(tiny("train.steps=3", "mesh.data=2", "mesh.tensor=4"), tmp_path / "full")
    accum = train(tiny("train.steps=3", "mesh.data=2", "mesh.tensor=4", "train.grad_accum=4"),
                  tmp_path / "accum")
    np.testing.assert_allclose(list(losses(tmp_path / "accum").values()),
                               list(losses(tmp_path / "full").values()), rtol=1e-5)
    assert full["final"]["grad_norm"] == pytest.approx(accum["final"]["grad_norm"], rel=1e-4)


def test_run_directory_layout_and_eval_command(tiny, tmp_path):
    run_dir = tmp_path / "run"
    summary = train(tiny(), run_dir)
    assert (run_dir / "config.yaml").is_file()
    # The resolved config reads back as the same run (derived sizes and `auto` choices explicit).
    assert config.resolved(RunDir(run_dir).config(), 384) == config.resolved(tiny(), 384, "cpu")
    rows = read_metrics(run_dir)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    for key in ("lr", "grad_norm", "param_norm", "step_time", "tokens_per_sec", "mfu", "tokens"):
        assert all(np.isfinite(r[key]) for r in train_rows), key
    assert [r["step"] for r in rows if "eval_loss" in r] == [3, 6]
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == [3, 6]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    assert {"train/loss", "train/mfu", "train/lr", "eval/loss", "eval/bpb"} <= set(events.Tags()["scalars"])
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(
        [r["loss"] for r in train_rows], rel=1e-6)
    texts = {tag: events.Tensors(tag)[0].tensor_proto.string_val[0].decode()
             for tag in events.Tags()["tensors"]}
    assert "n_layers: 2" in texts["config/text_summary"]
    assert f"{summary['params_non_embedding']:,}" in texts["parameters/text_summary"]
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["state"] == "done" and saved["params_total"] == summary["params_total"] > 0
    again = train(tiny(), run_dir)  # a finished run: nothing to do, same report
    assert again["step"] == 6 and again["final"] == summary["final"]
    assert [r["step"] for r in read_metrics(run_dir)] == [r["step"] for r in rows]

    result = subprocess.run([sys.executable, "-m", "research", "eval", str(run_dir), "--step", "3"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "step 3" in result.stdout and "bits/byte" in result.stdout
    eval_at_3 = losses(run_dir, "eval_loss")[3]
    assert f"{eval_at_3:.4f}" in result.stdout


def _start(run_dir: Path, overrides: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "research", "train", "--run-dir", str(run_dir), *overrides],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "XLA_FLAGS": xla_flags(2)},
    )


@pytest.mark.parametrize("objective", ["lm", "sft", "dpo"])
def test_resume_after_sigkill_is_bit_exact(tmp_path, tiny_overrides, request, objective):
    """Killed at an arbitrary point after a checkpoint, the restarted run ends exactly as an
    uninterrupted one: same parameters, same logged losses, no duplicated log lines; and the
    restarted process trained only the steps after that checkpoint. For every objective (sft
    and dpo read example rows; dpo also checkpoints its frozen reference)."""
    overrides = ["experiments/dense_tiny.yaml", *tiny_overrides, "train.steps=40", "checkpoint.every=8", "train.eval_every=10"]
    if objective != "lm":
        examples = request.getfixturevalue("example_dir") / f"{objective}.jsonl"
        overrides += [f"train.objective={objective}", f"examples.source={examples}", "train.seq_len=128"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    uninterrupted = _start(straight, overrides)
    assert uninterrupted.communicate(timeout=240) and uninterrupted.returncode == 0

    proc = _start(killed, overrides)
    deadline = time.time() + 240
    while newest_checkpoint(killed) < 16:
        assert time.time() < deadline and proc.poll() is None, "no checkpoint >= 16 appeared"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed_from = newest_checkpoint(killed)
    assert 16 <= resumed_from < 40
    restarted = _start(killed, overrides)
    out, err = restarted.communicate(timeout=240)
    assert restarted.returncode == 0, err
    # `step N: eval loss ...` lines (every 10 steps) show which steps this process trained
    evals = [int(step) for step in re.findall(r"step (\d+): eval loss", out)]
    assert evals == [s for s in (10, 20, 30, 40) if s > resumed_from], out

    assert losses(killed) == losses(straight)
    assert losses(killed, "eval_loss") == losses(straight, "eval_loss")
    lines = (killed / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines))
    a, b = final_params(straight), final_params(killed)
    assert jax.tree.all(jax.tree.map(np.array_equal, a, b))
    if objective == "dpo":  # 40 steps later the frozen reference is still the step-0 params
        start = initial_params(straight)
        assert jax.tree.all(jax.tree.map(np.array_equal, a["reference"], start))
        assert not any(jax.tree.leaves(jax.tree.map(np.array_equal, a["params"], start)))


def test_resume_under_completep_is_bit_exact(tiny, tmp_path):
    """Stopped at a checkpoint and resumed, a CompleteP run (per-parameter optimizer chain)
    ends exactly as a straight one: same losses, same parameters and optimizer state."""
    common = (*COMPLETEP, "optim.schedule=constant", "optim.warmup_steps=0", "checkpoint.every=2",
              "train.eval_every=2")
    train(tiny(*common, "train.steps=2"), tmp_path / "resumed")
    train(tiny(*common, "train.steps=4"), tmp_path / "resumed")
    train(tiny(*common, "train.steps=4"), tmp_path / "straight")
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    a, b = final_params(tmp_path / "straight"), final_params(tmp_path / "resumed")
    assert jax.tree.all(jax.tree.map(np.array_equal, a, b))


def test_resume_refuses_a_changed_config(tiny, tmp_path, capsys):
    """Also: the start-up messages, the resolved config.yaml, and resuming a run whose
    config.yaml predates resolution (derived sizes null, unused sections present)."""
    import yaml

    from research.config import ConfigError

    flat_lr = ("optim.schedule=constant", "optim.warmup_steps=0")  # independent of train.steps
    train(tiny(*flat_lr, "train.steps=2"), tmp_path / "run")
    said = capsys.readouterr().out
    for message in ("reading data.source='builtin'", "train and", "initialising 2 layers",
                    "compiling the train step", "compiled in"):
        assert message in said, said
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert {k: saved["model"][k] for k in ("n_kv_heads", "head_dim", "d_ff", "vocab_size")} == {
        "n_kv_heads": 4, "head_dim": 4, "d_ff": 128, "vocab_size": 384}  # 8/3·32 → 128; 257 → 384
    assert "moe" not in saved["model"] and "mamba" not in saved["model"]
    # what ran on this CPU, not `auto` (the config.yaml written below keeps `auto` and resumes)
    assert (saved["model"]["attention_impl"], saved["model"]["projection"]) == ("chunked", "custom")
    assert RunDir(tmp_path / "run").config().model.ff_size == 128

    again = train(tiny(*flat_lr, "train.steps=2"), tmp_path / "run")
    said = capsys.readouterr().out
    assert "already finished at step 2 (train.steps=2)" in said and "compiling" not in said
    assert again["state"] == "done" and again["step"] == 2
    with pytest.raises(ConfigError, match="model.n_layers"):
        train(tiny(*flat_lr, "train.steps=4", "model.n_layers=3"), tmp_path / "run")
    (tmp_path / "run" / "config.yaml").write_text(tiny(*flat_lr, "train.steps=2").to_yaml())
    # more steps, on another mesh layout (the checkpoint is resharded on load), is allowed
    extended = train(tiny(*flat_lr, "train.steps=4", "mesh.data=2", "mesh.tensor=4"), tmp_path / "run")
    assert "resuming from step 2" in capsys.readouterr().out
    straight = train(tiny(*flat_lr, "train.steps=4"), tmp_path / "straight")
    assert extended["step"] == straight["step"] == 4
    np.testing.assert_allclose(extended["final"]["loss"], straight["final"]["loss"], rtol=1e-5)


def test_retention_keeps_the_latest_and_every_nth_step(tiny, tmp_path):
    """keep_last=2 and keep_every=3 over saves at every step 1..7: {3, 6} forever, plus 6, 7."""
    train(tiny("train.steps=7", "checkpoint.every=1", "checkpoint.keep_last=2",
               "checkpoint.keep_every=3", "train.eval_every=100"), tmp_path / "run")
    kept = Checkpointer(tmp_path / "run" / "checkpoints", tiny().checkpoint, read_only=True).all_steps()
    assert sorted(kept) == [3, 6, 7]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_run_between_steps(tmp_path, tiny_overrides, sig):
    """SIGTERM/SIGINT: the step in flight finishes, saves in flight land, and the run is recorded
    as interrupted (exit 130); resuming is the same as after a kill (tested above)."""
    run_dir = tmp_path / "run"
    overrides = ["experiments/dense_tiny.yaml", *tiny_overrides, "train.steps=400",
                 "checkpoint.every=5"]
    proc = _start(run_dir, overrides)
    deadline = time.time() + 240
    while newest_checkpoint(run_dir) < 5:
        assert time.time() < deadline and proc.poll() is None, "no checkpoint appeared"
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["state"] == "interrupted" and 5 <= summary["step"] < 400
    # save first: the step it stopped after is checkpointed, and the one line says so
    assert newest_checkpoint(run_dir) == summary["step"]
    assert err.strip().splitlines()[-1] == (f"interrupted: step {summary['step']} is "
                                            "checkpointed: run the same command again to resume")
    assert not list((run_dir / "checkpoints").glob("*.orbax-checkpoint-tmp*"))  # no half save


MAMBA_TINY = ("model.mamba.head_dim=16", "model.mamba.d_state=8", "model.mamba.chunk_size=4")


@pytest.mark.parametrize("optimizer,setup", [
    ("muon", ("model.layer_pattern=[mamba:moe, attention:mlp]", "model.moe.n_experts=4",
              *MAMBA_TINY, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")),
    ("adafactor", ("model.layer_pattern=[attention:moe]", "model.moe.n_experts=4",
                   "train.grad_accum=2", "mesh.data=4", "mesh.tensor=2",
                   "optim.adafactor.min_dim_size_to_factor=16")),
])
def test_muon_and_adafactor_resume_bit_exact(tiny, tmp_path, optimizer, setup):
    """Muon (a partitioned state: momentum for the matrices, Adam's moments for the rest) on a
    Mamba + MoE hybrid sharded over data, fsdp and tensor, and Adafactor (factored statistics,
    replicated) on MoE over data and tensor with two micro-batches, both under CompleteP: stopped at a checkpoint and
    resumed, a run ends exactly as a straight one (losses, params, optimizer state)."""
    common = (*COMPLETEP, *setup, f"optim.name={optimizer}", "checkpoint.every=2",
              "train.eval_every=2", "optim.schedule=constant", "optim.warmup_steps=0")
    train(tiny(*common, "train.steps=2"), tmp_path / "resumed")
    train(tiny(*common, "train.steps=4"), tmp_path / "resumed")
    train(tiny(*common, "train.steps=4"), tmp_path / "straight")
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    a, b = final_params(tmp_path / "straight"), final_params(tmp_path / "resumed")
    assert jax.tree.all(jax.tree.map(np.array_equal, a, b))


def test_muon_sharded_and_accumulated_matches_one_device(tiny, tmp_path):
    """Newton-Schulz on matrices sharded over fsdp and tensor, with two micro-batches, gives
    one device's losses (float32, 1e-5 relative)."""
    steps = ("train.steps=4", "checkpoint.every=100", "optim.name=muon", "optim.lr=0.02")
    reference = train(tiny(*steps, "mesh.data=1"), tmp_path / "one", devices=jax.devices()[:1])
    sharded = train(tiny(*steps, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
                         "train.grad_accum=2"), tmp_path / "eight")
    assert reference["step"] == sharded["step"] == 4
    one, eight = losses(tmp_path / "one"), losses(tmp_path / "eight")
    np.testing.assert_allclose([eight[s] for s in one], list(one.values()), rtol=1e-5)
    assert one[4] < one[1]
