"""`research analyze DIR`: the runs below DIR as a table, figures, fits and one report page.

Everything goes to DIR/analysis/: table.csv and table.md (one row per run), fits.json, PNG
figures, report.md and a self-contained report.html, and the figures again as TensorBoard images
in analysis/tb (so `research board DIR` shows them beside the runs). See docs/analysis.md.
"""

from __future__ import annotations

import base64
import csv
import datetime
import html
import io
import json
import shutil
import struct
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from research.analysis import (downstream, fits, joint, mixture, mixture_report, plots, points,
                               replicates, transfer)
from research.analysis.runs import (ANALYSIS, COLUMNS, Run, family, finished, fixed_settings,
                                   format_value, load_runs, row)
from research.format import si

# (table column, axis label, symbol in the fitted formula)
SCALING_AXES = (("params_total", "parameters (total)", "N"),
                ("params_active", "active parameters", "N_active"),
                ("flops", "training FLOPs", "C"))
# Fields a run may differ in and still share a fit against each axis: the model's shape sets its
# parameters; shape and run length (steps, batch, sequence) set its training compute.
SIZE_FIELDS = ("model.",)
COMPUTE_FIELDS = ("model.", "train.steps", "train.batch_size", "train.seq_len")
FREE = {"params_total": SIZE_FIELDS, "params_active": SIZE_FIELDS, "flops": COMPUTE_FIELDS}
# The runs table's columns, most telling first (the CSV keeps COLUMNS' order).
FIRST = ("final_eval_loss", "state", "params_total", "tokens", "flops", "best_eval_loss",
         "final_eval_bpb")


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
    fitted: frozenset[str]  # names of the runs fitted: every seed of the settings on the frontier
    left_out: dict[str, str] = field(default_factory=dict)  # run name -> why it is not in the fit


def largest_family(pairs: list[tuple[Run, dict]], fields: list[str], free: tuple[str, ...]
                   ) -> tuple[list[tuple[Run, dict]], dict[str, str]]:
    """The family (runs differing only in `free` fields and the seed) with the most settings, and
    why each other run is left out: the fields in which it differs from that family."""
    families: dict[tuple, list[tuple[Run, dict]]] = {}
    for pair in pairs:
        families.setdefault(family(pair[0], fields, free), []).append(pair)
    if not families:
        return [], {}
    chosen = max(families.values(), key=lambda m: (len({replicates.group_key(r) for r, _ in m}),
                                                   len(m)))
    reference = chosen[0][0].values
    left_out = {}
    for run, _ in pairs:
        differ = [k for k in fields if not k.startswith(free) and run.values.get(k) != reference.get(k)]
        if differ:
            left_out[run.name] = "differs from the fitted runs in " + ", ".join(
                f"{k} ({format_value(run.values.get(k))} vs {format_value(reference.get(k))})"
                for k in differ)
    return chosen, left_out


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
    for key, label, symbol in SCALING_AXES:
        points = [(run, r) for run, r in done if r[key] is not None]
        if not points or (key == "params_active" and not moe):
            continue
        points, left_out = largest_family(points, fields, FREE[key])
        groups = replicates.groups([(run, r["final_eval_loss"]) for run, r in points])
        x_of = {run.name: r[key] for run, r in points}
        gx = np.array([np.mean([x_of[run.name] for run in g.runs]) for g in groups], float)
        keep = fits.frontier(gx, np.array([g.mean for g in groups], float))
        fitted = [run for g, k in zip(groups, keep) if k for run in g.runs]
        losses = {run.name: r["final_eval_loss"] for run, r in points}
        try:
            fit = fits.fit_power_law([x_of[run.name] for run in fitted],
                                     [losses[run.name] for run in fitted])
        except fits.FitError as exc:
            fit = exc
        out.append(ScalingFit(key, label, symbol, fit, frozenset(run.name for run in fitted),
                              left_out))
    return out


def compute_optimal(runs: list[Run], rows: list[dict[str, Any]], fields: list[str]
                    ) -> tuple[fits.IsoFlop | None, dict]:
    """Approach 2 over finished runs of one family (differing only in shape and run length; N:
    active parameters, so that C ≈ 6 N D holds for MoE too)."""
    done = [(run, r) for run, r in finished(runs, rows)
            if None not in (r["flops"], r["params_active"], r["tokens"])]
    done = [r for _, r in largest_family(done, fields, COMPUTE_FIELDS)[0]]
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


def fits_table(scaling: list[ScalingFit]) -> tuple[list[str], list[list[str]]]:
    header = ["eval loss against", "fit", "α [95%]", "E [95%]", "A [95%]", "runs fitted",
              "left out"]
    body = []
    for s in scaling:
        fit = s.fit
        left_out = "; ".join(f"{name}: {why}" for name, why in s.left_out.items()) or "none"
        if isinstance(fit, fits.PowerLaw):
            body.append([s.label, fit.formula(s.symbol), f"{fit.alpha:.3g} {fit.interval('alpha')}",
                         f"{fit.E:.3g} {fit.interval('E')}", f"{fit.A:.3g} {fit.interval('A')}",
                         str(len(s.fitted)), left_out])
        else:
            body.append([s.label, f"no fit: {fit}", "", "", "", str(len(s.fitted)), left_out])
    return header, body


def replicates_table(groups: list[replicates.Group]) -> tuple[list[str], list[list[str]]]:
    """One row per setting, best first: mean ± standard deviation over seeds, and each setting
    against the best by Welch's t-test."""
    header = ["setting", "runs", "final eval loss (mean ± sd)", "range", "vs the best"]
    body = []
    for i, g in enumerate(groups):
        spread = f"{min(g.losses):.4f} – {max(g.losses):.4f}" if g.n > 1 else ""
        if i == 0:
            versus = "best"
        else:
            c = replicates.compare(groups[0].losses, g.losses)
            versus = (f"+{c.difference:.4f}, p = {c.p_value:.2g}"
                      + ("" if c.distinguishable else " (within seed noise)")
                      if c.tested else f"+{c.difference:.4f}, untested (one run)")
        body.append([g.label, str(g.n), g.describe(), spread, versus])
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
    """The report's opening paragraph: the best setting, by how much, whether that is more than
    seed noise, and what the fits say."""
    states = Counter(run.state for run in runs)
    count = f"{len(runs)} run{'s' * (len(runs) != 1)}: " + ", ".join(
        f"{n} {state}" for state, n in states.most_common()) + "."
    done = finished(runs, rows)
    if not done:
        return f"No run finished with an eval loss ({count[:-1]}); the table shows each run's state."
    tokens = {r["tokens"] for _, r in done}
    budget = (f"At {si(tokens.pop())} training tokens per run, "
              if len(tokens) == 1 and None not in tokens else "")
    groups = replicates.groups([(run, r["final_eval_loss"]) for run, r in done])
    best = groups[0]
    bpb = [r["final_eval_bpb"] for run, r in done if run in best.runs and r["final_eval_bpb"]]
    notes = [f"{np.mean(bpb):.4f} bits/byte"] if bpb else []
    if best.n > 1:
        notes.append(f"mean ± sd over {best.n} seeds")
    loss = f"{best.describe()} nats/token" + (f" ({'; '.join(notes)})" if notes else "")
    if len(groups) == 1:
        text = f"{budget}{best.label} reached eval loss {loss}; it is the only setting that finished."
    else:
        second = groups[1]
        c = replicates.compare(best.losses, second.losses)
        text = (f"{budget}{best.label} reached the lowest final eval loss, {loss}, "
                f"{c.difference:.4f} nats ({100 * c.difference / second.mean:.2g}%) below the next "
                f"best, {second.label} ({second.describe()}): {c.verdict()}")
        if len(groups) > 2:
            text += f"; the worst, {groups[-1].label}, reached {groups[-1].describe()}"
        text += "."
    text = f"{text} {count}"
    for s in scaling:
        if isinstance(s.fit, fits.PowerLaw):
            text += (f" Against {s.label}, eval loss follows {s.fit.formula(s.symbol)} "
                     f"(α 95% interval {s.fit.interval('alpha')}; {len(s.fitted)} runs"
                     + (f", {len(s.left_out)} with other settings left out" if s.left_out else "")
                     + ").")
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
    """A table in its own horizontally scrolling box, so a wide one never widens the page."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in line) + "</tr>"
                   for line in body)
    return f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>"


def _code_block(header: list[str], body: list[list[str]]) -> str:
    """Columns aligned in a fixed-width block: TensorBoard's Text tab wraps table cells inside
    words, but scrolls a code block."""
    widths = [max(len(c) for c in column) for column in zip(header, *body)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [header, *body]]
    return "```\n" + "\n".join(lines) + "\n```"


_STYLE = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;
color:#222}.scroll{overflow-x:auto;max-width:100%;margin:1em 0}table{border-collapse:collapse;
font-size:13px}th,td{border:1px solid #ccc;padding:3px 8px;text-align:right;white-space:nowrap}
th{background:#f3f3f3;position:sticky;top:0}td:first-child,th:first-child{text-align:left;
position:sticky;left:0;background:#fff}th:first-child{background:#f3f3f3}
td:last-child{white-space:normal;min-width:16em;text-align:left}
img{max-width:100%;border:1px solid #eee;margin:0.5em 0}p.answer{font-size:16px;line-height:1.5}
p.meta{color:#666;font-size:13px}ul.fixed{columns:3 20em;font-size:13px;font-family:monospace;
padding-left:1.2em}"""


def _clip(text: str, width: int = 60) -> str:
    """A long value (mesh.rules) cut to one line; config.yaml has it whole."""
    return text if len(text) <= width else text[: width - 1] + "…"


def code_version() -> str:
    """The git commit of the code that wrote the report (and whether it had local changes)."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"],
                                capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--", "."],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return f"git {commit}" + (" with uncommitted changes" if dirty else "")


def provenance() -> str:
    now = datetime.datetime.now(datetime.timezone.utc)
    return f"Written {now:%Y-%m-%d %H:%M} UTC by research, code version {code_version()}."


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
    """Curves, loss against each distinguishing field, the scaling fits, IsoFLOP curves and
    learning-rate transfer."""
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
            runs, rows, s.key, s.label, s.symbol, s.fit, s.fitted, s.left_out, colors)))
    if iso is not None:
        out.append(Figure("isoflop", "IsoFLOP curves", plots.isoflop(
            iso, arrays["params_active"], arrays["final_eval_loss"], "active parameters")))
    if transfers:
        out.append(Figure("transfer", "Learning-rate transfer", transfer.figure(transfers)))
    return out


def analyze(root: Path, holdout: str | None = None, metric: str | None = None,
            kl: float = 0.0) -> tuple[Path, str]:
    """Write DIR/analysis/ for the runs below `root`; returns that folder and the answer paragraph.
    `holdout="largest"` fits L(N, D) without the largest compute budget and checks its prediction;
    `metric` and `kl`: the data-mixture part's objective and pull to the natural mix."""
    from research.sweep.runner import SWEEP_FILE
    from research.train.rundir import read_json

    root = Path(root)
    runs, fields = load_runs(root)
    rows = [row(run) for run in runs]
    scaling = scaling_fits(runs, rows, fields)
    iso, arrays = compute_optimal(runs, rows, fields)
    law = joint.section(points.from_rows([r for _, r in finished(runs, rows)]), iso, holdout)
    law = law.extend(downstream.section(runs, finished(runs, rows), holdout))
    law = law.extend(mixture_report.section(runs, fields, read_json(root / SWEEP_FILE), metric, kl))
    transfers = transfer.grids(runs, rows, fields)
    answer = " ".join(filter(None, [headline(runs, rows, scaling, iso), transfer.summary(transfers)]))
    groups = replicates.groups([(run, r["final_eval_loss"]) for run, r in finished(runs, rows)])

    out = root / ANALYSIS
    _clear(out)
    columns = ["run", *fields, *COLUMNS]
    with (out / "table.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    drawn = figures(runs, rows, fields, scaling, iso, arrays, transfers)
    shown = ["run", *fields, *FIRST, *(c for c in COLUMNS if c not in FIRST)]
    runs_table = (shown, [[cell(c, r[c]) for c in shown] for r in rows])
    tables = [("Runs", runs_table)]
    if groups and (len(groups) > 1 or groups[0].n > 1):
        tables.insert(0, ("Settings and seed noise", replicates_table(groups)))
    if scaling:
        tables.append(("Scaling-law fits", fits_table(scaling)))
    if iso is not None:
        tables.append(("IsoFLOP budgets", budgets_table(iso)))
    if transfers:
        tables.append(("Learning-rate transfer", transfer.table(transfers)))
    (out / "table.md").write_text(_markdown_table(*runs_table) + "\n")
    fixed = [f"{key} = {_clip(format_value(value))}"
             for key, value in fixed_settings(runs, fields).items()]
    write_report(out, f"Analysis of {root.resolve().name}", answer,
                 {**fits_record(scaling, iso), **law.record}, tables, drawn, law, fixed)
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


def analyze_mixture_points(table: mixture.Table, coefficients: dict[str, float],
                           caps: np.ndarray | None, natural: np.ndarray | None, kl: float,
                           source: Path, out: Path) -> tuple[Path, str]:
    """Write fits.json (its "mixture" entry), the report and its figures to `out` for a table of
    mixtures (`--mixture-points`)."""
    part = mixture_report.build(table, coefficients, caps, natural, kl, {})
    answer = f"{len(table.names)} mixtures of {', '.join(table.sources)} from {source}."
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "tb", ignore_errors=True)  # not _clear: `out` may hold the user's PNGs
    write_report(out, f"Mixture laws of {source.name}", answer, part.record, [], [], part)
    return out, answer


def write_report(out: Path, title: str, answer: str, record: dict[str, Any],
                 tables: list[tuple[str, tuple[list[str], list[list[str]]]]],
                 drawn: list[Figure], law: joint.Section, fixed: list[str] = ()) -> None:
    """fits.json, the figures as PNGs, report.md, report.html and TensorBoard images and text in
    `out`, headed by the date and code version; the joint-law section (its paragraph, tables and
    figures) follows the others, then the `fixed` settings (`key = value` lines)."""
    (out / "fits.json").write_text(json.dumps(record, indent=1))
    tables = [*tables, *law.tables]
    drawn = [*drawn, *(Figure(*f) for f in law.figures)]
    if law.text:
        answer = f"{answer}\n\n{law.text}"
    meta = provenance()
    pngs = {}
    for fig in drawn:
        buffer = io.BytesIO()
        fig.figure.savefig(buffer, format="png", dpi=110)
        pngs[fig.stem] = buffer.getvalue()
        (out / f"{fig.stem}.png").write_bytes(pngs[fig.stem])

    text = "\n".join([answer, *(f"\n## {name}\n\n{_markdown_table(*t)}" for name, t in tables)])
    fixed_md = ["\n## Fixed settings (the same in every run)\n\n" + "\n".join(
        f"- `{line}`" for line in fixed)] if fixed else []
    images_md = [f"\n## {fig.title}\n\n![{fig.title}]({fig.stem}.png)" for fig in drawn]
    (out / "report.md").write_text("\n".join([f"# {title}\n", f"_{meta}_\n", text, *fixed_md,
                                              *images_md]) + "\n")
    page = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
            f"<p class='meta'>{html.escape(meta)}</p>"]
    page += [f"<p class='answer'>{html.escape(part)}</p>" for part in answer.split("\n\n")]
    page += [f"<h2>{html.escape(name)}</h2>{_html_table(*t)}" for name, t in tables]
    if fixed:
        page.append("<h2>Fixed settings (the same in every run)</h2><ul class='fixed'>"
                    + "".join(f"<li>{html.escape(line)}</li>" for line in fixed) + "</ul>")
    page += [f"<h2>{html.escape(fig.title)}</h2><img alt='{html.escape(fig.title)}' src='data:image/"
             f"png;base64,{base64.b64encode(pngs[fig.stem]).decode()}'>" for fig in drawn]
    (out / "report.html").write_text("\n".join(page) + "</body></html>\n")

    from tensorboardX import SummaryWriter

    with SummaryWriter(str(out / "tb")) as writer:
        for fig in drawn:
            writer.file_writer.add_summary(_image_summary(f"analysis/{fig.stem}", pngs[fig.stem]), 0)
        writer.add_text("analysis/answer", f"{answer}\n\n_{meta}_", 0)
        for name, table in tables:
            writer.add_text("analysis/" + name.split()[0].lower(), _code_block(*table), 0)
        if fixed:
            writer.add_text("analysis/fixed", "```\n" + "\n".join(fixed) + "\n```", 0)
