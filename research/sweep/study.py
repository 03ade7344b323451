"""The optuna side of a sweep: TPE suggestions and pruning decisions, in the sweep's database.

Optuna only decides; which trial runs where is the sweep store's job (optuna's GridSampler can run
a point twice under concurrent workers). A study exists when the sweep is TPE or prunes. Every call
waits out a lost database like the store does; one whose commit was lost may be repeated, which
optuna tolerates (a repeated report or tell is ignored, a repeated ask leaves an unused trial).
"""

from __future__ import annotations

import zlib
from typing import Any

import optuna

from research.sweep.spec import Dimension, Sweep
from research.sweep.store import patiently, retry

optuna.logging.set_verbosity(optuna.logging.WARNING)


def needs_study(sweep: Sweep) -> bool:
    return sweep.spec.search.method == "tpe" or sweep.spec.pruner is not None


def _distribution(dim: Dimension) -> optuna.distributions.BaseDistribution:
    if dim.kind == "values":
        return optuna.distributions.CategoricalDistribution(dim.values)
    if dim.kind == "int":
        return optuna.distributions.IntDistribution(int(dim.low), int(dim.high))
    return optuna.distributions.FloatDistribution(dim.low, dim.high, log=dim.kind == "log_uniform")


def _pruner(sweep: Sweep) -> optuna.pruners.BasePruner:
    pruner = sweep.spec.pruner
    if pruner is None:
        return optuna.pruners.NopPruner()
    if pruner.type == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=pruner.startup_trials,
                                           n_warmup_steps=pruner.warmup_steps)
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=pruner.min_steps,
                                                  reduction_factor=pruner.reduction_factor)


def open_study(sweep: Sweep, url: str, number: int = 0) -> optuna.Study:
    """The sweep's study; its TPE sampler is seeded per trial number, so workers never collide."""
    seed = zlib.crc32(f"{sweep.spec.seed}:{number}".encode())
    sampler = optuna.samplers.TPESampler(n_startup_trials=sweep.spec.search.startup_trials,
                                         seed=seed)
    engine = ({"connect_args": {"timeout": 60}} if url.startswith("sqlite")
              else {"pool_pre_ping": True})  # a restarted server's dead connections are replaced

    def load() -> optuna.Study:  # the storage makes optuna's tables: workers may race on them
        storage = optuna.storages.RDBStorage(url, engine_kwargs=engine)
        return optuna.create_study(
            study_name=sweep.spec.name, storage=storage, sampler=sampler, pruner=_pruner(sweep),
            direction=sweep.spec.objective.direction, load_if_exists=True)

    return patiently(lambda: retry(load), _label(sweep.spec.name))


def _label(name: str) -> str:
    return f"optuna study {name!r}"


def ask(sweep: Sweep, url: str, number: int) -> tuple[int, dict[str, Any]]:
    """A new optuna trial for sweep trial `number`: its id and (TPE) suggested params."""
    study = open_study(sweep, url, number)
    dists = ({key: _distribution(dim) for key, dim in sweep.spec.search.params.items()}
             if sweep.spec.search.method == "tpe" else None)
    trial = patiently(lambda: study.ask(dists), _label(study.study_name))
    return trial._trial_id, dict(trial.params)


def attach(sweep: Sweep, url: str, trial_id: int) -> optuna.Trial:
    """The running optuna trial of a (possibly resumed) sweep trial. Making it reads the trial
    from the database, so it waits out an outage like every other optuna call."""
    opened = open_study(sweep, url)
    return patiently(lambda: optuna.Trial(opened, trial_id), _label(opened.study_name))


def report(trial: optuna.Trial, step: int, value: float) -> bool:
    """Report an eval value; True if the pruner says stop. Repeated steps are ignored by optuna."""
    label = _label(trial.study.study_name)
    patiently(lambda: trial.report(value, step), label)
    return patiently(trial.should_prune, label)


def tell(trial: optuna.Trial, state: str, objective: float | None) -> None:
    states = {"done": optuna.trial.TrialState.COMPLETE, "failed": optuna.trial.TrialState.FAIL,
              "pruned": optuna.trial.TrialState.PRUNED}
    patiently(lambda: trial.study.tell(trial, objective if state == "done" else None,
                                       states[state], skip_if_finished=True),
              _label(trial.study.study_name))
