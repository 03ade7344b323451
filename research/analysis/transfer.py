"""Learning-rate transfer: final eval loss against peak learning rate, one curve per model size.

A folder whose runs sweep `optim.lr` together with a size (`model.d_model` or `model.n_layers`),
optionally under several `model.parameterization`s, is a transfer grid. For each
parameterization every size gets its best learning rate (the grid's argmin of the mean over
seeds, refined by a parabola through it and its two neighbours in log2(lr) when it is interior),
and the optimum's drift is log2(best lr at the largest size / best lr at the smallest), in
octaves: 0 means the learning rate tuned on the smallest model is the right one at the largest.
An optimum on the edge of the grid has an unknown drift: the true one lies beyond the grid.

Drift alone says nothing about the model it lands on, so each size also gets the *transfer
gap*: the loss of the transferred model (the smallest size's best grid lr, used as is) minus the
best loss any parameterization in the folder reaches at that size, tuned over lr, with Welch's
test against seed noise when both have seeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from research.analysis.replicates import Comparison, compare
from research.analysis.runs import Run, finished, format_value

SIZES = ("model.d_model", "model.n_layers")
LR = "optim.lr"
PARAMETERIZATION = "model.parameterization"
UNKNOWN = "beyond the grid, drift unknown"


@dataclass(frozen=True)
class Curve:
    size: int
    lrs: np.ndarray  # ascending, distinct
    seeds: tuple[tuple[float, ...], ...]  # each lr's final eval losses, one per seed
    losses: np.ndarray  # each lr's mean over seeds
    best_lr: float
    best_loss: float

    @property
    def best(self) -> int:
        """Index of the grid's best lr (lowest mean)."""
        return int(np.argmin(self.losses))

    @property
    def at_edge(self) -> bool:
        """The grid's best is its smallest or largest lr: the optimum may lie beyond it."""
        return self.best in (0, len(self.lrs) - 1)

    def at(self, lr: float) -> tuple[float, ...] | None:
        """The losses at this lr (None if it was not run at this size)."""
        hits = [s for x, s in zip(self.lrs, self.seeds) if math.isclose(x, lr, rel_tol=1e-9)]
        return hits[0] if hits else None


@dataclass(frozen=True)
class Transfer:
    size_field: str
    parameterization: str
    curves: list[Curve]  # ascending size

    def drift_to(self, curve: Curve) -> float | None:
        """Octaves from the smallest size's best lr to `curve`'s (positive: it grows); None when
        either optimum is on the edge of its grid."""
        base = self.curves[0]
        if base.at_edge or curve.at_edge:
            return None
        return math.log2(curve.best_lr / base.best_lr)

    @property
    def drift(self) -> float | None:
        return self.drift_to(self.curves[-1])

    @property
    def base_lr(self) -> float:
        """The smallest size's best grid lr: what a transferred model trains with."""
        return float(self.curves[0].lrs[self.curves[0].best])


@dataclass(frozen=True)
class Gap:
    """The transferred model at one size against the best one tuned directly at that size."""

    transferred: tuple[float, ...]
    tuned: tuple[float, ...]
    tuned_by: str  # "standard at lr 0.002"
    comparison: Comparison  # transferred minus tuned


def octaves(x: float | None) -> str:
    return UNKNOWN if x is None else f"{round(x, 2) + 0.0:+.2f}"  # + 0.0: no "-0.00"


def describe(losses: tuple[float, ...]) -> str:
    """`mean ± sd (n seeds)`, or the one loss."""
    if len(losses) == 1:
        return f"{losses[0]:.4f}"
    return f"{np.mean(losses):.4f} ± {np.std(losses, ddof=1):.4f} ({len(losses)} seeds)"


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


def curve(size: int, points: list[tuple[float, float]]) -> Curve:
    """(lr, loss) pairs of one size, seeds of one lr together."""
    by_lr: dict[float, list[float]] = {}
    for lr, loss in points:
        by_lr.setdefault(float(lr), []).append(float(loss))
    lrs = np.array(sorted(by_lr))
    seeds = tuple(tuple(by_lr[lr]) for lr in lrs)
    means = np.array([np.mean(s) for s in seeds])
    return Curve(size, lrs, seeds, means, *optimum(lrs, means))


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
            curves = [curve(size, points) for size, points in sorted(by_size.items())]
            curves = [c for c in curves if len(c.lrs) >= 3]
            if len(curves) >= 2:
                out.append(Transfer(size_field, p, curves))
    return out


def gap(transfers: list[Transfer], t: Transfer, c: Curve) -> Gap | None:
    """`t`'s transferred model at `c`'s size against the best tuned there by any transfer of the
    same size field (None when the base's best lr was not run at that size)."""
    transferred = c.at(t.base_lr)
    if transferred is None:
        return None
    rivals = [(float(k.losses[k.best]), k, o) for o in transfers
              if o.size_field == t.size_field for k in o.curves if k.size == c.size]
    _, best, owner = min(rivals, key=lambda r: r[0])
    tuned = best.seeds[best.best]
    return Gap(transferred, tuned, f"{owner.parameterization} at lr {best.lrs[best.best]:.3g}",
               compare(tuned, transferred))


def gap_text(g: Gap | None) -> str:
    if g is None:
        return "not run at the base's lr"
    d = g.comparison.difference
    if not g.comparison.tested:
        return f"{d:+.4f} (one seed: noise unknown)"
    return f"{d:+.4f} (p = {g.comparison.p_value:.2g})"


def wider_is_better(t: Transfer) -> list[tuple[float, Comparison]]:
    """At each lr within one octave of the base's best: largest size minus smallest (a negative
    difference: the larger model is better), where both sizes ran it."""
    small, large = t.curves[0], t.curves[-1]
    out = []
    for lr, losses in zip(small.lrs, small.seeds):
        if abs(math.log2(lr / t.base_lr)) <= 1 + 1e-9 and (wide := large.at(lr)) is not None:
            out.append((float(lr), compare(losses, wide)))
    return out


def table(transfers: list[Transfer]) -> tuple[list[str], list[list[str]]]:
    header = ["size field", "parameterization", "size", "best lr", "loss at the best grid lr",
              "drift from the smallest (octaves)", "at the base's best lr", "best tuned here",
              "transfer gap"]
    body = []
    for t in transfers:
        for c in t.curves:
            g = gap(transfers, t, c)
            best_lr = f"{c.best_lr:.3g}" + (" (grid edge)" if c.at_edge else "")
            body.append([t.size_field, t.parameterization, str(c.size), best_lr,
                         describe(c.seeds[c.best]), octaves(t.drift_to(c)),
                         "" if g is None else describe(g.transferred),
                         "" if g is None else f"{describe(g.tuned)}, {g.tuned_by}", gap_text(g)])
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
            spread = [np.std(s, ddof=1) if len(s) > 1 else 0.0 for s in c.seeds]
            ax.errorbar(c.lrs, c.losses, yerr=spread, marker="o", color=color, capsize=3,
                        label=f"{name}={format_value(c.size)}")
            ax.plot([c.best_lr], [c.best_loss], marker="*", ms=14, color=color, mec="black")
        _log(ax)
        drift = UNKNOWN if t.drift is None else f"optimum drifts {octaves(t.drift)} octaves"
        ax.set_title(f"{t.parameterization}: {drift}", fontsize="small")
        ax.set_xlabel("peak learning rate")
        ax.set_ylabel(LOSS)
        ax.legend(fontsize="x-small")
    return fig
