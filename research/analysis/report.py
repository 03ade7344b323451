"""`research analyze DIR`: the runs below DIR as a table, figures, fits and one report page.

Everything goes to DIR/analysis/: table.csv and table.md (one row per run), fits.json, PNG
figures, report.md and a self-contained report.html, and the figures again as TensorBoard images
in analysis/tb (so `research board DIR` shows them beside the runs). See docs/analysis.md.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import shutil
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from research.analysis import fits, joint, plots, points, transfer
from research.analysis.runs import (ANALYSIS, COLUMNS, Run, finished, format_value, load_runs, row,
                                   si)

# (table column, axis label, symbol in the fitted formula)
SCALING_AXES = (("params_total", "parameters (total)", "N"),
                ("params_active", "active parameters", "N_active"),
                ("flops", "training FLOPs", "C"))


@dataclass(frozen=True)
class Figure:
    stem: str  # file name without .png
    title: str
    figure: Any  # matplotlib Figure


# ----------------------------------------------------------------------------- numbers


def cell(column: str, value: Any) -> str:
    """A table cell for people (the CSV keeps full precision)."""
    if value is None:
        return "–"
    if column in ("params_total", "params_active", "params_non_embedding", "tokens",
                  "tokens_per_sec"):
        return si(value)
    if column == "flops":
        return f"{value:.3g}"
    if column == "mfu":
        return f"{value:.2%}"
    if column.endswith(("_loss", "_bpb")):
        return f"{value:.4f}"
    return format_value(value)


# ----------------------------------------------------------------------------- fits


@dataclass(frozen=True)
class ScalingFit:
    """A power law of final eval loss against one column, fitted to the runs on its frontier."""

    key: str
    label: str
    symbol: str
    fit: fits.PowerLaw | fits.FitError
    fitted: frozenset[str]  # names of the runs on the frontier


def scaling_fits(runs: list[Run], rows: list[dict[str, Any]]) -> list[ScalingFit]:
    """Loss against total (and, for MoE, active) parameters and against training FLOPs; none
    without finished runs."""
    done = finished(runs, rows)
    moe = any(r["params_active"] != r["params_total"] for _, r in done)
    out = []
    for key, label, symbol in SCALING_AXES:
        points = [(run.name, r[key], r["final_eval_loss"]) for run, r in done if r[key] is not None]
        if not points or (key == "params_active" and not moe):
            continue
        names = np.array([p[0] for p in points], object)
        x, y = np.array([p[1:] for p in points], float).reshape(-1, 2).T
        keep = fits.frontier(x, y)
        try:
            fit = fits.fit_power_law(x[keep], y[keep])
        except fits.FitError as exc:
            fit = exc
        out.append(ScalingFit(key, label, symbol, fit, frozenset(names[keep])))
    return out


def compute_optimal(runs: list[Run], rows: list[dict[str, Any]]) -> tuple[fits.IsoFlop | None, dict]:
    """Approach 2 over finished runs (N: active parameters, so that C ≈ 6 N D holds for MoE too)."""
    done = [r for _, r in finished(runs, rows)
            if None not in (r["flops"], r["params_active"], r["tokens"])]
    arrays = {k: np.array([r[k] for r in done], float)
              for k in ("flops", "params_active", "tokens", "final_eval_loss")}
    iso = fits.isoflop(*arrays.values()) if done else None
    return iso, arrays


def fits_record(scaling: list[ScalingFit], iso: fits.IsoFlop | None) -> dict[str, Any]:
    """fits.json: every fitted number, or why there is none."""
    record: dict[str, Any] = {}
    for s in scaling:
        fit = s.fit
        record[f"loss_vs_{s.key}"] = {
            **({"E": fit.E, "A": fit.A, "alpha": fit.alpha, "intervals_95": fit.intervals}
               if isinstance(fit, fits.PowerLaw) else {"error": str(fit)}),
            "runs": sorted(s.fitted)}
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


def fits_table(scaling: list[ScalingFit]) -> tuple[list[str], list[list[str]]]:
    header = ["eval loss against", "fit", "α [95%]", "E [95%]", "A [95%]", "runs on the frontier"]
    body = []
    for s in scaling:
        fit = s.fit
        if isinstance(fit, fits.PowerLaw):
            body.append([s.label, fit.formula(s.symbol), f"{fit.alpha:.3g} {fit.interval('alpha')}",
                         f"{fit.E:.3g} {fit.interval('E')}", f"{fit.A:.3g} {fit.interval('A')}",
                         str(len(s.fitted))])
        else:
            body.append([s.label, f"no fit: {fit}", "", "", "", str(len(s.fitted))])
    return header, body


def budgets_table(iso: fits.IsoFlop) -> tuple[list[str], list[list[str]]]:
    header = ["compute C (FLOPs)", "runs", "N_opt", "D_opt", "loss at N_opt", "note"]
    body = []
    for b in iso.budgets:
        optimum = (["–"] * 3 if b.n_opt is None
                   else [si(b.n_opt), si(b.d_opt), f"{b.loss_opt:.4f}"])
        body.append([f"{b.flops:.3g}", str(len(b.members)), *optimum, b.note])
    if iso.params is not None:
        used = sum(b.n_opt is not None for b in iso.budgets)
        body.append([f"exponents over {used} budgets", "", f"∝ C^{iso.params.describe()}",
                     f"∝ C^{iso.tokens.describe()}", "", "± standard error"])
    else:
        body.append(["", "", "", "", "", iso.note])
    return header, body


# ----------------------------------------------------------------------------- the answer


def headline(runs: list[Run], rows: list[dict[str, Any]], scaling: list[ScalingFit],
             iso: fits.IsoFlop | None) -> str:
    """The report's opening paragraph: the best setting, by how much, and what the fits say."""
    states = Counter(run.state for run in runs)
    count = f"{len(runs)} run{'s' * (len(runs) != 1)}: " + ", ".join(
        f"{n} {state}" for state, n in states.most_common()) + "."
    done = sorted(finished(runs, rows), key=lambda p: p[1]["final_eval_loss"])
    if not done:
        return f"No run finished with an eval loss ({count[:-1]}); the table shows each run's state."
    tokens = {r["tokens"] for _, r in done}
    budget = f"At {si(tokens.pop())} training tokens per run, " if len(tokens) == 1 else ""
    best_run, best = done[0]
    loss = f"{best['final_eval_loss']:.4f} nats/token"
    if best["final_eval_bpb"] is not None:
        loss += f" ({best['final_eval_bpb']:.4f} bits/byte)"
    if len(done) == 1:
        text = f"{budget}{best_run.label} reached eval loss {loss}; it is the only finished run."
    else:
        next_run, second = done[1]
        gap = second["final_eval_loss"] - best["final_eval_loss"]
        text = (f"{budget}{best_run.label} reached the lowest final eval loss, {loss}, "
                f"{gap:.4f} nats ({100 * gap / second['final_eval_loss']:.2g}%) better than the next best, "
                f"{next_run.label} ({second['final_eval_loss']:.4f})")
        if len(done) > 2:
            worst_run, worst = done[-1]
            text += f"; the worst, {worst_run.label}, reached {worst['final_eval_loss']:.4f}"
        text += "."
    text = f"{text} {count}"
    for s in scaling:
        if isinstance(s.fit, fits.PowerLaw):
            text += (f" Against {s.label}, eval loss follows {s.fit.formula(s.symbol)} "
                     f"(α 95% interval {s.fit.interval('alpha')}).")
    if iso is not None and iso.params is not None:
        text += (f" Compute-optimal scaling over {sum(b.n_opt is not None for b in iso.budgets)} "
                 f"budgets: N_opt ∝ C^{iso.params.describe()}, D_opt ∝ C^{iso.tokens.describe()}.")
    return text


# ----------------------------------------------------------------------------- writing


def _markdown_table(header: list[str], body: list[list[str]]) -> str:
    escape = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(escape(c) for c in line) + " |" for line in body]
    return "\n".join(lines)


def _html_table(header: list[str], body: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in line) + "</tr>"
                   for line in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


_STYLE = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;
color:#222}table{border-collapse:collapse;font-size:13px;margin:1em 0}th,td{border:1px solid #ccc;
padding:3px 8px;text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}
img{max-width:100%;border:1px solid #eee;margin:0.5em 0}p.answer{font-size:16px;line-height:1.5}"""


def _image_summary(tag: str, png: bytes) -> Any:
    """A TensorBoard image of PNG bytes as they are (add_figure would draw the figure again)."""
    from tensorboardX.proto.summary_pb2 import Summary

    width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk
    image = Summary.Image(height=height, width=width, colorspace=4, encoded_image_string=png)
    return Summary(value=[Summary.Value(tag=tag, image=image)])


def _clear(out: Path) -> None:
    """Remove what an earlier analyze wrote that this one might not (a stale figure, old events)."""
    shutil.rmtree(out / "tb", ignore_errors=True)
    for png in out.glob("*.png"):
        png.unlink()
    out.mkdir(parents=True, exist_ok=True)


def figures(runs: list[Run], rows: list[dict[str, Any]], fields: list[str],
            scaling: list[ScalingFit], iso: fits.IsoFlop | None, arrays: dict,
            transfers: list[transfer.Transfer] = ()) -> list[Figure]:
    colors = plots.run_colors(runs)
    out = []
    if any(run.series("train/loss") or run.series("eval/loss") for run in runs):
        out.append(Figure("curves", "Loss curves", plots.curves(runs, colors)))
    plotted = [k for k in fields if any(r[k] is not None for _, r in finished(runs, rows))]
    if plotted:
        out.append(Figure("swept", "Final eval loss by swept field",
                          plots.swept(runs, rows, plotted, colors)))
    for s in scaling:
        out.append(Figure(f"loss_vs_{s.key}", f"Eval loss against {s.label}", plots.scaling(
            runs, rows, s.key, s.label, s.symbol, s.fit, s.fitted, colors)))
    if iso is not None:
        out.append(Figure("isoflop", "IsoFLOP curves", plots.isoflop(
            iso, arrays["params_active"], arrays["final_eval_loss"], "active parameters")))
    if transfers:
        out.append(Figure("transfer", "Learning-rate transfer", transfer.figure(transfers)))
    return out


def analyze(root: Path, holdout: str | None = None) -> tuple[Path, str]:
    """Write DIR/analysis/ for the runs below `root`; returns that folder and the answer paragraph.
    `holdout="largest"` fits L(N, D) without the largest compute budget and checks its prediction."""
    root = Path(root)
    runs, fields = load_runs(root)
    rows = [row(run) for run in runs]
    scaling = scaling_fits(runs, rows)
    iso, arrays = compute_optimal(runs, rows)
    law = joint.section(points.from_rows([r for _, r in finished(runs, rows)]), iso, holdout)
    transfers = transfer.grids(runs, rows, fields)
    answer = " ".join(filter(None, [headline(runs, rows, scaling, iso), transfer.summary(transfers)]))

    out = root / ANALYSIS
    _clear(out)
    columns = ["run", *fields, *COLUMNS]
    with (out / "table.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    drawn = figures(runs, rows, fields, scaling, iso, arrays, transfers)
    tables = [("Runs", (columns, [[cell(c, r[c]) for c in columns] for r in rows]))]
    if scaling:
        tables.append(("Scaling-law fits", fits_table(scaling)))
    if iso is not None:
        tables.append(("IsoFLOP budgets", budgets_table(iso)))
    if transfers:
        tables.append(("Learning-rate transfer", transfer.table(transfers)))
    (out / "table.md").write_text(_markdown_table(*tables[0][1]) + "\n")
    write_report(out, f"Analysis of {root.resolve().name}", answer,
                 {**fits_record(scaling, iso), **law.record}, tables, drawn, law)
    return out, answer


def analyze_points(table: points.Points, source: Path, out: Path,
                   holdout: str | None = None) -> tuple[Path, str]:
    """Write fits.json, the report and its figures to `out` for a table of points (`--points`)."""
    iso = fits.isoflop(table.flops, table.params, table.tokens, table.loss)
    law = joint.section(table, iso, holdout)
    drawn = []
    if iso is not None:
        drawn.append(Figure("isoflop", "IsoFLOP curves", plots.isoflop(
            iso, table.params, table.loss, "parameters")))
    tables = [("IsoFLOP budgets", budgets_table(iso))] if iso is not None else []
    answer = f"{len(table)} points from {source}."
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "tb", ignore_errors=True)  # not _clear: `out` may hold the user's PNGs
    record = {**fits_record([], iso), **law.record}
    write_report(out, f"Scaling laws of {source.name}", answer, record, tables, drawn, law)
    return out, answer


def write_report(out: Path, title: str, answer: str, record: dict[str, Any],
                 tables: list[tuple[str, tuple[list[str], list[list[str]]]]],
                 drawn: list[Figure], law: joint.Section) -> None:
    """fits.json, the figures as PNGs, report.md, report.html and TensorBoard images in `out`;
    the joint-law section (its paragraph, tables and figures) follows the others."""
    (out / "fits.json").write_text(json.dumps(record, indent=1))
    tables = [*tables, *law.tables]
    drawn = [*drawn, *(Figure(*f) for f in law.figures)]
    if law.text:
        answer = f"{answer}\n\n{law.text}"
    pngs = {}
    for fig in drawn:
        buffer = io.BytesIO()
        fig.figure.savefig(buffer, format="png", dpi=110)
        pngs[fig.stem] = buffer.getvalue()
        (out / f"{fig.stem}.png").write_bytes(pngs[fig.stem])

    text = "\n".join([answer, *(f"\n## {name}\n\n{_markdown_table(*t)}" for name, t in tables)])
    images_md = [f"\n## {fig.title}\n\n![{fig.title}]({fig.stem}.png)" for fig in drawn]
    (out / "report.md").write_text("\n".join([f"# {title}\n", text, *images_md]) + "\n")
    page = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    page += [f"<p class='answer'>{html.escape(part)}</p>" for part in answer.split("\n\n")]
    page += [f"<h2>{html.escape(name)}</h2>{_html_table(*t)}" for name, t in tables]
    page += [f"<h2>{html.escape(fig.title)}</h2><img alt='{html.escape(fig.title)}' src='data:image/"
             f"png;base64,{base64.b64encode(pngs[fig.stem]).decode()}'>" for fig in drawn]
    (out / "report.html").write_text("\n".join(page) + "</body></html>\n")

    from tensorboardX import SummaryWriter

    with SummaryWriter(str(out / "tb")) as writer:
        for fig in drawn:
            writer.file_writer.add_summary(_image_summary(f"analysis/{fig.stem}", pngs[fig.stem]), 0)
        writer.add_text("analysis/report", text, 0)
