"""Scaling-law fits: a saturating power law with bootstrap intervals, and IsoFLOP (approach 2).

Power law: L(X) = E + A * X^(-alpha), fitted as in Hoffmann et al. 2022 (Chinchilla): the Huber
loss of log residuals, log(E + A X^-alpha) - log L, minimised from a grid of starts (the
objective has several local minima). X is divided by its geometric mean while fitting so the
grid does not depend on X's units. Intervals: 2.5-97.5 percentiles of the fits to bootstrap
resamples of the points.

IsoFLOP (Chinchilla approach 2): runs of about the same training compute C form a budget; a
parabola in log N through each budget's losses gives its best model size N_opt (and, along the
budget's runs, the matching token count D_opt); lines through log N_opt and log D_opt against log C
give the compute-optimal exponents N_opt ∝ C^a, D_opt ∝ C^b.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
from scipy import optimize

HUBER_DELTA = 1e-3  # Chinchilla's: residuals beyond 0.1% in log loss count linearly
MIN_POINTS = 4  # distinct X values for a 3-parameter fit to leave anything to check it against
ALPHA_BOUNDS = (0.0, 4.0)  # an exponent that runs to either end means the points follow no power law
BOOTSTRAP = 200


class FitError(ValueError):
    """The data cannot support the fit (too few points, non-positive values); the message says why."""


@dataclass(frozen=True)
class PowerLaw:
    """L = E + A * X^-alpha, with 95% bootstrap intervals per parameter."""

    E: float
    A: float
    alpha: float
    n_points: int
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    draws: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)), repr=False)  # (E, A, alpha)
    # of each bootstrap resample

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.E + self.A * np.asarray(x, float) ** -self.alpha

    def formula(self, symbol: str) -> str:
        return f"L = {self.E:.3g} + {self.A:.3g}·{symbol}^-{self.alpha:.3g}"

    def interval(self, name: str) -> str:
        low, high = self.intervals.get(name, (np.nan, np.nan))
        return f"[{low:.3g}, {high:.3g}]"


def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Huber loss of residuals and its derivative, both divided by delta (gradients of order 1,
    which the optimizer's stopping rules need)."""
    small = np.abs(r) <= delta
    loss = np.where(small, 0.5 * r**2 / delta, np.abs(r) - 0.5 * delta)
    return loss, np.clip(r / delta, -1.0, 1.0)


def _objective(theta: np.ndarray, lx: np.ndarray, ly: np.ndarray) -> tuple[float, np.ndarray]:
    """Huber loss of log residuals for theta = (log E, log A', alpha), with its gradient."""
    e, a, alpha = theta
    pred = np.logaddexp(e, a - alpha * lx)
    loss, dr = _huber(pred - ly, HUBER_DELTA)
    w = np.exp(e - pred)  # share of E in the prediction: d pred / d e
    grad = np.array([np.sum(dr * w), np.sum(dr * (1 - w)), -np.sum(dr * (1 - w) * lx)])
    return float(np.sum(loss)), grad


def _minimize(starts: list[np.ndarray], lx: np.ndarray, ly: np.ndarray,
              bounds: list[tuple[float, float]]) -> np.ndarray:
    best = None
    for start in starts:
        # TNC, not L-BFGS-B: the latter's LAPACK calls crawl when BLAS threads compete for cores.
        result = optimize.minimize(_objective, start, args=(lx, ly), jac=True, method="TNC",
                                   bounds=bounds)
        if best is None or result.fun < best.fun:
            best = result
    return best.x


def fit_power_law(x: np.ndarray, y: np.ndarray, bootstrap: int = BOOTSTRAP,
                  seed: int = 0) -> PowerLaw:
    """Fit L = E + A X^-alpha to positive points; raises FitError when they cannot support it."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if np.any(x <= 0) or np.any(y <= 0):
        raise FitError("a power law needs positive values")
    distinct = len(np.unique(x))
    if distinct < MIN_POINTS:
        raise FitError(f"too few points to fit: {distinct} distinct value{'s' * (distinct != 1)}, "
                       f"need {MIN_POINTS}")
    x_ref = float(np.exp(np.mean(np.log(x))))
    lx, ly = np.log(x / x_ref), np.log(y)
    low, high = float(ly.min()), float(ly.max())
    spread = np.log(max(np.exp(high) - np.exp(low), 1e-3 * np.exp(low)))
    bounds = [(low - 10, high), (low - 15, high + 15), ALPHA_BOUNDS]
    grid = itertools.product(low + np.log([0.1, 0.5, 0.9]), spread + np.array([-2.0, 0.0, 2.0]),
                             [0.1, 0.3, 0.7, 1.5])
    theta = _minimize([np.array(start) for start in grid], lx, ly, bounds)
    if min(abs(theta[2] - bound) for bound in ALPHA_BOUNDS) < 1e-3:
        raise FitError(f"the points follow no power law (the exponent ran to its bound, "
                       f"{theta[2]:.3g})")

    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        pick = rng.integers(0, len(x), len(x))
        if len(np.unique(x[pick])) >= 3:
            samples.append(_minimize([theta], lx[pick], ly[pick], bounds))
    intervals = {}
    draws = np.zeros((0, 3))
    if samples:
        s = np.array(samples)
        draws = np.stack([np.exp(s[:, 0]), np.exp(s[:, 1]) * x_ref ** s[:, 2], s[:, 2]], axis=1)
        for name, values in zip(("E", "A", "alpha"), draws.T):
            intervals[name] = (float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5)))
    e, a, alpha = theta
    return PowerLaw(float(np.exp(e)), float(np.exp(a) * x_ref**alpha), float(alpha), len(x),
                    intervals, draws)


def frontier(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Mask of the points no point of smaller or equal x beats: the best loss reachable at each x.

    Scaling laws describe this envelope (Kaplan et al.'s L(C_min)); a run that a smaller one beats
    (a bad learning rate, a size past the budget's optimum) says nothing about it.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = np.zeros(len(x), bool)
    best = np.inf
    for i in np.lexsort((y, x)):
        if y[i] < best:
            keep[i], best = True, y[i]
    return keep


# ----------------------------------------------------------------------------- IsoFLOP

BUDGET_SPAN = 0.05  # decades: runs within a factor 10^0.05 (12%) of compute share a budget
MIN_BUDGET_RUNS = 3  # distinct model sizes for a parabola


@dataclass(frozen=True)
class Budget:
    """One IsoFLOP curve: runs of about the same compute and the size that minimises loss."""

    flops: float  # geometric mean of the runs' training FLOPs
    members: list[int]  # indices into the fitted arrays
    parabola: np.ndarray | None = None  # loss as a quadratic in log10 N (np.polyval order)
    n_opt: float | None = None
    d_opt: float | None = None
    loss_opt: float | None = None
    note: str = ""


@dataclass(frozen=True)
class Slope:
    """log Y = exponent * log C + intercept, with the exponent's standard error (None: 2 points)."""

    exponent: float
    intercept: float
    stderr: float | None

    def __call__(self, c: np.ndarray) -> np.ndarray:
        return 10 ** (self.intercept + self.exponent * np.log10(c))

    def describe(self) -> str:
        return f"{self.exponent:.3f}" + (f" ± {self.stderr:.3f}" if self.stderr is not None else "")


@dataclass(frozen=True)
class IsoFlop:
    budgets: list[Budget]
    params: Slope | None  # N_opt ∝ C^a
    tokens: Slope | None  # D_opt ∝ C^b
    note: str = ""


def group_budgets(flops: np.ndarray, span: float = BUDGET_SPAN) -> list[list[int]]:
    """Indices of runs grouped by compute: each group spans at most `span` decades."""
    order = np.argsort(flops)
    groups: list[list[int]] = []
    for i in order:
        if groups and np.log10(flops[i]) - np.log10(flops[groups[-1][0]]) <= span:
            groups[-1].append(int(i))
        else:
            groups.append([int(i)])
    return groups


def _budget(members: list[int], flops: np.ndarray, params: np.ndarray, tokens: np.ndarray,
            loss: np.ndarray) -> Budget:
    c = float(np.exp(np.mean(np.log(flops[members]))))
    ln, ld, l = np.log10(params[members]), np.log10(tokens[members]), loss[members]
    parabola = np.polyfit(ln, l, 2)
    curvature, slope, _ = parabola
    if curvature <= 0:
        return Budget(c, members, parabola, note="no minimum (loss is not convex in log N)")
    best = -slope / (2 * curvature)
    if not ln.min() <= best <= ln.max():
        side = "below" if best < ln.min() else "above"
        return Budget(c, members, parabola, note=f"minimum {side} the sizes tried")
    d_opt = 10 ** np.polyval(np.polyfit(ln, ld, 1), best)
    return Budget(c, members, parabola, float(10**best), float(d_opt),
                  float(np.polyval(parabola, best)))


def _slope(c: np.ndarray, y: np.ndarray) -> Slope:
    lc, ly = np.log10(c), np.log10(y)
    exponent, intercept = np.polyfit(lc, ly, 1)
    stderr = None
    if len(c) > 2:
        residual = ly - (intercept + exponent * lc)
        stderr = float(np.sqrt(residual @ residual / (len(c) - 2) / np.sum((lc - lc.mean()) ** 2)))
    return Slope(float(exponent), float(intercept), stderr)


def isoflop(flops: np.ndarray, params: np.ndarray, tokens: np.ndarray,
            loss: np.ndarray) -> IsoFlop | None:
    """Approach 2 over runs of several compute budgets; None when the runs do not form two budgets."""
    flops, params, tokens, loss = (np.asarray(v, float) for v in (flops, params, tokens, loss))
    groups = [g for g in group_budgets(flops)
              if len(np.unique(params[g])) >= MIN_BUDGET_RUNS]
    if len(groups) < 2:
        return None
    budgets = [_budget(g, flops, params, tokens, loss) for g in groups]
    optimal = [b for b in budgets if b.n_opt is not None]
    if len(optimal) < 2:
        return IsoFlop(budgets, None, None, f"{len(optimal)} of {len(budgets)} budgets have a "
                       "minimum inside the sizes tried; exponents need 2")
    c = np.array([b.flops for b in optimal])
    return IsoFlop(budgets, _slope(c, np.array([b.n_opt for b in optimal])),
                   _slope(c, np.array([b.d_opt for b in optimal])))
