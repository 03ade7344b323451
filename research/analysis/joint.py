"""The joint scaling-law part of a report: Approach 3 beside Approach 2, the extrapolation check,
and in words how far the fits can be trusted.

`fit` turns points (finished runs or a CSV's rows) into fits.json entries, tables, figures
and a paragraph; research/analysis/report.py places them in the report, and
research/analysis/questions.py says whether Approach 2 and 3 agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from research.analysis import approach3, fits, plots
from research.analysis.points import Points
from research.analysis.sections import Figure, Section
from research.format import si

WIDE = 0.25  # an exponent interval wider than this fraction of the exponent is called wide
FEW_POINTS = 20


TITLE = "Approach 3: the joint law L(N, D)"


@dataclass
class Joint:
    """The fit (or why there is none), its fits.json entries and its report section."""

    record: dict[str, Any] = field(default_factory=dict)  # fits.json entries
    section: Section = field(default_factory=lambda: Section(TITLE))
    law: approach3.JointLaw | None = None
    declined: str = ""  # why there is no fit, when points were given


def holdout_mask(points: Points) -> np.ndarray:
    """True for the points of the largest compute budget (fits.group_budgets), held out of the fit."""
    held = np.zeros(len(points), bool)
    held[fits.group_budgets(points.flops)[-1]] = True
    return held


def law_table(law: approach3.JointLaw) -> tuple[list[str], list[list[str]]]:
    bands = law.intervals()
    body = [[name, f"{getattr(law, name):.4g}", "[{:.4g}, {:.4g}]".format(*bands[name])
             if name in bands else "–"] for name in (*approach3.NAMES, "a", "b")]
    return ["parameter", "fit", "95% bootstrap interval"], body


def _budgets(points: Points) -> list[float]:
    """Budgets to compare allocations at: the smallest and largest fitted, and 10x and 100x past."""
    low, high = float(points.flops.min()), float(points.flops.max())
    return [low, high, 10 * high, 100 * high] if high > low else [high, 10 * high, 100 * high]


def allocation_table(law: approach3.JointLaw, iso: fits.IsoFlop | None,
                     budgets: list[float]) -> tuple[list[str], list[list[str]]]:
    """Approach 2's and 3's exponents and tokens per parameter at a few budgets, side by side."""
    bands = law.intervals()
    band = lambda k: "[{:.3f}, {:.3f}]".format(*bands[k]) if k in bands else ""  # noqa: E731
    two = iso is not None and iso.params is not None
    body = [["N_opt ∝ C^a", iso.params.describe() if two else "–", f"{law.a:.3f} {band('a')}"],
            ["D_opt ∝ C^b", iso.tokens.describe() if two else "–", f"{law.b:.3f} {band('b')}"]]
    for c in budgets:
        opt = law.optimal(c)
        ratio3 = f"{opt['d_opt'][0] / opt['n_opt'][0]:.3g} (N {si(opt['n_opt'][0])})"
        ratio2 = (f"{iso.tokens(c) / iso.params(c):.3g} (N {si(float(iso.params(c)))})"
                  if two else "–")
        body.append([f"D/N at C = {si(c)}", ratio2, ratio3])
    return ["", "Approach 2 (IsoFLOP parabolas)", "Approach 3 (L(N, D)) [95%]"], body


def holdout_table(law: approach3.JointLaw, points: Points) -> tuple[list[str], list[list[str]],
                                                                     list[bool]]:
    header = ["held-out point", "N", "D", "C", "measured loss", "predicted [95%]", "inside"]
    body, inside = [], []
    for i, name in enumerate(points.names):
        value, low, high = law.predict(points.params[i], points.tokens[i])
        inside.append(bool(low <= points.loss[i] <= high))
        body.append([name, si(points.params[i]), si(points.tokens[i]), si(points.flops[i]),
                     f"{points.loss[i]:.4f}", f"{value:.4f} [{low:.4f}, {high:.4f}]",
                     "yes" if inside[-1] else "NO"])
    return header, body, inside


def trust(law: approach3.JointLaw, fitted: Points, iso: fits.IsoFlop | None,
          held: Points | None, inside: list[bool]) -> str:
    """What the fits mean, and each reason to doubt them that the numbers show."""
    bands = law.intervals()
    words = [f"Approach 3 fits {law.formula()} to {len(fitted)} points; at fixed compute it puts "
             f"N_opt ∝ C^{law.a:.3f} and D_opt ∝ C^{law.b:.3f}."]
    if len(fitted) < FEW_POINTS:
        words.append(f"Only {len(fitted)} points carry five parameters: treat the constants as a "
                     "rough summary, not a law.")
    wide = [k for k in ("alpha", "beta") if k in bands
            and bands[k][1] - bands[k][0] > WIDE * getattr(law, k)]
    if wide:
        words.append("The 95% intervals of " + " and ".join(wide) + " are wide (" + "; ".join(
            f"{k} {law.interval(k)}" for k in wide) + "): the points do not pin the exponents down.")
    if iso is not None:
        edge = [b for b in iso.budgets if b.n_opt is None]
        if edge:
            verb = "has" if len(edge) == 1 else "have"
            words.append(f"{len(edge)} of {len(iso.budgets)} IsoFLOP budgets {verb} no minimum "
                         "inside the sizes tried (" + "; ".join(f"C = {si(b.flops)}: {b.note}"
                                                                for b in edge)
                         + "): widen the sizes on that side before trusting Approach 2.")
    if held is not None:
        misses = len(inside) - sum(inside)
        words.append(f"Fitted without the largest budget ({len(held)} point"
                     f"{'s' * (len(held) != 1)}), the law predicted {sum(inside)} of them inside "
                     "its 95% prediction interval" + (f" and missed {misses}" if misses else "") + ".")
    else:
        words.append("Run `research analyze DIR --holdout largest` to see whether the law predicts "
                     "the largest budget from the smaller ones before betting compute on it.")
    span = float(fitted.flops.max())
    words.append(f"Predictions past C = {si(span)} FLOPs are extrapolations; each decade beyond "
                 "it multiplies the uncertainty the intervals do not fully capture (a different "
                 "regime, a learning rate tuned for small models).")
    return " ".join(words)


def fit(points: Points, iso: fits.IsoFlop | None, holdout: str | None = None,
        seed: int = 0) -> Joint:
    """Approach 3 fitted to `points` (less the held-out ones), and everything that reports it."""
    out = Joint()
    if not len(points):
        return out
    held_mask = holdout_mask(points) if holdout else np.zeros(len(points), bool)
    fitted, held = points.subset(~held_mask), points.subset(held_mask) if holdout else None
    try:
        law = approach3.fit_joint(fitted.params, fitted.tokens, fitted.loss, fitted.flops,
                                  seed=seed)
    except fits.FitError as exc:
        out.record["approach3"] = {"error": str(exc), "points": fitted.names}
        out.declined = str(exc)
        return out
    out.law = law
    out.record["approach3"] = {**law.record(), "flops_range": [float(fitted.flops.min()),
                                                               float(fitted.flops.max())],
                               "points": fitted.names}
    tables = out.section.tables
    tables += [("Approach 3: L(N, D) = E + A/N^α + B/D^β", law_table(law)),
               ("Compute-optimal allocation, Approach 2 and 3",
                allocation_table(law, iso, _budgets(fitted)))]
    inside: list[bool] = []
    if held is not None and len(held):
        header, body, inside = holdout_table(law, held)
        tables.append(("Extrapolation check: the largest budget, held out", (header, body)))
        out.record["holdout"] = {"held_out": held.names, "points": [
            {"name": name, "params": float(held.params[i]), "tokens": float(held.tokens[i]),
             "flops": float(held.flops[i]), "loss": float(held.loss[i]),
             "predicted": dict(zip(("value", "low", "high"),
                                   law.predict(held.params[i], held.tokens[i])))}
            for i, name in enumerate(held.names)]}
    out.section.figures += [
        Figure("joint_fit", "L(N, D): IsoFLOP slices and contours",
               lambda: plots.joint_fit(law, fitted, held)),
        Figure("extrapolation", "Predicted against measured loss",
               lambda: plots.extrapolation(law, fitted, held))]
    out.section.text = trust(law, fitted, iso, held, inside)
    return out
