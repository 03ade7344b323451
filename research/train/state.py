"""Train state and its sharded initialisation.

The state is a plain dict pytree {params, opt_state, step, rng}: orbax saves it as is, and its
shardings come from the logical names the model gives its parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from research.models import parameterization
from research.parallel.mesh import AxisRules, logical_shardings

TrainState = dict[str, Any]


@dataclass(frozen=True)
class StateSpec:
    """What a run needs to build, restore and step its state: shapes, shardings, optimizer."""

    abstract: TrainState  # ShapeDtypeStructs carrying their shardings (orbax restore target)
    shardings: TrainState
    param_specs: Any  # logical PartitionSpecs of the params
    multipliers: Any  # a parameterization.Rule per param


def _fresh(params: Any, tx: optax.GradientTransformation, state_rng: jax.Array) -> TrainState:
    """Step 0 around `params`: a new optimizer state and the step's RNG."""
    return {
        "params": params,
        "opt_state": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
        "rng": state_rng,
    }


def _init_fn(model: nn.Module, tx: optax.GradientTransformation, example: jax.Array,
             multipliers: Any):
    def init(rng: jax.Array) -> TrainState:
        init_rng, state_rng = jax.random.split(rng)
        params = model.init(init_rng, example)["params"]
        # every scaled init is normal(std): scaling the draw gives normal(std * multiplier)
        params = jax.tree.map(lambda rule, p: p if rule.init == 1.0 else
                              p.replace_boxed(p.value * rule.init),
                              multipliers, params,
                              is_leaf=lambda x: isinstance(x, parameterization.Rule))
        return _fresh(params, tx, state_rng)

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
        model.clone(cfg=parameterization.base_width_config(model.cfg)))
    return parameterization.rules(model.cfg, nn.get_partition_spec(boxed), _strip_names(boxed),
                                  _strip_names(base))


def state_spec(model: nn.Module, tx: optax.GradientTransformation, example: jax.Array,
               mesh: Mesh, rules: AxisRules, multipliers: Any) -> StateSpec:
    boxed = jax.eval_shape(_init_fn(model, tx, example, multipliers), jax.random.PRNGKey(0))
    shardings = logical_shardings(boxed, mesh, rules)
    abstract = jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        _strip_names(boxed), shardings,
    )
    return StateSpec(abstract, shardings, nn.get_partition_spec(boxed["params"]), multipliers)


def init_state(model: nn.Module, tx: optax.GradientTransformation, example: jax.Array,
               spec: StateSpec, seed: int) -> TrainState:
    """Initialise directly into the target shardings (no full copy on any one device)."""
    init = _init_fn(model, tx, example, spec.multipliers)
    return jax.jit(lambda rng: nn.meta.unbox(init(rng)), out_shardings=spec.shardings)(
        jax.random.PRNGKey(seed)
    )


def state_from_params(params: Any, tx: optax.GradientTransformation, spec: StateSpec,
                      seed: int) -> TrainState:
    """A step-0 state around given (already sharded) params, e.g. imported weights: the same
    optimizer state and RNG as `init_state` would give, in the target shardings."""
    state_rng = jax.random.split(jax.random.PRNGKey(seed))[1]
    return jax.jit(lambda p: _fresh(p, tx, state_rng), out_shardings=spec.shardings)(params)
