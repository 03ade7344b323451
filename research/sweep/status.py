"""`research sweep status DIR`: one row per trial, from the store and the trials' run dirs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from research.config import ConfigError
from research.sweep import rundir
from research.sweep.runner import SWEEP_FILE
from research.sweep.spec import short_name
from research.sweep.store import Store
from research.train.rundir import read_json

_STYLES = {"pending": "dim", "running": "cyan", "interrupted": "yellow", "done": "green",
           "failed": "red", "pruned": "magenta"}


def trial_rows(sweep_dir: Path, storage: str | None = None) -> tuple[dict[str, Any], list[dict]]:
    """The sweep's info and, per trial: name, params, state, step, steps, objective, error.

    A running trial whose worker is gone shows as `interrupted` (the next worker resumes it).
    """
    info = read_json(sweep_dir / SWEEP_FILE)
    if info is None:
        raise ConfigError(f"{sweep_dir}: not a sweep dir (no {SWEEP_FILE})")
    store = Store(storage or info["storage"], info["name"])
    if not store.exists():
        raise ConfigError(f"{store.label}: holds no sweep named {info['name']!r}")
    now = time.time()
    rows = []
    for row in store.rows():
        trial = row["trial"] or {"name": f"t{row['number']:03d}", "params": {}}
        state = row["state"]
        if state == "running" and store.claimable(row, now):
            state = "interrupted"
        step, steps = rundir.progress(rundir.trial_dir(sweep_dir, trial))
        params = {**trial["params"], **({"seed": trial["seed"]} if trial.get("seed") is not None
                                         else {})}
        rows.append({"number": row["number"], "name": trial["name"], "params": params,
                     "state": state, "step": step, "steps": steps, "objective": row["objective"],
                     "error": row["error"]})
    return info, rows


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def print_status(sweep_dir: Path, storage: str | None = None, console: Console | None = None) -> None:
    info, rows = trial_rows(sweep_dir, storage)
    console = console or Console()
    table = Table(title=f"sweep {info['name']} ({sweep_dir})")
    table.add_column("trial", justify="right")
    columns = [*info["params"], *(["seed"] if info.get("seeds", 1) > 1 else [])]
    for key in columns:
        table.add_column(short_name(key), justify="right")
    table.add_column("state")
    table.add_column("step", justify="right")
    table.add_column(info["metric"], justify="right")
    table.add_column("error", overflow="fold")
    for row in rows:
        step = "" if row["step"] is None else f"{row['step']}/{row['steps'] or '?'}"
        table.add_row(f"t{row['number']:03d}", *(_cell(row["params"].get(k)) for k in columns),
                      f"[{_STYLES[row['state']]}]{row['state']}[/]", step,
                      _cell(row["objective"]), row["error"] or "")
    console.print(table)
    counts = {state: sum(r["state"] == state for r in rows) for state in _STYLES}
    unstarted = info["budget"] - len(rows)
    summary = ", ".join(f"{n} {state}" for state, n in counts.items() if n)
    if unstarted > 0:
        summary += f"{', ' if summary else ''}{unstarted} not yet sampled"
    console.print(f"{len(rows) + max(unstarted, 0)} trials: {summary}")
    done = [r for r in rows if r["objective"] is not None]
    if done:
        best = (min if info["direction"] == "minimize" else max)(done, key=lambda r: r["objective"])
        console.print(f"best: {best['name']} {info['metric']} {best['objective']:.4g}")
