"""Mixture laws: from the metrics of runs at several data mixtures to a proposed mix.

Two regressors from the weights p (on the simplex) to a metric y, each fitted by least squares
from several starts:

    log_linear   y = exp(c) + exp(theta . p)            (Olmix; K + 1 parameters)
    mixing_law   y = c + k exp(t . p)                    (Data Mixing Laws, Ye et al. 2024)

On the simplex the mixing law's k folds into t (sum p = 1), so both have K + 1 free parameters;
they differ in that the mixing law's floor c may take any sign and k may be negative. Each is
judged by leave-k-out cross-validation over the mixtures (k = ceil(n / 5), seeded folds): the
root-mean-square error and the Spearman rank correlation of held-out predictions; the better one
has the lower error on the objective.

The objective is a weighted sum of metrics (by default their mean, e.g. a macro average of
per-domain losses), predicted as the same sum of the per-metric laws: a single exponential of a
linear form has its optimum at a corner, the mean of several need not. The proposal minimizes it
over {p : sum p = 1, 0 <= p <= cap} plus an optional pull lambda * KL(p || natural) (SLSQP from
several starts); its interval is the 2.5-97.5 percentile of the objective at the proposal under
laws refitted to bootstrap resamples of the mixtures.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import optimize, stats

from research.config import ConfigError
from research.sweep.swarm import (CV_FOLDS, law_parameters, min_trials, project, rounded,
                                    weight_key)

FORMS = ("log_linear", "mixing_law")
FORMULAS = {"log_linear": "y = exp(c) + exp(θ·p)", "mixing_law": "y = c + k·exp(t·p)"}
TITLES = {"log_linear": "log-linear law (Olmix)", "mixing_law": "Data Mixing Law"}
SUM_TOLERANCE = 1e-3  # a CSV row's weights may miss 1 by this much (rounded weights)
BOOTSTRAP = 100
MAX_EVALUATIONS = 300  # per start: a start that has not converged by then is in the wrong basin
SEED = 0
EXTRAPOLATION = 0.05  # a proposed weight this far outside the weights tried is called out


# ----------------------------------------------------------------------------- the laws


def predict(form: str, params: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The law's value at each row of `weights` (n x K)."""
    weights = np.asarray(weights, float)
    if form == "log_linear":
        return np.exp(params[0]) + np.exp(weights @ params[1:])
    return params[0] + params[1] * np.exp(weights @ params[2:])


def _starts(form: str, w: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
    """Linearised starts: for a floor f below (or, for a negative k, above) the data,
    log|y - f| is linear in p (the intercept folds into the exponents since sum p = 1)."""
    starts = []
    low, high, spread = float(y.min()), float(y.max()), float(np.ptp(y)) or abs(float(y.min())) or 1.0
    floors = [low - spread * s for s in (0.05, 0.5, 2.0)]
    if low > 0:
        floors += [low * f for f in (0.5, 0.9)]
    for floor in floors:
        theta = np.linalg.lstsq(w, np.log(y - floor), rcond=None)[0]
        if form == "log_linear":
            if floor > 0:
                starts.append(np.r_[math.log(floor), theta])
        else:
            starts.append(np.r_[floor, 1.0, theta])
    if form == "mixing_law":  # k < 0: a concave law under a ceiling
        theta = np.linalg.lstsq(w, np.log(high + spread * 0.5 - y), rcond=None)[0]
        starts.append(np.r_[high + spread * 0.5, -1.0, theta])
    return starts


def fit(form: str, w: np.ndarray, y: np.ndarray, start: np.ndarray | None = None) -> np.ndarray:
    """Least-squares parameters of `form` (from `start` alone, or from the linearised starts)."""
    def residual(params: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):
            r = predict(form, params, w) - y
        return np.where(np.isfinite(r), r, 1e6)

    best = None
    for x0 in [start] if start is not None else _starts(form, w, y):
        result = optimize.least_squares(residual, x0, method="lm" if len(y) >= len(x0) else "trf",
                                        x_scale="jac", max_nfev=MAX_EVALUATIONS)
        if best is None or result.cost < best.cost:
            best = result
    return best.x


def folds(n: int, seed: int = SEED) -> list[np.ndarray]:
    """Leave-k-out folds, k = ceil(n / CV_FOLDS): each point is held out exactly once."""
    order = np.random.default_rng(seed).permutation(n)
    k = math.ceil(n / CV_FOLDS)
    return [order[i:i + k] for i in range(0, n, k)]


# ----------------------------------------------------------------------------- fitting a table


@dataclass(frozen=True)
class Table:
    """Mixtures and their measured metrics: one row per mixture (replicates averaged)."""

    names: list[str]  # a run's setting or a CSV row
    sources: list[str]
    weights: np.ndarray  # n x K, rows on the simplex
    metrics: dict[str, np.ndarray]  # metric -> n values


@dataclass
class Quality:
    rmse: float
    spearman: float


@dataclass
class MixtureFit:
    table: Table
    coefficients: dict[str, float]  # objective = sum of coefficient x metric
    laws: dict[str, dict[str, np.ndarray]]  # form -> metric -> parameters
    held_out: dict[str, dict[str, np.ndarray]]  # form -> metric or "objective" -> predictions
    quality: dict[str, dict[str, Quality]]  # form -> metric or "objective" -> cross-validation
    best: str
    proposal: dict[str, Any] = field(default_factory=dict)

    def objective(self, form: str, weights: np.ndarray, laws: dict[str, np.ndarray] | None = None
                  ) -> np.ndarray:
        laws = laws or self.laws[form]
        return sum(c * predict(form, laws[m], weights) for m, c in self.coefficients.items())

    def measured(self) -> np.ndarray:
        return sum(c * self.table.metrics[m] for m, c in self.coefficients.items())


def _quality(measured: np.ndarray, predicted: np.ndarray) -> Quality:
    rho = stats.spearmanr(measured, predicted).statistic if np.ptp(measured) > 0 else math.nan
    return Quality(float(np.sqrt(np.mean((predicted - measured) ** 2))), float(rho))


def fit_table(table: Table, coefficients: dict[str, float]) -> MixtureFit:
    """Both laws for every metric, their held-out predictions and quality, and the better form."""
    need = min_trials(len(table.sources))
    negative = [m for m, y in table.metrics.items() if not np.all(y > 0)]
    if negative:
        raise ConfigError(f"{negative[0]}: the log-linear law needs positive values (a loss)")
    if len(table.names) < need:
        raise ConfigError(f"{len(table.names)} mixtures: the laws over {len(table.sources)} sources "
                          f"have {law_parameters(len(table.sources))} parameters and are "
                          f"cross-validated leaving 1/{CV_FOLDS} out; they need at least {need}")
    w = table.weights
    laws: dict[str, dict[str, np.ndarray]] = {}
    held: dict[str, dict[str, np.ndarray]] = {}
    quality: dict[str, dict[str, Quality]] = {}
    for form in FORMS:
        laws[form] = {m: fit(form, w, y) for m, y in table.metrics.items()}
        held[form] = {m: np.empty(len(w)) for m in table.metrics}
        for test in folds(len(w)):
            train = np.setdiff1d(np.arange(len(w)), test)
            for m, y in table.metrics.items():
                params = fit(form, w[train], y[train], laws[form][m])
                held[form][m][test] = predict(form, params, w[test])
        quality[form] = {m: _quality(y, held[form][m]) for m, y in table.metrics.items()}
    result = MixtureFit(table, coefficients, laws, held, quality, FORMS[0])
    measured = result.measured()
    for form in FORMS:
        held[form]["objective"] = sum(c * held[form][m] for m, c in coefficients.items())
        quality[form]["objective"] = _quality(measured, held[form]["objective"])
    result.best = min(FORMS, key=lambda f: quality[f]["objective"].rmse)
    return result


# ----------------------------------------------------------------------------- the proposal


def _kl(p: np.ndarray, q: np.ndarray) -> tuple[float, np.ndarray]:
    safe = np.maximum(p, 1e-12)
    return float(np.sum(p * np.log(safe / q))), np.log(safe / q) + 1


def propose(result: MixtureFit, caps: np.ndarray | None = None, natural: np.ndarray | None = None,
            kl: float = 0.0, bootstrap: int = BOOTSTRAP, seed: int = SEED) -> dict[str, Any]:
    """The mix minimizing the better law's objective (+ kl * KL(p || natural)) under the caps,
    its predicted objective, a bootstrap interval, and the same against the natural mix."""
    table, form = result.table, result.best
    k = len(table.sources)
    upper = np.ones(k) if caps is None else np.asarray(caps, float)
    if kl > 0 and natural is None:
        raise ConfigError("--kl: a pull towards the natural mix needs the natural mix "
                          "(--natural NAME=W,...)")

    def loss(p: np.ndarray) -> float:
        value = float(result.objective(form, p[None])[0])
        return value + (kl * _kl(p, natural)[0] if kl > 0 else 0.0)

    starts = [project(np.full(k, 1 / k), upper),
              project(table.weights[np.argmin(result.measured())], upper),
              *(project(np.eye(k)[i] * 0.8 + 0.2 / k, upper) for i in range(k))]
    if natural is not None:
        starts.append(project(np.asarray(natural, float), upper))
    best = None
    for x0 in starts:
        run = optimize.minimize(loss, x0, method="SLSQP", bounds=list(zip(np.zeros(k), upper)),
                                constraints=[{"type": "eq", "fun": lambda p: p.sum() - 1}],
                                options={"maxiter": 500, "ftol": 1e-12})
        p = project(np.clip(run.x, 0, upper), upper)
        if best is None or loss(p) < loss(best):
            best = p
    weights = rounded(best)
    predicted = float(result.objective(form, weights[None])[0])
    rng = np.random.default_rng(seed)
    at_proposal, gains = [], []
    reference = None if natural is None else np.asarray(natural, float)[None]
    runaway = 0  # refits whose law overflows at the proposal or the natural mix
    for _ in range(bootstrap):
        rows = rng.integers(0, len(table.names), len(table.names))
        with np.errstate(over="ignore", invalid="ignore"):  # a refit may run off: counted below
            laws = {m: fit(form, table.weights[rows], y[rows], result.laws[form][m])
                    for m, y in table.metrics.items()}
            value = float(result.objective(form, weights[None], laws)[0])
            gain = (float(result.objective(form, reference, laws)[0]) - value
                    if reference is not None else 0.0)
        if not (math.isfinite(value) and math.isfinite(gain)):
            runaway += 1
            continue
        at_proposal.append(value)
        gains.append(gain)
    if not at_proposal:
        raise ConfigError(f"every one of {bootstrap} bootstrap refits overflows at the proposed "
                          "mix: the law is extrapolated too far (cap the weights or pull towards "
                          "the natural mix with --kl)")
    out: dict[str, Any] = {
        "weights": dict(zip(table.sources, weights.tolist())), "predicted": predicted,
        "interval": [float(np.percentile(at_proposal, 2.5)), float(np.percentile(at_proposal, 97.5))],
        "regressor": form, "kl": kl, "caps": dict(zip(table.sources, upper.tolist())),
        "bootstrap_runaway": runaway}
    if reference is not None:
        out["natural"] = dict(zip(table.sources, np.asarray(natural, float).tolist()))
        out["natural_predicted"] = float(result.objective(form, reference)[0])
        low, median, high = np.percentile(gains, [16, 50, 84])  # robust to refits that run off
        out["gain_vs_natural"] = [float(median), float((high - low) / 2)]
    result.proposal = out
    return out


# ----------------------------------------------------------------------------- words and files


def label(coefficients: dict[str, float]) -> str:
    """The objective in words: one metric, the mean of several, or their weighted sum."""
    if len(coefficients) == 1:
        return next(iter(coefficients))
    if len(set(coefficients.values())) == 1:
        return f"mean of {', '.join(coefficients)}"
    return " + ".join(f"{c:.3g}·{m}" for m, c in coefficients.items())


def record(result: MixtureFit, metric_label: str) -> dict[str, Any]:
    """fits.json's "mixture" entry: the proposal first, then the laws and their quality."""
    quality = {form: {m: {"rmse": q.rmse, "spearman": q.spearman} for m, q in per.items()}
               for form, per in result.quality.items()}
    return {**result.proposal, "objective": metric_label, "coefficients": result.coefficients,
            "sources": result.table.sources, "mixtures": len(result.table.names),
            "laws": {form: {"formula": FORMULAS[form],
                            **{m: p.tolist() for m, p in per.items()}}
                     for form, per in result.laws.items()},
            "cross_validation": quality, "folds": len(folds(len(result.table.names)))}


def sources_block(weights: dict[str, float], origins: dict[str, str] | None = None) -> str:
    """The proposal as a `data.sources` block to paste into an experiment."""
    lines = ["data:", "  sources:"]
    for name, w in weights.items():
        origin = (origins or {}).get(name)
        lines.append(f"    {name}: {{source: {origin}, weight: {w:.4f}}}" if origin
                     else f"    {name}: {{weight: {w:.4f}}}   # keep its source")
    return "\n".join(lines)


def overrides(weights: dict[str, float]) -> str:
    return " ".join(f"{weight_key(name)}={w:.4f}" for name, w in weights.items())


def interval(low: float, high: float) -> str:
    """`[2.6674, 2.7348]`; a bound past 10^4 (a bootstrap law that ran off along an exponential,
    far outside the mixtures tried) in 3 significant digits, `[2.6674, 4.44e+65]`."""
    return "[" + ", ".join(f"{x:.4f}" if abs(x) < 1e4 else f"{x:.3g}" for x in (low, high)) + "]"


def trust(result: MixtureFit, metric_label: str) -> str:
    """The plain sentence on how far the law and its proposal can be trusted."""
    q = result.quality[result.best]["objective"]
    other = next(f for f in FORMS if f != result.best)
    p = result.proposal
    lo, hi = p["interval"]
    text = (f"The {TITLES[result.best]} ranks held-out mixtures with Spearman "
            f"{q.spearman:.2f} and predicts their {metric_label} to {q.rmse:.3g} (root mean "
            f"square, {len(result.table.names)} mixtures, leave-{math.ceil(len(result.table.names) / CV_FOLDS)}"
            f"-out; the {TITLES[other]}: Spearman "
            f"{result.quality[other]['objective'].spearman:.2f}, {result.quality[other]['objective'].rmse:.3g}). "
            f"Its proposal predicts {p['predicted']:.4f} {interval(lo, hi)}")
    if "gain_vs_natural" in p:
        mean, sd = p["gain_vs_natural"]
        text += (f" and beats the natural mix by {mean:.3g} ± {sd:.2g} predicted" if mean > 2 * sd
                 else f"; its predicted gain over the natural mix, {mean:.3g} ± {sd:.2g}, is "
                 "within the bootstrap's spread")
    text += "."
    if p.get("bootstrap_runaway"):
        text += (f" {p['bootstrap_runaway']} bootstrap refits overflow at the proposal and are "
                 "left out of its interval: the law is extrapolated far there.")
    w = result.table.weights
    beyond = [f"{s} {v:.2f} (tried {lo:.2f} to {hi:.2f})" for s, v, lo, hi in
              zip(result.table.sources, p["weights"].values(), w.min(0), w.max(0))
              if v < lo - EXTRAPOLATION or v > hi + EXTRAPOLATION]
    if beyond:
        text += f" The proposal lies outside the mixtures tried: {', '.join(beyond)}."
    if not q.spearman >= 0.5:
        text += " A rank correlation this low means the proposal is no better than a guess."
    return text


def laws_table(result: MixtureFit) -> tuple[list[str], list[list[str]]]:
    header = ["law", "metric", "held-out RMSE", "held-out Spearman"]
    body = [[form + (" (better)" if form == result.best else ""), m, f"{q.rmse:.4g}",
             f"{q.spearman:.3f}"] for form, per in result.quality.items() for m, q in per.items()]
    return header, body


def proposal_table(result: MixtureFit) -> tuple[list[str], list[list[str]]]:
    """The proposal and the natural mix: weights and predicted objective (the report adds the
    measured validation runs)."""
    p = result.proposal
    header = ["mix", *result.table.sources, "predicted", "measured"]
    lo, hi = p["interval"]
    body = [["proposal", *(f"{w:.4f}" for w in p["weights"].values()),
             f"{p['predicted']:.4f} {interval(lo, hi)}", "–"]]
    if "natural" in p:
        body.append(["natural", *(f"{w:.4f}" for w in p["natural"].values()),
                     f"{p['natural_predicted']:.4f}", "–"])
    return header, body


# ----------------------------------------------------------------------------- a CSV of points


def parse_assignments(flag: str, text: str | None, sources: list[str]) -> np.ndarray | None:
    """`a=0.5,b=0.3,c=0.2` -> an array in `sources` order (every source, numbers in [0, 1])."""
    if not text:
        return None
    values: dict[str, float] = {}
    for item in text.split(","):
        name, eq, number = item.partition("=")
        try:
            value = float(number)
        except ValueError:
            value = math.nan
        if not eq or name.strip() not in sources or not 0 <= value <= 1:
            raise ConfigError(f"{flag}: {item!r} is not NAME=W with NAME one of "
                              f"{', '.join(sources)} and W in [0, 1]")
        values[name.strip()] = value
    missing = [s for s in sources if s not in values]
    if missing:
        raise ConfigError(f"{flag}: no value for {', '.join(missing)}")
    return np.array([values[s] for s in sources])


def parse_metrics(text: str) -> dict[str, float]:
    """`--metric a,b` (the mean) or `a=0.7,b=0.3` (a weighted sum) -> metric -> coefficient."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ConfigError("--metric: name at least one metric column")
    named = {}
    for item in items:
        name, eq, number = item.rpartition("=") if "=" in item else (item, "", "")
        try:
            value = float(number) if eq else 1.0 / len(items)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0) or not name:
            raise ConfigError(f"--metric: {item!r} is not METRIC or METRIC=COEFFICIENT (> 0)")
        named[name] = value
    return named


def read_points(path: Path, sources: list[str], metrics: list[str]) -> Table:
    """A CSV with one weight column per source and the metric columns; one line per problem."""
    try:
        with Path(path).open(newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"{path}: cannot read the CSV ({exc})") from None
    for column in [*sources, *metrics]:
        if column not in header:
            raise ConfigError(f"{path}: no column {column!r} (columns: {', '.join(header) or 'none'})")
    if len(sources) < 2 or len(set(sources)) != len(sources):
        raise ConfigError(f"--sources: two or more distinct weight columns, got {sources}")

    def number(line: int, column: str, text: str | None) -> float:
        try:
            value = float(text)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            raise ConfigError(f"{path}: row {line}: {column} must be a number, got {text!r}")
        return value

    weights = np.array([[number(i + 2, s, row[s]) for s in sources] for i, row in enumerate(rows)])
    values = {m: np.array([number(i + 2, m, row[m]) for i, row in enumerate(rows)]) for m in metrics}
    for i, w in enumerate(weights):
        if np.any(w < 0) or abs(w.sum() - 1) > SUM_TOLERANCE:
            raise ConfigError(f"{path}: row {i + 2}: the weights {', '.join(sources)} must be >= 0 "
                              f"and sum to 1 (within {SUM_TOLERANCE:g}), got sum {w.sum():.6g}")
    need = min_trials(len(sources))
    if len(rows) < need:
        raise ConfigError(f"{path}: {len(rows)} rows: the laws over {len(sources)} sources have "
                          f"{law_parameters(len(sources))} parameters and are cross-validated "
                          f"leaving 1/{CV_FOLDS} out; they need at least {need} rows")
    return Table([f"row {i + 2}" for i in range(len(rows))], list(sources),
                 weights / weights.sum(1, keepdims=True), values)
