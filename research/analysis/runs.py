"""The runs below a folder and one table row per run.

A run directory is one `research train` or `research sweep` wrote: it holds summary.json,
metrics.jsonl or trial.json, or a config.yaml that reads as an experiment config. Runs that failed,
were pruned, or never started are kept: their rows say so.
"""

from __future__ import annotations

import math
import os
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from research import config as config_lib
from research.analysis.events import Series, has_events, read_scalars, scalars_from_metrics
from research.config import ConfigError
from research.models.layers import backend
from research.train import rundir
from research.train.rundir import RunDir
from research.sweep.spec import SEED_KEY

ANALYSIS = "analysis"  # the output folder inside the analysed one, never read as a run
# Fields that differ between runs without changing what is trained or how it is measured.
BOOKKEEPING = config_lib.fields_with_role(config_lib.BOOKKEEPING)
# Sizes config.resolved fills in from other fields (null in older config.yaml files): they
# distinguish runs only where the fields they follow from do not already.
RESOLVED = ("model.n_kv_heads", "model.head_dim", "model.d_ff", "model.vocab_size",
            "model.moe.d_expert")


@dataclass
class Run:
    path: Path
    name: str  # path relative to the analysed folder
    config: dict[str, Any]  # flattened config.yaml ({} when missing)
    summary: dict[str, Any]
    trial: dict[str, Any] | None
    scalars: Series
    label: str = ""  # what distinguishes it, e.g. "n_layers=4, seed=1"; set by `load_runs`
    group: str = ""  # the label without the seed: the same for all replicates of a setting
    setting: tuple = ()  # what replicates share: the distinguishing values (or, unknown, the name)
    values: dict[str, Any] = field(default_factory=dict)  # distinguishing field -> value

    @property
    def state(self) -> str:
        return (self.trial or {}).get("state") or self.summary.get("state") or "unknown"

    @property
    def error(self) -> str | None:
        return (self.trial or {}).get("error") or self.summary.get("error")

    @property
    def tokens_per_step(self) -> int | None:
        if "tokens_per_step" in self.summary:
            return self.summary["tokens_per_step"]
        if "train.batch_size" in self.config and "train.seq_len" in self.config:
            return self.config["train.batch_size"] * self.config["train.seq_len"]
        return None

    @property
    def seed(self) -> Any:
        seed = (self.trial or {}).get("seed")
        return self.config.get(SEED_KEY) if seed is None else seed

    def series(self, tag: str) -> list[tuple[int, float]]:
        return self.scalars.get(tag, [])


def _read_config(path: Path, check: bool = False) -> dict[str, Any] | None:
    """A config.yaml's flattened fields as resolved (config.resolved: derived sizes filled in,
    unused sections left out, whichever version wrote it); None when unreadable, or (check) not
    an experiment config.

    Only folders with nothing but a config.yaml are checked: a run's own config may be from an
    older schema and still name its swept values (it is then read as it is).
    """
    try:
        raw = yaml.load(path.read_text(), Loader=config_lib.YamlLoader)
        if not isinstance(raw, dict):
            return None
        cfg = config_lib.validate(raw)
    except (OSError, yaml.YAMLError):
        return None
    except ConfigError:
        return None if check else config_lib.flatten(raw)
    # A run records what its `auto` choices ran as; a config that never ran (or predates a
    # choice) still says auto: read it as what auto runs here, so that it does not look swept.
    cfg = cfg.model_copy(update={"model": config_lib.auto_resolved(cfg.model, backend())})
    return config_lib.flatten(config_lib.resolved(cfg, cfg.model.vocab_size))


def find_run_dirs(root: Path) -> list[Path]:
    """Run directories at or below `root` (not inside one another, not in root/analysis)."""
    found = []
    for here, dirs, files in os.walk(root):
        path = Path(here)
        if any(name in files for name in rundir.MARKERS) or (
                rundir.CONFIG in files and _read_config(RunDir(path).config_path, check=True)
                is not None):
            found.append(path)
            dirs.clear()
        else:  # not our output, nor hidden folders (a sweep's .jax_cache)
            dirs[:] = sorted(d for d in dirs
                             if not d.startswith(".") and not (path == root and d == ANALYSIS))
    return sorted(found)


def read_run(path: Path, root: Path) -> Run:
    """A run's files; scalars from tb/, or metrics.jsonl where tb/ has no training scalars (a run
    with logging.tensorboard=false holds only what the sweep wrote there)."""
    run = RunDir(path)
    scalars = read_scalars(run.tensorboard) if has_events(run.tensorboard) else {}
    if not any(tag.startswith(("train/", "eval/")) for tag in scalars):
        scalars = scalars_from_metrics(run.metrics())
    config = _read_config(run.config_path)
    name = path.relative_to(root).as_posix() if path != root else path.name
    return Run(path, name, config or {}, run.summary(), rundir.read_json(run.trial_record),
               scalars)


def _explained(key: str, others: list[str], runs: list[Run]) -> bool:
    """True when runs that agree on `others` also agree on `key` (a size derived from them)."""
    seen: dict[tuple, Any] = {}
    for run in runs:
        value = run.config.get(key)
        if value is not None:
            other = tuple(repr(run.config.get(k)) for k in others)
            if seen.setdefault(other, value) != value:
                return False
    return True


def distinguishing_fields(runs: list[Run]) -> list[str]:
    """What tells runs apart: a sweep's swept and derived fields (trial.json) first, then every
    other config field whose value differs between runs, among the runs that have it (a section a
    run does not use is absent from its config), except bookkeeping and the seed (replicates of
    one setting differ only there)."""
    keys: dict[str, None] = {}
    for run in runs:
        if run.trial:
            keys.update(dict.fromkeys([*run.trial.get("params", {}), *run.trial.get("derived", {})]))
    configs = [run.config for run in runs if run.config]
    for key in sorted({key for c in configs for key in c}):
        if key in keys or key == SEED_KEY or key in BOOKKEEPING:
            continue
        if len({repr(c[key]) for c in configs if key in c and c[key] is not None}) > 1:
            keys[key] = None
    plain = [k for k in keys if k not in RESOLVED]
    return [k for k in keys if k not in RESOLVED or not _explained(k, plain, runs)]


def short_names(keys: list[str]) -> dict[str, str]:
    """The shortest dotted suffix of each key that no other key ends with: `n_layers`, but
    `model.head_dim` and `mamba.head_dim` when both appear."""
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if not any(other != key and (other == suffix or other.endswith("." + suffix))
                       for other in keys):
                break
        out[key] = suffix
    return out


def family(run: Run, fields: list[str], free: tuple[str, ...]) -> tuple[str, ...]:
    """The run's values of the fields not starting with one of `free`: runs of one family differ
    only in the free fields (and the seed), so a line or a fit through them shows those alone."""
    return tuple(f"{k}={run.values.get(k)!r}" for k in fields if not k.startswith(free))


def format_value(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def load_runs(root: Path) -> tuple[list[Run], list[str]]:
    """The runs below `root`, in trial order, and their swept fields; ConfigError when none."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{root}: no such directory")
    paths = find_run_dirs(root)
    if not paths:
        raise ConfigError(f"{root}: no run directories below it (looked for summary.json, "
                          "metrics.jsonl, trial.json or an experiment config.yaml)")
    runs = [read_run(path, root) for path in paths]
    runs.sort(key=lambda r: ((r.trial or {}).get("trial", math.inf),
                             [int(part) if part.isdigit() else part  # layers2 before layers10
                              for part in re.split(r"(\d+)", r.name)]))
    fields = distinguishing_fields(runs)
    short = short_names(fields)
    for run in runs:
        params = {**(run.trial or {}).get("params", {}), **(run.trial or {}).get("derived", {})}
        run.values = {key: params.get(key, run.config.get(key)) for key in fields}
        known = bool(run.config or params)  # a run with neither is nobody's replicate
        run.setting = tuple(f"{k}={v!r}" for k, v in run.values.items()) if known else (run.name,)
        run.group = (", ".join(f"{short[k]}={format_value(v)}" for k, v in run.values.items()
                               if v is not None) or ("every run" if len(runs) > 1 else run.name)
                     if known else run.name)
    replicated = Counter(run.setting for run in runs)
    for run in runs:
        run.label = (f"{run.group}, seed={run.seed}" if replicated[run.setting] > 1
                     and run.seed is not None else run.group)
    same = Counter(run.label for run in runs)  # the same config and seed: name the folder too
    for run in runs:
        if same[run.label] > 1:
            run.label = f"{run.label} [{run.name}]"
    return runs, fields


def fixed_settings(runs: list[Run], fields: list[str]) -> dict[str, Any]:
    """Config fields with one value in every run that has them (not bookkeeping): what the
    comparison holds fixed."""
    configs = [run.config for run in runs if run.config]
    out = {}
    for key in sorted({key for c in configs for key in c}):
        values = {repr(c[key]) for c in configs if key in c}
        if key not in fields and len(values) == 1 and key not in BOOKKEEPING:
            out[key] = next(c[key] for c in configs if key in c)
    return out


# ----------------------------------------------------------------------------- table

COLUMNS = ("state", "step", "steps", "params_total", "params_active", "params_non_embedding",
           "tokens", "flops", "final_eval_loss", "best_eval_loss", "final_eval_bpb",
           "best_eval_bpb", "tokens_per_sec", "mfu", "branch", "error")


def _last(points: list[tuple[int, float]]) -> float | None:
    return points[-1][1] if points else None


def _best(points: list[tuple[int, float]]) -> float | None:
    return min(v for _, v in points) if points else None


def _median(points: list[tuple[int, float]]) -> float | None:
    return statistics.median(v for _, v in points) if points else None


def finished(runs: list[Run], rows: list[dict[str, Any]]) -> list[tuple[Run, dict[str, Any]]]:
    """Runs that completed with an eval loss: the only ones compared, plotted against size and fitted.

    A failed or pruned run's last eval comes from a shorter run, so it would flatter no setting.
    """
    return [(run, r) for run, r in zip(runs, rows) if run.state == "done"
            and r["final_eval_loss"] is not None and math.isfinite(r["final_eval_loss"])]


def row(run: Run) -> dict[str, Any]:
    """The run's table row: swept values then COLUMNS (None where the run has no such number).

    tokens/s and MFU are medians over the logged steps, so one slow step does not decide them.
    """
    summary, train = run.summary, run.series("train/loss")
    steps_done = max([s for points in run.scalars.values() for s, _ in points],
                     default=summary.get("step"))
    # Exact, where events hold train/tokens as float32.
    tokens = (train[-1][0] * run.tokens_per_step if train and run.tokens_per_step
              else _last(run.series("train/tokens")))
    fpt = summary.get("flops_per_token")
    return {
        "run": run.name, **run.values, "state": run.state, "step": steps_done,
        "steps": summary.get("steps", run.config.get("train.steps")),
        **{key: summary.get(key) for key in ("params_total", "params_active", "params_non_embedding")},
        "tokens": tokens, "flops": fpt * tokens if fpt is not None and tokens is not None else None,
        "final_eval_loss": _last(run.series("eval/loss")),
        "best_eval_loss": _best(run.series("eval/loss")),
        "final_eval_bpb": _last(run.series("eval/bpb")),
        "best_eval_bpb": _best(run.series("eval/bpb")),
        "tokens_per_sec": _median(run.series("train/tokens_per_sec")),
        "mfu": _median(run.series("train/mfu")), "branch": branch_of(run), "error": run.error,
    }


def branch_of(run: Run) -> str | None:
    """"PARENT@STEP" for a cooldown branch (docs/training.md), else None: its point is a fully
    decayed model at its token count, though it shares its first STEP steps with the parent."""
    parent = run.config.get("branch.parent")
    return f"{Path(parent).name}@{run.config.get('branch.step')}" if parent else None
