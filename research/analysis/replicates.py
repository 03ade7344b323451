"""Replicates and seed noise: runs that differ only in their seed, and whether two settings differ
by more than that noise.

Runs with the same values in every distinguishing field (see `runs.load_runs`; `train.seed` is never
one) form a group: the seeds of one sweep point, or repeated plain runs. A group's final eval
losses give its mean and sample standard deviation; two groups are compared with Welch's t-test
(unequal variances), whose 95% interval of the difference is reported with the p-value. A setting
run once has no noise estimate, and a comparison involving it says so instead of declaring a winner.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from research.analysis.runs import Run

LEVEL = 0.95  # confidence of the interval; a difference counts as real when p < 1 - LEVEL


@dataclass(frozen=True)
class Group:
    """Finished runs of one setting and their final eval losses (same order)."""

    label: str
    runs: tuple[Run, ...]
    losses: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.losses)

    @property
    def mean(self) -> float:
        return float(np.mean(self.losses))

    @property
    def std(self) -> float | None:
        """Sample standard deviation over seeds (None for one run: the noise is unknown)."""
        return float(np.std(self.losses, ddof=1)) if self.n > 1 else None

    def describe(self) -> str:
        """`3.1234 ± 0.0100` (mean ± sample sd over seeds), or `3.1234` for one run."""
        return f"{self.mean:.4f}" + (f" ± {self.std:.4f}" if self.std is not None else "")


def group_key(run: Run) -> tuple:
    return run.setting


def groups(pairs: list[tuple[Run, float]]) -> list[Group]:
    """(run, final eval loss) pairs -> groups of replicates, best (lowest mean) first.

    A second run of a setting with a seed already seen (the same experiment run twice, e.g. a
    plain run and a sweep trial) repeats a replicate rather than adding one: only the first counts.
    """
    members: dict[tuple, list[tuple[Run, float]]] = {}
    seen: set[tuple] = set()
    for run, loss in pairs:
        if run.seed is not None and (group_key(run), run.seed) in seen:
            continue
        seen.add((group_key(run), run.seed))
        members.setdefault(group_key(run), []).append((run, loss))
    out = [Group(m[0][0].group, tuple(r for r, _ in m), tuple(float(l) for _, l in m))
           for m in members.values()]
    return sorted(out, key=lambda g: g.mean)


@dataclass(frozen=True)
class Comparison:
    """b minus a, with Welch's test when both have at least two runs."""

    difference: float
    p_value: float | None = None
    interval: tuple[float, float] | None = None

    @property
    def tested(self) -> bool:
        return self.p_value is not None

    @property
    def distinguishable(self) -> bool:
        return self.p_value is not None and self.p_value < 1 - LEVEL

    def verdict(self) -> str:
        """What the difference means against seed noise, with the test that says so."""
        if not self.tested:
            return ("the run-to-run noise is unknown with one run of a setting, so this difference "
                    "is untested (repeat each point over seeds with `seeds:` in the sweep file)")
        low, high = self.interval
        test = (f"Welch's t-test p = {self.p_value:.2g}, {LEVEL:.0%} interval of the difference "
                f"[{low:.4f}, {high:.4f}]")
        if self.distinguishable:
            return f"larger than seed noise ({test})"
        return f"not distinguishable from seed noise ({test})"


def compare(a: np.ndarray | tuple[float, ...], b: np.ndarray | tuple[float, ...]) -> Comparison:
    """mean(b) - mean(a); Welch's t-test and its interval when each side has two or more values.

    The interval uses the Welch-Satterthwaite degrees of freedom; identical values on both sides
    (zero variance) test as indistinguishable when the means agree and distinguishable otherwise.
    """
    a, b = np.asarray(a, float), np.asarray(b, float)
    difference = float(b.mean() - a.mean())
    if len(a) < 2 or len(b) < 2:
        return Comparison(difference)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return Comparison(difference, 1.0 if difference == 0 else 0.0, (difference, difference))
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    p_value = float(stats.ttest_ind(b, a, equal_var=False).pvalue)
    half = float(stats.t.ppf(0.5 + LEVEL / 2, df)) * se
    return Comparison(difference, p_value, (difference - half, difference + half))
