"""Multi-process training over loopback: 2 processes x 4 virtual CPU devices."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from research.parallel.distributed import initialize
from research.config import ConfigError
from research.train.rundir import read_metrics
from conftest import xla_flags

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(run_dir: Path, overrides: list[str], processes: int, devices: int,
           heartbeat: int = 10) -> list[subprocess.Popen]:
    env = {**os.environ, "XLA_FLAGS": xla_flags(devices)}
    base = [sys.executable, "-m", "research", "train", "experiments/dense_tiny.yaml",
            "--run-dir", str(run_dir), *overrides]
    if processes == 1:
        return [subprocess.Popen(base, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)]
    port = free_port()
    return [subprocess.Popen([*base, "--coordinator", f"127.0.0.1:{port}", "--num-processes",
                              str(processes), "--process-id", str(i), "--heartbeat-timeout",
                              str(heartbeat)],
                             cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
            for i in range(processes)]


def finish(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]


def trajectory(run_dir: Path) -> list[dict]:
    """Every logged number except timings, which differ between any two runs."""
    exact = ("step", "loss", "grad_norm", "param_norm", "eval_loss", "eval_bpb", "eval/code/loss",
             "eval/tests/loss", "data/code/tokens", "data/tests/tokens")
    return [{k: r[k] for k in exact if k in r} for r in read_metrics(run_dir)]


@pytest.fixture
def overrides(tiny_overrides) -> list[str]:
    """A two-source mixture whose weights change at step 10, after the checkpoint at 8: each
    process reads only its rows of the same global batches, also across the stage change."""
    return [*tiny_overrides, "train.steps=12", "checkpoint.every=4", "train.eval_every=6",
            "mesh.data=2", "mesh.tensor=4", "data.sources.code.source=builtin:code",
            "data.sources.tests.source=builtin:tests", "data.sources.tests.weight=0.5",
            "data.stages=[{from_step: 10, weights: {code: 0.2, tests: 0.8}}]"]


def test_two_processes_match_one_and_resume_bit_exactly(tmp_path, overrides):
    """2 processes x 4 devices give the losses of 1 process x 8 devices on the same mesh; a
    2-process run killed after a checkpoint and restarted ends as the uninterrupted run."""
    finish(launch(tmp_path / "one", overrides, processes=1, devices=8))
    finish(launch(tmp_path / "two", overrides, processes=2, devices=4))
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for key in ("loss", "eval_loss", "eval/code/loss", "eval/tests/loss", "data/tests/tokens"):
        np.testing.assert_allclose([r[key] for r in two if key in r], [r[key] for r in one if key in r],
                                   rtol=1e-5)

    killed = tmp_path / "killed"
    procs = launch(killed, overrides, processes=2, devices=4)
    deadline = time.time() + 180
    while not (killed / "checkpoints" / "8").exists():
        assert time.time() < deadline and all(p.poll() is None for p in procs), "no checkpoint"
        time.sleep(0.05)
    for proc in procs:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finish(launch(killed, overrides, processes=2, devices=4))
    assert trajectory(killed) == trajectory(tmp_path / "two")
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["state"] == "done" and summary["step"] == 12


def test_a_dead_process_stops_the_others(tmp_path, overrides):
    procs = launch(tmp_path / "run", [*overrides, "train.steps=100000"], processes=2, devices=4,
                   heartbeat=5)
    deadline = time.time() + 180
    while not (tmp_path / "run" / "metrics.jsonl").exists():
        assert time.time() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.time()
    _, err = procs[0].communicate(timeout=120)
    assert procs[0].returncode != 0
    assert time.time() - killed_at < 60
    assert "another task died" in err or "heartbeat" in err


def test_partial_flags_are_refused():
    with pytest.raises(ConfigError, match="--num-processes, --process-id: required"):
        initialize("127.0.0.1:1234")
    with pytest.raises(ConfigError, match="--process-id 2: must be in 0..1"):
        initialize("127.0.0.1:1234", 2, 2)
