"""Scaling points from anywhere: (parameters, tokens, FLOPs, loss) from finished runs or a CSV.

A CSV needs columns `params`, `loss` and `tokens` or `flops` (other names are mapped with
`--columns params=Model Size,flops=Training FLOP`). A missing one is derived with Chinchilla's
C = 6 N D. Every problem is one ConfigError line naming the file, row and column.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from research.analysis import approach3, fits
from research.config import ConfigError

FIELDS = ("params", "tokens", "flops", "loss")


@dataclass(frozen=True)
class Points:
    """One entry per point: a run's name or a CSV row number, and its numbers."""

    names: list[str]
    params: np.ndarray  # N (for runs: active parameters, so C ≈ k N D holds for MoE too)
    tokens: np.ndarray  # D
    flops: np.ndarray  # C
    loss: np.ndarray

    def __len__(self) -> int:
        return len(self.names)

    def subset(self, mask: np.ndarray) -> Points:
        return Points([n for n, m in zip(self.names, mask) if m], self.params[mask],
                      self.tokens[mask], self.flops[mask], self.loss[mask])


def from_rows(rows: list[dict[str, Any]]) -> Points:
    """Finished runs' table rows (runs.finished) that have every number."""
    usable = [r for r in rows if None not in (r["params_active"], r["tokens"], r["flops"])]
    column = lambda key: np.array([r[key] for r in usable], float)  # noqa: E731
    return Points([r["run"] for r in usable], column("params_active"), column("tokens"),
                  column("flops"), column("final_eval_loss"))


def parse_columns(text: str | None) -> dict[str, str]:
    """`params=Model Size,flops=Training FLOP` -> {"params": "Model Size", ...}."""
    mapping = {}
    for item in filter(None, (text or "").split(",")):
        key, eq, column = item.partition("=")
        if not eq or key.strip() not in FIELDS or not column.strip():
            raise ConfigError(f"--columns: {item!r} is not FIELD=COLUMN with FIELD one of "
                              f"{', '.join(FIELDS)}")
        mapping[key.strip()] = column.strip()
    return mapping


def _number(path: Path, line: int, field: str, text: str | None) -> float:
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{path}: row {line}: {field} must be a positive number, got {text!r}")
    return value


def read_csv(path: Path, columns: dict[str, str] | None = None, drop_highest: int = 0) -> Points:
    """The CSV's points, less the `drop_highest` highest losses (outliers a replication drops)."""
    path = Path(path)
    columns = {field: field for field in FIELDS} | (columns or {})
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            table = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"{path}: cannot read the CSV ({exc})") from None
    present = [field for field in FIELDS if columns[field] in header]
    shown = ", ".join(header) or "none"
    for field in ("params", "loss"):
        if field not in present:
            raise ConfigError(f"{path}: no column {columns[field]!r} for {field} (columns: {shown}); "
                              f"map one with --columns {field}=NAME")
    if "tokens" not in present and "flops" not in present:
        raise ConfigError(f"{path}: needs a tokens or a flops column (columns: {shown}); map one "
                          "with --columns tokens=NAME or --columns flops=NAME")
    values = {field: np.array([_number(path, i + 2, columns[field], row[columns[field]])
                               for i, row in enumerate(table)], float) for field in present}
    n = values["params"]
    tokens = values.get("tokens", values.get("flops", n) / (approach3.CHINCHILLA_K * n))
    flops = values.get("flops", approach3.CHINCHILLA_K * n * tokens)
    points = Points([f"row {i + 2}" for i in range(len(table))], n, tokens, flops, values["loss"])
    if drop_highest:
        points = points.subset(np.argsort(np.argsort(-points.loss)) >= drop_highest)
    try:
        approach3.check_points(points.params, points.tokens, points.loss)
    except fits.FitError as exc:
        raise ConfigError(f"{path}: {exc}" + (f" after dropping the {drop_highest} highest losses"
                                              if drop_highest else "")) from None
    return points
