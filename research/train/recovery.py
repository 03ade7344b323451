"""Recovery from non-finite losses (train.on_nonfinite=rollback) and the fault injector: the
policy as pure functions of the run's rollback records, which the loop keeps in the run
directory (so every later resume honours them).

A rollback after the parameters first went non-finite at step s (the state records s, see
research/train/stability.py): the latest checkpoint before s is restored, the batch step s read
is skipped from then on, and the lr is multiplied by train.rollback_lr_factor for the
train.rollback_lr_steps steps after the restored one. Batches are numbered from 1 in the order
the data pipeline yields them; without skips step k reads batch k, with skipped batches S step
k reads the k-th batch not in S, so the batch any step reads follows from S alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from research.config import TrainConfig
from research.train.rundir import write_json

FAULT_SCALES = {"spike": 1e4, "nan": math.nan}


@dataclass(frozen=True)
class Rollback:
    """One rollback: the step whose update went non-finite, the batch it read (skipped from
    then on), the checkpoint step restored, and the last step of the lowered lr."""

    failed_step: int
    batch: int
    restored_step: int
    lr_until: int


def read_rollbacks(path: Path) -> list[Rollback]:
    """The run's rollbacks ([] when it had none)."""
    if not path.is_file():
        return []
    return [Rollback(**record) for record in json.loads(path.read_text())]


def write_rollbacks(path: Path, rollbacks: list[Rollback]) -> None:
    """Atomically (a kill never leaves half a list)."""
    write_json(path, [asdict(r) for r in rollbacks])


def skipped_batches(rollbacks: list[Rollback]) -> frozenset[int]:
    return frozenset(r.batch for r in rollbacks)


def batch_of_step(step: int, skipped: frozenset[int]) -> int:
    """The batch step `step` reads (0 for step 0: none read yet)."""
    batch = step
    for s in sorted(skipped):
        if s <= batch:
            batch += 1
    return batch


def next_batch(data: Iterator[Any], drawn: int, skipped: frozenset[int]) -> tuple[Any, int]:
    """The next batch to train on after `drawn` batches were read, passing over skipped ones;
    returns it and its number."""
    drawn += 1
    while drawn in skipped:
        next(data)
        drawn += 1
    return next(data), drawn


def lr_factor(step: int, rollbacks: list[Rollback], cfg: TrainConfig) -> float:
    """The lr multiplier at `step`: rollback_lr_factor for every rollback whose lowered steps
    cover it (two overlapping rollbacks lower it twice)."""
    factor = 1.0
    for r in rollbacks:
        if r.restored_step < step <= r.lr_until:
            factor *= cfg.rollback_lr_factor
    return factor


def loss_scale(batch: int, cfg: TrainConfig) -> float:
    """The fault injector: the loss factor for `batch` (1 unless it is a fault step's)."""
    return FAULT_SCALES[cfg.fault] if batch in cfg.fault_steps else 1.0


def plan_rollback(failed_step: int, rollbacks: list[Rollback], checkpoints: list[int],
                  cfg: TrainConfig) -> Rollback:
    """The rollback after the parameters went non-finite at `failed_step`, or a
    FloatingPointError (one line) when the run must stop: too many rollbacks, or no checkpoint
    before the failure."""
    if len(rollbacks) >= cfg.max_rollbacks:
        raise FloatingPointError(f"non-finite loss at step {failed_step} after {len(rollbacks)} "
                                 f"rollbacks (train.max_rollbacks={cfg.max_rollbacks}): stopping")
    earlier = [step for step in checkpoints if step < failed_step]
    if not earlier:
        raise FloatingPointError(f"non-finite loss at step {failed_step}: no checkpoint before "
                                 "it to roll back to")
    restored = max(earlier)
    return Rollback(failed_step, batch_of_step(failed_step, skipped_batches(rollbacks)),
                    restored, restored + cfg.rollback_lr_steps)


class SkippedUpdates:
    """The steps whose update the spike guard skipped, found from the step's cumulative count
    ("spike/skipped") without a host sync per step: the counts of the steps since the last
    read are fetched together when the loop logs."""

    def __init__(self, skipped_so_far: int):
        self.seen = skipped_so_far
        self.pending: list[tuple[int, int, Any]] = []

    def add(self, step: int, batch: int, step_metrics: dict[str, Any]) -> None:
        if "spike/skipped" in step_metrics:
            self.pending.append((step, batch, step_metrics["spike/skipped"]))

    def read(self) -> list[tuple[int, int]]:
        """(step, batch) of each skipped update since the last read."""
        import jax

        counts = jax.device_get([count for *_, count in self.pending])
        found = []
        for (step, batch, _), count in zip(self.pending, counts):
            if count > self.seen:
                found.append((step, batch))
                self.seen = int(count)
        self.pending = []
        return found
