"""The parts of a report, as data: report.py writes them out as Markdown, HTML and TensorBoard.

Figures are drawn only when written (`Figure.draw`), so a section that is left out costs nothing
and tests can check which sections a report has without rendering any.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

Table = tuple[list[str], list[list[str]]]  # header, rows of cells


@dataclass(frozen=True)
class Figure:
    stem: str  # file name without .png
    title: str
    draw: Callable[[], Any]  # -> matplotlib Figure


@dataclass
class Section:
    title: str
    text: str = ""
    tables: list[tuple[str, Table]] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)


@dataclass
class Part:
    """A fitted part of a report: its fits.json entries, its section (None when it has nothing
    to show) and a line per thing it had to leave out, for the report's Omitted list."""

    record: dict[str, Any] = field(default_factory=dict)
    section: Section | None = None
    omitted: list[str] = field(default_factory=list)
