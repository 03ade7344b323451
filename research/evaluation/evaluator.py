"""The downstream evaluator: a run's ranked-choice tasks, tokenized once, scored at a cadence.

The training loop builds it before anything is written (so a bad task file stops the run with
one line) and calls `log_scores` at eval.tasks_every; `research eval --tasks` calls `scores`.
Metrics are logged as `downstream/<task>/acc`, `/acc_norm`, `/gold_bpb` and
`downstream/macro_acc` (the mean accuracy over the tasks that were scored).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
from jax.sharding import Mesh

from research.config import ExperimentConfig
from research.data.tokenizer import Tokenizer
from research.evaluation.scoring import Scorer, TaskRows, task_metrics, task_rows
from research.evaluation.tasks import load_tasks

PREFIX = "downstream"


class Downstream:
    def __init__(self, tasks: list[TaskRows], scorer: Scorer, every: int):
        self.tasks, self.scorer, self.every = tasks, scorer, every
        self.seconds = 0.0  # of the latest evaluation

    @classmethod
    def build(cls, cfg: ExperimentConfig, spec: str, model: nn.Module, mesh: Mesh,
              param_shardings: Any, tokenizer: Tokenizer, field: str = "eval.tasks"
              ) -> Downstream:
        """Read and tokenize the tasks of `spec` (bad input: ConfigError naming `field`)."""
        tasks = [task_rows(task, tokenizer, cfg.train.seq_len)
                 for task in load_tasks(spec, cfg.data, field)]
        scorer = Scorer(model, mesh, param_shardings, cfg.train.batch_size, cfg.train.seq_len,
                        tokenizer.eos_id)
        return cls(tasks, scorer, cfg.eval.tasks_every or cfg.train.eval_every)

    def due(self, step: int, last: int) -> bool:
        return step % self.every == 0 or step == last

    def describe(self) -> list[str]:
        """A line per task: items, choices, chance, and contexts cut to fit train.seq_len."""
        lines = []
        for t in self.tasks:
            cut = t.truncated
            note = (f"; {cut} context(s) cut from the left to fit train.seq_len="
                    f"{self.scorer.seq_len}" if cut else "")
            lines.append(f"downstream task {t.task.name}: {len(t.task.items)} items, "
                         f"{len(t.rows)} choices, chance {t.task.chance:.3f}{note}")
        return lines

    def _score(self, params: Any, tasks: TaskRows) -> dict[str, float]:
        sums, _ = self.scorer(params, tasks.rows)
        return task_metrics(tasks.task, sums)

    def scores(self, params: Any) -> dict[str, dict[str, float]]:
        """{task: {acc, acc_norm, gold_bpb}}; call inside the mesh's context."""
        start = time.perf_counter()
        out = {t.task.name: self._score(params, t) for t in self.tasks}
        self.seconds = time.perf_counter() - start
        return out

    def log_scores(self, params: Any, warn: Callable[[str], None]) -> dict[str, float]:
        """Flat metrics for metrics.jsonl; a task that fails is reported through `warn` and left
        out (it never stops training)."""
        start = time.perf_counter()
        flat: dict[str, float] = {}
        accuracies = []
        for tasks in self.tasks:
            try:
                metrics = self._score(params, tasks)
            except Exception as exc:  # noqa: BLE001 - a failing task is logged, training goes on
                warn(f"downstream task {tasks.task.name} failed ({type(exc).__name__}: {exc}); "
                     "training goes on")
                continue
            flat.update({f"{PREFIX}/{tasks.task.name}/{k}": v for k, v in metrics.items()})
            accuracies.append(metrics["acc"])
        if accuracies:
            flat[f"{PREFIX}/macro_acc"] = sum(accuracies) / len(accuracies)
        self.seconds = time.perf_counter() - start
        return flat
