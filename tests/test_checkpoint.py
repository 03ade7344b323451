"""Checkpoint integrity and save-first: a damaged checkpoint is found by its digests, refused by
eval and skipped (never deleted) on resume; retention waits for the digests; a failure after
training checkpoints the latest step first."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import cli
from research.config import CheckpointConfig, ConfigError
from research.train import loop, metrics
from research.train.checkpoint import MANIFEST, CheckpointError, Checkpointer
from research.train.loop import prepare, train
from research.train.rundir import RunDir, read_metrics

STEPS = ("train.steps=4", "checkpoint.every=2", "train.eval_every=100")


def _restore_latest(run_dir: Path):
    cfg = RunDir(run_dir).config()
    setup = prepare(cfg, jax.devices()[:1])
    with setup.context():
        return RunDir(run_dir).restore(setup.spec.abstract)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, token_cache_dir):
    """A tiny run with checkpoints at steps 2 and 4, and its final parameters."""
    from conftest import TINY
    from research import config

    cfg = config.load(None, [*TINY, f"data.cache_dir={token_cache_dir}", *STEPS])
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    train(cfg, run_dir, devices=jax.devices()[:1])
    state, _ = _restore_latest(run_dir)
    return cfg, run_dir, jax.device_get(state)


def _largest_array_file(step_dir: Path) -> Path:
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)),
               key=lambda p: p.stat().st_size)


def _truncate(step_dir: Path) -> None:
    f = _largest_array_file(step_dir)
    with open(f, "r+b") as out:
        out.truncate(f.stat().st_size // 2)


def _flip_bytes(step_dir: Path) -> None:
    f = _largest_array_file(step_dir)
    data = bytearray(f.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
    f.write_bytes(bytes(data))


def _garble_data_state(step_dir: Path) -> None:
    next((step_dir / "data").glob("*.json")).write_text("{garbage")


def _empty_meta(step_dir: Path) -> None:
    (step_dir / "meta" / "metadata").write_text("")


def _unverified_garbled(step_dir: Path) -> None:
    """A step that landed but lost its digests (killed in between), with a garbled data state."""
    (step_dir / MANIFEST).unlink()
    _garble_data_state(step_dir)


@pytest.mark.parametrize("damage", [_truncate, _flip_bytes, _unverified_garbled])
def test_damaged_latest_checkpoint_is_refused_by_eval_and_skipped_on_resume(
        finished_run, tmp_path, damage):
    cfg, original, final_state = finished_run
    run_dir = tmp_path / "run"
    shutil.copytree(original, run_dir)
    damage(run_dir / "checkpoints" / "4")
    if damage is not _unverified_garbled:  # eval reads no data state: that one restores
        with pytest.raises(CheckpointError, match=r"^checkpoint 4 is damaged: .*4/state/.* does not "
                                                  r"match its checksum \(the newest intact one: "
                                                  r"--step 2\)$"):
            _restore_latest(run_dir)

    summary = train(cfg, run_dir, devices=jax.devices()[:1])  # resumes from 2, redoes 3 and 4
    assert summary["step"] == 4
    assert (run_dir / "checkpoints" / "damaged" / "4").is_dir()  # moved aside, never deleted
    state, meta = _restore_latest(run_dir)
    assert meta["step"] == 4
    assert jax.tree.all(jax.tree.map(np.array_equal, jax.device_get(state), final_state))
    train_steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert train_steps == [1, 2, 3, 4]  # 3 and 4 logged once: rows past the resume point go


@pytest.mark.parametrize("damage, item", [(_garble_data_state, "data"), (_empty_meta, "meta")])
def test_eval_of_a_checkpoint_with_damaged_json_is_one_line(finished_run, tmp_path, capsys,
                                                            damage, item):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run[1], run_dir)
    damage(run_dir / "checkpoints" / "4")
    assert cli.main(["eval", str(run_dir)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: checkpoint 4 is damaged: {run_dir}/"
                                               f"checkpoints/4/{item}/"), err


def _tiny_state(value: float) -> dict:
    return {"w": jnp.full((4,), value, jnp.float32)}


def test_retention_never_drops_the_last_verified_step_for_an_unverified_one(tmp_path):
    """keep_last=1: while step 2 has landed but has no digests yet, step 1 stays; digests
    written, 1 goes. A restart that finds 3 without digests keeps 2 as well."""
    iterator = iter(grain.MapDataset.range(10).to_iter_dataset())
    cfg = CheckpointConfig(every=1, keep_last=1, async_save=True)
    checkpoints = Checkpointer(tmp_path, cfg)
    checkpoints.save(1, _tiny_state(1.0), iterator, {"step": 1})
    checkpoints.finish()
    checkpoints.save(2, _tiny_state(2.0), iterator, {"step": 2})
    checkpoints.manager.wait_until_finished()  # landed, not yet digested
    assert checkpoints.all_steps() == [1, 2]
    assert not (tmp_path / "2" / MANIFEST).exists()
    checkpoints.finish()
    assert checkpoints.all_steps() == [2] and checkpoints.damage(2) is None
    assert (tmp_path / "2" / MANIFEST).is_file()
    checkpoints.save(3, _tiny_state(3.0), iterator, {"step": 3})
    checkpoints.manager.wait_until_finished()
    checkpoints.manager.close()  # the process dies here
    assert Checkpointer(tmp_path, cfg, read_only=True).all_steps() == [2, 3]


def _fail_at(step: int, exc: BaseException):
    def write(self, at_step, values, prefix):
        if at_step == step and prefix == "train":
            raise exc
        return original(self, at_step, values, prefix)

    original = metrics.RunLog.write
    return write


def test_a_failure_after_training_checkpoints_the_latest_step_first(tiny, tiny_overrides, tmp_path,
                                                                    monkeypatch, capsys):
    """A full disk at the log of step 3 (no checkpoint due before step 100): step 3 is saved
    first, the one error line says so (exit 2), and the rerun resumes from step 3."""
    cfg_args = ["train.steps=5", "checkpoint.every=100", "train.eval_every=100"]
    monkeypatch.setattr(metrics.RunLog, "write",
                        _fail_at(3, OSError(errno.ENOSPC, "No space left on device", "metrics.jsonl")))
    run_dir = tmp_path / "run"
    overrides = [f"--run-dir={run_dir}", *cfg_args]
    (tmp_path / "experiment.yaml").write_text("{}\n")  # the config tiny() builds
    code = cli.main(["train", str(tmp_path / "experiment.yaml"), *tiny_overrides, *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == ("error: metrics.jsonl: No space left on device; step 3 is checkpointed: run "
                   "the same command again to resume")
    assert Checkpointer(run_dir / "checkpoints", CheckpointConfig(), read_only=True).all_steps() == [3]
    monkeypatch.undo()
    with monkeypatch.context() as m:  # the eval fails: a bug, with the save noted on it
        m.setattr(loop, "evaluate", _raise(RuntimeError("eval broke")))
        with pytest.raises(RuntimeError) as info:
            train(tiny(*cfg_args, "train.eval_every=4"), run_dir)
    assert info.value.__notes__ == ["step 4 is checkpointed: run the same command again to resume"]
    summary = train(tiny(*cfg_args), run_dir)
    assert summary["step"] == 5
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == [1, 2, 4, 5]  # 3: lost log


def _raise(exc: BaseException):
    def fail(*args, **kwargs):
        raise exc
    return fail


def test_a_refused_start_writes_nothing(tiny, tmp_path):
    """Too few train windows, or a held-out split shorter than one eval window: refused before
    the run directory exists, so the corrected command is not refused as a config change."""
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"data.source: its train split has \d+ tokens, fewer "
                                          r"than one window"):
        train(tiny("train.seq_len=50000000"), run_dir)
    assert not run_dir.exists()
    text = tmp_path / "numbers.txt"
    text.write_text("".join(f"{i}\n" for i in range(1, 1201)))
    with pytest.raises(ConfigError, match=r"held-out split has \d+ tokens, fewer than one eval "
                                          r"window of train.seq_len\+1=129"):
        train(tiny(f"data.source={text}", "train.seq_len=128"), run_dir)
    assert not run_dir.exists()
    assert train(tiny("train.steps=1"), run_dir, devices=jax.devices()[:1])["step"] == 1


@pytest.mark.parametrize("damage", [_truncate, _flip_bytes])
def test_init_from_a_damaged_checkpoint_is_refused_in_one_line(finished_run, tmp_path, damage):
    """model.init_from=RUN reads through the same verified path as eval and resume (it used to
    load the garbled weights, or die with a long traceback)."""
    cfg, original, _ = finished_run
    source = tmp_path / "source"
    shutil.copytree(original, source)
    damage(source / "checkpoints" / "4")
    new = cfg.model_copy(update={"model": cfg.model.model_copy(update={"init_from": str(source)})})
    with pytest.raises(ConfigError, match=r"^model.init_from: checkpoint 4 is damaged: .* does not "
                                          r"match its checksum"):
        train(new, tmp_path / "new", devices=jax.devices()[:1])
    assert not (tmp_path / "new").exists()  # refused before anything was written


def test_every_command_checks_step_the_same_way(finished_run, capsys):
    """eval, generate and export-hf: a step the run did not keep is one line naming --step and
    the kept steps, exit code 2, before any data is read."""
    _, run_dir, _ = finished_run
    for command in (["eval", str(run_dir)], ["generate", str(run_dir), "--prompt", "x"],
                    ["export-hf", str(run_dir), "--out", str(run_dir.parent / "hf")]):
        assert cli.main([*command, "--step", "3"]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"error: --step: {run_dir} has no checkpoint at step 3 (available: [2, 4])"
    assert not (run_dir.parent / "hf").exists()
