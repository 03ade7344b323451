"""Named, weighted sources: exact block-deterministic mixing, stages, per-source evaluation.

The sequences of a run are cut, from each stage's first step on, into blocks of K sequences (K:
the smallest multiple of the global batch that is at least BLOCK_SEQUENCES). Every block holds
a fixed number of sequences of each source, the stage's weights times K rounded by largest
remainder (so within one sequence of its share), in an order drawn from (seed, stage, block).
Each source is read as an endless stream of its train windows, reshuffled every epoch (the
token pipeline's shuffle, seeded with train.seed), and a source that runs out repeats.

Everything about global batch k is a pure function of k, the seed, the weights and the stage
steps: a global batch is the same for any number of processes (each reads only its rows), the
iterator's checkpointed state is just {"next_index": k}, and a stage lands exactly on its step.
A single source is the same stream as before mixtures existed: batch k is its windows k*B..k*B+B-1.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import grain
import numpy as np

from research.config import ConfigError, DataConfig
from research.data.pipeline import (TokenCache, build_token_cache, checkpointable_iterator,
                                    eval_batches, n_windows, process_rows, read_windows)
from research.data.tokenizer import Tokenizer

BLOCK_SEQUENCES = 1024  # rounding to whole sequences costs at most 1/K of a source's share


@dataclass(frozen=True)
class Mixture:
    """The run's data: every set's token cache and the weights of each stage.

    `caches` holds the training sources in config order (weight 0 ones included), then the
    eval-only sets; `stages` is ((first step, {training source: weight}), ...), the first at step 1.
    """

    caches: dict[str, TokenCache]
    fields: dict[str, str]  # the config field naming each set, for messages
    stages: tuple[tuple[int, dict[str, float]], ...]
    tokenizer: Tokenizer

    @property
    def training(self) -> list[str]:
        return list(self.stages[0][1])

    @property
    def weights(self) -> dict[str, float]:
        """The base weights (data.sources), normalized: what eval_loss weights the sets by."""
        base = self.stages[0][1]
        total = sum(base.values())
        return {name: weight / total for name, weight in base.items()}


def source_fields(cfg: DataConfig) -> dict[str, tuple[str, str]]:
    """Every set by name -> (its source, the config field that names it)."""
    single = not cfg.sources
    out = {name: (spec.source, "data.source" if single else f"data.sources.{name}.source")
           for name, spec in cfg.named_sources().items()}
    return out | {name: (source, f"data.eval_only.{name}") for name, source in cfg.eval_only.items()}


def stage_weights(cfg: DataConfig) -> tuple[tuple[int, dict[str, float]], ...]:
    """((first step, weights of every training source), ...): the base weights from step 1, then
    each stage's (sources it does not name get 0)."""
    names = cfg.named_sources()
    base = (1, {name: spec.weight for name, spec in names.items()})
    return (base, *((s.from_step, {name: s.weights.get(name, 0.0) for name in names})
                    for s in cfg.stages))


def load(cfg: DataConfig, say: Callable[[str], None] | None = None) -> Mixture:
    """Build or load each set's token cache (each its own, content-keyed); `say` hears each."""
    caches, fields = {}, {}
    for name, (source, field) in source_fields(cfg).items():
        if say is not None:
            say(f"reading {field}={source!r} into the token cache ({cfg.cache_dir}) ...")
        started = time.perf_counter()
        cache = build_token_cache(cfg, source, field, say)
        if say is not None:
            say(f"token cache {cache.path.name[:12]}: {len(cache.train):,} train and "
                f"{len(cache.heldout):,} held-out tokens, ready in "
                f"{time.perf_counter() - started:.1f}s")
        caches[name], fields[name] = cache, field
    tokenizer = next(iter(caches.values())).tokenizer
    return Mixture(caches, fields, stage_weights(cfg), tokenizer)


def block_counts(weights: np.ndarray, block: int) -> np.ndarray:
    """Sequences of each source in a block of `block`: weights x block, normalized and rounded by
    largest remainder (ties to the earlier source), so each is within one of its share."""
    share = np.asarray(weights, np.float64) / np.sum(weights) * block
    counts = np.floor(share).astype(np.int64)
    order = np.argsort(-(share - counts), kind="stable")
    counts[order[:block - counts.sum()]] += 1
    return counts


class Plan:
    """Which source and which of its stream positions fill each row of each global batch.

    Global batch k (0-based) is trained at step k+1. Pure arithmetic, no data read.
    """

    def __init__(self, mixture: Mixture, *, global_batch: int, seed: int):
        self.batch, self.seed = global_batch, seed
        self.block = global_batch * math.ceil(BLOCK_SEQUENCES / global_batch)
        self.starts = [step - 1 for step, _ in mixture.stages]  # first batch index of each stage
        self.counts = [block_counts([w.get(name, 0.0) for name in mixture.training], self.block)
                       for _, w in mixture.stages]
        # a batch needs its block's order, and consecutive batches share it: keep the last few
        self._order = functools.lru_cache(maxsize=4)(self._block_order)
        self.bases = [np.zeros(len(self.counts[0]), np.int64)]
        for i in range(1, len(self.starts)):  # draws before stage i: what stage i-1 took
            self.bases.append(self.bases[-1] + self._within(i - 1, self.starts[i] - self.starts[i - 1]))

    def _block_order(self, stage: int, block: int) -> tuple[np.ndarray, np.ndarray]:
        """A block's source per position, and each position's rank among its source's."""
        labels = np.repeat(np.arange(len(self.counts[stage])), self.counts[stage])
        labels = np.random.default_rng([self.seed, stage, block]).permutation(labels)
        rank = np.empty(self.block, np.int64)
        for source in range(len(self.counts[stage])):
            where = np.flatnonzero(labels == source)
            rank[where] = np.arange(len(where))
        return labels, rank

    def _within(self, stage: int, batches: int) -> np.ndarray:
        """Draws of each source in the first `batches` batches of a stage."""
        block, offset = divmod(batches * self.batch, self.block)
        labels, _ = self._order(stage, block)
        return block * self.counts[stage] + np.bincount(labels[:offset],
                                                        minlength=len(self.counts[stage]))

    def _stage(self, k: int) -> int:
        return int(np.searchsorted(self.starts, k, side="right")) - 1

    def drawn(self, k: int) -> np.ndarray:
        """Sequences taken from each source by batches 0..k-1 (i.e. after step k)."""
        stage = self._stage(k)
        return self.bases[stage] + self._within(stage, k - self.starts[stage])

    def rows(self, k: int, rows: slice) -> tuple[np.ndarray, np.ndarray]:
        """(source, position in that source's stream) of `rows` of global batch k."""
        stage = self._stage(k)
        block, offset = divmod((k - self.starts[stage]) * self.batch, self.block)
        labels, rank = self._order(stage, block)
        at = offset + np.arange(self.batch)[rows]
        source = labels[at]
        first = self.bases[stage] + block * self.counts[stage]
        return source, first[source] + rank[at]


def _check_sources(mixture: Mixture, seq_len: int) -> list[int]:
    """Windows per training source; a source that ever has weight needs at least one."""
    sizes = []
    for name in mixture.training:
        n = n_windows(mixture.caches[name].train, seq_len)
        if not n and any(weights[name] for _, weights in mixture.stages):
            raise ConfigError(f"{mixture.fields[name]}: its train split has "
                              f"{len(mixture.caches[name].train)} tokens, fewer than one window of "
                              f"train.seq_len+1={seq_len + 1}; use more data or a shorter sequence")
        sizes.append(n)
    return sizes


def train_dataset(mixture: Mixture, *, seq_len: int, global_batch: int, seed: int,
                  process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """Element k: {"tokens": int32 [global_batch // process_count, seq_len+1]}, this process's
    rows of global batch k (the batch of step k+1)."""
    rows = process_rows(global_batch, process_index, process_count)
    if not 0 <= seed < 2**32:
        raise ConfigError(f"train.seed={seed}: the data shuffle needs a seed in [0, 2**32)")
    sizes = _check_sources(mixture, seq_len)
    plan = Plan(mixture, global_batch=global_batch, seed=seed)
    caches = [mixture.caches[name] for name in mixture.training]
    streams = [grain.MapDataset.range(n).shuffle(seed=seed).repeat() if n else None for n in sizes]

    def read(k: int) -> dict[str, np.ndarray]:
        source, position = plan.rows(k, rows)
        out = np.empty((len(source), seq_len + 1), np.int32)
        for s in np.unique(source):
            mine = source == s
            windows = np.array([streams[s][int(p)] for p in position[mine]], np.int64)
            out[mine] = read_windows(caches[s].train, windows, seq_len)
        return {"tokens": out}

    return grain.MapDataset.range(sys.maxsize).map(read)


def train_iterator(mixture: Mixture, **kwargs) -> grain.DatasetIterator:
    """A checkpointable iterator over `train_dataset` (state: {"next_index": step})."""
    return checkpointable_iterator(train_dataset(mixture, **kwargs))


def data_metrics(mixture: Mixture, plan: Plan, step: int, seq_len: int) -> dict[str, float]:
    """data/<name>/tokens (trained on so far) and data/<name>/epochs (passes over its train
    split) of each training source after `step` steps."""
    out = {}
    for name, drawn in zip(mixture.training, plan.drawn(step).tolist()):
        windows = n_windows(mixture.caches[name].train, seq_len)
        out[f"data/{name}/tokens"] = drawn * seq_len
        out[f"data/{name}/epochs"] = drawn / windows if windows else 0.0
    return out


def eval_sets(mixture: Mixture, *, seq_len: int, global_batch: int, n_batches: int,
              process_index: int = 0, process_count: int = 1) -> dict[str, list[np.ndarray]]:
    """Each set's fixed held-out batches (`pipeline.eval_batches`), by name."""
    return {name: eval_batches(cache, seq_len=seq_len, global_batch=global_batch,
                               n_batches=n_batches, process_index=process_index,
                               process_count=process_count, field=mixture.fields[name])
            for name, cache in mixture.caches.items()}


def eval_scores(mixture: Mixture, totals: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Metrics from each set's (summed loss, tokens) over its held-out batches.

    eval/<name>/loss is the set's mean loss (nats/token) and eval/<name>/bpb its bits per byte;
    eval/macro_* are the plain means over the training sources (data.sources, weight 0
    included); eval_loss and eval_bpb score the training sources' held-out streams mixed by the
    base weights: sum w L / ln 2 / sum w bytes-per-token, the old metrics for a single source.
    """
    out: dict[str, float] = {}
    for name, (loss_sum, tokens) in totals.items():
        loss = loss_sum / tokens
        out[f"eval/{name}/loss"] = loss
        out[f"eval/{name}/bpb"] = loss / math.log(2) / mixture.caches[name].heldout_bytes_per_token
    weights = mixture.weights
    loss = sum(w * out[f"eval/{name}/loss"] for name, w in weights.items() if w)
    per_byte = sum(w * mixture.caches[name].heldout_bytes_per_token
                   for name, w in weights.items() if w)
    names = mixture.training
    return {"eval_loss": loss, "eval_bpb": loss / math.log(2) / per_byte,
            "eval/macro_loss": float(np.mean([out[f"eval/{n}/loss"] for n in names])),
            "eval/macro_bpb": float(np.mean([out[f"eval/{n}/bpb"] for n in names])), **out}


def check_resume(saved: DataConfig, new: DataConfig, step: int) -> str | None:
    """Resuming at `step` with other data.stages: allowed when the weights of steps 1..step stay
    as they were (returns the one line that says so; None when nothing changed), refused when a
    change would rewrite the past."""
    old, now = stage_weights(saved), stage_weights(new)
    if old == now:
        return None
    past = lambda stages: [(s, w) for s, w in stages if s <= step]  # noqa: E731
    if past(old) != past(now):
        raise ConfigError(f"data.stages: the weights up to step {step} (the checkpoint this run "
                          "resumes from) differ from the run's config.yaml; only stages from step "
                          f"{step + 1} on may change: use a new --run-dir")
    show = lambda stages: ", ".join(f"{s}: {w}" for s, w in stages if s > step) or "none"  # noqa: E731
    return (f"data.stages changed from step {step + 1} on (was {show(old)}; now {show(now)}); "
            "the steps already trained are unchanged")


def eval_table(mixture: Mixture, scores: dict[str, float], batches: dict[str, int],
               tokens_per_batch: int) -> str:
    """The per-set table `research eval` prints: weight, loss, bits per byte, tokens scored."""
    weights = mixture.weights
    lines = [f"{'set':<16} {'weight':>7} {'loss':>8} {'bpb':>8} {'tokens':>10}"]
    for name in mixture.caches:
        weight = f"{weights[name]:.3f}" if name in weights else "eval"
        lines.append(f"{name:<16} {weight:>7} {scores[f'eval/{name}/loss']:>8.4f} "
                     f"{scores[f'eval/{name}/bpb']:>8.4f} {batches[name] * tokens_per_batch:>10,}")
    lines.append(f"{'macro':<16} {'':>7} {scores['eval/macro_loss']:>8.4f} "
                 f"{scores['eval/macro_bpb']:>8.4f}")
    lines.append(f"{'weighted':<16} {'':>7} {scores['eval_loss']:>8.4f} {scores['eval_bpb']:>8.4f}")
    return "\n".join(lines)
