"""What a running sweep shows: each running trial's step, losses and time left, as it trains.

On a terminal, a table redrawn in place (rich Live) with the runner's event lines above it;
elsewhere (a log file, a pipe, a test) plain lines: one per trial whenever its step has moved and
`every_s` seconds have passed since that trial's last line.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from rich.console import Console
from rich.live import Live
from rich.table import Table

from research.sweep.spec import SEED_KEY, short_name


@dataclass
class TrialProgress:
    """One running trial as read from its metrics.jsonl."""

    name: str
    values: dict[str, Any]  # swept values (and the replicate's seed)
    steps: int | None
    step: int | None = None
    loss: float | None = None
    eval_loss: float | None = None
    _first: tuple[float, int] | None = field(default=None, repr=False)  # (time, step) first seen

    def update(self, entries: list[dict[str, Any]], now: float) -> None:
        for entry in entries:
            if "loss" in entry:
                self.loss = entry["loss"]
            if "eval_loss" in entry:
                self.eval_loss = entry["eval_loss"]
            if isinstance(entry.get("step"), int):
                self.step = entry["step"]
        if self._first is None and self.step is not None:
            self._first = (now, self.step)  # steps read together arrived at one time: no rate yet

    def eta(self, now: float) -> float | None:
        """Seconds left at the step rate since the first step seen (compilation excluded)."""
        if self._first is None or self.steps is None or self.step is None:
            return None
        since, first = self._first
        if self.step <= first:
            return None
        return (self.steps - self.step) * (now - since) / (self.step - first)

    def cells(self, now: float) -> dict[str, str]:
        step = "" if self.step is None else f"{self.step}/{self.steps or '?'}"
        return {"step": step, "loss": _number(self.loss), "eval loss": _number(self.eval_loss),
                "ETA": duration(self.eta(now))}

    def line(self, now: float) -> str:
        cells = self.cells(now)
        parts = [f"step {cells['step']}", f"loss {cells['loss']}"]
        if self.eval_loss is not None:
            parts.append(f"eval loss {cells['eval loss']}")
        if cells["ETA"]:
            parts.append(f"ETA {cells['ETA']}")
        return f"[{self.name}] " + ", ".join(parts)


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = round(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class PlainLines:
    """Event lines as they come; a progress line per trial at most every `every_s` seconds."""

    def __init__(self, say: Callable[[str], None], every_s: float):
        self.say, self.every_s = say, every_s
        self.shown: dict[str, tuple[float, int | None]] = {}  # trial -> (time, step) last printed

    def line(self, text: str) -> None:
        self.say(text)

    def update(self, trials: list[TrialProgress], now: float) -> None:
        for trial in trials:
            last_time, last_step = self.shown.get(trial.name, (-float("inf"), None))
            if trial.step is not None and trial.step != last_step and now - last_time >= self.every_s:
                self.say(trial.line(now))
                self.shown[trial.name] = (now, trial.step)

    def close(self) -> None:
        pass


class LiveTable:
    """A rich table of the running trials, redrawn in place; event lines scroll above it."""

    def __init__(self, title: str, params: list[str], console: Console | None = None):
        self.title, self.params = title, params
        self.live = Live(self._table([], time.time()), console=console or Console(),
                         auto_refresh=False, transient=True)
        self.live.start()

    def _table(self, trials: list[TrialProgress], now: float) -> Table:
        table = Table(title=self.title, title_justify="left")
        table.add_column("trial")
        names = [*self.params, *([SEED_KEY] if any(SEED_KEY in t.values for t in trials) else [])]
        for name in names:
            table.add_column(short_name(name), justify="right")
        for column in ("step", "loss", "eval loss", "ETA"):
            table.add_column(column, justify="right")
        for trial in trials:
            values = [_cell(trial.values.get(k)) for k in names]
            table.add_row(trial.name.split("-", 1)[0], *values, *trial.cells(now).values())
        return table

    def line(self, text: str) -> None:
        self.live.console.print(text, markup=False, highlight=False)

    def update(self, trials: list[TrialProgress], now: float) -> None:
        self.live.update(self._table(trials, now), refresh=True)

    def close(self) -> None:
        self.live.stop()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def make_view(title: str, params: list[str], say: Callable[[str], None], every_s: float,
              live: bool | None = None) -> PlainLines | LiveTable:
    """A live table when stdout is a terminal (or `live`), else plain lines through `say`."""
    if live if live is not None else sys.stdout.isatty():
        return LiveTable(title, params)
    return PlainLines(say, every_s)
