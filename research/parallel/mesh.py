"""Device mesh from the config, logical axis rules, and the shardings of state and batch.

Models name their axes logically ("embed", "act_batch", ...); the rules in `mesh.rules` map
those names onto mesh axes. This module is the only place that turns names into shardings.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from research.config import ConfigError, ExperimentConfig, MeshConfig

AxisRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]
BATCH_AXES = ("data", "fsdp", "expert")  # mesh axes that split the batch dimension


def make_mesh(cfg: MeshConfig, devices: list[jax.Device] | None = None) -> Mesh:
    """A mesh over all (or the given) devices with Auto axes, so Linen's logical constraints work."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = cfg.shape(len(devices))
    return jax.make_mesh(
        tuple(sizes[name] for name in cfg.axis_names),
        cfg.axis_names,
        axis_types=(jax.sharding.AxisType.Auto,) * len(cfg.axis_names),
        devices=devices,
    )


def axis_rules(cfg: MeshConfig) -> AxisRules:
    """The config's rules in the form flax expects (an empty tuple means replicated)."""
    return tuple((logical, axes if axes else None) for logical, axes in cfg.rules)


def data_parallel_size(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[axis] for axis in BATCH_AXES]))


def logical_axis_size(name: str) -> int:
    """How many devices split the logical axis `name` under the rules in scope, on the current
    (abstract) mesh; 1 outside a mesh. For model code that lays data out per shard."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    spec = nn.logical_to_mesh_axes((name,))
    axes = spec[0] if spec else None
    axes = (axes,) if isinstance(axes, str) else (axes or ())
    return int(np.prod([mesh.shape[axis] for axis in axes]))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Token batches [batch, seq] are split over the batch axes and replicated over tensor."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, None))


def logical_shardings(abstract_boxed: Any, mesh: Mesh, rules: AxisRules) -> Any:
    """Shardings for a pytree whose leaves carry logical names (flax `LogicallyPartitioned`)."""
    return nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract_boxed), mesh, rules)


def check_process_rows(mesh: Mesh, global_batch: int) -> None:
    """Each process must own one contiguous block of batch rows, block p for process p: that is
    what the input pipeline reads for it (so the global batch is the same for any host count)."""
    per_process = global_batch // jax.process_count()
    want = set(range(jax.process_index() * per_process, (jax.process_index() + 1) * per_process))
    have: set[int] = set()
    for device, index in batch_sharding(mesh).devices_indices_map((global_batch, 1)).items():
        if device.process_index == jax.process_index():
            have.update(range(global_batch)[index[0]])
    if have != want:
        raise ConfigError(
            f"mesh: with {jax.process_count()} processes the batch must split over hosts first; "
            "make mesh.data a multiple of the process count (data parallel across hosts) and keep "
            "fsdp/expert/tensor within a host"
        )


def check_divisibility(cfg: ExperimentConfig, mesh: Mesh) -> None:
    """Fail early, naming the field, when the batch or the heads cannot be split over the mesh."""
    dp = data_parallel_size(mesh)
    micro = cfg.train.batch_size // cfg.train.grad_accum
    if micro % dp:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} / train.grad_accum={cfg.train.grad_accum} "
            f"= {micro} sequences per micro-batch must be divisible by the data-parallel size "
            f"{dp} (mesh.data*mesh.fsdp*mesh.expert)"
        )
    check_process_rows(mesh, cfg.train.batch_size)
    tensor = mesh.shape["tensor"]
    mixers = {mixer for mixer, _ in cfg.model.period}
    heads = []  # attention heads matter only where there is attention (not in pure Mamba)
    if "attention" in mixers:
        heads += [("model.n_heads", cfg.model.n_heads), ("model.n_kv_heads", cfg.model.kv_heads)]
    if "mamba" in mixers:
        heads.append(("Mamba heads (model.mamba.expand*d_model/head_dim)",
                      cfg.model.mamba.n_heads(cfg.model.d_model)))
    for field, value in heads:
        if value % tensor:
            raise ConfigError(f"{field}={value} must be divisible by mesh.tensor={tensor}")
