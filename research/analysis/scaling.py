"""Loss against size and compute over finished runs: power-law fits (one family each, on its
frontier) and Approach 2's IsoFLOP budgets, with their fits.json entries and tables."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from research.analysis import families, fits, points, replicates
from research.analysis.runs import Run, finished
from research.format import si
from research.analysis.sections import Table

# (table column, axis label, symbol in the fitted formula)
AXES = (("params_total", "parameters (total)", "N"),
        ("params_active", "active parameters", "N_active"),
        ("flops", "training FLOPs", "C"))
# Fields a run may differ in and still share a fit against each axis: the model's shape sets its
# parameters; shape and run length (steps, batch, sequence) set its training compute.
SIZE_FIELDS = ("model.",)
COMPUTE_FIELDS = ("model.", "train.steps", "train.batch_size", "train.seq_len")
FREE = {"params_total": SIZE_FIELDS, "params_active": SIZE_FIELDS, "flops": COMPUTE_FIELDS}


@dataclass(frozen=True)
class ScalingFit:
    """A power law of final eval loss against one column, fitted to the runs on its frontier."""

    key: str
    label: str
    symbol: str
    fit: fits.PowerLaw | fits.FitError
    fitted: frozenset[str]  # names of the runs fitted: every seed of the settings on the frontier
    left_out: dict[str, str] = field(default_factory=dict)  # run name -> why it is not in the fit
    left_out_summary: str = ""  # `11 runs differ in train.steps`


def scaling_fits(runs: list[Run], rows: list[dict[str, Any]], fields: list[str]) -> list[ScalingFit]:
    """Loss against total (and, for MoE, active) parameters and against training FLOPs; none
    without finished runs.

    Only one family is fitted (runs that differ in what sets the axis alone); the frontier is taken
    over settings' mean losses, and every seed of a frontier setting is a point of the fit, so the
    bootstrap resamples seeds too.
    """
    done = finished(runs, rows)
    moe = any(r["params_active"] != r["params_total"] for _, r in done)
    out = []
    for key, label, symbol in AXES:
        pairs = [(run, r) for run, r in done if r[key] is not None]
        if not pairs or (key == "params_active" and not moe):
            continue
        family = families.largest(pairs, fields, FREE[key])
        groups = replicates.groups([(run, r["final_eval_loss"]) for run, r in family.members])
        x_of = {run.name: r[key] for run, r in family.members}
        gx = np.array([np.mean([x_of[run.name] for run in g.runs]) for g in groups], float)
        keep = fits.frontier(gx, np.array([g.mean for g in groups], float))
        fitted = [run for g, k in zip(groups, keep) if k for run in g.runs]
        losses = {run.name: r["final_eval_loss"] for run, r in family.members}
        try:
            fit = fits.fit_power_law([x_of[run.name] for run in fitted],
                                     [losses[run.name] for run in fitted])
        except fits.FitError as exc:
            fit = exc
        out.append(ScalingFit(key, label, symbol, fit, frozenset(run.name for run in fitted),
                              family.reasons(), family.summary()))
    return out


def compute_optimal(runs: list[Run], rows: list[dict[str, Any]], fields: list[str]
                    ) -> tuple[fits.IsoFlop | None, points.Points]:
    """Approach 2 over finished runs of one family (differing only in shape and run length; N:
    active parameters, so that C ≈ 6 N D holds for MoE too), and those runs as points."""
    done = [(run, r) for run, r in finished(runs, rows)
            if None not in (r["flops"], r["params_active"], r["tokens"])]
    family = points.from_rows([r for _, r in families.largest(done, fields, COMPUTE_FIELDS).members])
    iso = (fits.isoflop(family.flops, family.params, family.tokens, family.loss)
           if len(family) else None)
    return iso, family


def fits_record(scaling: list[ScalingFit], iso: fits.IsoFlop | None) -> dict[str, Any]:
    """fits.json: every fitted number, or why there is none."""
    record: dict[str, Any] = {}
    for s in scaling:
        fit = s.fit
        record[f"loss_vs_{s.key}"] = {
            **({"E": fit.E, "A": fit.A, "alpha": fit.alpha, "intervals_95": fit.intervals}
               if isinstance(fit, fits.PowerLaw) else {"error": str(fit)}),
            "runs": sorted(s.fitted), "left_out": s.left_out}
    if iso is not None:
        record["isoflop"] = {
            "budgets": [{"flops": b.flops, "runs": len(b.members), "n_opt": b.n_opt,
                         "d_opt": b.d_opt, "loss_opt": b.loss_opt, "note": b.note}
                        for b in iso.budgets],
            "n_opt_exponent": iso.params and iso.params.exponent,
            "n_opt_exponent_stderr": iso.params and iso.params.stderr,
            "d_opt_exponent": iso.tokens and iso.tokens.exponent,
            "d_opt_exponent_stderr": iso.tokens and iso.tokens.stderr, "note": iso.note,
        }
    return record


def fits_table(scaling: list[ScalingFit]) -> Table:
    """The fitted power laws (declined fits are listed under Omitted instead)."""
    header = ["eval loss against", "fit", "α [95%]", "E [95%]", "A [95%]", "runs fitted",
              "left out (each run's reason: table.csv)"]
    body = [[s.label, s.fit.formula(s.symbol), f"{s.fit.alpha:.3g} {s.fit.interval('alpha')}",
             f"{s.fit.E:.3g} {s.fit.interval('E')}", f"{s.fit.A:.3g} {s.fit.interval('A')}",
             str(len(s.fitted)), s.left_out_summary or "none"]
            for s in scaling if isinstance(s.fit, fits.PowerLaw)]
    return header, body


def budgets_table(iso: fits.IsoFlop) -> Table:
    """Approach 2 per budget, and the exponents over the budgets with a minimum."""
    header = ["compute C (FLOPs)", "runs", "N_opt", "D_opt", "loss at N_opt", "note"]
    body = []
    for b in iso.budgets:
        optimum = (["–"] * 3 if b.n_opt is None
                   else [si(b.n_opt), si(b.d_opt), f"{b.loss_opt:.4f}"])
        body.append([si(b.flops), str(len(b.members)), *optimum, b.note])
    if iso.params is not None:
        used = sum(b.n_opt is not None for b in iso.budgets)
        body.append([f"exponents over {used} budgets", "", f"∝ C^{iso.params.describe()}",
                     f"∝ C^{iso.tokens.describe()}", "", "± standard error"])
    else:
        body.append(["", "", "", "", "", iso.note])
    return header, body
