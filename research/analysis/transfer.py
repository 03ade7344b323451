"""Learning-rate transfer: final eval loss against peak learning rate, one curve per model size.

A folder whose runs sweep `optim.lr` together with a size (`model.d_model` or `model.n_layers`),
optionally under several `model.parameterization`s, is a transfer grid. For each
parameterization every size gets its best learning rate (the grid's argmin, refined by a
parabola through it and its two neighbours in log2(lr) when it is interior), and the optimum's
drift is log2(best lr at the largest size / best lr at the smallest), in octaves: 0 means the
learning rate tuned on the smallest model is the right one at the largest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from research.analysis.runs import Run, finished, format_value

SIZES = ("model.d_model", "model.n_layers")
LR = "optim.lr"
PARAMETERIZATION = "model.parameterization"


@dataclass(frozen=True)
class Curve:
    size: int
    lrs: np.ndarray  # ascending
    losses: np.ndarray
    best_lr: float
    best_loss: float


@dataclass(frozen=True)
class Transfer:
    size_field: str
    parameterization: str
    curves: list[Curve]  # ascending size

    @property
    def drift(self) -> float:
        """Octaves from the smallest size's best lr to the largest's (positive: it grows)."""
        return math.log2(self.curves[-1].best_lr / self.curves[0].best_lr)


def octaves(x: float) -> str:
    return f"{round(x, 2) + 0.0:+.2f}"  # + 0.0: no "-0.00"


def optimum(lrs: np.ndarray, losses: np.ndarray) -> tuple[float, float]:
    """(best lr, its loss): the argmin, or the vertex of the parabola in log2(lr) through it and
    its neighbours when it is interior (clamped to them)."""
    i = int(np.argmin(losses))
    if 0 < i < len(lrs) - 1:
        x, y = np.log2(lrs[i - 1:i + 2]), losses[i - 1:i + 2]
        a, b, c = np.polyfit(x, y, 2)
        if a > 0:
            vertex = float(np.clip(-b / (2 * a), x[0], x[-1]))
            return 2.0 ** vertex, float(np.polyval([a, b, c], vertex))
    return float(lrs[i]), float(losses[i])


def grids(runs: list[Run], rows: list[dict[str, Any]], fields: list[str]) -> list[Transfer]:
    """Every size x lr grid among the finished runs, per parameterization (needs >= 2 sizes with
    >= 3 learning rates each)."""
    if LR not in fields:
        return []
    out = []
    done = finished(runs, rows)
    for size_field in (f for f in SIZES if f in fields):
        groups: dict[str, dict[int, list[tuple[float, float]]]] = {}
        for run, r in done:
            p = run.values.get(PARAMETERIZATION) or run.config.get(PARAMETERIZATION) or "standard"
            size, lr = run.values.get(size_field), run.values.get(LR)
            if size is not None and lr is not None:
                groups.setdefault(p, {}).setdefault(int(size), []).append((lr, r["final_eval_loss"]))
        for p, by_size in groups.items():
            curves = []
            for size, points in sorted(by_size.items()):
                lrs, losses = np.array(sorted(points), float).T
                if len(lrs) >= 3:
                    curves.append(Curve(size, lrs, losses, *optimum(lrs, losses)))
            if len(curves) >= 2:
                out.append(Transfer(size_field, p, curves))
    return out


def table(transfers: list[Transfer]) -> tuple[list[str], list[list[str]]]:
    header = ["size field", "parameterization", "size", "best lr", "loss at best lr",
              "drift from the smallest (octaves)"]
    body = []
    for t in transfers:
        for c in t.curves:
            drift = math.log2(c.best_lr / t.curves[0].best_lr)
            body.append([t.size_field, t.parameterization, str(c.size), f"{c.best_lr:.3g}",
                         f"{c.best_loss:.4f}", octaves(drift)])
    return header, body


def figure(transfers: list[Transfer]) -> Any:
    """A panel per (size field, parameterization): loss against lr per size, optima starred."""
    from matplotlib import colormaps

    from research.analysis.plots import LOSS, _figure, _log, _title

    fig, axes = _figure(len(transfers))
    _title(fig, "Learning-rate transfer: final eval loss against peak lr, one curve per size")
    for t, ax in zip(transfers, axes):
        name = t.size_field.split(".")[-1]
        for i, c in enumerate(t.curves):
            color = colormaps["viridis"](i / max(len(t.curves) - 1, 1))
            ax.plot(c.lrs, c.losses, marker="o", color=color, label=f"{name}={format_value(c.size)}")
            ax.plot([c.best_lr], [c.best_loss], marker="*", ms=14, color=color, mec="black")
        _log(ax)
        ax.set_title(f"{t.parameterization}: optimum drifts {octaves(t.drift)} octaves",
                     fontsize="small")
        ax.set_xlabel("peak learning rate")
        ax.set_ylabel(LOSS)
        ax.legend(fontsize="x-small")
    return fig
