"""Cooldown branches: a run that continues another run's full state (params, optimizer state,
data position) from one of its checkpoints, usually to decay the learning rate early.

With a warmup-stable-decay schedule, one long run at constant learning rate branched at several
steps into short cooldowns gives the loss of a fully trained model at each of those token counts
(Hägele et al. 2024). A branch is an ordinary run directory whose config says where it came from
(`branch.parent`, `branch.step`) and how its schedule ends (`optim.schedule_steps`: the parent's
horizon; `optim.cooldown_from`: where its own decay starts), so it resumes like any run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from research import config as config_lib
from research.config import ConfigError, ExperimentConfig
from research.data.tokenizer import load_tokenizer
from research.models.decoder import padded_vocab
from research.models.layers import backend
from research.train.rundir import RunDir

# Fields a branch sets itself, on top of those a resumed run may change.
BRANCH_FIELDS = frozenset({"branch.parent", "branch.step", "optim.schedule_steps",
                           "optim.cooldown_from"})


def parse_branch_from(text: str) -> tuple[Path, int]:
    """"RUN@STEP" -> (RUN, STEP)."""
    path, sep, step = text.rpartition("@")
    if not (sep and path and step.isdigit() and int(step) > 0):
        raise ConfigError(f"--branch-from {text!r}: expected RUN_DIR@STEP with STEP a positive "
                          "checkpoint step, e.g. runs/long@3000")
    return Path(path).expanduser(), int(step)


def read_parent(parent: Path, what: str) -> ExperimentConfig:
    try:
        return RunDir(parent).config()
    except ConfigError as exc:
        raise ConfigError(f"{what}: {exc}") from None


def cooldown_length(step: int, cooldown_fraction: float) -> int:
    """Cooldown steps K so that K is `cooldown_fraction` of the branch's S + K steps."""
    return max(round(step * cooldown_fraction / (1 - cooldown_fraction)), 1)


def overrides(parent_cfg: ExperimentConfig, parent: Path, step: int,
              cooldown_steps: int | None = None, cooldown_fraction: float | None = None,
              what: str = "--branch-from") -> list[str]:
    """The config overrides that make a run the branch of `parent` (whose config is
    `parent_cfg`) at `step`: with a cooldown of `cooldown_steps` (or `cooldown_fraction` of the
    branch's length) to min_lr_ratio, else keeping the parent's schedule to its end."""
    if parent_cfg.optim.cooldown_from is not None:
        raise ConfigError(f"{what}: {parent} is itself a cooldown branch; branch from its parent "
                          f"{parent_cfg.branch.parent}")
    if cooldown_fraction is not None:
        cooldown_steps = cooldown_length(step, cooldown_fraction)
    end = parent_cfg.train.steps if cooldown_steps is None else step + cooldown_steps
    if step >= parent_cfg.train.steps:
        raise ConfigError(f"{what}: step {step} is not before the end of {parent} "
                          f"(train.steps={parent_cfg.train.steps}): nothing is left to branch")
    if end > parent_cfg.train.steps:
        raise ConfigError(f"{what}: a cooldown of {cooldown_steps} steps from step {step} ends at "
                          f"{end}, past the {parent_cfg.train.steps} steps of {parent}'s schedule; "
                          f"at most {parent_cfg.train.steps - step}")
    horizon = parent_cfg.optim.schedule_steps or parent_cfg.train.steps
    out = [f"branch.parent={parent.absolute()}", f"branch.step={step}",
           f"optim.schedule_steps={horizon}", f"train.steps={end}"]
    return out + ([] if cooldown_steps is None else [f"optim.cooldown_from={step}"])


def check(cfg: ExperimentConfig) -> None:
    """Refuse a branch that is not a true continuation of its parent: a missing parent, a step
    it did not keep (or a damaged one), a setting that differs (but those a resumed run may
    change, and the branch's own; named), or an end past the parent's schedule."""
    parent, step = RunDir(Path(cfg.branch.parent)), cfg.branch.step
    what = f"branch.parent={parent.path}"
    source = read_parent(parent.path, what)
    vocab = load_tokenizer(cfg.data.tokenizer).vocab_size
    mine, theirs = (config_lib.resolved(c, padded_vocab(c.model, vocab), backend())
                    for c in (cfg, source))
    free = config_lib.fields_with_role(config_lib.BOOKKEEPING, config_lib.EXTENT) | BRANCH_FIELDS
    difference = config_lib.first_difference(mine, theirs, free)
    if difference is not None:
        key, here, there = difference
        raise ConfigError(f"{what}: {key} is {here!r} here but {there!r} in "
                          f"{parent.config_path}; a branch continues its parent's run with the "
                          "same settings")
    if cfg.optim.schedule_steps != (source.optim.schedule_steps or source.train.steps):
        raise ConfigError(f"{what}: optim.schedule_steps={cfg.optim.schedule_steps} must be the "
                          f"parent's train.steps={source.train.steps} (its schedule)")
    if cfg.train.steps > source.train.steps:
        raise ConfigError(f"{what}: train.steps={cfg.train.steps} runs past the parent's schedule "
                          f"(train.steps={source.train.steps})")
    parent.check_step(step, what)
    if problem := parent.checkpointer(source.checkpoint).damage(step):
        raise ConfigError(f"{what}: checkpoint {step} is damaged: {problem}")


def restore(cfg: ExperimentConfig, abstract_state: Any, data_iterator: Any) -> Any:
    """The parent's state at branch.step, verified against its digests, onto
    `abstract_state`'s shardings, and its data position into `data_iterator`."""
    try:
        state, _ = RunDir(Path(cfg.branch.parent)).restore(abstract_state, cfg.branch.step,
                                                           data_iterator)
    except ConfigError as exc:
        raise ConfigError(f"branch.parent={cfg.branch.parent}: {exc}") from None
    return state
