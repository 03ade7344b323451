"""Runs a sweep's trials: claim one, start `research train` for it, watch it, record its end.

One process per trial, each in its own run directory under the sweep dir, so a crash, a NaN or an
out-of-memory kill ends only that trial. The runner is a single-threaded poll loop: it starts
trials into free slots, tails their metrics.jsonl for eval points (pruning), refreshes its claims'
heartbeats, and records each trial's end. Trials get SIGINT when the runner dies, even by SIGKILL
(Linux parent-death signal), so no orphan keeps training while another worker resumes its trial.
"""

from __future__ import annotations

import ctypes
import glob
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import optuna

from research.config import ConfigError
from research.sweep import rundir, study
from research.sweep.live import TrialProgress, make_view
from research.sweep.spec import SEED_KEY, Sweep
from research.sweep.store import Claim, LostClaim, Store
from research.train.rundir import RunDir, read_json, write_json

TRAIN_COMMAND = (sys.executable, "-m", "research", "train")
SWEEP_FILE = rundir.SWEEP_FILE
POLL_S = 0.5
PROGRESS_S = 15.0  # plain output (not a terminal): a progress line per trial at most this often
STOP_GRACE_S = 30.0


def default_sweep_dir(name: str) -> Path:
    return Path("sweeps_out") / name


def default_storage(sweep_dir: Path) -> str:
    return f"sqlite:///{(sweep_dir / 'sweep.db').resolve()}"


# ----------------------------------------------------------------------------- devices


def visible_devices(env: Mapping[str, str]) -> tuple[str, list[str]]:
    """The accelerators trials may use, found without importing jax (which would claim them)."""
    if env.get("JAX_PLATFORMS", "").split(",")[0] == "cpu":
        return "cpu", []
    if "CUDA_VISIBLE_DEVICES" in env:
        ids = [d.strip() for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
        return ("cuda", ids) if ids else ("cpu", [])
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                             capture_output=True, text=True, check=False).stdout
        if ids := [line.strip() for line in out.splitlines() if line.strip()]:
            return "cuda", ids
    chips = glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*")
    return ("tpu", [str(i) for i in range(len(chips))]) if chips else ("cpu", [])


def split_devices(devices: Sequence[str], slots: int) -> list[list[str]]:
    """Disjoint, equal, contiguous device groups, one per concurrent trial (CPU: all empty).

    Devices left over by an uneven split stay idle, so every trial gets the same hardware.
    """
    if not devices:
        return [[] for _ in range(slots)]
    if slots > len(devices):
        raise ConfigError(f"parallel={slots}: each concurrent trial needs its own device, but only "
                          f"{len(devices)} are visible; lower parallel")
    per = len(devices) // slots
    return [list(devices[i * per:(i + 1) * per]) for i in range(slots)]


def device_env(kind: str, group: list[str], slot: int, slots: int) -> dict[str, str]:
    """Environment that limits one trial process to its device group."""
    if kind == "cuda":
        return {"CUDA_VISIBLE_DEVICES": ",".join(group)}
    if kind == "tpu" and slots > 1:
        if len(group) != 1:
            raise ConfigError(f"parallel={slots}: on TPU, concurrent trials get one chip each; set "
                              "parallel to 1 or to the number of chips")
        return {"TPU_VISIBLE_CHIPS": group[0], "TPU_CHIPS_PER_PROCESS_BOUNDS": "1,1,1",
                "TPU_PROCESS_BOUNDS": "1,1,1", "TPU_PROCESS_PORT": str(8476 + slot)}
    return {}


def trial_env(sweep_dir: Path, devices: dict[str, str]) -> dict[str, str]:
    """The trial's environment: ours, a compilation cache shared by all trials, its devices."""
    env = dict(os.environ)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str((sweep_dir / ".jax_cache").resolve()))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    return {**env, **devices}


def _die_with_parent(parent: int) -> None:
    """Runs in the child before exec: SIGINT it when the runner dies, however it dies (Linux).
    SIGINT is first set back to its default: a sweep started in the background (`nohup ... &`)
    ignores it, and an ignored signal stays ignored across exec, so the trial would outlive it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.signal(signal.SIGINT, 0)  # 0 = SIG_DFL
        libc.prctl(1, signal.SIGINT)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the runner died before prctl took effect
        os.kill(os.getpid(), signal.SIGINT)


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT (research train exits cleanly, letting a checkpoint in flight land), then SIGKILL."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def exit_error(code: int, last: str | None) -> str:
    """The error recorded for a trial process that exited with `code` (negative: a signal)."""
    if code < 0:
        name = signal.Signals(-code).name
        return f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    return last or f"exit code {code}"


# ----------------------------------------------------------------------------- the loop


@dataclass
class _Running:
    claim: Claim
    trial: dict[str, Any]
    run_dir: Path
    proc: subprocess.Popen
    log_start: int
    slot: int
    started: float
    tail: rundir.MetricsTail
    progress: TrialProgress
    optuna_trial: optuna.Trial | None = None
    pruned: bool = False


@dataclass
class Runner:
    """One worker of a sweep. The first to start creates the store; the others attach to it.

    `worker=False` (the plain command) waits until every trial of the sweep has ended, taking over
    trials whose workers died, then prints the table; `worker=True` leaves when nothing is left to
    start. While trials run, `research.sweep.live` shows their progress (`live`: a redrawn table;
    None: when stdout is a terminal; else a line per trial every `progress_s` seconds via `say`).
    """

    sweep: Sweep
    sweep_dir: Path
    storage: str
    worker: bool = False
    trial_command: Sequence[str] = TRAIN_COMMAND
    say: Callable[[str], None] = field(default=lambda line: print(line, flush=True))
    live: bool | None = False
    progress_s: float = PROGRESS_S

    def __post_init__(self) -> None:
        self.sweep_dir = self.sweep_dir.resolve()
        self.spec = self.sweep.spec
        self.uses_study = study.needs_study(self.sweep)
        self.budget = self.sweep.budget

    def open(self) -> Store:
        """Attach to (or create) the sweep's store; refuses a sweep dir that holds another sweep."""
        info_path = self.sweep_dir / SWEEP_FILE
        info = read_json(info_path)
        if info and info.get("name") != self.spec.name:
            raise ConfigError(f"{self.sweep_dir}: holds sweep {info.get('name')!r}, not "
                              f"{self.spec.name!r}; use another --sweep-dir")
        if info and info.get("storage") != self.storage:
            raise ConfigError(f"{self.sweep_dir}: its sweep store is {info.get('storage')}, not "
                              f"{self.storage}; pass --storage {info.get('storage')}")
        store = Store(self.storage, self.spec.name, self.spec.lease_s)  # checks the URL first
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        planned = [t.record() for t in self.sweep.planned_trials()]
        store.create(self.sweep.fingerprint(), self.sweep.settings(), planned)
        if self.uses_study:
            study.open_study(self.sweep, self.storage)
        write_json(info_path, {"name": self.spec.name, "storage": self.storage,
                               "method": self.spec.search.method,
                               "params": self.sweep.swept,
                               "derived": list(self.spec.derived),
                               "budgets": list(self.spec.search.budgets),
                               "seeds": self.spec.seeds,
                               "overrides": self.sweep.fixed_overrides,
                               "metric": self.spec.objective.metric,
                               "direction": self.spec.objective.direction,
                               "budget": self.budget, **self._mixture()})
        return store

    def _mixture(self) -> dict[str, Any]:
        """A mixture sweep's sources, token counts, natural mix and caps, for the analysis."""
        if self.spec.search.method != "mixture":
            return {}
        plan = self.sweep.mixture_plan
        return {"mixture": {k: plan[k] for k in ("sources", "tokens", "natural", "caps",
                                                  "train_tokens")}}

    def run(self) -> int:
        """Run trials until none is left; 0 when done, 130 when interrupted (resumable)."""
        kind, devices = visible_devices(os.environ)
        groups = split_devices(devices, self.spec.parallel)
        envs = [trial_env(self.sweep_dir, device_env(kind, g, i, len(groups)))
                for i, g in enumerate(groups)]
        store = self.open()
        running: list[_Running] = []
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
        self.view = make_view(f"sweep {self.spec.name} ({self.sweep_dir})",
                              self.sweep.swept, self.say, self.progress_s, self.live)
        try:
            last_beat = time.time()
            while True:
                ended = [(item, code) for item in running
                         if (code := self._poll(item)) is not None]
                self.view.update([item.progress for item in running], time.time())  # last steps too
                for item, code in ended:
                    self._finish(store, item, code)
                    running.remove(item)
                if time.time() - last_beat > self.spec.lease_s / 4:
                    last_beat = time.time()
                    for item in list(running):
                        if not store.heartbeat(item.claim):
                            self.view.line(f"[{item.trial['name']}] taken over by another worker: "
                                           "stopping")
                            _stop(item.proc)
                            running.remove(item)
                free = [s for s in range(len(envs)) if s not in {r.slot for r in running}]
                for slot in free:
                    claim = store.claim(self.budget)
                    if claim is None:
                        break
                    if (item := self._start(store, claim, slot, envs[slot])) is not None:
                        running.append(item)
                if not running and (self.worker or store.settled(self.budget)):
                    break
                time.sleep(POLL_S)
        except KeyboardInterrupt:
            for item in running:
                _stop(item.proc)
                store.release(item.claim)
                rundir.write_record(item.run_dir, item.trial, "pending", None, None)
            self.view.line("interrupted: run the same command again to finish the sweep")
            return 130
        finally:
            self.view.close()
            signal.signal(signal.SIGTERM, previous)
        return 0

    def _start(self, store: Store, claim: Claim, slot: int, env: dict[str, str]) -> _Running | None:
        try:
            if claim.trial is None or (self.uses_study and claim.optuna_trial is None):
                trial_id, params = study.ask(self.sweep, self.storage, claim.number)
                trial = claim.trial or self.sweep.make_trial(claim.number, params).record()
                claim = store.assign(claim, trial, trial_id)
        except LostClaim:
            return None
        except ConfigError as exc:  # a TPE point whose derived fields cannot be computed
            store.finish(claim, "failed", None, str(exc))
            return None
        trial = claim.trial
        run_dir = rundir.trial_dir(self.sweep_dir, trial)
        run_dir.mkdir(parents=True, exist_ok=True)
        rundir.write_record(run_dir, trial, "running", None, None)
        # name=: the trial's progress lines and summary.json say which trial they are.
        command = [*self.trial_command, str(self.sweep.base), "--run-dir", str(run_dir),
                   *trial["overrides"], f"name={trial['name']}"]
        parent, started = os.getpid(), time.time()
        with RunDir(run_dir).trial_log.open("ab") as log:
            log.write(f"=== attempt {claim.attempt} by {store.owner}: {' '.join(command)}\n".encode())
            log.flush()
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    preexec_fn=lambda: _die_with_parent(parent))
            log_start = log.tell()
        optuna_trial = (study.attach(self.sweep, self.storage, claim.optuna_trial)
                        if claim.optuna_trial is not None else None)
        again = f", attempt {claim.attempt}" if claim.attempt > 1 else ""
        self.view.line(f"[{trial['name']}] started{again}")
        values = {**trial["params"], **trial["derived"]}
        if trial.get("seed") is not None:
            values[SEED_KEY] = trial["seed"]
        steps = self.sweep.trial_config(trial["overrides"]).train.steps
        return _Running(claim, trial, run_dir, proc, log_start, slot, started,
                        rundir.MetricsTail(RunDir(run_dir).metrics_path),
                        TrialProgress(trial["name"], values, steps), optuna_trial)

    def _poll(self, item: _Running) -> int | None:
        """Read the trial's new metrics, report eval points (maybe prune); its exit code once its
        process has ended.

        Only a trial still running can be pruned: one that already finished keeps its result.
        """
        code = item.proc.poll()
        entries = item.tail.read()
        item.progress.update(entries, time.time())
        if item.optuna_trial is not None and not item.pruned:
            metric = self.spec.objective.metric
            for entry in entries:
                if (metric in entry and study.report(item.optuna_trial, entry["step"], entry[metric])
                        and code is None):
                    item.pruned = True
                    self.view.line(f"[{item.trial['name']}] pruned at step {entry['step']} "
                                   f"({metric} {entry[metric]:.4g})")
                    _stop(item.proc)
                    code = item.proc.returncode
                    break
        return code

    def _finish(self, store: Store, item: _Running, code: int) -> None:
        metric = self.spec.objective.metric
        objective = rundir.objective_value(RunDir(item.run_dir).metrics(), self.spec.objective)
        error = None
        if item.pruned:
            state, objective = "pruned", None
        elif code == 0 and objective is not None:
            state = "done"
        else:
            state, objective = "failed", None
            error = (exit_error(code, rundir.summary_error(item.run_dir, item.started)
                                 or rundir.last_line(RunDir(item.run_dir).trial_log, item.log_start))
                     if code else f"finished without a {metric!r} entry in metrics.jsonl")
        if not store.finish(item.claim, state, objective, error):
            self.view.line(f"[{item.trial['name']}] was taken over by another worker; result "
                           "dropped")
            return
        if item.optuna_trial is not None:
            study.tell(item.optuna_trial, state, objective)
        rundir.write_record(item.run_dir, item.trial, state, objective, error)
        hparams = {**item.progress.values, "trial": item.trial["name"], "state": state}
        rundir.write_hparams(item.run_dir, hparams, f"sweep/{metric}", objective,
                             rundir.progress(item.run_dir)[0])
        outcome = (f": {metric} {objective:.4g}" if objective is not None
                   else f": {error}" if error else "")
        self.view.line(f"[{item.trial['name']}] {state} in {time.time() - item.started:.0f}s{outcome}")
