"""Sweeps: spec parsing and checking, the store's claims, and end-to-end sweeps of real (tiny)
`research train` runs: two workers, SIGKILL and resume, failure + pruning + status."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from research import config
from research.config import ConfigError
from research.sweep import rundir, spec, study
from research.train import compile_cache
from research.train import rundir as train_rundir
from research.sweep.runner import exit_error, device_env, split_devices, visible_devices
from research.sweep.spec import Objective
from research.sweep.store import Store
from conftest import newest_checkpoint

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "experiments" / "dense_tiny.yaml"
CLI = [sys.executable, "-m", "research"]


def write_sweep(path: Path, **fields) -> Path:
    path.write_text(yaml.safe_dump({"base": str(BASE), **fields}, sort_keys=False))
    return path


# ----------------------------------------------------------------------------- spec


@pytest.mark.parametrize("value", [1e-5, 0.001, 3e-3, 1.5e20, -2.5, 3, 0, True, False, None,
                                   "cosine", "1e-4", "true", "null", "a b", "[1, 2]", [], [1, 2.5]])
def test_rendered_overrides_read_back_exactly(value):
    key, _, text = spec.render("x.y", value).partition("=")
    back = config.parse_value(text)
    assert key == "x.y" and back == value and type(back) is type(value)


def test_derived_expressions_match_python_and_refuse_the_rest():
    names = {"n_layers": 6, "lr": 3e-3}
    for expr, expected in [("64 * n_layers", 384), ("max(64, 512 // n_layers) * 2", 170),
                           ("lr / n_layers ** 0.5", 3e-3 / 6 ** 0.5), ("-(n_layers % 4) + 1", -1),
                           ("round(lr * 1000, 1)", 3.0), ("int(n_layers / 4)", 1)]:
        assert spec.evaluate(expr, names, "d") == pytest.approx(expected, rel=1e-12)
    for expr in ["__import__('os').system('true')", "n_layers.real", "[n_layers][0]",
                 "(lambda: 1)()", "open('x')", "n_layers if 1 else 2", "'a' * 3", "2 ** 1000"]:
        with pytest.raises(ValueError, match="not allowed|too large"):
            spec.check_expression(expr, set(names), "derived.x")
    with pytest.raises(ValueError, match="unknown name 'n_layer'"):
        spec.check_expression("n_layer * 2", set(names), "derived.x")


def test_grid_trials_names_overrides_and_derived_fields(tmp_path):
    path = write_sweep(tmp_path / "g.yaml", overrides={"train.steps": 5},
                       search={"params": {"model.n_layers": [1, 2], "optim.lr": [1e-3, 3e-3]}},
                       derived={"model.d_model": "64 * n_layers"})
    sweep = spec.load(path, ["train.batch_size=4"])
    trials = sweep.planned_trials()
    assert [t.name for t in trials] == ["t000-n_layers=1-lr=0.001", "t001-n_layers=1-lr=0.003",
                                        "t002-n_layers=2-lr=0.001", "t003-n_layers=2-lr=0.003"]
    assert trials[3].overrides == ("train.steps=5", "train.batch_size=4", "model.n_layers=2",
                                   "optim.lr=0.003", "model.d_model=128")
    cfg = config.load(sweep.base, trials[3].overrides)
    assert (cfg.model.n_layers, cfg.model.d_model, cfg.optim.lr, cfg.train.steps) == (2, 128, 3e-3, 5)


def test_seeds_repeat_every_point_with_its_own_init_and_data_order(tmp_path, token_cache_dir):
    path = write_sweep(tmp_path / "s.yaml", search={"params": {"model.n_layers": [1, 2]}}, seeds=3)
    trials = spec.load(path).planned_trials()
    assert [t.name for t in trials] == [f"t{3 * p + s:03d}-n_layers={n}-seed={s}"
                                        for p, n in enumerate((1, 2)) for s in range(3)]
    assert [(t.params, t.seed, t.overrides[-1]) for t in trials[3:]] == [
        ({"model.n_layers": 2}, s, f"train.seed={s}") for s in range(3)]
    assert trials[4].record()["seed"] == 1
    # train.seed sets the data order, not only the initialisation: first batches differ.
    from research.data import mixture

    cfgs = [config.load(BASE, [*t.overrides, f"data.cache_dir={token_cache_dir}"]) for t in trials[3:5]]
    data = mixture.load(cfgs[0].data)
    first = [mixture.train_dataset(data, seq_len=32, global_batch=4, seed=c.train.seed)[0]["tokens"]
             for c in cfgs]
    assert not np.array_equal(*first)


def test_random_trials_are_seeded_and_within_bounds(tmp_path):
    space = {"method": "random", "params": {"optim.lr": {"log_uniform": [1e-4, 1e-2]},
                                            "optim.warmup_steps": {"int": [0, 10]},
                                            "optim.beta1": {"uniform": [0.8, 0.95]},
                                            "optim.schedule": {"choice": ["cosine", "wsd"]}}}
    path = write_sweep(tmp_path / "r.yaml", search=space, trials=40, seed=3)
    first, again = spec.load(path).planned_trials(), spec.load(path).planned_trials()
    assert [t.params for t in first] == [t.params for t in again]  # every worker sees one list
    lrs = [t.params["optim.lr"] for t in first]
    assert all(1e-4 <= lr <= 1e-2 for lr in lrs) and min(lrs) < 1e-3 < max(lrs)
    assert {t.params["optim.warmup_steps"] for t in first} <= set(range(11))
    assert all(isinstance(t.params["optim.warmup_steps"], int) for t in first)
    assert {t.params["optim.schedule"] for t in first} == {"cosine", "wsd"}
    other = write_sweep(tmp_path / "r2.yaml", search=space, trials=40, seed=4)
    assert [t.params for t in spec.load(other).planned_trials()] != [t.params for t in first]


BAD_SWEEPS = [
    ({"search": {"params": {"model.n_layers": [1]}}, "objectiv": {"metric": "x"}},
     "objectiv: unknown field; did you mean objective?"),
    ({"search": {"params": {"model.n_layers": []}}}, "search.params.model.n_layers: empty list"),
    ({"search": {"method": "random", "params": {"optim.lr": {"loguniform": [1e-4, 1e-2]}}},
      "trials": 3}, "search.params.optim.lr: expected a list of values, or one of"),
    ({"search": {"method": "random", "params": {"optim.lr": {"log_uniform": [0, 1]}}}, "trials": 3},
     "log_uniform: low must be positive"),
    ({"search": {"method": "random", "params": {"optim.lr": {"uniform": [1, 1e-3]}}}, "trials": 3},
     "uniform: low 1 must be below high 0.001"),
    ({"search": {"params": {"optim.lr": {"uniform": [1e-4, 1e-2]}}}},
     "grid search needs a list of values"),
    ({"search": {"method": "tpe", "params": {"optim.lr": {"uniform": [1e-4, 1e-2]}}}},
     "trials: a tpe search needs a trial budget"),
    ({"search": {"params": {"model.nlayers": [1, 2]}}},
     "trial t000-nlayers=1: model.nlayers: unknown field; did you mean model.n_layers?"),
    ({"search": {"params": {"model.n_heads": [4, 3]}}},
     "trial t001-n_heads=3: model.n_heads=3 must divide model.d_model=128"),
    ({"overrides": {"train.stepz": 3}, "search": {"params": {"model.n_layers": [1]}}},
     "overrides: train.stepz: unknown field; did you mean train.steps?"),
    ({"overrides": {"train": {"steps": 3}}, "search": {"params": {"model.n_layers": [1]}}},
     "overrides.train: a number, string, boolean, null or list, not dict {'steps': 3} (dotted "
     "keys set one field each, e.g. train.FIELD: ...)"),
    ({"search": {"params": {"model.n_layers": [1]}}, "derived": {"model.d_model": "n_layers.real"}},
     "derived.model.d_model: 'n_layers.real' is not allowed"),
    ({"search": {"params": {"model.n_layers": [1, 2]}},
      "derived": {"model.d_model": "64 // (n_layers - 1)"}},
     "'64 // (n_layers - 1)' fails for n_layers=1"),
    ({"search": {"params": {"model.n_layers": [1]}}, "pruner": {"type": "hyperband"}}, "pruner:"),
    ({"search": {"params": {"model.n_layers": [1]}}, "base": "missing.yaml"},
     "base: experiment 'missing.yaml' not found"),
    ({"search": {"params": {"model.n_layers": [1]}}, "seeds": 2, "overrides": {"train.seed": 3}},
     "seeds: 2 sets train.seed for every trial"),
    ({"search": {"method": "tpe", "params": {"optim.lr": {"uniform": [1e-4, 1e-2]}}}, "trials": 3,
      "seeds": 2}, "seeds: replicates need a fixed trial list"),
]


@pytest.mark.parametrize("fields, message", BAD_SWEEPS)
def test_bad_sweep_files_are_rejected_with_one_line(tmp_path, fields, message):
    path = write_sweep(tmp_path / "bad.yaml", **fields)
    with pytest.raises(ConfigError) as err:
        spec.load(path)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith(str(path))


def test_command_line_override_of_a_swept_field_is_rejected(tmp_path):
    path = write_sweep(tmp_path / "s.yaml", search={"params": {"model.n_layers": [1, 2]}})
    with pytest.raises(ConfigError, match="model.n_layers is swept"):
        spec.load(path, ["model.n_layers=3"])


def test_bad_sweep_file_on_the_command_line_starts_nothing(tmp_path):
    path = write_sweep(tmp_path / "bad.yaml", search={"params": {"model.n_layers": []}})
    out = subprocess.run([*CLI, "sweep", str(path), "--sweep-dir", str(tmp_path / "out")],
                         capture_output=True, text=True, cwd=REPO, env=_env(), timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "empty list" in out.stderr
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- store


def _claim_all(url: str, budget: int, seen: multiprocessing.Queue) -> None:
    store = Store(url, "s")
    while (claim := store.claim(budget)) is not None:
        seen.put(claim.number)
        time.sleep(random.random() * 0.01)
        assert store.finish(claim, "done", float(claim.number), None)
    seen.put(None)


@pytest.mark.parametrize("planned", [True, False], ids=["grid", "tpe"])
def test_concurrent_workers_claim_every_trial_exactly_once(store_url, planned):
    url, budget, workers = store_url, 24, 4
    trials = [{"number": n, "name": f"t{n:03d}"} for n in range(budget)] if planned else []
    Store(url, "s").create("f", {}, trials)
    ctx = multiprocessing.get_context("spawn")
    seen = ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(url, budget, seen)) for _ in range(workers)]
    for p in procs:
        p.start()
    claimed, finished = [], 0
    while finished < workers:
        item = seen.get(timeout=120)
        finished += item is None
        claimed += [] if item is None else [item]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert sorted(claimed) == list(range(budget))
    rows = Store(url, "s").rows()
    assert [(r["number"], r["state"], r["attempt"]) for r in rows] == [
        (n, "done", 1) for n in range(budget)]


def test_dead_or_silent_owners_lose_their_claims(store_url):
    url = store_url
    Store(url, "s").create("f", {}, [{"number": n} for n in range(3)])
    dead = subprocess.Popen(["true"])
    dead.wait()
    crashed = Store(url, "s")
    crashed.owner = f"{socket.gethostname()}:{dead.pid}"  # a local worker that was SIGKILLed
    lost = crashed.claim(3)
    me = Store(url, "s")
    taken = me.claim(3)
    assert (lost.number, taken.number, taken.attempt) == (0, 0, 2)
    assert not crashed.heartbeat(lost) and not crashed.finish(lost, "done", 1.0, None)
    remote = Store(url, "s")
    remote.owner = "another-host:1"  # alive as far as we can tell, heartbeat fresh
    held = remote.claim(3)
    third = me.claim(3)
    assert held.number == 1 and third.number == 2 and me.claim(3) is None  # 1 is still leased
    assert me.finish(taken, "done", 0.5, None) and me.finish(third, "failed", None, "boom")
    impatient = Store(url, "s", lease_s=0.0)  # remote's heartbeat is now older than the lease
    assert impatient.claim(3).number == 1 and not remote.heartbeat(held)
    assert [(r["state"], r["attempt"], r["objective"]) for r in me.rows()] == [
        ("done", 2, 0.5), ("running", 2, None), ("failed", 1, None)]


def test_store_refuses_a_different_sweep_and_stays_intact(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    store = Store(url, "s")
    assert store.create("fingerprint-a", {}, [{"number": 0}, {"number": 1}])
    claim = store.claim(2)
    store.finish(claim, "failed", None, "boom")
    before = store.rows()
    assert not Store(url, "s").create("fingerprint-a", {}, [{"number": 0}, {"number": 1}])
    with pytest.raises(ConfigError, match="already holds a sweep named 's' made from other settings"):
        Store(url, "s").create("fingerprint-b", {}, [{"number": 0}])
    assert Store(url, "s").rows() == before


def test_a_refused_rerun_names_each_differing_setting(tmp_path):
    path = write_sweep(tmp_path / "s.yaml", search={"params": {"model.n_layers": [1, 2]}})
    url = f"sqlite:///{tmp_path}/s.db"
    first = spec.load(path, ["train.steps=100"])
    assert Store(url, "s").create(first.fingerprint(), first.settings(), [])
    other = spec.load(path, ["train.steps=7", "optim.lr=0.01"])
    with pytest.raises(ConfigError) as err:
        Store(url, "s").create(other.fingerprint(), other.settings(), [])
    assert ("(optim.lr: 0.01 here, 0.003 in the store; train.steps: 7 here, 100 in the store)"
            in str(err.value))
    write_sweep(path, search={"params": {"model.n_layers": [1, 3]}})
    moved = spec.load(path, ["train.steps=100"])
    with pytest.raises(ConfigError, match=r"sweep: search.params.model.n_layers.values: \[1, 3\] "
                                          r"here, \[1, 2\] in the store"):
        Store(url, "s").create(moved.fingerprint(), moved.settings(), [])


def test_tpe_suggestions_are_reproducible_per_trial_number(tmp_path):
    path = write_sweep(tmp_path / "t.yaml", trials=4, seed=1, search={
        "method": "tpe", "params": {"optim.lr": {"log_uniform": [1e-4, 1e-2]},
                                    "model.n_layers": {"int": [1, 4]}}})
    sweep = spec.load(path)
    asked = []
    for db in ("a", "b"):
        url = f"sqlite:///{tmp_path}/{db}.db"
        params = [study.ask(sweep, url, n)[1] for n in range(3)]
        asked.append(params)
    assert asked[0] == asked[1]
    assert len({p["optim.lr"] for p in asked[0]}) == 3
    for p in asked[0]:
        assert 1e-4 <= p["optim.lr"] <= 1e-2 and p["model.n_layers"] in range(1, 5)
        config.load(sweep.base, sweep.make_trial(0, p).overrides)


# ----------------------------------------------------------------------------- devices, files


def test_devices_are_split_disjointly_among_concurrent_trials():
    gpus = [str(i) for i in range(8)]
    assert split_devices(gpus, 3) == [["0", "1"], ["2", "3"], ["4", "5"]]
    assert split_devices(gpus, 8) == [[g] for g in gpus]
    assert split_devices([], 3) == [[], [], []]
    with pytest.raises(ConfigError, match="parallel=3: each concurrent trial needs its own device"):
        split_devices(["0", "1"], 3)
    assert device_env("cuda", ["2", "3"], 1, 4) == {"CUDA_VISIBLE_DEVICES": "2,3"}
    assert device_env("tpu", ["2"], 2, 4)["TPU_VISIBLE_CHIPS"] == "2"
    assert device_env("tpu", ["0", "1", "2", "3"], 0, 1) == {} and device_env("cpu", [], 0, 2) == {}
    with pytest.raises(ConfigError, match="one chip each"):
        device_env("tpu", ["0", "1"], 0, 2)
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "4,5"}) == ("cuda", ["4", "5"])
    assert visible_devices({"JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": "0"}) == ("cpu", [])


def test_metrics_tail_survives_partial_lines_and_a_resume_rewrite(tmp_path):
    path = tmp_path / "metrics.jsonl"
    tail = rundir.MetricsTail(path)
    assert tail.read() == []
    path.write_text('{"step": 1, "loss": 5}\n{"step": 2, "lo')
    assert tail.read() == [{"step": 1, "loss": 5}]
    with path.open("a") as f:
        f.write('ss": 4}\n{"step": 3, "eval_loss": 3.5}\n')
    assert tail.read() == [{"step": 2, "loss": 4}, {"step": 3, "eval_loss": 3.5}]
    tmp = tmp_path / "new"  # a resumed run drops entries after its checkpoint and rewrites the file
    tmp.write_text('{"step": 1, "loss": 5}\n{"step": 2, "loss": 4}\n{"step": 3, "eval_loss": 3.4}\n')
    os.replace(tmp, path)
    assert [e["step"] for e in tail.read()] == [1, 2, 3]


def test_live_view_rates_eta_from_steps_seen_and_throttles_plain_lines():
    from research.sweep.live import PlainLines, TrialProgress

    trial = TrialProgress("t000-n_layers=1", {"model.n_layers": 1}, steps=100)
    trial.update([{"step": s, "loss": 5.0 - s / 10} for s in (1, 2, 3)], now=50.0)
    assert trial.eta(50.0) is None  # steps read at once (a resume, a slow poll): no rate yet
    trial.update([{"step": 13, "loss": 3.7}, {"step": 13, "eval_loss": 3.9}], now=60.0)
    assert trial.eta(60.0) == pytest.approx(87 * 10 / 10)  # 10 steps in 10 s, 87 to go
    assert trial.line(60.0) == "[t000-n_layers=1] step 13/100, loss 3.7000, eval loss 3.9000, ETA 1m27s"
    said: list[str] = []
    view = PlainLines(said.append, every_s=15.0)
    view.update([trial], 60.0)
    view.update([trial], 61.0)  # same step: nothing new
    trial.update([{"step": 20, "loss": 3.5}], now=70.0)
    view.update([trial], 70.0)  # moved, but within 15 s of the last line
    view.update([trial], 75.0)
    assert [line.split(",")[0] for line in said] == ["[t000-n_layers=1] step 13/100",
                                                     "[t000-n_layers=1] step 20/100"]


def test_error_line_of_a_failed_attempt(tmp_path):
    log = tmp_path / "trial.log"
    log.write_bytes(b"=== attempt 1\nold error\n")
    start = log.stat().st_size
    with log.open("ab") as f:
        f.write(b"step 1\r 10%|#  | 1/10\r 20%|## | 2/10\nerror: out of memory\n\n")
    assert rundir.last_line(log, start) == "error: out of memory"
    assert rundir.last_line(log, log.stat().st_size) is None
    assert exit_error(-signal.SIGKILL, "step 3") == "killed by SIGKILL (out of memory?)"
    assert exit_error(1, None) == "exit code 1" and exit_error(2, "error: x") == "error: x"
    since = time.time() - 1
    train_rundir.write_json(tmp_path / "summary.json", {"state": "failed", "error": "ValueError: y"})
    assert rundir.summary_error(tmp_path, since) == "ValueError: y"
    assert rundir.summary_error(tmp_path, time.time() + 60) is None  # an earlier attempt's


def test_objective_final_or_best():
    entries = [{"step": 1, "loss": 9.0}, {"step": 2, "eval_loss": 4.0}, {"step": 4, "eval_loss": 3.0},
               {"step": 6, "eval_loss": 3.5}]
    assert rundir.objective_value(entries, Objective()) == 3.5
    assert rundir.objective_value(entries, Objective(reduce="best")) == 3.0
    assert rundir.objective_value(entries, Objective(reduce="best", direction="maximize")) == 4.0
    assert rundir.objective_value(entries, Objective(metric="eval_bpb")) is None


# ----------------------------------------------------------------------------- end to end


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "250"}


def _tiny(tiny_overrides: list[str], *swept: str, **changes) -> list[str]:
    """The suite's tiny-run overrides minus the swept keys, with `changes` applied."""
    keep = [o for o in tiny_overrides if o.split("=")[0] not in (*swept, *changes)]
    return keep + [f"{k}={v}" for k, v in changes.items()]


def _sweep(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([*CLI, "sweep", *map(str, args)], cwd=REPO, env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs)


def _wait_for(condition, timeout: float = 180.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _attempts(run_dir: Path) -> int:
    return (run_dir / train_rundir.TRIAL_LOG).read_text().count("=== attempt ")


def test_two_workers_run_each_grid_point_exactly_once(tmp_path, tiny_overrides, monkeypatch):
    # the sweep's own cache (sweep_dir/.jax_cache), not the suite's private one (conftest.py)
    monkeypatch.delenv(compile_cache.ENV)
    path = write_sweep(tmp_path / "layers.yaml", search={"params": {"model.n_layers": [1, 2, 3]}})
    out = tmp_path / "out"
    workers = [_sweep(path, "--sweep-dir", out, "--worker", *_tiny(tiny_overrides, "model.n_layers"))
               for _ in range(2)]
    logs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], logs
    names = ["t000-n_layers=1", "t001-n_layers=2", "t002-n_layers=3"]
    started = [line.split("]")[0][1:] for log in logs for line in log.splitlines()
               if line.endswith("] started")]
    assert sorted(started) == names and all("] started" in log for log in logs)  # both worked
    for name in names:
        steps = [json.loads(line)["step"] for line in _lines(out / name / "metrics.jsonl")
                 if "loss" in json.loads(line)]
        assert steps == [1, 2, 3, 4, 5, 6] and _attempts(out / name) == 1
        assert json.loads((out / name / "trial.json").read_text())["state"] == "done"
    rows = Store(f"sqlite:///{out}/sweep.db", "layers").rows()
    assert [(r["state"], r["attempt"]) for r in rows] == [("done", 1)] * 3
    assert any((out / ".jax_cache").iterdir())  # trials share one persistent compilation cache


def test_sigkilled_sweep_resumes_the_trial_from_its_checkpoint(tmp_path, tiny_overrides):
    path = write_sweep(tmp_path / "resume.yaml", search={"params": {"train.steps": [6, 150]}})
    out = tmp_path / "out"
    overrides = _tiny(tiny_overrides, "train.steps", **{"checkpoint.every": 10,
                                                         "train.eval_every": 50})
    first, second = out / "t000-steps=6", out / "t001-steps=150"
    runner = _sweep(path, "--sweep-dir", out, *overrides)
    _wait_for(lambda: newest_checkpoint(second) >= 10)
    runner.send_signal(signal.SIGKILL)
    runner.communicate(timeout=30)
    # The trial got SIGINT when its runner died and stopped (research train's interrupt path).
    _wait_for(lambda: (train_rundir.read_json(second / "summary.json") or {}).get("state") != "running", 60)
    assert train_rundir.read_json(second / "trial.json")["state"] == "running"
    saved = max(int(p.name) for p in (second / "checkpoints").iterdir() if p.name.isdigit())
    before = _lines(second / "metrics.jsonl")
    finished = (first / "metrics.jsonl").read_text()
    assert 10 <= saved < 150 and json.loads(before[-1])["step"] < 150
    status = subprocess.run([*CLI, "sweep", "status", str(out)], capture_output=True, text=True,
                            cwd=REPO, env=_env(), timeout=120).stdout
    assert "2 trials: 1 interrupted, 1 done" in status  # claimed by a worker that is gone

    again = _sweep(path, "--sweep-dir", out, *overrides)
    log = again.communicate(timeout=300)[0]
    assert again.returncode == 0, log
    assert "[t001-steps=150] started, attempt 2" in log and "t000-steps=6] started" not in log
    after = _lines(second / "metrics.jsonl")
    step = lambda line: json.loads(line)["step"]  # noqa: E731
    # Entries up to the checkpoint are the first attempt's, byte for byte (their timings would
    # differ had the trial restarted from step 0); the rest were trained once each.
    assert [l for l in after if step(l) <= saved] == [l for l in before if step(l) <= saved]
    assert [step(l) for l in after if "loss" in json.loads(l)] == list(range(1, 151))
    assert (first / "metrics.jsonl").read_text() == finished and _attempts(first) == 1
    assert _attempts(second) == 2
    assert train_rundir.read_json(second / "trial.json")["state"] == "done"


def test_failed_and_pruned_trials_do_not_stop_the_sweep(tmp_path, tiny_overrides):
    # The slow trial (lr 1e-7) gets 2000 more steps than the others: only pruning ends it before
    # 2100, which the runner's 0.5 s poll cannot miss (the others end at 100).
    path = write_sweep(tmp_path / "lr.yaml", search={"params": {"optim.lr": [1e6, 3e-3, 1e-7]}},
                       derived={"train.steps": "100 + 2000 * int(min(1, 1e-6 // lr))"},
                       pruner={"type": "median", "startup_trials": 1})
    out = tmp_path / "out"
    overrides = _tiny(tiny_overrides, "train.steps", **{"train.eval_every": 10,
                                                        "checkpoint.every": 100})
    runner = _sweep(path, "--sweep-dir", out, *overrides)
    log = runner.communicate(timeout=300)[0]
    assert runner.returncode == 0, log
    nan, good, slow = out / "t000-lr=1e+06", out / "t001-lr=0.003", out / "t002-lr=1e-07"
    records = [train_rundir.read_json(d / "trial.json") for d in (nan, good, slow)]
    assert [r["state"] for r in records] == ["failed", "done", "pruned"], log
    assert [r["params"] for r in records] == [{"optim.lr": v} for v in (1e6, 3e-3, 1e-7)]
    assert records[0]["error"].startswith("FloatingPointError: non-finite loss at step")
    assert records[1]["objective"] == json.loads(_lines(good / "metrics.jsonl")[-1])["eval_loss"]
    assert json.loads(_lines(slow / "metrics.jsonl")[-1])["step"] < 2100  # stopped early

    status = subprocess.run([*CLI, "sweep", "status", str(out)], capture_output=True, text=True,
                            cwd=REPO, env=_env(), timeout=120)
    assert status.returncode == 0, status.stderr
    rows = {line.split()[1]: line for line in status.stdout.splitlines() if line[:3] == "│  "}
    assert set(rows) == {"t000", "t001", "t002"}
    assert "1e+06" in rows["t000"] and "failed" in rows["t000"] and "non-finite loss" in rows["t000"]
    assert "0.003" in rows["t001"] and "done" in rows["t001"] and "100/100" in rows["t001"]
    assert f"{records[1]['objective']:.4g}" in rows["t001"]
    assert "1e-07" in rows["t002"] and "pruned" in rows["t002"]
    assert "3 trials: 1 done, 1 failed, 1 pruned" in status.stdout

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(good / "tb"))
    events.Reload()
    start = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info.hparams
    assert math.isclose(hparams["optim.lr"].number_value, 3e-3)
    assert hparams["state"].string_value == "done"
    assert events.Scalars("sweep/eval_loss")[-1].value == pytest.approx(records[1]["objective"])

    # The same sweep with other settings is refused before it touches the store.
    before = Store(f"sqlite:///{out}/sweep.db", "lr").rows()
    other = subprocess.run([*CLI, "sweep", str(path), "--sweep-dir", str(out), *overrides,
                            "train.eval_every=7"], capture_output=True, text=True, cwd=REPO, env=_env())
    assert other.returncode == 2 and "made from other settings (train.eval_every: 7 here, 10 in " \
        "the store)" in other.stderr, other.stderr
    assert Store(f"sqlite:///{out}/sweep.db", "lr").rows() == before
