"""The run directory: its layout, its config, its checkpoints and its summary.

This is the only module that spells a run directory's file names. A run directory holds

    config.yaml     the resolved experiment config (every derived size filled in)
    summary.json    state, step, sizes and the latest metrics, rewritten as the run goes
    metrics.jsonl   one JSON line per logged step (train and eval metrics)
    tb/             TensorBoard events
    checkpoints/    orbax steps, each sealed with sha256 digests (research/train/checkpoint.py)
    tokenizer.json  an imported run's own copy of its tokenizer (research import-hf)
    rollbacks.json  the rollbacks after non-finite losses: the batches skipped from then on
                    (train.on_nonfinite=rollback, research/train/recovery.py)

and, for a sweep's trial, trial.log (stdout and stderr of every attempt) and trial.json (swept
values and outcome). Every command that reads a checkpoint comes through `RunDir.restore` or
`RunDir.restore_params`, which refuse a damaged step with one line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from research import config as config_lib
from research.config import ConfigError, ExperimentConfig
from research.train.checkpoint import Checkpointer

CONFIG = "config.yaml"
SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
TENSORBOARD = "tb"
CHECKPOINTS = "checkpoints"
TOKENIZER = "tokenizer.json"
ROLLBACKS = "rollbacks.json"
TRIAL_LOG = "trial.log"
TRIAL_RECORD = "trial.json"
HARNESS = "harness"  # `research harness` results, one step_N.json per checkpoint step
# A folder holding one of these is a run (analysis finds runs by them).
MARKERS = (SUMMARY, METRICS, TRIAL_RECORD)


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file's object; None when it is missing or unreadable (e.g. cut short by a kill)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_json(path: Path, data: dict[str, Any] | list[Any]) -> None:
    """Atomic replace (summary.json, trial.json, rollbacks.json): a reader never sees half a
    file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def parse_metrics(text: str) -> list[dict[str, Any]]:
    """metrics.jsonl entries; a line cut short by a kill is skipped."""
    entries = []
    for line in text.splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return entries


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The metrics.jsonl entries of the run directory at `path` ([] when it has none yet)."""
    try:
        return parse_metrics((Path(path) / METRICS).read_text())
    except OSError:
        return []


@dataclass(frozen=True)
class RunDir:
    """One run directory (it need not exist yet: `research train` creates it)."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def summary_path(self) -> Path:
        return self.path / SUMMARY

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def tokenizer(self) -> Path:
        return self.path / TOKENIZER

    @property
    def harness(self) -> Path:
        return self.path / HARNESS

    @property
    def rollbacks_path(self) -> Path:
        return self.path / ROLLBACKS

    @property
    def trial_log(self) -> Path:
        return self.path / TRIAL_LOG

    @property
    def trial_record(self) -> Path:
        return self.path / TRIAL_RECORD

    # ------------------------------------------------------------------------- config

    def has_config(self) -> bool:
        return self.config_path.is_file()

    def config(self) -> ExperimentConfig:
        """The run's validated config; a ConfigError when this is no run directory."""
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"{self.path}: is a file; a run directory is a folder")
        if not self.has_config():
            raise ConfigError(f"{self.path}: not a run directory (no {CONFIG})")
        return config_lib.validate(config_lib.read_yaml(self.config_path))

    def write_config(self, resolved_yaml: str) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(resolved_yaml)

    # ------------------------------------------------------------------------- summary

    def summary(self) -> dict[str, Any]:
        """summary.json ({} when the run has none yet)."""
        return read_json(self.summary_path) or {}

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json(self.summary_path, summary)

    def metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.path)

    # ------------------------------------------------------------------------- checkpoints

    def checkpointer(self, cfg: config_lib.CheckpointConfig, *, read_only: bool = True
                     ) -> Checkpointer:
        return Checkpointer(self.checkpoints, cfg, read_only=read_only)

    def steps(self) -> list[int]:
        """The kept checkpoint steps, oldest first ([] when none; creates nothing)."""
        if not self.checkpoints.is_dir():
            return []
        return self._reader().all_steps()

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def restore(self, abstract_state: Any, step: int | None = None,
                data_iterator: Any | None = None) -> tuple[Any, dict[str, Any]]:
        """The full state (and the data iterator's position) at `step` (None: the latest),
        verified against its digests, onto the shardings of `abstract_state`."""
        return self._reader().restore(step, abstract_state, data_iterator)

    def restore_params(self, abstract_params: Any, step: int | None = None) -> Any:
        """Only the params at `step` (None: the latest), verified, onto `abstract_params`'s
        shardings: how another run starts from this one's weights."""
        return self._reader().restore_params(step, abstract_params)

    def _reader(self) -> Checkpointer:
        """A read-only view of the checkpoints (retention settings do not matter to reading)."""
        return self.checkpointer(config_lib.CheckpointConfig())

    def check_step(self, step: int | None, flag: str = "--step") -> int:
        """`step` (None: the latest) if the run kept it; else one line naming `flag` and the
        steps it has, the same for every command that takes a step."""
        steps = self.steps()
        chosen = steps[-1] if step is None and steps else step
        if chosen is None or chosen not in steps:
            raise ConfigError(f"{flag}: {self.path} has no checkpoint at step {chosen} "
                              f"(available: {steps or 'none'})")
        return chosen
