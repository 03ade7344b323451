"""Train state, its sharded initialisation, and starting from another run's weights.

The state is a plain dict pytree {params, opt_state, step, rng} (+ {reference}: the frozen
starting params DPO compares against; + {stability}: the guards' statistics, see
research/train/stability.py): orbax saves it as is, and its shardings come from the logical
names the model gives its parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from research import config as config_lib
from research.config import ConfigError, ExperimentConfig
from research.interop import hf
from research.models import parameterization
from research.parallel.mesh import AxisRules, logical_shardings
from research.train.rundir import RunDir

TrainState = dict[str, Any]


@dataclass(frozen=True)
class StateSpec:
    """What a run needs to build, restore and step its state: shapes, shardings, optimizer."""

    abstract: TrainState  # ShapeDtypeStructs carrying their shardings (orbax restore target)
    shardings: TrainState
    param_specs: Any  # logical PartitionSpecs of the params
    multipliers: Any  # a parameterization.Rule per param


def _fresh(params: Any, tx: optax.GradientTransformation, state_rng: jax.Array,
           guards: Any = None) -> TrainState:
    """Step 0 around `params`: a new optimizer state, the step's RNG, and the stability
    guards' initial statistics (when the run has any)."""
    state = {
        "params": params,
        "opt_state": _names_that_fit(tx.init(params)),
        "step": jnp.zeros((), jnp.int32),
        "rng": state_rng,
    }
    return state if guards is None else {**state, "stability": guards}


def _names_that_fit(opt_state: Any) -> Any:
    """Optimizer statistics shaped unlike their parameter (Adafactor's factored row and column
    moments) drop the parameter's logical names, which would not fit them: they are small and
    replicated."""
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
    return jax.tree.map(lambda x: x.value if is_box(x) and len(x.value.shape) != len(x.names) else x,
                        opt_state, is_leaf=is_box)


def _init_fn(model: nn.Module, tx: optax.GradientTransformation, example: jax.Array,
             multipliers: Any, reference: bool, guards: Any = None):
    def init(rng: jax.Array) -> TrainState:
        init_rng, state_rng = jax.random.split(rng)
        params = model.init(init_rng, example)["params"]
        # every scaled init is normal(std): scaling the draw gives normal(std * multiplier)
        params = jax.tree.map(lambda rule, p: p if rule.init == 1.0 else
                              p.replace_boxed(p.value * rule.init),
                              multipliers, params,
                              is_leaf=lambda x: isinstance(x, parameterization.Rule))
        state = _fresh(params, tx, state_rng, guards)
        return {**state, "reference": params} if reference else state

    return init


def _strip_names(tree: Any) -> Any:
    """Drop the logical-name boxes of shape-only leaves (nn.meta.unbox would apply constraints)."""
    return jax.tree.map(
        lambda leaf: leaf.unbox(apply_constraint=False) if isinstance(leaf, nn.meta.AxisMetadata) else leaf,
        tree, is_leaf=lambda leaf: isinstance(leaf, nn.meta.AxisMetadata),
    )


def param_specs(model: nn.Module, example: jax.Array) -> Any:
    """Logical PartitionSpecs of the params, from shapes alone (no compute)."""
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), example)["params"])
    return nn.get_partition_spec(boxed)


def param_multipliers(model: nn.Module, example: jax.Array) -> Any:
    """The parameterization's Rule for every param (see research/models/parameterization.py),
    against the same params of the model at its base width."""
    def shapes(m: nn.Module) -> Any:
        return jax.eval_shape(lambda: m.init(jax.random.key(0), example)["params"])

    boxed = shapes(model)
    base = boxed if model.cfg.parameterization == "standard" else shapes(
        model.clone(cfg=config_lib.base_width_config(model.cfg)))
    return parameterization.rules(model.cfg, nn.get_partition_spec(boxed), _strip_names(boxed),
                                  _strip_names(base))


def state_spec(model: nn.Module, tx: optax.GradientTransformation, example: jax.Array,
               mesh: Mesh, rules: AxisRules, multipliers: Any, *, reference: bool = False,
               guards: Any = None) -> StateSpec:
    """`guards`: stability.init_state(cfg.train), the state's "stability" entry (or None)."""
    boxed = jax.eval_shape(_init_fn(model, tx, example, multipliers, reference, guards),
                           jax.random.PRNGKey(0))
    shardings = logical_shardings(boxed, mesh, rules)
    abstract = jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        _strip_names(boxed), shardings,
    )
    return StateSpec(abstract, shardings, nn.get_partition_spec(boxed["params"]), multipliers)


def init_state(model: nn.Module, tx: optax.GradientTransformation, example: jax.Array,
               spec: StateSpec, seed: int) -> TrainState:
    """Initialise directly into the target shardings (no full copy on any one device)."""
    init = _init_fn(model, tx, example, spec.multipliers, "reference" in spec.abstract,
                    _initial_guards(spec))
    return jax.jit(lambda rng: nn.meta.unbox(init(rng)), out_shardings=spec.shardings)(
        jax.random.PRNGKey(seed)
    )


def _initial_guards(spec: StateSpec) -> Any:
    """The stability entry of a fresh state (all zeros), or None when the run has none."""
    guards = spec.abstract.get("stability")
    return None if guards is None else jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), guards)


def state_from_params(params: Any, tx: optax.GradientTransformation, spec: StateSpec,
                      seed: int) -> TrainState:
    """A step-0 state around given (already sharded) params, e.g. imported weights: the same
    optimizer state and RNG as `init_state` would give, in the target shardings. A DPO state's
    frozen reference is a copy of them (no buffer shared, so the state can be donated)."""
    state_rng = jax.random.split(jax.random.PRNGKey(seed))[1]
    shardings = {k: v for k, v in spec.shardings.items() if k != "reference"}
    state = jax.jit(lambda p: _fresh(p, tx, state_rng, _initial_guards(spec)),
                    out_shardings=shardings)(params)
    if "reference" in spec.shardings:
        state["reference"] = jax.tree.map(lambda x: x.copy(), state["params"])
    return state


def split_init_from(init_from: str) -> tuple[Path, int | None]:
    """"RUN_DIR[@STEP]" -> (RUN_DIR, STEP or None for the latest checkpoint)."""
    path, sep, step = init_from.rpartition("@")
    if sep and path and step.isdigit():
        return Path(path).expanduser(), int(step)
    return Path(init_from).expanduser(), None


def load_initial_params(spec: StateSpec, cfg: ExperimentConfig) -> Any:
    """The params a run starts from (`model.init_from`), sharded like `spec`.

    The one entry point for starting from earlier weights; it dispatches on what the path is:
    a run directory (RUN_DIR[@STEP]: that run's checkpoint, params only) or a Hugging Face
    model folder (research/interop/hf.py).
    """
    path, step = split_init_from(cfg.model.init_from)
    if RunDir(path).has_config():
        return params_from_run(spec, cfg, RunDir(path), step)
    folder = Path(cfg.model.init_from).expanduser()
    if (folder / "config.json").is_file():
        hf.check_init_from(cfg.model)
        return hf.load_params(folder, cfg.model, spec.abstract["params"])
    raise ConfigError(f"model.init_from: {cfg.model.init_from!r} is neither a run directory "
                      "(RUN_DIR[@STEP] with a config.yaml) nor a Hugging Face model folder (with "
                      "a config.json)")


def params_from_run(spec: StateSpec, cfg: ExperimentConfig, run: RunDir, step: int | None
                    ) -> Any:
    """Params of `run`'s checkpoint at `step` (default: its latest), verified against its
    digests. Its model section (but the fields that do not change the parameters, see
    config.fields_with_role) and tokenizer must equal this run's: the first difference is one
    line naming the field."""
    source = run.config()
    vocab = spec.abstract["params"]["embed"]["embedding"].shape[0]
    free = {name.removeprefix("model.") for name in config_lib.fields_with_role(
        *config_lib.ALL_ROLES) if name.startswith("model.")}
    difference = config_lib.first_difference(config_lib.resolved(cfg, vocab)["model"],
                                             config_lib.resolved(source, source.model.vocab_size
                                                                 or vocab)["model"],
                                             frozenset(free))
    if difference is not None:
        key, mine, theirs = difference
        raise ConfigError(f"model.init_from: model.{key} is {mine!r} here but {theirs!r} in "
                          f"{run.config_path}; the parameter shapes must match")
    if source.data.tokenizer != cfg.data.tokenizer:
        raise ConfigError(f"model.init_from: data.tokenizer is {cfg.data.tokenizer!r} here but "
                          f"{source.data.tokenizer!r} in {run.config_path}")
    try:
        return run.restore_params(spec.abstract["params"], step)
    except ConfigError as exc:
        raise ConfigError(f"model.init_from: {exc}") from None
