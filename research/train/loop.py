"""The training loop: the one place with side effects (files, logs, checkpoints, progress bar).

`prepare` builds everything a run needs from its config (mesh, data, model, optimizer, state
shapes); `train` runs or resumes a run in a directory; `evaluate` scores params on held-out data.
The step itself is the pure function in `research.train.step`, jitted here with explicit
shardings and the state donated.
"""

from __future__ import annotations

import contextlib
import functools
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from research import config as config_lib
from research.config import ConfigError, ExperimentConfig, MeshConfig
from research.data.examples import Examples, example_iterator, load_examples
from research.data import mixture
from research.data.mixture import Mixture
from research.data.tokenizer import load_tokenizer
from research.evaluation.evaluator import Downstream
from research.models.decoder import Decoder, padded_vocab
from research.models.layers import backend
from research.parallel.mesh import (AxisRules, axis_rules, batch_sharding, check_divisibility,
                                    make_mesh)
from research.train import branch, flops, metrics, recovery, stability
from research.train.checkpoint import DIVERGED, Checkpointer
from research.train.rundir import RunDir
from research.train.optim import lr_multiplier, make_optimizer, state_bytes
from research.train.objectives import make_objective
from research.train.state import (StateSpec, TrainState, init_state, load_initial_params, param_multipliers,
                                  param_specs, params_from_run, state_from_params, state_spec)
from research.train.step import Controls, controls, eval_step, train_step


@dataclass(frozen=True)
class Setup:
    """Everything derived from a config before any state exists."""

    cfg: ExperimentConfig
    mesh: Mesh
    rules: AxisRules
    data: Mixture
    model: nn.Module
    vocab_size: int
    tx: optax.GradientTransformation
    lr_multiplier: optax.Schedule
    spec: StateSpec

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """Mesh and logical-axis rules in scope for tracing the model."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def global_array(self, local_rows: np.ndarray) -> jax.Array:
        """This process's rows of a batch -> one global array sharded over the batch axes."""
        return jax.make_array_from_process_local_data(batch_sharding(self.mesh), local_rows)


def _quiet(message: str) -> None:
    """`say` for processes other than the lead, and for callers that want no messages."""


def prepare(cfg: ExperimentConfig, devices: list[jax.Device] | None = None,
            say: Callable[[str], None] = _quiet) -> Setup:
    """Build the run's pieces on all devices, or on `devices` (e.g. one device as a reference);
    `say` hears what takes time (reading and tokenizing the data)."""
    mesh = make_mesh(cfg.mesh, devices)
    check_divisibility(cfg, mesh)
    rules = axis_rules(cfg.mesh)
    data = mixture.load(cfg.data, None if say is _quiet else say)
    vocab = padded_vocab(cfg.model, data.tokenizer.vocab_size)
    model = Decoder(config_lib.for_backend(cfg.model, backend()), vocab)  # what runs here
    example = jnp.zeros((1, cfg.train.seq_len), jnp.int32)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        multipliers = param_multipliers(model, example)
        tx = make_optimizer(cfg.optim, cfg.train.steps, param_specs(model, example), multipliers)
        spec = state_spec(model, tx, example, mesh, rules, multipliers,
                          reference=cfg.train.objective == "dpo",
                          guards=stability.init_state(cfg.train))
    return Setup(cfg, mesh, rules, data, model, vocab, tx,
                 lr_multiplier(cfg.optim, cfg.train.steps), spec)


def compile_train_step(setup: Setup, examples: Examples | None = None
                       ) -> tuple[Any, Controls]:
    """The jitted, compiled training step (state donated) and the controls it takes (the peak
    lr; step.controls); call inside `setup.context()`."""
    cfg = setup.cfg
    replicated = NamedSharding(setup.mesh, PartitionSpec())
    step_fn = jax.jit(
        functools.partial(train_step, model=setup.model, tx=setup.tx,
                          lr_multiplier=setup.lr_multiplier, grad_accum=cfg.train.grad_accum,
                          objective=make_objective(cfg.train.objective, cfg.dpo,
                                                   cfg.optim.z_loss),
                          guards=stability.Guards.from_config(cfg)),
        in_shardings=(setup.spec.shardings, batch_sharding(setup.mesh), replicated),
        out_shardings=(setup.spec.shardings, None),
        donate_argnums=0,
    )
    batch_shape = {name: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding(setup.mesh))
                   for name, shape in _batch_shapes(cfg, examples).items()}
    knobs = controls(cfg.optim.lr)
    return step_fn.lower(setup.spec.abstract, batch_shape, knobs).compile(), knobs


def step_seconds(cfg: ExperimentConfig, steps: int = 3) -> float:
    """Seconds per training step of `cfg` on this machine: compile, one step to warm up, then the
    mean of `steps` more on real batches (for planning; nothing is written)."""
    setup = prepare(cfg)
    data = mixture.train_iterator(setup.data, seq_len=cfg.train.seq_len,
                                  global_batch=cfg.train.batch_size, seed=cfg.train.seed,
                                  process_index=jax.process_index(),
                                  process_count=jax.process_count())
    with setup.context():
        state = init_state(setup.model, setup.tx, jnp.zeros((1, cfg.train.seq_len), jnp.int32),
                           setup.spec, cfg.train.seed)
        step_fn, knobs = compile_train_step(setup)
        batches = [jax.tree.map(setup.global_array, next(data)) for _ in range(steps + 1)]
        state, out = step_fn(state, batches[0], knobs)
        jax.block_until_ready(out)
        start = time.perf_counter()
        for batch in batches[1:]:
            state, out = step_fn(state, batch, knobs)
        jax.block_until_ready(out)
    return (time.perf_counter() - start) / steps


def evaluate(setup: Setup, params: Any, sets: dict[str, list[np.ndarray]],
             step_fn: Any | None = None) -> dict[str, float]:
    """Held-out loss (nats/token) and bits per byte of each set's fixed batches, their macro
    means and the weighted eval_loss/eval_bpb (`mixture.eval_scores`)."""
    if step_fn is None:
        step_fn = jax.jit(functools.partial(eval_step, model=setup.model))
    with setup.context():  # one batch in flight at a time (docs/parallelism.md)
        outs = {name: [jax.block_until_ready(step_fn(params, setup.global_array(rows)))
                       for rows in batches] for name, batches in sets.items()}
    sums = jax.device_get({name: jax.tree.map(lambda *xs: sum(xs), *o)
                           for name, o in outs.items()})
    return mixture.eval_scores(setup.data, {name: (float(t["loss_sum"]), float(t["tokens"]))
                                            for name, t in sums.items()})


def _check_resumable(saved: ExperimentConfig, new: ExperimentConfig, path: Path) -> None:
    """Compared as resolved, so a config.yaml with derived sizes and `auto` choices filled in
    (or from before they were) matches what it was derived from on this backend; only fields
    whose role says they leave the trajectory alone (config.BOOKKEEPING, config.EXTENT) may
    differ."""
    vocab = padded_vocab(new.model, load_tokenizer(new.data.tokenizer).vocab_size)
    free = config_lib.fields_with_role(config_lib.BOOKKEEPING, config_lib.EXTENT)
    difference = config_lib.first_difference(config_lib.resolved(new, vocab, backend()),
                                             config_lib.resolved(saved, vocab, backend()), free)
    if difference is not None:
        key, now, old = difference
        raise ConfigError(f"{key}: {now!r} differs from {old!r} in {path}; a run directory "
                          "resumes with its own config (only fields that leave the trajectory "
                          "alone may change, e.g. train.steps, logging, checkpoint, mesh): use "
                          "a new --run-dir")


@contextlib.contextmanager
def _stop_between_steps() -> Iterator[list[int]]:
    """SIGINT/SIGTERM ask the loop to stop after the current step (a second signal stops at
    once), so an interrupt never lands inside a checkpoint save or a collective, and the run is
    recorded as interrupted. Signal handlers exist only in the main thread."""
    requested: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def request(signum: int, frame: Any) -> None:
        if requested:
            raise KeyboardInterrupt
        requested.append(signum)

    previous = {sig: signal.signal(sig, request) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _batch_shapes(cfg: ExperimentConfig, examples: Examples | None) -> dict[str, tuple[int, ...]]:
    """Global batch shapes: token windows [B, L+1], or the example rows' fields."""
    if examples is None:
        return {"tokens": (cfg.train.batch_size, cfg.train.seq_len + 1)}
    return {name: (cfg.train.batch_size, *rows.shape[1:]) for name, rows in examples.rows.items()}


def load_run(run: RunDir, step: int | None = None, devices: list[jax.Device] | None = None
             ) -> tuple[Setup, TrainState, dict[str, Any]]:
    """A run's setup and its verified checkpoint at `step` (None: the latest): where every
    command that reads a trained model starts (eval, generate, export-hf, the benches). On
    `devices` (e.g. one device) the run's mesh shape gives way to a data-parallel one."""
    cfg = run.config()
    run.check_step(step)  # before the token cache is built: a wrong --step fails at once
    if devices is not None:
        cfg = cfg.model_copy(update={"mesh": MeshConfig(rules=cfg.mesh.rules)})
    setup = prepare(cfg, devices)
    with setup.context():
        state, meta = run.restore(setup.spec.abstract, step)
    return setup, state, meta


# ----------------------------------------------------------------------------- the loop's parts


def _due(step: int, every: int, last: int) -> bool:
    """A cadence: every `every` steps, and at the run's last step."""
    return step % every == 0 or step == last


def _check_start(run: RunDir, cfg: ExperimentConfig, say: Callable[[str], None]
                 ) -> tuple[int | None, bool]:
    """(the run's latest checkpoint step, whether the directory is a starting point); refuses a
    run directory that cannot take this config, before anything is computed or written.

    A run directory whose only checkpoint is step 0 (what `import-hf` writes) is a starting
    point, not a run in progress: an experiment trains it with its own data, optimizer and
    schedule, as long as its model section describes the same model."""
    if run.path.exists() and not run.path.is_dir():
        raise ConfigError(f"{run.path}: is a file; a run directory is a folder")
    latest = run.latest_step()
    starting_point = run.has_config() and latest == 0
    if starting_point and cfg.model.init_from is not None:
        raise ConfigError(f"model.init_from: {run.path} already holds its step-0 weights; drop "
                          "model.init_from or use a new --run-dir")
    if run.has_config() and not starting_point:
        saved = run.config()
        _check_resumable(saved, cfg, run.config_path)
        if note := mixture.check_resume(saved.data, cfg.data, latest or 0):
            say(note)
    if cfg.branch.parent is not None and latest is None:
        branch.check(cfg)
    return latest, starting_point


def _initial_weights(setup: Setup, run: RunDir, latest: int | None, starting_point: bool
                     ) -> tuple[Any, str] | None:
    """(params, where from) when the run starts from earlier weights: its own step 0 (a starting
    point) or model.init_from (a new run only); None when it initialises or resumes."""
    cfg = setup.cfg
    if starting_point:
        with setup.context():
            return params_from_run(setup.spec, cfg, run, 0), f"{run.path}@0"
    if cfg.model.init_from is not None and latest is None:
        with setup.context():
            return load_initial_params(setup.spec, cfg), cfg.model.init_from
    return None


def _restore_or_init(setup: Setup, checkpoints: Checkpointer, data: grain.DatasetIterator,
                     data_iterator: Callable[[], grain.DatasetIterator], starting_point: bool,
                     initial: tuple[Any, str] | None, say: Callable[[str], None], is_lead: bool
                     ) -> tuple[int, TrainState, grain.DatasetIterator]:
    """(start step, state, data iterator): the newest intact checkpoint with its data
    position, or step 0 from the initial weights or a fresh initialisation."""
    cfg = setup.cfg
    started = time.perf_counter()
    with setup.context():
        start, state, notes = ((None, None, []) if starting_point
                               else checkpoints.resume(setup.spec.abstract, data))
        for note in notes if is_lead else []:
            print(note, file=sys.stderr, flush=True)
        if start is not None:
            say(f"resuming from step {start} (its checkpoint in {checkpoints.directory})")
        else:
            start = 0
            if notes:
                data = data_iterator()  # a failed restore may have moved it
            if cfg.branch.parent is not None:
                start = cfg.branch.step
                say(f"branching from {cfg.branch.parent} at step {start} (params, optimizer "
                    "state and data position)")
                state = branch.restore(cfg, setup.spec.abstract, data)
            elif initial is not None:
                say(f"starting from the weights of {initial[1]}")
                state = state_from_params(initial[0], setup.tx, setup.spec, cfg.train.seed)
            else:
                say(f"initialising {cfg.model.n_layers} layers, d_model={cfg.model.d_model} ...")
                state = init_state(setup.model, setup.tx,
                                   jnp.zeros((1, cfg.train.seq_len), jnp.int32), setup.spec,
                                   cfg.train.seed)
    say(f"state ready in {time.perf_counter() - started:.1f}s")
    return start, state, data


class SpeedMonitor:
    """Step time, tokens/s and MFU over the steps since the last measurement; time spent
    outside training steps (evaluation, logging) is not step time."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak_flops: float, step: int):
        self.tokens_per_step, self.flops_per_token, self.peak = (tokens_per_step, flops_per_token,
                                                                 peak_flops)
        self.restart(step)

    def restart(self, step: int) -> None:
        self.time, self.step = time.perf_counter(), step

    def resume(self) -> None:
        """After a pause (an evaluation): the clock restarts, the step count does not."""
        self.time = time.perf_counter()

    def measure(self, step: int) -> dict[str, float]:
        step_time = (time.perf_counter() - self.time) / (step - self.step)
        tokens_per_sec = self.tokens_per_step / step_time
        return {"step_time": step_time, "tokens_per_sec": tokens_per_sec,
                "mfu": self.flops_per_token * tokens_per_sec / self.peak,
                "tokens": step * self.tokens_per_step}


class CheckpointCadence:
    """Saves every checkpoint.every steps and at the end; after a failure, `save_first` keeps
    the steps trained since the last save."""

    def __init__(self, checkpoints: Checkpointer, cfg: ExperimentConfig,
                 data: grain.DatasetIterator, state: TrainState, start: int):
        self.checkpoints, self.cfg, self.data, self.state = checkpoints, cfg, data, state
        self.reached = self.fetched = self.saved = start

    def stepped(self, step: int, state: TrainState) -> None:
        self.reached, self.state = step, state

    def restored(self, step: int, state: TrainState) -> None:
        """After a rollback restored checkpoint `step`."""
        self.reached = self.fetched = self.saved = step
        self.state = state

    def maybe_save(self, step: int) -> None:
        if _due(step, self.cfg.checkpoint.every, self.cfg.train.steps):
            self.save(step)

    def save(self, step: int) -> None:
        self.checkpoints.save(step, self.state, self.data, {"step": step,
                                                            "config": self.cfg.to_dict()})
        self.saved = step

    def can_save_first(self) -> bool:
        """Not after a step that failed half-way: the data iterator is then a step ahead."""
        return bool(self.reached) and self.reached in (self.fetched, self.saved)

    def save_first(self) -> str:
        """Checkpoint the latest completed step unless it is, and say so."""
        if self.reached > self.saved:
            try:
                self.save(self.reached)
                self.checkpoints.finish()
            except Exception as exc:
                latest = self.checkpoints.latest_step()
                return (f"step {self.reached} could not be checkpointed ({type(exc).__name__}: "
                        f"{exc}); latest checkpoint: {f'step {latest}' if latest else 'none'}")
        return f"step {self.reached} is checkpointed: run the same command again to resume"


class Reporter:
    """Where the loop's numbers go: metrics.jsonl and TensorBoard, the progress bar, and the
    summary (rewritten at each eval and at the end); only the lead process writes."""

    def __init__(self, run: RunDir, cfg: ExperimentConfig, summary: dict[str, Any], start: int,
                 is_lead: bool):
        self.run, self.summary, self.is_lead = run, summary, is_lead
        self.log = metrics.RunLog(run, resume_step=start, tensorboard=cfg.logging.tensorboard,
                                  enabled=is_lead)
        self.progress = metrics.Progress(cfg.name, cfg.train.steps, start,
                                         enabled=is_lead and cfg.logging.progress)

    def train_metrics(self, step: int, values: dict[str, float]) -> None:
        self.log.write(step, values, "train")
        self.progress.metrics(loss=f"{values['loss']:.4f}", tok_s=f"{values['tokens_per_sec']:,.0f}",
                              mfu=f"{values['mfu']:.1%}")
        self.summary["final"].update(values)

    def eval_metrics(self, step: int, scores: dict[str, float]) -> None:
        self.log.write(step, scores, "eval")
        self.summary["final"].update(scores)
        if self.is_lead:
            self.progress.write(f"step {step}: eval loss {scores['eval_loss']:.4f}, "
                                f"{scores['eval_bpb']:.4f} bits/byte")
        self.save_summary(step=step)

    def downstream_metrics(self, step: int, scores: dict[str, float], seconds: float) -> None:
        """Downstream task metrics (none when every task failed)."""
        if not scores:
            return
        self.log.write(step, scores, "downstream")
        self.summary["final"].update(scores)
        self.note(f"step {step}: downstream macro accuracy {scores['downstream/macro_acc']:.3f} "
                  f"({seconds:.1f}s)")

    def note(self, text: str) -> None:
        """A line that stays, above the progress bar (lead process only)."""
        if self.is_lead:
            self.progress.write(text)

    def save_summary(self, **changes: Any) -> None:
        self.summary.update(changes)
        if self.is_lead:
            self.run.write_summary(self.summary)

    def close(self) -> None:
        self.progress.close()
        self.log.close()


class Guard:
    """The stability guards' side of the loop (research/train/stability.py, recovery.py): the
    batch each step reads (passing over those rollbacks skipped), the step's controls (the lr
    after a rollback, the fault injector), the updates the spike guard skipped (one line each
    in metrics.jsonl), the per-layer norms, and train.on_nonfinite."""

    def __init__(self, run: RunDir, cfg: ExperimentConfig, state: TrainState, start: int,
                 is_lead: bool):
        self.run, self.cfg, self.is_lead = run, cfg, is_lead
        self.rollbacks = recovery.read_rollbacks(run.rollbacks_path)
        self._controls: dict[tuple[float, float], Controls] = {}
        self._start_at(start, state)

    def _start_at(self, step: int, state: TrainState) -> None:
        self.skipped = recovery.skipped_batches(self.rollbacks)
        self.batch = recovery.batch_of_step(step, self.skipped)  # the last batch read
        count = state.get("stability", {}).get("skipped")
        self.skips = recovery.SkippedUpdates(0 if count is None else int(jax.device_get(count)))

    def next_batch(self, data: grain.DatasetIterator) -> Any:
        rows, self.batch = recovery.next_batch(data, self.batch, self.skipped)
        return rows

    def controls(self, step: int) -> Controls:
        """The controls of `step` (which has just read its batch); made once per value, so
        steps do not each copy scalars to the devices."""
        key = (recovery.lr_factor(step, self.rollbacks, self.cfg.train),
               recovery.loss_scale(self.batch, self.cfg.train))
        if key not in self._controls:
            self._controls[key] = controls(self.cfg.optim.lr * key[0], key[1])
        return self._controls[key]

    def stepped(self, step: int, step_metrics: dict[str, jax.Array], log: metrics.RunLog) -> None:
        """Note a skipped update; log the per-layer norms when they are due (one host sync)."""
        self.skips.add(step, self.batch, step_metrics)
        every = self.cfg.logging.norms_every
        if every and step % every == 0:
            norms = {k: v for k, v in step_metrics.items() if k.startswith("norms/")}
            log.write(step, {k: float(v) for k, v in jax.device_get(norms).items()}, "train")

    def log_skipped(self, log: metrics.RunLog) -> None:
        for step, batch in self.skips.read():
            log.write(step, {"spike_skipped_batch": batch}, "spike")

    def went_bad(self, values: dict[str, float]) -> bool:
        """Non-finite parameters, or a non-finite loss the spike guard did not skip."""
        return not math.isfinite(values["param_norm"]) or (
            not math.isfinite(values["loss"]) and not self.cfg.train.skip_spikes)

    def roll_back(self, state: TrainState, setup: Setup, checkpoints: Checkpointer,
                  data: grain.DatasetIterator, saver: CheckpointCadence, report: Reporter
                  ) -> tuple[int, TrainState]:
        """Back to the last checkpoint before the parameters went non-finite: the rollback is
        recorded (after newer checkpoints are set aside, so a kill at any point resumes the
        same way) and logged; returns the restored step and state."""
        failed = int(jax.device_get(state["stability"]["first_nonfinite"])) or saver.reached
        checkpoints.finish()
        rollback = recovery.plan_rollback(failed, self.rollbacks, checkpoints.all_steps(),
                                          self.cfg.train)
        restored = rollback.restored_step
        for later in checkpoints.all_steps():
            if later > restored:  # on the diverged path: kept, out of the way
                checkpoints.move_aside(later, DIVERGED)
        self.rollbacks.append(rollback)
        if self.is_lead:
            recovery.write_rollbacks(self.run.rollbacks_path, self.rollbacks)
        with setup.context():
            state, _ = checkpoints.restore(restored, setup.spec.abstract, data)
        self._start_at(restored, state)
        saver.restored(restored, state)
        report.log.rewind(restored)
        report.log.write(restored, {"rollback_failed_step": failed, "rollback_batch":
                                    rollback.batch, "rollback_count": len(self.rollbacks)},
                         "rollback")
        report.summary["rollbacks"] = len(self.rollbacks)
        train = self.cfg.train
        lowered = (f", lr x{train.rollback_lr_factor} until step {rollback.lr_until}"
                   if rollback.lr_until > restored and train.rollback_lr_factor < 1 else "")
        if self.is_lead:
            report.progress.write(f"step {failed}: non-finite loss; rolled back to step "
                                  f"{restored}, skipping batch {rollback.batch}{lowered} "
                                  f"(rollback {len(self.rollbacks)} of at most "
                                  f"{train.max_rollbacks})")
        return restored, state


def _summary(cfg: ExperimentConfig, run: RunDir, start: int, counts: dict[str, int],
             tokens_per_step: int, flops_per_token: float, peak: float,
             opt_state_bytes_per_param: float) -> dict[str, Any]:
    """summary.json as the run starts; a resumed run shows its last reported metrics."""
    return {
        "name": cfg.name, "state": "running", "step": start, "steps": cfg.train.steps,
        **{f"params_{k}": v for k, v in counts.items()},
        "flops_per_token": flops_per_token, "tokens_per_step": tokens_per_step,
        "peak_flops": peak, "opt_state_bytes_per_param": opt_state_bytes_per_param,
        "error": None,
        "final": run.summary().get("final", {}) if start else {},
    }


# ----------------------------------------------------------------------------- the loop


def train(cfg: ExperimentConfig, run_dir: Path,
          devices: list[jax.Device] | None = None) -> dict[str, Any]:
    """Train (or resume) the run in `run_dir`; returns the final summary."""
    run = RunDir(run_dir)
    is_lead = jax.process_index() == 0
    say = (lambda message: print(message, flush=True)) if is_lead else _quiet
    latest, starting_point = _check_start(run, cfg, say)
    # Everything that can fail on a bad config (shapes, data, held-out split, examples,
    # init_from) before anything is written, so a refused start leaves no run directory behind.
    setup = prepare(cfg, devices, say)
    examples = None if cfg.train.objective == "lm" else load_examples(cfg, setup.data.tokenizer)
    downstream = None if cfg.eval.tasks is None else Downstream.build(
        cfg, cfg.eval.tasks, setup.model, setup.mesh, setup.spec.shardings["params"],
        setup.data.tokenizer)
    initial = _initial_weights(setup, run, latest, starting_point)

    def data_iterator() -> grain.DatasetIterator:
        shards = dict(global_batch=cfg.train.batch_size, seed=cfg.train.seed,
                      process_index=jax.process_index(), process_count=jax.process_count())
        if examples is None:
            return mixture.train_iterator(setup.data, seq_len=cfg.train.seq_len, **shards)
        return example_iterator(examples, **shards)

    data = data_iterator()
    heldout = mixture.eval_sets(setup.data, seq_len=cfg.train.seq_len,
                                global_batch=cfg.train.batch_size, n_batches=cfg.train.eval_batches,
                                process_index=jax.process_index(), process_count=jax.process_count())
    plan = mixture.Plan(setup.data, global_batch=cfg.train.batch_size, seed=cfg.train.seed)
    resolved_yaml = config_lib.to_yaml(config_lib.resolved(cfg, setup.vocab_size, backend()))
    if is_lead:
        run.write_config(resolved_yaml)
    checkpoints = run.checkpointer(cfg.checkpoint, read_only=False)
    start, state, data = _restore_or_init(setup, checkpoints, data, data_iterator, starting_point,
                                          initial, say, is_lead)
    finished = start >= cfg.train.steps
    if finished:
        say(f"already finished at step {start} (train.steps={cfg.train.steps}); nothing to train "
            "(raise train.steps to continue it)")

    rows_per_example = 2 if cfg.train.objective == "dpo" else 1  # a pair is two rows
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len * rows_per_example
    flops_per_token = flops.flops_per_token(cfg.model, setup.vocab_size, cfg.train.seq_len)
    peak = metrics.peak_flops(cfg.model.compute_dtype, cfg.logging.peak_flops) * jax.process_count()
    counts = flops.param_counts(cfg.model, setup.vocab_size)
    opt_bytes, opt_per_param = state_bytes(setup.spec.abstract["opt_state"],
                                           setup.spec.abstract["params"])
    say(f"optimizer {cfg.optim.name}: state {opt_bytes / 2**20:,.1f} MiB, {opt_per_param:.2f} "
        "bytes per parameter")
    summary = _summary(cfg, run, start, counts, tokens_per_step, flops_per_token, peak,
                       opt_per_param)
    report = Reporter(run, cfg, summary, start, is_lead)
    profiler = metrics.StepProfiler(run.tensorboard, cfg.logging.profile_steps)
    if examples is not None:
        summary["examples"] = examples.counts
        say(f"{cfg.examples.source} examples: {examples.summary()}")
    for line in downstream.describe() if downstream is not None else []:
        say(line)
    if start == 0:
        report.log.text("config", resolved_yaml)
        report.log.text("parameters", "\n".join(f"{k:>14}: {v:,}" for k, v in counts.items()))

    with _stop_between_steps() as stop_requested:
        report.save_summary()
        with setup.context():
            # Compile ahead of the loop, so step times (and MFU) never include compilation.
            compile_start = time.perf_counter()
            if not finished:
                say("compiling the train step ...")
                step_fn, _ = compile_train_step(setup, examples)
                summary["compile_seconds"] = time.perf_counter() - compile_start
                say(f"compiled in {summary['compile_seconds']:.1f}s; training steps "
                    f"{start + 1}-{cfg.train.steps}")
            eval_fn = jax.jit(functools.partial(eval_step, model=setup.model),
                              in_shardings=(setup.spec.shardings["params"], batch_sharding(setup.mesh)))

        saver = CheckpointCadence(checkpoints, cfg, data, state, start)
        speed = SpeedMonitor(tokens_per_step, flops_per_token, peak, start)
        guard = Guard(run, cfg, state, start, is_lead)
        last = cfg.train.steps
        try:
            step = start
            while step < last:
                step += 1
                if stop_requested:
                    raise KeyboardInterrupt
                profiler.before(step)
                with setup.context():
                    saver.fetched = step  # the data iterator is now ahead of the state
                    batch = jax.tree.map(setup.global_array, guard.next_batch(data))
                    state, step_metrics = step_fn(state, batch, guard.controls(step))
                profiler.after(step, state)
                saver.stepped(step, state)
                report.progress.update(step)
                guard.stepped(step, step_metrics, report.log)
                if _due(step, cfg.train.log_every, last):
                    values = {k: float(v) for k, v in jax.device_get(step_metrics).items()
                              if not k.startswith("norms/")}
                    guard.log_skipped(report.log)
                    if guard.went_bad(values):
                        if cfg.train.on_nonfinite == "stop":
                            raise FloatingPointError(f"non-finite loss at step {step}")
                        step, state = guard.roll_back(state, setup, checkpoints, data, saver,
                                                      report)
                        speed.restart(step)
                        continue
                    if examples is None:
                        values.update(mixture.data_metrics(setup.data, plan, step, cfg.train.seq_len))
                    report.train_metrics(step, {**values, **speed.measure(step)})
                    speed.restart(step)
                if _due(step, cfg.train.eval_every, last):
                    report.eval_metrics(step, evaluate(setup, state["params"], heldout, eval_fn))
                    speed.resume()  # eval time is not step time
                if downstream is not None and downstream.due(step, last):
                    with setup.context():
                        scores = downstream.log_scores(state["params"], report.note)
                    report.downstream_metrics(step, scores, downstream.seconds)
                    speed.resume()
                saver.maybe_save(step)
        except BaseException as exc:
            # Save first: whatever failed (eval, logging, a full disk, a signal), the steps
            # trained since the last checkpoint are kept, unless the state itself went bad.
            if saver.can_save_first() and not isinstance(exc, FloatingPointError):
                exc.add_note(saver.save_first())
            if isinstance(exc, KeyboardInterrupt):
                summary.update(state="interrupted")
            else:
                summary.update(state="failed", error=f"{type(exc).__name__}: {exc}")
            raise
        else:
            summary.update(state="done")
        finally:
            checkpoints.close()  # whatever happened, let a save in flight land before exiting
            profiler.stop()
            report.close()
            report.save_summary(step=saver.reached)
    return summary
