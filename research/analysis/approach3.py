"""Chinchilla's Approach 3: the joint law L(N, D) = E + A/N^alpha + B/D^beta, fitted to points.

Fitted as in Hoffmann et al. 2022 (appendix D.2) and Besiroglu et al. 2024 (the replication):
parameters theta = (e = log E, a = log A, b = log B, alpha, beta), objective the SUM over points
of Huber_delta(LSE(a - alpha log N, b - beta log D, e) - log L) with delta = 1e-3, minimised by
L-BFGS-B from a grid of starts, the best kept. The sum matters: Besiroglu et al. traced
Hoffmann's published values to an optimiser that stopped early on a tiny objective (a mean of
1e-7-sized Huber terms looks converged from the start). Our Huber is divided by delta
(`fits._huber`), so gradients are of order one and the stopping rules mean something. N and D are
divided by their geometric means while fitting, so the grid of starts does not depend on units.

Intervals: 2.5-97.5 percentiles over fits to bootstrap resamples of the points (each refitted
from the full fit's solution). A predicted loss's interval combines those fits with the full
fit's log residuals, so it covers the law's uncertainty and the points' scatter around it.

Compute-optimal allocation: with C = k N D (k = 6 in Chinchilla's C ≈ 6ND; for our runs k is the
geometric mean of C / (N D) over the points, which counts attention and the output head too),
minimising L at fixed C gives

    N_opt = G (C/k)^a,  D_opt = (C/k)^b / G,  a = beta/(alpha+beta),  b = alpha/(alpha+beta),
    G = (alpha A / (beta B))^(1/(alpha+beta)).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import optimize
from threadpoolctl import threadpool_limits

from research.analysis.fits import ALPHA_BOUNDS, BOOTSTRAP, HUBER_DELTA, FitError, _huber

NAMES = ("E", "A", "B", "alpha", "beta")
MIN_POINTS = 7  # five parameters, and two points left over to check them against
MIN_DISTINCT = 2  # N and D values each: one of them alone is confounded with E
CHINCHILLA_K = 6.0  # C = 6 N D


def objective(theta: np.ndarray, ln: np.ndarray, ld: np.ndarray,
              ll: np.ndarray) -> tuple[float, np.ndarray]:
    """Summed Huber loss of log residuals for theta = (e, a, b, alpha, beta), with its gradient."""
    e, a, b, alpha, beta = theta
    terms = np.stack([np.full_like(ln, e), a - alpha * ln, b - beta * ld])
    pred = np.logaddexp.reduce(terms, axis=0)
    loss, dr = _huber(pred - ll, HUBER_DELTA)
    w = np.exp(terms - pred)  # each term's share of the prediction: d pred / d term
    grad = np.array([np.sum(dr * w[0]), np.sum(dr * w[1]), np.sum(dr * w[2]),
                     -np.sum(dr * w[1] * ln), -np.sum(dr * w[2] * ld)])
    return float(np.sum(loss)), grad


def minimize(fun: Any, starts: list[np.ndarray], args: tuple, bounds: list[tuple[float, float]]
             ) -> optimize.OptimizeResult:
    """The best L-BFGS-B result over `starts` (one BLAS thread: L-BFGS-B's small LAPACK calls
    crawl when threads compete for cores)."""
    best = None
    with threadpool_limits(1):
        for start in starts:
            result = optimize.minimize(fun, start, args=args, jac=True, method="L-BFGS-B",
                                       bounds=bounds)
            if best is None or result.fun < best.fun:
                best = result
    return best


def start_grid(ll: np.ndarray) -> list[np.ndarray]:
    """108 starts in normalised units: E a fraction of the lowest loss, A and B terms around the
    losses' spread, exponents from shallow to steep."""
    low = float(ll.min())
    spread = np.log(max(np.exp(ll.max()) - np.exp(low), 1e-3 * np.exp(low)))
    grid = itertools.product(low + np.log([0.3, 0.7, 0.95]), spread + np.array([-1.5, 0.0]),
                             spread + np.array([-1.5, 0.0]), [0.2, 0.5, 1.0], [0.2, 0.5, 1.0])
    return [np.array(start) for start in grid]


def _bounds(ll: np.ndarray) -> list[tuple[float, float]]:
    low, high = float(ll.min()), float(ll.max())
    return [(low - 10, high), (low - 20, high + 20), (low - 20, high + 20), ALPHA_BOUNDS,
            ALPHA_BOUNDS]


def _loss(p: np.ndarray, n: np.ndarray, d: np.ndarray) -> np.ndarray:
    """L(N, D) for parameter rows p[..., (E, A, B, alpha, beta)]."""
    E, A, B, alpha, beta = (p[..., i] for i in range(5))
    return E + A * n**-alpha + B * d**-beta


def _optimal(p: np.ndarray, k: float, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N_opt, D_opt, L at the optimum) at compute c, for parameter rows p (module docstring)."""
    E, A, B, alpha, beta = (p[..., i] for i in range(5))
    g = (alpha * A / (beta * B)) ** (1 / (alpha + beta))
    n = g * (c / k) ** (beta / (alpha + beta))
    d = (c / k) / n
    return n, d, _loss(p, n, d)


def _band(values: np.ndarray) -> tuple[float, float]:
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


@dataclass(frozen=True)
class JointLaw:
    """A fitted L(N, D) with its bootstrap fits; C = k N D converts it to compute."""

    params: np.ndarray  # (E, A, B, alpha, beta)
    k: float
    n_points: int
    samples: np.ndarray  # bootstrap fits, one row of params each
    residuals: np.ndarray  # log(prediction) - log(loss) at the fitted points

    def __getattr__(self, name: str) -> float:
        if name in NAMES:
            return float(self.params[NAMES.index(name)])
        raise AttributeError(name)

    def __call__(self, n: np.ndarray, d: np.ndarray) -> np.ndarray:
        return _loss(self.params, np.asarray(n, float), np.asarray(d, float))

    @property
    def a(self) -> float:
        """N_opt ∝ C^a."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        """D_opt ∝ C^b."""
        return self.alpha / (self.alpha + self.beta)

    def intervals(self) -> dict[str, tuple[float, float]]:
        """95% bootstrap intervals of the parameters and of the exponents a and b."""
        if not len(self.samples):
            return {}
        out = {name: _band(self.samples[:, i]) for i, name in enumerate(NAMES)}
        alpha, beta = self.samples[:, 3], self.samples[:, 4]
        out["a"], out["b"] = _band(beta / (alpha + beta)), _band(alpha / (alpha + beta))
        return out

    def interval(self, name: str) -> str:
        low, high = self.intervals().get(name, (np.nan, np.nan))
        return f"[{low:.3g}, {high:.3g}]"

    def formula(self) -> str:
        return (f"L = {self.E:.3g} + {self.A:.4g}/N^{self.alpha:.3g} + "
                f"{self.B:.4g}/D^{self.beta:.3g}")

    def predict(self, n: float, d: float) -> tuple[float, float, float]:
        """Loss at (n, d) and its 95% prediction interval (law's uncertainty and points' scatter)."""
        value = float(self(n, d))
        if not len(self.samples):
            return value, np.nan, np.nan
        spread = _loss(self.samples, n, d)[:, None] * np.exp(-self.residuals)[None, :]
        return (value, *_band(spread))

    def optimal(self, c: float) -> dict[str, tuple[float, float, float]]:
        """N_opt, D_opt and the loss there at compute c: (value, low, high), 95% intervals (the
        loss's a prediction interval)."""
        n, d, loss = (float(v) for v in _optimal(self.params, self.k, c))
        out = {"n_opt": (n, np.nan, np.nan), "d_opt": (d, np.nan, np.nan),
               "loss": self.predict(n, d)}
        if len(self.samples):
            ns, ds, _ = _optimal(self.samples, self.k, c)
            out["n_opt"], out["d_opt"] = (n, *_band(ns)), (d, *_band(ds))
        return out

    def record(self) -> dict[str, Any]:
        """fits.json's entry: everything `from_record` needs to predict again."""
        return {**{name: float(v) for name, v in zip(NAMES, self.params)}, "a": self.a,
                "b": self.b, "k": self.k, "n_points": self.n_points,
                "intervals_95": self.intervals(), "bootstrap": self.samples.tolist(),
                "log_residuals": self.residuals.tolist()}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> JointLaw:
        return cls(np.array([record[name] for name in NAMES], float), float(record["k"]),
                   int(record["n_points"]), np.array(record["bootstrap"], float).reshape(-1, 5),
                   np.array(record["log_residuals"], float))


def check_points(n: np.ndarray, d: np.ndarray, loss: np.ndarray) -> None:
    """FitError naming what is wrong when the points cannot support a joint fit."""
    if np.any(n <= 0) or np.any(d <= 0) or np.any(loss <= 0):
        raise FitError("the joint law needs positive parameters, tokens and losses")
    distinct = len(set(zip(n.tolist(), d.tolist())))
    if distinct < MIN_POINTS:
        raise FitError(f"too few points for L(N, D): {distinct} distinct (N, D), need {MIN_POINTS}")
    for name, values in (("N", n), ("D", d)):
        if len(np.unique(values)) < MIN_DISTINCT:
            raise FitError(f"L(N, D) needs at least {MIN_DISTINCT} distinct {name} values")


def fit_joint(n: np.ndarray, d: np.ndarray, loss: np.ndarray, flops: np.ndarray | None = None,
              bootstrap: int = BOOTSTRAP, seed: int = 0,
              starts: list[np.ndarray] | None = None) -> JointLaw:
    """Fit L(N, D) to finite points; C = k N D with k from `flops` (else 6). `starts`, in the
    normalised units of the fit, replace the grid (tests use it to show the grid matters)."""
    n, d, loss = (np.asarray(v, float) for v in (n, d, loss))
    keep = np.isfinite(n) & np.isfinite(d) & np.isfinite(loss)
    n, d, loss = n[keep], d[keep], loss[keep]
    check_points(n, d, loss)
    k = (CHINCHILLA_K if flops is None
         else float(np.exp(np.mean(np.log(np.asarray(flops, float)[keep] / (n * d))))))
    n_ref, d_ref = (float(np.exp(np.mean(np.log(v)))) for v in (n, d))
    ln, ld, ll = np.log(n / n_ref), np.log(d / d_ref), np.log(loss)
    bounds = _bounds(ll)
    theta = minimize(objective, starts or start_grid(ll), (ln, ld, ll), bounds).x
    for name, value in zip(("alpha", "beta"), theta[3:]):
        if min(abs(value - bound) for bound in ALPHA_BOUNDS) < 1e-3:
            raise FitError(f"the points follow no L(N, D) law ({name} ran to its bound, {value:.3g})")

    def natural(t: np.ndarray) -> np.ndarray:
        e, a, b, alpha, beta = t
        return np.array([np.exp(e), np.exp(a) * n_ref**alpha, np.exp(b) * d_ref**beta, alpha, beta])

    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        pick = rng.integers(0, len(n), len(n))
        if len(np.unique(n[pick])) >= MIN_DISTINCT and len(np.unique(d[pick])) >= MIN_DISTINCT:
            samples.append(natural(minimize(objective, [theta], (ln[pick], ld[pick], ll[pick]),
                                            bounds).x))
    params = natural(theta)
    residuals = np.log(_loss(params, n, d)) - ll
    return JointLaw(params, k, len(n), np.array(samples).reshape(-1, 5), residuals)
