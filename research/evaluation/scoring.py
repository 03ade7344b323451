"""Ranked-choice scoring: continuation log-probabilities, batched and jitted on the run's mesh.

A request is (context, continuation) text. It becomes one row of tokens: eos (the document
separator the model saw in training, so the context starts as a document does), the context's
tokens, then the continuation's, each tokenized on its own so the scored span is exactly the
continuation. A row longer than train.seq_len + 1 tokens loses tokens from the left (counted).
Rows are grouped by length into a few padded shapes (each compiled once) and scored in batches
of fixed size: one forward pass per row, summed log-probabilities of the continuation tokens.

From these sums an item's choices are ranked as in OLMo's in-loop evaluator and the harness:
`acc` by the summed log-probability, `acc_norm` by it divided by the choice's length in
characters; `gold_bpb` is the gold choice's negative log-probability in bits per UTF-8 byte.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from research.data.tokenizer import Tokenizer
from research.evaluation.tasks import Task
from research.parallel.mesh import batch_sharding

MIN_BUCKET = 32  # the shortest padded row length; longer ones double up to train.seq_len


@dataclass(frozen=True)
class Row:
    """Token ids and how many of the last ones are scored; `cut` tokens were dropped from the
    left to fit."""

    ids: np.ndarray
    scored: int
    cut: int = 0


def encode(tokenizer: Tokenizer, context: str, continuation: str, seq_len: int) -> Row:
    """The row of a (context, continuation) request, fitted to seq_len + 1 tokens."""
    target = tokenizer.encode(continuation)
    ids = np.concatenate([[tokenizer.eos_id], tokenizer.encode(context), target]).astype(np.int32)
    cut = max(0, len(ids) - (seq_len + 1))
    return Row(ids[cut:], min(len(target), seq_len), cut)


def _row_scores(params: Any, tokens: jax.Array, mask: jax.Array, *, model: nn.Module
                ) -> tuple[jax.Array, jax.Array]:
    """Summed log-probability of each row's masked targets [B], and whether every masked target
    is the model's top token [B] (the harness's is_greedy)."""
    logits, _ = model.apply({"params": params}, tokens[:, :-1])
    logits = logits.astype(jnp.float32)
    targets = tokens[:, 1:]
    log_probs = -optax.losses.softmax_cross_entropy_with_integer_labels(logits, targets)
    greedy = (jnp.argmax(logits, axis=-1) == targets) | (mask == 0)
    return (log_probs * mask).sum(axis=-1), greedy.all(axis=-1)


class Scorer:
    """Scores rows with a model's params on a mesh: params as sharded for training, rows split
    over the batch axes, `batch_size` rows per call (a multiple of the batch shards)."""

    def __init__(self, model: nn.Module, mesh: Mesh, param_shardings: Any, batch_size: int,
                 seq_len: int, pad_id: int):
        self.mesh, self.batch_size, self.seq_len, self.pad_id = mesh, batch_size, seq_len, pad_id
        self._score = jax.jit(functools.partial(_row_scores, model=model),
                              in_shardings=(param_shardings, batch_sharding(mesh),
                                            batch_sharding(mesh)),
                              out_shardings=NamedSharding(mesh, PartitionSpec()))

    def bucket(self, length: int) -> int:
        """The padded input length of a row of `length` tokens (inputs are all but the last)."""
        size = MIN_BUCKET
        while size < length - 1 and size < self.seq_len:
            size *= 2
        return min(size, self.seq_len)

    def _global(self, rows: np.ndarray) -> jax.Array:
        """A batch of rows (the same on every process) -> one array over the batch axes."""
        count, index = jax.process_count(), jax.process_index()
        local = np.split(rows, count)[index]
        return jax.make_array_from_process_local_data(batch_sharding(self.mesh), local)

    def __call__(self, params: Any, rows: Sequence[Row]) -> tuple[np.ndarray, np.ndarray]:
        """Summed log-probabilities (float64 [N]) and is-greedy flags [N] of `rows`; call inside
        the mesh's context (Setup.context)."""
        sums, greedy = np.zeros(len(rows)), np.zeros(len(rows), bool)
        by_bucket: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            by_bucket.setdefault(self.bucket(len(row.ids)), []).append(i)
        for length, members in sorted(by_bucket.items()):
            for start in range(0, len(members), self.batch_size):
                batch = members[start:start + self.batch_size]
                tokens = np.full((self.batch_size, length + 1), self.pad_id, np.int32)
                mask = np.zeros((self.batch_size, length), np.float32)
                for r, i in enumerate(batch):
                    ids, scored = rows[i].ids, rows[i].scored
                    tokens[r, :len(ids)] = ids
                    mask[r, len(ids) - 1 - scored:len(ids) - 1] = 1
                # one batch in flight at a time (docs/parallelism.md: independent executions)
                out = self._score(params, self._global(tokens), self._global(mask))
                batch_sums, batch_greedy = jax.device_get(out)
                sums[batch] = batch_sums[:len(batch)]
                greedy[batch] = batch_greedy[:len(batch)]
        return sums, greedy


@dataclass(frozen=True)
class TaskRows:
    """A task's requests as rows: one per choice of each item, in item order."""

    task: Task
    rows: list[Row]

    @property
    def truncated(self) -> int:
        """Items whose context lost tokens to fit train.seq_len."""
        cut, i = 0, 0
        for item in self.task.items:
            cut += any(row.cut for row in self.rows[i:i + len(item.choices)])
            i += len(item.choices)
        return cut


def task_rows(task: Task, tokenizer: Tokenizer, seq_len: int) -> TaskRows:
    return TaskRows(task, [encode(tokenizer, item.context, choice, seq_len)
                           for item in task.items for choice in item.choices])


def task_metrics(task: Task, sums: np.ndarray) -> dict[str, float]:
    """acc, acc_norm and gold_bpb (means over items) from each choice's summed log-probability
    (in the order of `task_rows`). Ties go to the first choice, as numpy's argmax does."""
    acc, acc_norm, bpb = [], [], []
    i = 0
    for item in task.items:
        scores = sums[i:i + len(item.choices)]
        i += len(item.choices)
        lengths = np.array([len(choice) for choice in item.choices], float)
        acc.append(np.argmax(scores) == item.label)
        acc_norm.append(np.argmax(scores / lengths) == item.label)
        gold_bytes = len(item.choices[item.label].encode("utf-8"))
        bpb.append(-scores[item.label] / math.log(2) / gold_bytes)
    return {"acc": float(np.mean(acc)), "acc_norm": float(np.mean(acc_norm)),
            "gold_bpb": float(np.mean(bpb))}
