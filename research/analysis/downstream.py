"""Loss to accuracy: the OLMo ladder's two-step prediction of a task's accuracy from compute.

Step 1: the task loss (gold_bpb: bits per byte of the correct choice) of each run's final
checkpoint against its training compute C, as a saturating power law L(C) = E + A C^-alpha
(research/analysis/fits.py). Step 2: accuracy against task loss, over every downstream
evaluation of every run (intermediate checkpoints included, as OLMo does), as a sigmoid
acc(L) = b + a / (1 + exp(k (L - L0))): b is the floor (about chance), b + a the ceiling.
A prediction at C chains the two; its 95% interval comes from bootstrap resamples of both
steps' points (the i-th resample of each step paired). `holdout="largest"` leaves the runs of
the largest compute budget out of both fits and compares their predicted and measured accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import optimize

from research.analysis import fits
from research.analysis.sections import Part, Section
from research.analysis.runs import Run

PREFIX = "downstream/"
BOOTSTRAP = 200
MIN_ACC_POINTS = 6  # four parameters and something left to check them against


def sigmoid(loss: np.ndarray, a: float, b: float, k: float, l0: float) -> np.ndarray:
    return b + a / (1 + np.exp(np.clip(k * (np.asarray(loss, float) - l0), -50, 50)))


def _jacobian(loss: np.ndarray, a: float, b: float, k: float, l0: float) -> np.ndarray:
    """d sigmoid / d (a, b, k, L0), [points, 4]."""
    s = 1 / (1 + np.exp(np.clip(k * (loss - l0), -50, 50)))
    slope = -a * s * (1 - s)  # d sigmoid / d (k (L - L0))
    return np.stack([s, np.ones_like(s), slope * (loss - l0), -slope * k], axis=1)


def fit_sigmoid(loss: np.ndarray, acc: np.ndarray, start: np.ndarray | None = None) -> np.ndarray:
    """(a, b, k, L0) by least squares; raises FitError when the points cannot support it."""
    loss, acc = np.asarray(loss, float), np.asarray(acc, float)
    if len(loss) < MIN_ACC_POINTS or np.ptp(loss) == 0:
        raise fits.FitError(f"{len(loss)} (task loss, accuracy) points, need {MIN_ACC_POINTS} "
                            "with different losses")
    span = np.ptp(loss)
    if start is None:
        start = np.array([max(np.ptp(acc), 0.05), acc.min(), 4 / span, np.median(loss)])
    bounds = ([0, 0, 1e-3 / span, loss.min() - 3 * span], [1, 1, 1e3 / span, loss.max() + 3 * span])
    try:
        params, _ = optimize.curve_fit(sigmoid, loss, acc, p0=np.clip(start, *bounds),
                                       bounds=bounds, jac=_jacobian, max_nfev=2000)
    except (RuntimeError, ValueError) as exc:
        raise fits.FitError(f"the sigmoid did not converge ({exc})") from None
    return params


@dataclass(frozen=True)
class TwoStep:
    """A task's two fits and their paired bootstrap draws."""

    loss: fits.PowerLaw
    accuracy: np.ndarray  # (a, b, k, L0)
    accuracy_draws: np.ndarray  # [draws, 4]
    flops_range: tuple[float, float]

    def predict(self, flops: float) -> dict[str, tuple[float, float, float]]:
        """Task loss and accuracy at compute `flops`: (value, 2.5%, 97.5%) each."""
        loss = float(self.loss(flops))
        acc = float(sigmoid(loss, *self.accuracy))
        n = min(len(self.loss.draws), len(self.accuracy_draws))
        if not n:
            return {"loss": (loss, np.nan, np.nan), "accuracy": (acc, np.nan, np.nan)}
        e, a, alpha = self.loss.draws[:n].T
        losses = e + a * flops ** -alpha
        accs = np.array([sigmoid(l, *p) for l, p in zip(losses, self.accuracy_draws[:n])])
        band = lambda v: tuple(np.percentile(v, [2.5, 97.5]).tolist())  # noqa: E731
        return {"loss": (loss, *band(losses)), "accuracy": (acc, *band(accs))}

    def record(self) -> dict[str, Any]:
        return {"loss": {"E": self.loss.E, "A": self.loss.A, "alpha": self.loss.alpha,
                         "draws": self.loss.draws.tolist()},
                "accuracy": {**dict(zip(("a", "b", "k", "L0"), self.accuracy.tolist())),
                             "draws": self.accuracy_draws.tolist()},
                "flops_range": list(self.flops_range)}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> TwoStep:
        loss, acc = record["loss"], record["accuracy"]
        law = fits.PowerLaw(loss["E"], loss["A"], loss["alpha"], 0,
                            draws=np.asarray(loss["draws"], float).reshape(-1, 3))
        return cls(law, np.array([acc[k] for k in ("a", "b", "k", "L0")]),
                   np.asarray(acc["draws"], float).reshape(-1, 4), tuple(record["flops_range"]))

    def describe(self) -> tuple[str, str]:
        a, b, k, l0 = self.accuracy
        return (self.loss.formula("C").replace("L =", "bpb ="),
                f"acc = {b:.3g} + {a:.3g}/(1 + e^({k:.3g}(bpb - {l0:.3g})))")


def fit_two_step(flops: np.ndarray, final_loss: np.ndarray, loss: np.ndarray, acc: np.ndarray,
                 seed: int = 0) -> TwoStep:
    """Step 1 on (flops, final_loss) per run, step 2 on every (loss, acc) point."""
    law = fits.fit_power_law(flops, final_loss, seed=seed)
    params = fit_sigmoid(loss, acc)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(len(law.draws)):
        pick = rng.integers(0, len(loss), len(loss))
        try:
            draws.append(fit_sigmoid(loss[pick], acc[pick], params))
        except fits.FitError:
            continue
    return TwoStep(law, params, np.array(draws).reshape(-1, 4),
                   (float(np.min(flops)), float(np.max(flops))))


def task_names(runs: list[Run]) -> list[str]:
    names = {tag[len(PREFIX):-len("/gold_bpb")] for run in runs for tag in run.scalars
             if tag.startswith(PREFIX) and tag.endswith("/gold_bpb")}
    return sorted(names)


def _points(finished: list[tuple[Run, dict[str, Any]]], task: str) -> tuple[list[str], ...]:
    """Per run (name, C, final task loss, final accuracy), and every (task loss, accuracy) point
    with the index of its run."""
    names, flops, final_loss, final_acc, loss, acc, owner = [], [], [], [], [], [], []
    for run, row in finished:
        bpb = dict(run.series(f"{PREFIX}{task}/gold_bpb"))
        accuracy = dict(run.series(f"{PREFIX}{task}/acc"))
        steps = sorted(bpb.keys() & accuracy.keys())
        if not steps or row.get("flops") is None:
            continue
        names.append(row["run"])
        flops.append(row["flops"])
        final_loss.append(bpb[steps[-1]])
        final_acc.append(accuracy[steps[-1]])
        loss += [bpb[s] for s in steps]
        acc += [accuracy[s] for s in steps]
        owner += [len(names) - 1] * len(steps)
    return names, *(np.array(v, float) for v in (flops, final_loss, final_acc, loss, acc)), \
        np.array(owner, int)


def section(runs: list[Run], finished: list[tuple[Run, dict[str, Any]]],
            holdout: str | None = None, seed: int = 0) -> Part:
    """fits.json's "downstream" entry, a table and a paragraph, for runs with downstream metrics;
    a task whose fit is declined is a line for Omitted."""
    out = Part()
    tasks = task_names(runs)
    if not tasks:
        return out
    record: dict[str, Any] = {}
    body = []
    for task in tasks:
        names, flops, final_loss, final_acc, loss, acc, owner = _points(finished, task)
        held = np.zeros(len(names), bool)
        if holdout and len(names):
            held[fits.group_budgets(flops)[-1]] = True
        kept = ~held[owner]
        try:
            law = fit_two_step(flops[~held], final_loss[~held], loss[kept], acc[kept], seed)
        except fits.FitError as exc:
            record[task] = {"error": str(exc)}
            out.omitted.append(f"Downstream accuracy of {task}: no fit ({exc}).")
            continue
        record[task] = law.record()
        largest = law.flops_range[1]
        at = {c: law.predict(c)["accuracy"] for c in (largest, 10 * largest)}
        step1, step2 = law.describe()
        check = "–"
        if held.any():
            checks = [(n, law.predict(c)["accuracy"], a)
                      for n, c, a in zip(np.array(names)[held], flops[held], final_acc[held])]
            record[task]["holdout"] = [{"name": n, "predicted": list(p), "measured": float(a)}
                                       for n, p, a in checks]
            check = "; ".join(f"{p[0]:.3f} [{p[1]:.3f}, {p[2]:.3f}] vs {a:.3f}"
                              for _, p, a in checks)
        body.append([task, str(len(names) - int(held.sum())), step1, step2,
                     *(f"{v:.3f} [{lo:.3f}, {hi:.3f}]" for v, lo, hi in at.values()), check])
    out.record["downstream"] = record
    if body:
        header = ["task", "runs", "step 1: task loss against C", "step 2: accuracy against task "
                  "loss", "accuracy at the largest C", "at 10x that", "held-out runs: predicted "
                  "vs measured"]
        out.section = Section(
            "Downstream accuracy", "Downstream accuracy, predicted in two steps (compute -> task "
            "loss -> accuracy, 95% bootstrap intervals): see the table.",
            [("Downstream: task loss and accuracy from compute (two-step)", (header, body))])
    return out
