"""The sweep store on SQLite and on a real PostgreSQL server (tests/conftest.py starts one): schema
versions, lost commits, storage URLs, and workers running a 12-point grid exactly once while
status is read, after one of them is SIGKILLed, and across a database outage. Trials are
tests/sweep_fake_trial.py (a stand-in for `research train` that takes a fraction of a second)."""

from __future__ import annotations

import contextlib
import logging
import socket
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy as sa

from research.config import ConfigError
from research.sweep import spec, study
from research.sweep import store as store_module
from research.sweep.status import trial_rows
from research.sweep.store import Store
from conftest import process_gone
from test_sweep import CLI, REPO, _env, _lines, _wait_for, write_sweep

FAKE_TRIAL = Path(__file__).resolve().parent / "sweep_fake_trial.py"
WORKER = ("import sys; from pathlib import Path; from research.sweep import runner, spec; "
          "runner.POLL_S = 0.1; "  # a fast poll loop: trials of a fraction of a second
          "sys.exit(runner.Runner(spec.load(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], "
          "worker=True, trial_command=(sys.executable, sys.argv[4])).run())")
LRS = [round(0.001 * (n + 1), 3) for n in range(12)]


def _grid(tmp_path: Path, points: int = 12, **fields) -> Path:
    return write_sweep(tmp_path / "grid.yaml", search={"params": {"optim.lr": LRS[:points]}},
                       **fields)


def _ignore_sigint() -> None:
    """As a shell's background job (`nohup research sweep ... &`) starts: SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _worker(sweep: Path, out: Path, url: str, trial_s: float = 0.3,
            background: bool = False) -> subprocess.Popen:
    """A `research sweep --worker` whose trials are the fake trial (`background`: started with
    SIGINT ignored, as by a shell's `&`)."""
    command = [sys.executable, "-c", WORKER, str(sweep), str(out), url, str(FAKE_TRIAL)]
    return subprocess.Popen(command, cwd=REPO, env={**_env(), "FAKE_TRIAL_S": str(trial_s)},
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=_ignore_sigint if background else None)


def _finish(workers: list[subprocess.Popen]) -> list[str]:
    logs = [w.communicate(timeout=120)[0] for w in workers]
    assert [w.returncode for w in workers] == [0] * len(workers), logs
    return logs


def _calls(out: Path) -> dict[str, list[tuple[int, int]]]:
    """Per trial run dir: (worker pid, trial pid) of every time the trial was started."""
    return {d.name: [tuple(map(int, line.split())) for line in _lines(d / "calls")]
            for d in sorted(out.iterdir()) if (d / "calls").exists()}


def _done(out: Path) -> int:
    return sum((d / "metrics.jsonl").exists() for d in out.iterdir()) if out.exists() else 0


def _assert_ran_once(out: Path, url: str, points: int = 12) -> dict[str, list[tuple[int, int]]]:
    calls = _calls(out)
    assert len(calls) == points and all(len(c) == 1 for c in calls.values()), calls
    rows = Store(url, "grid").rows()
    assert [(r["state"], r["attempt"], r["objective"]) for r in rows] == [
        ("done", 1, lr) for lr in LRS[:points]]
    return calls


# ----------------------------------------------------------------------------- store


def test_bad_storage_url_is_one_line_and_creates_nothing(tmp_path):
    for url, message in [("not a url", "not a database URL"), ("sqlite://", "in-memory SQLite"),
                         ("nosuchdb://x/y", "not a database URL"),
                         ("postgresql+nosuchdriver://u@h/db", "not a database URL"),
                         ("mysql://u:secret@h/db", "its driver MySQLdb is not installed")]:
        with pytest.raises(ConfigError, match=message) as err:
            Store(url, "s")
        assert "\n" not in str(err.value) and "secret" not in str(err.value)
    out = tmp_path / "out"
    run = subprocess.run([*CLI, "sweep", str(_grid(tmp_path)), "--sweep-dir", str(out),
                          "--storage", "postgres:/nowhere"], capture_output=True, text=True,
                         cwd=REPO, env=_env(), timeout=120)
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert "storage 'postgres:/nowhere': not a database URL" in run.stderr
    assert not out.exists()


def test_a_server_that_never_answers_is_one_line_at_once_and_creates_nothing(tmp_path):
    """Nothing listens at the URL when the sweep starts: no retrying for minutes (that is for a
    server lost mid-sweep), one line, exit 2, no sweep directory."""
    pytest.importorskip("psycopg", reason="the PostgreSQL driver: pip install 'research[postgres]'")
    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "out"
    url = f"postgresql://postgres:secret@127.0.0.1:{port}/sweeps"
    run = subprocess.run([*CLI, "sweep", str(_grid(tmp_path)), "--sweep-dir", str(out),
                          "--storage", url], capture_output=True, text=True, cwd=REPO,
                         env=_env(), timeout=60)  # the retrying it replaces waited 300 s
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert run.stderr.startswith(f"error: storage 'postgresql://postgres:***@127.0.0.1:{port}/"
                                 "sweeps': cannot connect (") and "secret" not in run.stderr
    assert not out.exists()


def test_schema_is_versioned_and_older_stores_are_migrated(store_url, monkeypatch):
    Store(store_url, "s").create("f", {}, [{"number": 0}])
    engine = sa.create_engine(store_url)

    def version() -> int:
        with engine.connect() as conn:
            return conn.execute(sa.text("SELECT version FROM sweep_schema")).scalar_one()

    assert version() == store_module.SCHEMA_VERSION == 1

    def add_note(conn: sa.Connection) -> None:
        conn.execute(sa.text("ALTER TABLE sweep_trials ADD COLUMN note TEXT"))

    monkeypatch.setattr(store_module, "SCHEMA_VERSION", 2)
    monkeypatch.setattr(store_module, "MIGRATIONS", {1: add_note})
    assert [r["state"] for r in Store(store_url, "s").rows()] == ["pending"]  # read by the next
    assert version() == 2
    assert "note" in {c["name"] for c in sa.inspect(engine).get_columns("sweep_trials")}
    assert Store(store_url, "s").exists() and version() == 2  # migrated once
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", 1)
    with pytest.raises(ConfigError, match="schema version 2, this research reads up to 1"):
        Store(store_url, "s").rows()
    engine.dispose()


def test_status_of_a_store_without_the_sweep_creates_nothing(store_url, tmp_path):
    (tmp_path / "sweep.json").write_text('{"name": "grid", "storage": "sqlite:///unused.db"}')
    with pytest.raises(ConfigError, match="holds no sweep named 'grid'"):
        trial_rows(tmp_path, store_url)
    engine = sa.create_engine(store_url)
    assert sa.inspect(engine).get_table_names() == []
    engine.dispose()


class _LosesNextCommit:
    """An engine whose next transaction commits, then reports its connection lost (the client
    cannot tell whether a commit landed when the server goes away during it)."""

    def __init__(self, engine: sa.Engine):
        self.engine, self.armed = engine, True

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    @contextlib.contextmanager
    def begin(self):
        with self.engine.begin() as conn:
            yield conn
        if self.armed:
            self.armed = False
            raise sa.exc.OperationalError("COMMIT", {}, Exception("server closed the connection"),
                                          connection_invalidated=True)


def test_a_write_whose_commit_was_lost_is_not_applied_twice(store_url, caplog):
    store = Store(store_url, "s")
    store.create("f", {}, [{"number": n} for n in range(3)])
    store.engine = _LosesNextCommit(store.engine)
    with caplog.at_level(logging.WARNING, logger=store_module.__name__):
        claim = store.claim(3)  # committed, then "lost": the retry finds it landed
    assert (claim.number, claim.attempt) == (0, 1)
    assert "server closed the connection; retrying in" in caplog.text
    store.engine.armed = True
    assert store.finish(claim, "done", 0.5, None)  # its retry changes nothing, yet it counts
    assert [(r["state"], r["attempt"], r["objective"]) for r in store.rows()] == [
        ("done", 1, 0.5), ("pending", 0, None), ("pending", 0, None)]
    explicit = store_url.replace("postgresql://", "postgresql+psycopg://", 1)  # the same driver
    assert Store(explicit, "s").rows() == store.rows()
    tpe = Store(store_url, "tpe")
    tpe.create("g", {}, [])
    tpe.engine = _LosesNextCommit(tpe.engine)
    added = tpe.claim(2)  # a TPE row insert whose commit was lost
    assert (added.number, added.attempt) == (0, 1) and len(tpe.rows()) == 1


def test_attaching_to_a_running_optuna_trial_waits_out_a_lost_database(store_url, tmp_path,
                                                                       monkeypatch, caplog):
    """A worker resuming a trial re-reads it from optuna's tables: an outage then must be waited
    out, not kill the worker (it did, under load, in the outage test below)."""
    sweep = spec.load(_grid(tmp_path, 1, pruner={"type": "median"}))
    trial_id, _ = study.ask(sweep, store_url, 0)
    storage = optuna.storages.RDBStorage
    get_trial, calls = storage.get_trial, []

    def get_trial_first_lost(self, trial_id):
        calls.append(trial_id)
        if len(calls) == 1:  # the connection drops, as optuna reports it
            cause = sa.exc.OperationalError("SELECT", {}, Exception("connection refused"))
            raise optuna.exceptions.StorageInternalError("lost") from cause
        return get_trial(self, trial_id)

    monkeypatch.setattr(storage, "get_trial", get_trial_first_lost)
    with caplog.at_level(logging.WARNING, logger=store_module.__name__):
        trial = study.attach(sweep, store_url, trial_id)
    assert trial._trial_id == trial_id and calls == [trial_id, trial_id]
    assert "connection refused; retrying in" in caplog.text


def test_a_query_retried_in_a_broken_transaction_waits_out_the_outage(store_url, tmp_path,
                                                                       monkeypatch, caplog):
    """When the server drops a connection mid-query, optuna falls back to a second query in the
    same session, which fails with SQLAlchemy's PendingRollbackError raised while handling the
    first error; optuna wraps that. The worker must wait it out (it died, in the outage test
    below, about 1 run in 20 under load)."""
    sweep = spec.load(_grid(tmp_path, 1, pruner={"type": "median"}))
    trial = study.attach(sweep, store_url, study.ask(sweep, store_url, 0)[0])
    storage = optuna.storages.RDBStorage
    get_trials, calls = storage._get_trials, []  # where the real failure was raised

    def first_call_in_a_broken_transaction(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            try:
                raise sa.exc.OperationalError("SELECT", {}, Exception("terminating connection"))
            except sa.exc.OperationalError:
                try:
                    raise sa.exc.PendingRollbackError("Can't reconnect until invalid "
                                                      "transaction is rolled back.")
                except sa.exc.PendingRollbackError as error:
                    raise optuna.exceptions.StorageInternalError("commit") from error
        return get_trials(self, *args, **kwargs)

    monkeypatch.setattr(storage, "_get_trials", first_call_in_a_broken_transaction)
    with caplog.at_level(logging.WARNING, logger=store_module.__name__):
        assert study.report(trial, 1, 0.5) is False
    assert len(calls) >= 2 and "terminating connection; retrying in" in caplog.text


def test_workers_opening_a_new_study_at_once_all_succeed(store_url, tmp_path):
    """Each worker of a pruned (or TPE) sweep makes optuna's tables if missing: they race."""
    sweep = _grid(tmp_path, 1, pruner={"type": "median"})
    code = ("import sys; from research.sweep import spec, study; "
            "study.open_study(spec.load(sys.argv[1]), sys.argv[2])")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(sweep), store_url], cwd=REPO,
                              env=_env(), text=True, stderr=subprocess.PIPE) for _ in range(4)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, errors
    assert [s.study_name for s in optuna.get_all_study_summaries(store_url)] == ["grid"]


# ----------------------------------------------------------------------------- workers


def test_workers_run_each_grid_point_exactly_once_while_status_is_read(store_url, tmp_path):
    sweep, out = _grid(tmp_path), tmp_path / "out"
    workers = [_worker(sweep, out, store_url, trial_s=0.5) for _ in range(3)]
    _wait_for(lambda: (out / "sweep.json").exists())
    status = subprocess.Popen([*CLI, "sweep", "status", str(out), "--storage", store_url],
                              cwd=REPO, env=_env(), text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    snapshots = []
    while any(w.poll() is None for w in workers):  # status reads racing the workers' writes
        snapshots.append([r["state"] for r in trial_rows(out, store_url)[1]])
        time.sleep(0.1)
    _finish(workers)
    calls = _assert_ran_once(out, store_url)
    assert len({worker for (worker, _), in calls.values()}) >= 2  # the workers shared the grid
    assert any("running" in s for s in snapshots) and all(len(s) == 12 for s in snapshots)
    done = [s.count("done") for s in snapshots]
    assert done == sorted(done) and not any("interrupted" in s for s in snapshots)
    table, errors = status.communicate(timeout=120)
    assert status.returncode == 0 and "12 trials: " in table, errors
    cells = [line.split() for line in table.splitlines() if line.startswith("│")]
    assert [c[1] for c in cells if c[1].startswith("t0")] == [f"t{n:03d}" for n in range(12)]


def test_a_sigkilled_workers_trial_is_taken_over(store_url, tmp_path):
    sweep, out = _grid(tmp_path, 4), tmp_path / "out"
    doomed = _worker(sweep, out, store_url, trial_s=120, background=True)
    _wait_for(lambda: "t000-lr=0.001" in _calls(out) if out.exists() else False)
    doomed.kill()
    doomed.communicate(timeout=30)
    [(_, trial_pid)] = _calls(out)["t000-lr=0.001"]
    # SIGINTed when its worker died, though the worker ignored SIGINT (not after its 120 s)
    _wait_for(lambda: process_gone(trial_pid), timeout=60)
    _, rows = trial_rows(out, store_url)
    assert [r["state"] for r in rows] == ["interrupted", "pending", "pending", "pending"]
    [log] = _finish([_worker(sweep, out, store_url)])
    assert "[t000-lr=0.001] started, attempt 2" in log
    calls = _calls(out)
    assert [len(c) for c in calls.values()] == [2, 1, 1, 1]
    assert calls["t000-lr=0.001"][0][0] == doomed.pid  # the first attempt was the killed worker's
    rows = Store(store_url, "grid").rows()
    assert [(r["state"], r["attempt"]) for r in rows] == [("done", 2)] + [("done", 1)] * 3


def test_an_exited_child_not_yet_reaped_counts_as_gone():
    """What the wait above relies on: a process that has exited but whose parent has not yet
    reaped it (a zombie) still has its /proc entry, and counts as gone."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    _wait_for(lambda: process_gone(child.pid))
    assert Path(f"/proc/{child.pid}").exists()  # not reaped: a zombie
    child.wait()
    assert process_gone(child.pid)


def test_a_sweep_survives_a_database_outage(store_url, tmp_path, request):
    # A pruner that never prunes: every trial also asks, reports to and tells optuna's tables.
    sweep, out = _grid(tmp_path, pruner={"type": "median", "startup_trials": 100}), tmp_path / "out"
    workers = [_worker(sweep, out, store_url, trial_s=0.4) for _ in range(2)]
    _wait_for(lambda: _done(out) >= 2)
    if store_url.startswith("postgresql"):  # the server goes away: connections drop, then refused
        server = request.getfixturevalue("postgres_server")
        server.stop()
        time.sleep(2)
        server.start()
    else:  # SQLite has no server: every write waits on a lock held for as long
        lock = sqlite3.connect(store_url.removeprefix("sqlite:///"), isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")
        time.sleep(2)
        lock.execute("ROLLBACK")
        lock.close()
    assert _done(out) < 12  # the outage came mid-sweep
    logs = _finish(workers)
    _assert_ran_once(out, store_url)
    if store_url.startswith("postgresql"):
        assert any("retrying in" in log for log in logs), logs
    trials = optuna.load_study(study_name="grid", storage=store_url).trials
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted((t.value, t.intermediate_values) for t in complete) == [(lr, {1: lr}) for lr in LRS]
