"""Coordinate check: does each activation keep its size as the model widens or deepens?

Each size of the model trains a few steps from the experiment's config; before the first step and
after each one, the mean |activation| of the embedding output, of every sublayer's output
(attention, mlp, moe, mamba; averaged over the layers), of the residual stream after each block
(averaged over the layers) and of the logits is taken on one fixed held-out batch. Under a
parameterization that transfers, these stay flat against width (and depth); under standard the
logits and, after a few steps, the hidden rows grow with width. The verdict per row is the
log-log slope of the last step's values against size, "flat" when |slope| <= the threshold.

Activations are read with flax's `capture_intermediates` (no module is edited for it), with
layers in a loop (`scan_layers=false`, the same math) so every layer's output is visible.
"""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from research import config as config_lib
from research.config import ConfigError, ExperimentConfig
from research.models.decoder import FFNS, MIXERS, Block, Decoder
from research.models.layers import Embed

SUBLAYERS = (*MIXERS, *FFNS)
HIDDEN = (*SUBLAYERS, "residual")  # the rows that must stay flat under μP/CompleteP


@dataclass(frozen=True)
class Check:
    """Mean |activation| of each row at each step, for one parameterization along one axis."""

    parameterization: str
    axis: str  # "width" (model.d_model) or "depth" (model.n_layers)
    sizes: tuple[int, ...]
    means: dict[str, np.ndarray]  # row -> [steps + 1, sizes]


def _captured(module: nn.Module, method: str) -> bool:
    return method == "__call__" and (isinstance(module, (Decoder, Embed, Block))
                                     or module.name in SUBLAYERS)


def _row(path: tuple[str, ...]) -> str:
    """Where a captured output came from -> its row name."""
    if not path:
        return "logits"
    if path[-1] == "embed":
        return "embedding"
    return "residual" if path[-1].startswith("layer_") else path[-1]


def activation_means(model: Decoder, params: Any, tokens: jax.Array) -> dict[str, jax.Array]:
    """Mean |activation| per row for a model with looped layers (rows present in the model)."""
    _, state = model.apply({"params": params}, tokens, capture_intermediates=_captured,
                           mutable=["intermediates"])
    per_row: dict[str, list[jax.Array]] = {}
    for path, outputs in traverse_util.flatten_dict(state["intermediates"]).items():
        out = outputs[0]
        value = out[0] if isinstance(out, tuple) else out  # sublayers return (y, aux)
        per_row.setdefault(_row(path[:-1]), []).append(jnp.abs(value.astype(jnp.float32)).mean())
    return {row: jnp.mean(jnp.stack(values)) for row, values in per_row.items()}


def measure(cfg: ExperimentConfig, steps: int) -> dict[str, np.ndarray]:
    """Train `cfg` for `steps` steps on one device; each row's mean |activation| [steps + 1]."""
    from research.data import mixture
    from research.train.loop import compile_train_step, prepare
    from research.train.state import init_state

    setup = prepare(cfg, jax.devices()[:1])
    seq = cfg.train.seq_len
    data = mixture.train_iterator(setup.data, seq_len=seq, global_batch=cfg.train.batch_size,
                                  seed=cfg.train.seed)
    sets = mixture.eval_sets(setup.data, seq_len=seq, global_batch=cfg.train.batch_size,
                             n_batches=1)
    probe = jnp.asarray(next(iter(sets.values()))[0])[:, :-1]  # the first source's held-out rows
    with setup.context():
        state = init_state(setup.model, setup.tx, jnp.zeros((1, seq), jnp.int32), setup.spec,
                           cfg.train.seed)
        step, knobs = compile_train_step(setup)
        means = jax.jit(functools.partial(activation_means, setup.model))
        history = [means(state["params"], probe)]
        for _ in range(steps):
            state, _ = step(state, {"tokens": setup.global_array(next(data)["tokens"])}, knobs)
            history.append(means(state["params"], probe))
    history = jax.device_get(history)
    return {row: np.array([h[row] for h in history], float) for row in history[0]}


def configs(experiment: str | None, overrides: list[str], parameterization: str, axis: str,
            sizes: list[int], other: int | None) -> list[ExperimentConfig]:
    """One validated config per size; the base shape is the config's own or the smallest size."""
    field, other_field = ("d_model", "n_layers") if axis == "width" else ("n_layers", "d_model")
    own_base = getattr(config_lib.load(experiment, overrides).model, f"base_{field}")
    base = {f"model.base_{field}": own_base or min(sizes)}
    if other is not None:
        base[f"model.{other_field}"] = other
    out = []
    for size in sizes:
        fixed = [f"model.{field}={size}", f"model.parameterization={parameterization}",
                 "model.scan_layers=false", "model.remat=none", "mesh.data=1",
                 *(f"{k}={v}" for k, v in base.items())]
        out.append(config_lib.load(experiment, [*overrides, *fixed]))
    return out


def run(experiment: str | None, overrides: list[str], parameterizations: list[str],
        widths: list[int], depths: list[int], steps: int) -> list[Check]:
    """Every config is checked before the first one trains (a ConfigError names the field)."""
    plan = []
    for p in parameterizations:
        if len(widths) > 1:
            plan.append((p, "width", widths, configs(experiment, overrides, p, "width", widths,
                                                     min(depths) if depths else None)))
        if len(depths) > 1:
            plan.append((p, "depth", depths, configs(experiment, overrides, p, "depth", depths,
                                                     min(widths) if widths else None)))
    if not plan:
        raise ConfigError("--widths or --depths: give at least two sizes to compare")
    checks = []
    for p, axis, sizes, cfgs in plan:
        measured = [measure(cfg, steps) for cfg in cfgs]
        rows = [r for r in measured[0] if all(r in m for m in measured)]
        checks.append(Check(p, axis, tuple(sizes),
                            {r: np.stack([m[r] for m in measured], axis=1) for r in rows}))
    return checks


def slope(sizes: tuple[int, ...], values: np.ndarray) -> float:
    """Least-squares slope of log(values) against log(sizes)."""
    return float(np.polyfit(np.log(sizes), np.log(values), 1)[0])


def table(checks: list[Check], threshold: float) -> list[dict[str, Any]]:
    """One row per (parameterization, axis, activation): the last step's slope and verdict."""
    rows = []
    for c in checks:
        for row, values in c.means.items():
            s = slope(c.sizes, values[-1])
            verdict = "flat" if abs(s) <= threshold else "grows" if s > 0 else "shrinks"
            rows.append({"parameterization": c.parameterization, "axis": c.axis,
                         "activation": row, "slope": s, "verdict": verdict})
    return rows


def figure(check: Check) -> Any:
    """One panel per step: mean |activation| of each row against size, log-log."""
    from research.analysis.plots import _figure, _log, _title

    steps = len(next(iter(check.means.values())))
    fig, axes = _figure(steps, width=4.0)
    _title(fig, f"Coordinate check, {check.parameterization}: mean |activation| against "
                f"{check.axis}")
    for step, ax in enumerate(axes):
        for row, values in check.means.items():
            ax.plot(check.sizes, values[step], marker="o", label=row)
        _log(ax, y=True)
        ax.set_title(f"step {step}", fontsize="small")
        ax.set_xlabel("d_model" if check.axis == "width" else "n_layers")
    axes[0].set_ylabel("mean |activation|")
    axes[0].legend(fontsize="x-small")
    return fig


def write(checks: list[Check], out: Path, threshold: float) -> list[dict[str, Any]]:
    """out/coordcheck_{parameterization}_{axis}.png, slopes.csv and slopes.md; returns the rows."""
    out.mkdir(parents=True, exist_ok=True)
    for check in checks:
        figure(check).savefig(out / f"coordcheck_{check.parameterization}_{check.axis}.png", dpi=90)
    rows = table(checks, threshold)
    with (out / "slopes.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"Log-log slope of mean |activation| against size at the last step; flat: |slope| "
             f"<= {threshold}.", "", "| parameterization | axis | activation | slope | verdict |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['parameterization']} | {r['axis']} | {r['activation']} | {r['slope']:+.2f} "
              f"| {r['verdict']} |" for r in rows]
    (out / "slopes.md").write_text("\n".join(lines) + "\n")
    return rows
