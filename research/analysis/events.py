"""A run's scalar series, read from its TensorBoard event files without TensorFlow.

tensorboard's own EventAccumulator reads every event file in a run's tb/ in order and drops what a
resumed run purged (tensorboardX's purge_step), so it sees what the dashboard shows. metrics.jsonl
holds the same numbers (at full precision; events store float32) and is the fallback for runs
that logged no TensorBoard events.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Iterator

from research.train.metrics import tensorboard_tag

Series = dict[str, list[tuple[int, float]]]  # tag -> [(step, value), ...] in step order


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Hide tensorboard's warnings (e.g. "purging expired events" after a resume)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def has_events(tb_dir: Path) -> bool:
    return tb_dir.is_dir() and any(tb_dir.glob("events.out.tfevents.*"))


def read_scalars(tb_dir: Path) -> Series:
    """Every scalar tag in the event files directly in `tb_dir`."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    with _quiet("tensorboard"):
        acc = ea.EventAccumulator(str(tb_dir), size_guidance={ea.SCALARS: 0})
        acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def scalars_from_metrics(entries: list[dict[str, Any]]) -> Series:
    """metrics.jsonl entries under the tags `research train` gives them in TensorBoard."""
    series: Series = {}
    for entry in entries:
        prefix = "eval" if any(key.startswith("eval_") for key in entry) else "train"
        for key, value in entry.items():
            if key != "step" and isinstance(value, (int, float)):
                series.setdefault(tensorboard_tag(key, prefix), []).append(
                    (int(entry["step"]), float(value)))
    return series
