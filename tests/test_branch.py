"""Cooldown branches: a true continuation of the parent (bit for bit), the cooldown schedule,
exact resume after SIGKILL, and one-line refusals of bad branches."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from research import cli, config
from research.train import branch
from research.train.loop import train
from research.train.rundir import RunDir
from tests.conftest import newest_checkpoint
from tests.test_train import _start, final_params, losses

# a wsd parent whose checkpoints at 4 and 8 are kept
PARENT = ("optim.schedule=wsd", "optim.decay_fraction=0.5", "train.steps=12", "checkpoint.every=4",
          "checkpoint.keep_every=4", "train.eval_every=4")


@pytest.fixture(scope="module")
def parent(token_cache_dir, tmp_path_factory) -> Path:
    """One parent run for the tests that only read it."""
    from research import config
    from tests.conftest import TINY

    run_dir = tmp_path_factory.mktemp("branch") / "parent"
    train(config.load(None, [*TINY, f"data.cache_dir={token_cache_dir}", *PARENT]), run_dir)
    return run_dir


def test_a_branch_keeping_the_parents_schedule_reproduces_it_bit_for_bit(tiny, tmp_path, parent):
    """From step 8 of a wsd run, with the parent's own remaining schedule (its decay), the branch
    logs exactly the parent's losses, eval losses and learning rates, and ends with its params."""
    overrides = branch.overrides(RunDir(parent).config(), parent, 8)
    summary = train(tiny(*PARENT, *overrides), tmp_path / "branch")
    assert summary["step"] == 12
    ours, theirs = losses(tmp_path / "branch"), losses(parent)
    assert sorted(ours) == [9, 10, 11, 12]
    assert ours == {s: theirs[s] for s in ours}
    assert losses(tmp_path / "branch", "lr") == {s: losses(parent, "lr")[s] for s in ours}
    assert losses(tmp_path / "branch", "eval_loss") == {12: losses(parent, "eval_loss")[12]}
    a, b = final_params(parent), final_params(tmp_path / "branch")
    assert jax.tree.all(jax.tree.map(np.array_equal, a["params"], b["params"]))
    saved = yaml.safe_load((tmp_path / "branch" / "config.yaml").read_text())
    assert saved["branch"] == {"parent": str(parent.absolute()), "step": 8}


def test_a_cooldown_branch_decays_linearly_to_the_floor(tiny, tmp_path, parent):
    """Branched at 4 (stable phase) with a 4-step cooldown: the lr of step 4+k is the stable
    peak decayed linearly to optim.min_lr_ratio at step 8 (the lr logged at step t is the one
    its update used, the schedule at t-1); and it keeps training from the parent's state."""
    cfg = tiny(*PARENT, *branch.overrides(RunDir(parent).config(), parent, 4, cooldown_steps=4))
    assert (cfg.train.steps, cfg.optim.cooldown_from, cfg.optim.schedule_steps) == (8, 4, 12)
    train(cfg, tmp_path / "branch")
    peak, floor = cfg.optim.lr, cfg.optim.lr * cfg.optim.min_lr_ratio
    expected = {4 + k: peak + (floor - peak) * (k - 1) / 4 for k in range(1, 5)}
    np.testing.assert_allclose(list(losses(tmp_path / "branch", "lr").values()),
                               list(expected.values()), rtol=1e-6)
    assert losses(tmp_path / "branch", "loss")[5] == losses(parent)[5]  # same first update
    # research analyze: a point at 8 steps' tokens, marked as a branch of the parent at step 4
    from research.analysis.questions import states
    from research.analysis.runs import load_runs, row

    runs, _ = load_runs(tmp_path)
    point = row(runs[0])
    assert point["branch"] == "parent@4" and point["tokens"] == 8 * cfg.train.batch_size * cfg.train.seq_len
    assert "1 of them are cooldown branches of a longer run (column branch: parent@4)" in \
        states(runs)
    # K = S F / (1 - F): a 20% cooldown from step 120 ends at 150
    assert branch.cooldown_length(120, 0.2) == 30


def test_resume_of_a_branch_after_sigkill_is_bit_exact(tmp_path, tiny_overrides):
    """A branch killed after one of its own checkpoints resumes from it (not from the parent)
    and ends exactly as an uninterrupted branch."""
    common = ["experiments/dense_tiny.yaml", *tiny_overrides, "optim.schedule=wsd",
              "checkpoint.every=8", "checkpoint.keep_every=8", "train.eval_every=10"]
    parent = tmp_path / "parent"
    train(config.load(common[0], [*common[1:], "train.steps=40"]), parent)
    flags = ["--branch-from", f"{parent}@8", "--cooldown-steps", "32"]
    straight = _start(tmp_path / "straight", [*common, *flags])
    assert straight.communicate(timeout=240) and straight.returncode == 0

    killed = tmp_path / "killed"
    proc = _start(killed, [*common, *flags])
    deadline = time.time() + 240
    while newest_checkpoint(killed) < 16:
        assert time.time() < deadline and proc.poll() is None, "no checkpoint >= 16 appeared"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 16 <= newest_checkpoint(killed) < 40
    restarted = _start(killed, [*common, *flags])
    out, err = restarted.communicate(timeout=240)
    assert restarted.returncode == 0, err
    assert "resuming from step" in out and "branching" not in out
    assert losses(killed) == losses(tmp_path / "straight")
    assert min(losses(tmp_path / "straight")) == 9
    a, b = final_params(tmp_path / "straight"), final_params(killed)
    assert jax.tree.all(jax.tree.map(np.array_equal, a, b))


def test_bad_branches_are_one_line_and_write_nothing(tiny_overrides, parent, tmp_path, capsys):
    new, experiment = tmp_path / "new", tmp_path / "experiment.yaml"
    experiment.write_text("{}\n")  # the defaults, as the parent's `tiny` config
    base = ["train", str(experiment), "--run-dir", str(new), *tiny_overrides, *PARENT]
    cases = [
        (["--branch-from", f"{tmp_path}/nothing@4"], "nothing: not a run directory"),
        (["--branch-from", f"{parent}"], "expected RUN_DIR@STEP"),
        (["--branch-from", f"{parent}@6"], "has no checkpoint at step 6 (available: [4, 8, 12])"),
        (["--branch-from", f"{parent}@8", "--cooldown-steps", "5"],
         "a cooldown of 5 steps from step 8 ends at 13, past the 12 steps"),
        (["--branch-from", f"{parent}@4", "model.n_layers=3"], "model.n_layers is 3 here but 2"),
        (["--branch-from", f"{parent}@4", "optim.name=lion"], "optim.name is 'lion' here"),
        (["--cooldown-steps", "4"], "only with --branch-from"),
        (["optim.name=sgd"], "optim.name"),
        (["optim.lion.beta2=0.9"], "optim.lion.beta2: a hyperparameter of lion, but "
                                   "optim.name=adamw"),
        (["optim.name=muon", "optim.adafactor.factored=false"], "optim.adafactor.factored"),
    ]
    for flags, message in cases:
        assert cli.main([*base, *flags]) == 2, flags
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (flags, err)
        assert not new.exists()


def test_a_cooldowns_sweep_plans_the_long_run_then_one_branch_per_step(tmp_path):
    """Trial 0 trains the long run in `from`; each step gets a branch with a 20% cooldown. A step
    the long run does not keep, swept params or parallel trials are refused in one line."""
    from research.config import ConfigError
    from research.sweep import spec

    def sweep(**search) -> Path:
        path = tmp_path / "cool.yaml"
        path.write_text(yaml.safe_dump({
            "base": str(Path(__file__).resolve().parents[1] / "experiments" / "dense_tiny.yaml"),
            "overrides": {"optim.schedule": "wsd", "train.steps": 600, "checkpoint.every": 120,
                          "checkpoint.keep_every": 120},
            "search": {"method": "cooldowns", "from": str(tmp_path / "long"), "steps": [120, 360],
                       "cooldown_fraction": 0.2, **search}}))
        return path

    trials = spec.load(sweep()).planned_trials()
    assert [t.name for t in trials] == ["t000-long", "t001-branch=120", "t002-branch=360"]
    assert trials[0].run_dir == str(tmp_path / "long")
    branch_cfg = config.load(spec.load(sweep()).base, list(trials[2].overrides))
    assert (branch_cfg.branch.parent, branch_cfg.branch.step) == (str(tmp_path / "long"), 360)
    assert (branch_cfg.train.steps, branch_cfg.optim.cooldown_from,
            branch_cfg.optim.schedule_steps) == (450, 360, 600)
    for search, message in [({"steps": [130]}, "search.steps: 130 is not a checkpoint the long "
                                                "run keeps"),
                            ({"params": {"optim.lr": [1e-3]}}, "search: params: a cooldowns "
                                                                "search sweeps no fields"),
                            ({"cooldown_fraction": None}, "search: cooldown_fraction: a cooldowns "
                                                          "search needs")]:
        with pytest.raises(ConfigError, match=message):
            spec.load(sweep(**search))
