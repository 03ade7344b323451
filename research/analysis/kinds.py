"""What question a folder of runs asks, read from its sweep spec (sweep.json) or, for a folder
without one, from what its runs vary.

| kind     | the runs                                         | the question                      |
|----------|--------------------------------------------------|-----------------------------------|
| isoflop  | `search.method: isoflop` (or several compute     | the compute-optimal size per      |
|          | budgets with 3+ sizes each)                      | budget, and how it scales         |
| transfer | `optim.lr` x a size (d_model, n_layers)          | does the best lr move with size   |
| lr       | `optim.lr` alone                                 | the best learning rate            |
| seeds    | one setting over several seeds                   | how large is run-to-run noise     |
| ladder   | one model size field (n_layers, d_model, ...)    | how loss falls with size          |
| mixture  | `search.method: mixture`                         | which data mix (issue 24's laws)  |
| grid     | anything else                                    | which setting is best             |
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from research.analysis import transfer
from research.analysis.runs import Run
from research.sweep.rundir import SWEEP_FILE
from research.train.rundir import read_json

KINDS = ("isoflop", "transfer", "lr", "seeds", "ladder", "mixture", "grid")
SIZE_FIELDS = ("model.n_layers", "model.d_model", "model.d_ff", "model.n_heads",
               "model.moe.n_experts", "model.moe.d_expert")


@dataclass(frozen=True)
class Kind:
    name: str  # one of KINDS
    swept: tuple[str, ...]  # the fields the question varies (search.params, or what differs)
    derived: tuple[str, ...] = ()  # fields that follow from the swept ones (derived:, train.steps)
    method: str | None = None  # the spec's search.method, when the folder is a sweep dir

    @property
    def free(self) -> tuple[str, ...]:
        """Fields runs of one comparison may differ in: the swept and derived ones."""
        return (*self.swept, *self.derived)

    @property
    def field(self) -> str | None:
        """The field the lead figure plots against (ladder, lr), or None."""
        if self.name == "lr":
            return transfer.LR
        if self.name == "ladder":
            return self.swept[0]
        return None


def sweep_info(root: Path) -> dict[str, Any]:
    """The sweep dir's sweep.json ({} for a plain folder of runs)."""
    return read_json(Path(root) / SWEEP_FILE) or {}


def _swept(runs: list[Run], fields: list[str], info: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(swept, derived) fields: the spec's, else the trials' records', else all that differ."""
    if info.get("params"):
        swept = list(info["params"])
        derived = list(info.get("derived", []))
    elif any(run.trial for run in runs):
        swept = list(dict.fromkeys(k for run in runs for k in (run.trial or {}).get("params", {})))
        derived = list(dict.fromkeys(k for run in runs for k in (run.trial or {}).get("derived", {})))
    else:
        swept, derived = list(fields), []
    derived += [k for k in ("train.steps",) if info.get("method") == "isoflop" and k not in derived]
    return swept, derived


def detect(root: Path, runs: list[Run], fields: list[str], budgets: int) -> Kind:
    """The folder's kind; `budgets` is how many IsoFLOP budgets (3+ sizes each) its runs form."""
    info = sweep_info(root)
    method = info.get("method")
    swept, derived = _swept(runs, fields, info)
    make = lambda name: Kind(name, tuple(swept), tuple(derived), method)  # noqa: E731
    if method == "mixture":
        return make("mixture")
    if method == "isoflop" or (method is None and budgets >= 2):
        return make("isoflop")
    varied = [k for k in swept if len({repr(run.values.get(k, run.config.get(k)))
                                       for run in runs}) > 1]
    if transfer.LR in varied and any(k in transfer.SIZES for k in varied):
        return make("transfer")
    if varied == [transfer.LR]:
        return make("lr")
    if not varied and len(runs) > 1 and len({run.seed for run in runs}) > 1:
        return make("seeds")
    if len(varied) == 1 and varied[0] in SIZE_FIELDS:
        return Kind("ladder", tuple(varied), tuple(k for k in (*swept, *derived) if k not in varied),
                    method)
    return make("grid")
