"""The training loop: the one place with side effects (files, logs, checkpoints, progress bar).

`prepare` builds everything a run needs from its config (mesh, data, model, optimizer, state
shapes); `train` runs or resumes a run in a directory; `evaluate` scores params on held-out data.
The step itself is the pure function in `research.train.step`, jitted here with explicit
shardings and the state donated.
"""

from __future__ import annotations

import contextlib
import functools
import json
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
from research.config import ConfigError, ExperimentConfig
from research.data.examples import Examples, example_iterator, load_examples
from research.data.pipeline import TokenCache, build_token_cache, eval_batches, train_iterator
from research.data.tokenizer import load_tokenizer
from research.models.decoder import Decoder, padded_vocab
from research.parallel.mesh import (AxisRules, axis_rules, batch_sharding, check_divisibility,
                                    make_mesh)
from research.train import flops, metrics
from research.train.checkpoint import Checkpointer
from research.train.optim import lr_multiplier, make_optimizer
from research.train.objectives import make_objective
from research.train.state import (StateSpec, init_state, load_initial_params, param_multipliers,
                                  param_specs, params_from_run, state_from_params, state_spec)
from research.train.step import eval_step, train_step

# Fields that may change when a run is resumed: they do not alter the training trajectory
# (train.steps extends or shortens the run; note a cosine schedule then follows the new length;
# a new mesh reshards the checkpoint on load and changes only float reduction order).
RESUMABLE_CHANGES = ("name", "train.steps", "train.log_every", "train.eval_every",
                     "train.eval_batches", "checkpoint", "logging", "mesh")


@dataclass(frozen=True)
class Setup:
    """Everything derived from a config before any state exists."""

    cfg: ExperimentConfig
    mesh: Mesh
    rules: AxisRules
    cache: TokenCache
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
    say(f"reading data.source={cfg.data.source!r} into the token cache ({cfg.data.cache_dir}) ...")
    started = time.perf_counter()
    cache = build_token_cache(cfg.data)
    say(f"token cache {cache.path.name[:12]}: {len(cache.train):,} train and {len(cache.heldout):,} "
        f"held-out tokens, ready in {time.perf_counter() - started:.1f}s")
    vocab = padded_vocab(cfg.model, cache.tokenizer.vocab_size)
    model = Decoder(cfg.model, vocab)
    example = jnp.zeros((1, cfg.train.seq_len), jnp.int32)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        multipliers = param_multipliers(model, example)
        tx = make_optimizer(cfg.optim, cfg.train.steps, param_specs(model, example), multipliers)
        spec = state_spec(model, tx, example, mesh, rules, multipliers,
                          reference=cfg.train.objective == "dpo")
    return Setup(cfg, mesh, rules, cache, model, vocab, tx,
                 lr_multiplier(cfg.optim, cfg.train.steps), spec)


def compile_train_step(setup: Setup, examples: Examples | None = None
                       ) -> tuple[Any, jax.Array]:
    """The jitted, compiled training step (state donated) and the peak lr it takes; call inside
    `setup.context()`."""
    cfg = setup.cfg
    replicated = NamedSharding(setup.mesh, PartitionSpec())
    step_fn = jax.jit(
        functools.partial(train_step, model=setup.model, tx=setup.tx,
                          lr_multiplier=setup.lr_multiplier, grad_accum=cfg.train.grad_accum,
                          objective=make_objective(cfg.train.objective, cfg.dpo)),
        in_shardings=(setup.spec.shardings, batch_sharding(setup.mesh), replicated),
        out_shardings=(setup.spec.shardings, None),
        donate_argnums=0,
    )
    batch_shape = {name: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding(setup.mesh))
                   for name, shape in _batch_shapes(cfg, examples).items()}
    peak_lr = jnp.asarray(cfg.optim.lr, jnp.float32)
    return step_fn.lower(setup.spec.abstract, batch_shape, peak_lr).compile(), peak_lr


def step_seconds(cfg: ExperimentConfig, steps: int = 3) -> float:
    """Seconds per training step of `cfg` on this machine: compile, one step to warm up, then the
    mean of `steps` more on real batches (for planning; nothing is written)."""
    setup = prepare(cfg)
    data = train_iterator(setup.cache, seq_len=cfg.train.seq_len, global_batch=cfg.train.batch_size,
                          seed=cfg.train.seed, process_index=jax.process_index(),
                          process_count=jax.process_count())
    with setup.context():
        state = init_state(setup.model, setup.tx, jnp.zeros((1, cfg.train.seq_len), jnp.int32),
                           setup.spec, cfg.train.seed)
        step_fn, peak_lr = compile_train_step(setup)
        batches = [jax.tree.map(setup.global_array, next(data)) for _ in range(steps + 1)]
        state, out = step_fn(state, batches[0], peak_lr)
        jax.block_until_ready(out)
        start = time.perf_counter()
        for batch in batches[1:]:
            state, out = step_fn(state, batch, peak_lr)
        jax.block_until_ready(out)
    return (time.perf_counter() - start) / steps


def evaluate(setup: Setup, params: Any, batches: list[np.ndarray],
             step_fn: Any | None = None) -> dict[str, float]:
    """Held-out loss (nats/token) and bits per byte over fixed batches."""
    if step_fn is None:
        step_fn = jax.jit(functools.partial(eval_step, model=setup.model))
    with setup.context():
        outs = [step_fn(params, setup.global_array(rows)) for rows in batches]
    totals = jax.device_get(jax.tree.map(lambda *xs: sum(xs), *outs))  # one host sync
    loss = float(totals["loss_sum"]) / float(totals["tokens"])
    return {"eval_loss": loss, "eval_bpb": loss / math.log(2) / setup.cache.heldout_bytes_per_token}


def _check_resumable(saved: ExperimentConfig, new: ExperimentConfig, path: Path) -> None:
    """Compared as resolved, so a config.yaml with derived sizes filled in (or from before they
    were) matches the null it was derived from."""
    def flat(d: dict, prefix: str = "") -> dict[str, Any]:
        out = {}
        for key, value in d.items():
            name = f"{prefix}{key}"
            out.update(flat(value, name + ".") if isinstance(value, dict) else {name: value})
        return out

    tokenizer_vocab = load_tokenizer(new.data.tokenizer).vocab_size
    old, now = (flat(config_lib.resolved(c, padded_vocab(c.model, tokenizer_vocab)))
                for c in (saved, new))
    for key in sorted(old.keys() | now.keys()):
        if key.startswith(RESUMABLE_CHANGES) or old.get(key) == now.get(key):
            continue
        raise ConfigError(f"{key}: {now.get(key)!r} differs from {old.get(key)!r} in {path}; a run "
                          f"directory resumes with its own config (only {', '.join(RESUMABLE_CHANGES)} "
                          "may change): use a new --run-dir")


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


def _previous_final(run_dir: Path) -> dict[str, float]:
    """The last metrics a resumed run had reported (what a rerun of a finished run shows)."""
    path = run_dir / "summary.json"
    return json.loads(path.read_text()).get("final", {}) if path.is_file() else {}


def _latest_step(run_dir: Path, cfg: ExperimentConfig) -> int | None:
    """The run's latest checkpoint step, None when it has none (read-only: creates nothing)."""
    directory = run_dir / "checkpoints"
    if not directory.is_dir():
        return None
    return Checkpointer(directory, cfg.checkpoint, read_only=True).latest_step()


def _batch_shapes(cfg: ExperimentConfig, examples: Examples | None) -> dict[str, tuple[int, ...]]:
    """Global batch shapes: token windows [B, L+1], or the example rows' fields."""
    if examples is None:
        return {"tokens": (cfg.train.batch_size, cfg.train.seq_len + 1)}
    return {name: (cfg.train.batch_size, *rows.shape[1:]) for name, rows in examples.rows.items()}


def load_run_config(run_dir: Path) -> ExperimentConfig:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml)")
    return config_lib.validate(config_lib.read_yaml(path))


def train(cfg: ExperimentConfig, run_dir: Path,
          devices: list[jax.Device] | None = None) -> dict[str, Any]:
    """Train (or resume) the run in `run_dir`; returns the final summary."""
    run_dir = Path(run_dir)
    is_lead = jax.process_index() == 0
    say = (lambda message: print(message, flush=True)) if is_lead else _quiet
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: is a file; a run directory is a folder")
    config_path = run_dir / "config.yaml"
    # A run directory whose only checkpoint is step 0 (what `import-hf` writes) is a starting
    # point, not a run in progress: an experiment trains it with its own data, optimizer and
    # schedule, as long as its model section describes the same model.
    latest = _latest_step(run_dir, cfg)
    starting_point = config_path.exists() and latest == 0
    if starting_point and cfg.model.init_from is not None:
        raise ConfigError(f"model.init_from: {run_dir} already holds its step-0 weights; drop "
                          "model.init_from or use a new --run-dir")
    if config_path.exists() and not starting_point:
        _check_resumable(load_run_config(run_dir), cfg, config_path)
    # Everything that can fail on a bad config (shapes, data, held-out split, examples,
    # init_from) before anything is written, so a refused start leaves no run directory behind.
    setup = prepare(cfg, devices, say)
    examples = None if cfg.train.objective == "lm" else load_examples(cfg, setup.cache.tokenizer)
    initial_params, weights_from = None, cfg.model.init_from
    if starting_point:
        weights_from = f"{run_dir}@0"
        with setup.context():
            initial_params = params_from_run(setup.spec, cfg, run_dir, 0)
    elif cfg.model.init_from is not None and latest is None:
        with setup.context():
            initial_params = load_initial_params(setup.spec, cfg)

    def data_iterator() -> grain.DatasetIterator:
        shards = dict(global_batch=cfg.train.batch_size, seed=cfg.train.seed,
                      process_index=jax.process_index(), process_count=jax.process_count())
        if examples is None:
            return train_iterator(setup.cache, seq_len=cfg.train.seq_len, **shards)
        return example_iterator(examples, **shards)

    data = data_iterator()
    heldout = eval_batches(setup.cache, seq_len=cfg.train.seq_len, global_batch=cfg.train.batch_size,
                           n_batches=cfg.train.eval_batches, process_index=jax.process_index(),
                           process_count=jax.process_count())
    resolved_yaml = config_lib.to_yaml(config_lib.resolved(cfg, setup.vocab_size))
    if is_lead:
        run_dir.mkdir(parents=True, exist_ok=True)
        config_path.write_text(resolved_yaml)

    checkpoints = Checkpointer(run_dir / "checkpoints", cfg.checkpoint)
    started = time.perf_counter()
    with setup.context():
        start, state, notes = ((None, None, []) if starting_point
                               else checkpoints.resume(setup.spec.abstract, data))
        for note in notes if is_lead else []:
            print(note, file=sys.stderr, flush=True)
        if start is not None:
            say(f"resuming from step {start} (its checkpoint in {run_dir / 'checkpoints'})")
        if start is None:
            start = 0
            if notes:
                data = data_iterator()  # a failed restore may have moved it
            if initial_params is not None:
                say(f"starting from the weights of {weights_from}")
                state = state_from_params(initial_params, setup.tx, setup.spec, cfg.train.seed)
            else:
                say(f"initialising {cfg.model.n_layers} layers, d_model={cfg.model.d_model} ...")
                state = init_state(setup.model, setup.tx,
                                   jnp.zeros((1, cfg.train.seq_len), jnp.int32), setup.spec,
                                   cfg.train.seed)
    say(f"state ready in {time.perf_counter() - started:.1f}s")
    finished = start >= cfg.train.steps
    if finished:
        say(f"already finished at step {start} (train.steps={cfg.train.steps}); nothing to train "
            "(raise train.steps to continue it)")

    counts = flops.param_counts(cfg.model, setup.vocab_size)
    rows_per_example = 2 if cfg.train.objective == "dpo" else 1  # a pair is two rows
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len * rows_per_example
    flops_per_token = flops.flops_per_token(cfg.model, setup.vocab_size, cfg.train.seq_len)
    peak = metrics.peak_flops(cfg.model.compute_dtype, cfg.logging.peak_flops) * jax.process_count()
    summary: dict[str, Any] = {
        "name": cfg.name, "state": "running", "step": start, "steps": cfg.train.steps,
        **{f"params_{k}": v for k, v in counts.items()},
        "flops_per_token": flops_per_token, "tokens_per_step": tokens_per_step,
        "peak_flops": peak, "error": None, "final": _previous_final(run_dir) if start else {},
    }
    log = metrics.RunLog(run_dir, resume_step=start, tensorboard=cfg.logging.tensorboard,
                         enabled=is_lead)
    profiler = metrics.StepProfiler(run_dir / "tb", cfg.logging.profile_steps)
    if examples is not None:
        summary["examples"] = examples.counts
        say(f"{cfg.examples.source} examples: {examples.summary()}")
    if start == 0:
        log.text("config", resolved_yaml)
        log.text("parameters", "\n".join(f"{k:>14}: {v:,}" for k, v in counts.items()))

    def save_summary(**changes: Any) -> None:
        summary.update(changes)
        if is_lead:
            metrics.write_json(run_dir / "summary.json", summary)

    with _stop_between_steps() as stop_requested:
        save_summary()
        with setup.context():
            # Compile ahead of the loop, so step times (and MFU) never include compilation.
            compile_start = time.perf_counter()
            if not finished:
                say("compiling the train step ...")
                step_fn, peak_lr = compile_train_step(setup, examples)
                summary["compile_seconds"] = time.perf_counter() - compile_start
                say(f"compiled in {summary['compile_seconds']:.1f}s; training steps "
                    f"{start + 1}-{cfg.train.steps}")
            eval_fn = jax.jit(functools.partial(eval_step, model=setup.model),
                              in_shardings=(setup.spec.shardings["params"], batch_sharding(setup.mesh)))

        progress = metrics.Progress(cfg.name, cfg.train.steps, start,
                                    enabled=is_lead and cfg.logging.progress)
        reached = fetched = saved = start

        def checkpoint(step: int) -> None:
            nonlocal saved
            checkpoints.save(step, state, data, {"step": step, "config": cfg.to_dict()})
            saved = step

        def save_first() -> str:
            """After a failure: checkpoint the latest completed step unless it is, and say so."""
            if reached > saved:
                try:
                    checkpoint(reached)
                    checkpoints.finish()
                except Exception as exc:
                    latest = checkpoints.latest_step()
                    return (f"step {reached} could not be checkpointed ({type(exc).__name__}: "
                            f"{exc}); latest checkpoint: {f'step {latest}' if latest else 'none'}")
            return f"step {reached} is checkpointed: run the same command again to resume"

        try:
            last_time, last_step = time.perf_counter(), start
            for step in range(start + 1, cfg.train.steps + 1):
                if stop_requested:
                    raise KeyboardInterrupt
                profiler.before(step)
                with setup.context():
                    batch = jax.tree.map(setup.global_array, next(data))
                    fetched = step  # the data iterator is now one step ahead of the state
                    state, step_metrics = step_fn(state, batch, peak_lr)
                profiler.after(step, state)
                reached = step
                progress.update(step)
                if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                    values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                    if not math.isfinite(values["loss"]):
                        raise FloatingPointError(f"non-finite loss at step {step}")
                    now = time.perf_counter()
                    step_time = (now - last_time) / (step - last_step)
                    tokens_per_sec = tokens_per_step / step_time
                    values.update(step_time=step_time, tokens_per_sec=tokens_per_sec,
                                  mfu=flops_per_token * tokens_per_sec / peak,
                                  tokens=step * tokens_per_step)
                    log.write(step, values, "train")
                    progress.metrics(loss=f"{values['loss']:.4f}", tok_s=f"{tokens_per_sec:,.0f}",
                                     mfu=f"{values['mfu']:.1%}")
                    summary["final"].update(values)
                    last_time, last_step = time.perf_counter(), step
                if step % cfg.train.eval_every == 0 or step == cfg.train.steps:
                    scores = evaluate(setup, state["params"], heldout, eval_fn)
                    log.write(step, scores, "eval")
                    summary["final"].update(scores)
                    if is_lead:
                        progress.write(f"step {step}: eval loss {scores['eval_loss']:.4f}, "
                                   f"{scores['eval_bpb']:.4f} bits/byte")
                    save_summary(step=step)
                    last_time = time.perf_counter()  # eval time is not step time
                if step % cfg.checkpoint.every == 0 or step == cfg.train.steps:
                    checkpoint(step)
        except BaseException as exc:
            # Save first: whatever failed (eval, logging, a full disk, a signal), the steps
            # trained since the last checkpoint are kept, unless the state itself went bad.
            # (not after a step that failed half-way: the data iterator is then one step ahead)
            if reached and (fetched == reached or reached == saved) and \
                    not isinstance(exc, FloatingPointError):
                exc.add_note(save_first())
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
            progress.close()
            log.close()
            save_summary(step=reached)
    return summary
