"""A trial's run directory as the sweep sees it: what `research train` wrote, and what we add.

`research train` writes the run directory (research/train/rundir.py names its files). The sweep
adds trial.log (the trial's stdout+stderr, all attempts), trial.json (swept values, state,
objective, error; read by the analysis tools) and an HParams session in tb/.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from research.sweep.spec import Objective
from research.train.rundir import RunDir, parse_metrics, write_json

SWEEP_FILE = "sweep.json"  # in the sweep dir: name, storage, method; for status and analysis


def trial_dir(sweep_dir: Path, trial: dict[str, Any]) -> Path:
    """Where a trial runs: its own folder in the sweep dir, or the run_dir it names (a
    cooldowns search's long run)."""
    return Path(trial["run_dir"]) if trial.get("run_dir") else sweep_dir / trial["name"]


class MetricsTail:
    """New complete lines of a growing metrics.jsonl (which a resumed run rewrites)."""

    def __init__(self, path: Path):
        self.path, self.offset, self.inode = path, 0, None

    def read(self) -> list[dict[str, Any]]:
        try:
            stat = self.path.stat()
            if stat.st_ino != self.inode or stat.st_size < self.offset:
                self.inode, self.offset = stat.st_ino, 0
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return []
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        return parse_metrics(complete.decode(errors="replace"))


def objective_value(entries: list[dict[str, Any]], objective: Objective) -> float | None:
    """The trial's objective: the metric's last value, or its best over all evals."""
    values = [float(e[objective.metric]) for e in entries
              if isinstance(e.get(objective.metric), (int, float))]
    if not values:
        return None
    if objective.reduce == "final":
        return values[-1]
    return min(values) if objective.direction == "minimize" else max(values)


def progress(run_dir: Path) -> tuple[int | None, int | None]:
    """(step reached, steps planned) from metrics.jsonl and summary.json, whichever is further."""
    run = RunDir(run_dir)
    summary = run.summary()
    steps = [e["step"] for e in run.metrics() if isinstance(e.get("step"), int)]
    reached = max([*steps, summary.get("step") or 0]) if (steps or summary) else None
    return reached, summary.get("steps")


def summary_error(run_dir: Path, since: float) -> str | None:
    """The error `research train` put in summary.json, if it failed after time `since`.

    Preferred to the log's last line, which output at interpreter exit can follow.
    """
    run = RunDir(run_dir)
    try:
        if run.summary_path.stat().st_mtime < since:
            return None  # left by an earlier attempt
    except OSError:
        return None
    summary = run.summary()
    return summary.get("error") if summary.get("state") == "failed" else None


def last_line(path: Path, start: int = 0) -> str | None:
    """The last non-empty line written to a log after byte `start` (a terminal's progress bar,
    or an older run's, uses \\r)."""
    try:
        with path.open("rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1] if lines else None


def write_hparams(run_dir: Path, hparams: dict[str, Any], objective_tag: str,
                  objective: float | None, step: int | None) -> None:
    """One TensorBoard HParams session in the trial's tb/, next to its training scalars.

    The metrics listed are the training tags already in tb/ plus the sweep objective, written
    here as its own scalar so the dashboard can sort trials by it.
    """
    from tensorboardX import SummaryWriter
    from tensorboardX.summary import hparams as hparams_summary

    metric_tags = [objective_tag, "eval/loss", "eval/bpb", "train/loss"]
    experiment, start, end = hparams_summary(hparams, dict.fromkeys(metric_tags, 0.0))
    with SummaryWriter(str(RunDir(run_dir).tensorboard)) as writer:
        for summary in (experiment, start, end):
            writer.file_writer.add_summary(summary)
        if objective is not None:
            writer.add_scalar(objective_tag, objective, step or 0)


def write_record(run_dir: Path, trial: dict[str, Any], state: str, objective: float | None,
                 error: str | None) -> None:
    """trial.json: the trial's swept values, replicate seed and outcome, for the analysis tools.

    The overrides every trial shares are in the sweep dir's sweep.json, and the whole config in
    the trial's config.yaml, so they are not repeated here.
    """
    write_json(RunDir(run_dir).trial_record, {
        "trial": trial["number"], "name": trial["name"], "params": trial["params"],
        "derived": trial["derived"], "seed": trial.get("seed"), "state": state,
        "objective": objective, "error": error,
    })
