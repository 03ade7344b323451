"""Which runs may be compared: a ranking, a line or a fit joins only runs that differ in the
fields it varies (and the seed), so that what it shows is those fields' effect alone.

Runs that differ from the chosen family in anything else are left out and summarised by the
fields they differ in ("11 runs differ in train.steps"); table.csv names each one and why.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from research.analysis import replicates
from research.analysis.runs import Run, family, format_value

Differences = dict[str, tuple[Any, Any]]  # field -> (the run's value, the family's value)


@dataclass(frozen=True)
class Family:
    """The runs of one family and, for every other run, the fields in which it differs."""

    members: list[tuple[Run, dict[str, Any]]]  # (run, table row) pairs
    left_out: dict[str, Differences] = field(default_factory=dict)  # run name -> differences

    def why(self, name: str) -> str:
        """`differs from the fitted runs in optim.lr (0.01 vs 0.003), train.steps (80 vs 300)`."""
        return "differs from the fitted runs in " + ", ".join(
            f"{k} ({format_value(mine)} vs {format_value(theirs)})"
            for k, (mine, theirs) in self.left_out[name].items())

    def reasons(self) -> dict[str, str]:
        return {name: self.why(name) for name in self.left_out}

    def summary(self) -> str:
        """`11 runs differ in train.steps; 1 in optim.lr and train.steps` ('' when none)."""
        return summarize(self.left_out)


def summarize(left_out: dict[str, Differences]) -> str:
    """Left-out runs counted by the set of fields they differ in, most common first."""
    counts = Counter(tuple(diff) for diff in left_out.values())
    parts = []
    for i, (fields, n) in enumerate(counts.most_common()):
        names = " and ".join([", ".join(fields[:-1]), fields[-1]] if len(fields) > 1 else fields)
        parts.append(f"{n} run{'s' * (n != 1)} differ{'s' * (n == 1)} in {names}" if i == 0
                     else f"{n} in {names}")
    return "; ".join(parts)


def largest(pairs: list[tuple[Run, dict[str, Any]]], fields: list[str],
            free: tuple[str, ...]) -> Family:
    """The family (runs differing only in fields starting with one of `free`, and the seed) with
    the most settings, and how each other run differs from it."""
    families: dict[tuple, list[tuple[Run, dict]]] = {}
    for pair in pairs:
        families.setdefault(family(pair[0], fields, free), []).append(pair)
    if not families:
        return Family([])
    chosen = max(families.values(), key=lambda m: (len({replicates.group_key(r) for r, _ in m}),
                                                   len(m)))
    reference = chosen[0][0].values
    left_out = {}
    for run, _ in pairs:
        differ = {k: (run.values.get(k), reference.get(k)) for k in fields
                  if not k.startswith(free) and run.values.get(k) != reference.get(k)}
        if differ:
            left_out[run.name] = differ
    return Family(chosen, left_out)
