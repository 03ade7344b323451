"""`research analyze DIR`: the runs below DIR as a table, figures, fits and one report page.

Everything goes to DIR/analysis/: table.csv and table.md (one row per run), fits.json, PNG
figures, report.md and a self-contained report.html, and the figures again as TensorBoard images
in analysis/tb with a custom-scalars layout (so `research board DIR` shows them beside the runs).

The report leads with the answer to the sweep's question (kinds.py tells which, questions.py
answers it), then the sections that can say something; a section with nothing to show (a fit
declined for lack of points, a panel of runs no line can join) is one line under "Omitted".
See docs/analysis.md.
"""

from __future__ import annotations

import base64
import csv
import datetime
import html
import io
import json
import re
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from research.analysis import (downstream, fits, joint, kinds, layout, mixture, mixture_report,
                               plots, points, transfer)
from research.analysis.questions import Lead, Study, agreement, lead as lead_of
from research.analysis.runs import (ANALYSIS, COLUMNS, family, finished, fixed_settings,
                                   format_value, load_runs, row)
from research.analysis.scaling import budgets_table, compute_optimal, fits_record, fits_table, \
    scaling_fits
from research.analysis.sections import Figure, Section
from research.format import si

# The runs table's columns, most telling first (the CSV keeps COLUMNS' order).
FIRST = ("final_eval_loss", "state", "params_total", "tokens", "flops", "best_eval_loss",
         "final_eval_bpb")
LEFT_OUT = "left_out"  # table.csv's column: why a run is not in the lead's comparison


# ----------------------------------------------------------------------------- numbers


def cell(column: str, value: Any) -> str:
    """A table cell for people (the CSV keeps full precision)."""
    if value is None:
        return "–"
    if column in ("params_total", "params_active", "params_non_embedding", "tokens",
                  "tokens_per_sec", "flops"):
        return si(value)
    if column == "mfu":
        return f"{value:.2%}"
    if column.endswith(("_loss", "_bpb")):
        return f"{value:.4f}"
    return format_value(value)


# ----------------------------------------------------------------------------- sections


def study(root: Path, holdout: str | None = None, metric: str | None = None, kl: float = 0.0
          ) -> Study:
    """Read the runs below `root`, fit everything that can be fitted, and tell the sweep's kind.
    `metric` and `kl`: the data-mixture part's objective and pull to the natural mix."""
    from research.sweep.runner import SWEEP_FILE
    from research.train.rundir import read_json

    runs, fields = load_runs(root)
    rows = [row(run) for run in runs]
    scaling = scaling_fits(runs, rows, fields)
    iso, iso_points = compute_optimal(runs, rows, fields)
    kind = kinds.detect(root, runs, fields, len(iso.budgets) if iso is not None else 0)
    done = finished(runs, rows)
    law = joint.fit(points.from_rows([r for _, r in done]), iso, holdout)
    by: dict[str, float] | None = None
    label = ""
    if kind.name == "isoflop":
        by, label = {run.name: r["flops"] for run, r in zip(runs, rows)}, "training compute C (FLOPs)"
    elif kind.field is not None:
        by, label = {run.name: run.values.get(kind.field) for run in runs}, kind.field
    return Study(Path(root), runs, rows, fields, kind, scaling, iso, iso_points, law,
                 transfer.grids(runs, rows, fields), plots.palette(runs, by, label),
                 downstream.section(runs, done, holdout),
                 mixture_report.section(runs, fields, read_json(Path(root) / SWEEP_FILE), metric,
                                        kl))


def _joined(study: Study, key: str) -> bool:
    """Whether two finished settings differ in `key` alone, so a line can join them."""
    seen: dict[tuple, set[str]] = {}
    for run, r in study.done:
        if r.get(key) is not None:
            seen.setdefault(family(run, study.fields, (key,)), set()).add(repr(r[key]))
    return any(len(values) > 1 for values in seen.values())


def sections(study: Study, lead: Lead) -> tuple[list[Section], list[str]]:
    """The sections after the lead that can say something, and one line per one left out."""
    out: list[Section] = []
    omitted: list[str] = []
    shown = {figure.stem for figure in lead.figures}
    logged = any(run.series("train/loss") or run.series("eval/loss") for run in study.runs)
    if "curves" not in shown and logged:
        out.append(Section("Loss curves", figures=[Figure(
            "curves", "Loss curves", lambda: plots.curves(study.runs, study.palette))]))
    plotted = [k for k in study.fields if f"loss_vs_{k.split('.')[-1]}" not in shown
               and any(r[k] is not None for _, r in study.done)]
    isoflop = study.kind.name == "isoflop"  # sizes are compared within a budget only
    panels = [] if isoflop else [k for k in plotted if _joined(study, k)]
    unjoined = [k for k in plotted if k not in panels]
    if isoflop and plotted:
        omitted.append("Final eval loss by swept field: runs of different budgets differ in "
                       "training tokens too; the IsoFLOP curves compare sizes within a budget.")
    elif unjoined:
        omitted.append(f"Final eval loss against {', '.join(unjoined)}: no two finished runs "
                       "differ in that field alone, so no line or ranking can show its effect.")
    if panels:
        out.append(Section("Final eval loss by swept field", figures=[Figure(
            "swept", "Final eval loss by swept field",
            lambda: plots.swept(study.runs, study.rows, study.fields, panels, study.palette))]))
    across = [s for s in study.scaling if isoflop and s.key != "flops"]
    omitted += [f"Eval loss against {s.label}: across budgets, sizes differ in training tokens "
                "too; the IsoFLOP curves compare them within a budget." for s in across]
    fitted = [s for s in study.scaling if isinstance(s.fit, fits.PowerLaw) and s not in across]
    figures = [Figure(f"loss_vs_{s.key}", f"Eval loss against {s.label}", lambda s=s: plots.scaling(
        study.runs, study.rows, s.key, s.label, s.symbol, s.fit, s.fitted, s.left_out,
        study.palette)) for s in fitted if f"loss_vs_{s.key}" not in shown]
    if fitted:
        out.append(Section("Scaling-law fits", tables=[("Scaling-law fits", fits_table(fitted))],
                           figures=figures))
    omitted += [f"Eval loss against {s.label}: no fit ({s.fit})." for s in study.scaling
                if not isinstance(s.fit, fits.PowerLaw) and s not in across]
    if study.iso is not None and not isoflop:
        iso = study.iso
        out.append(Section("IsoFLOP curves", tables=[("IsoFLOP budgets", budgets_table(iso))],
                           figures=[Figure("isoflop", "IsoFLOP curves", lambda: plots.isoflop(
                               iso, study.iso_points.params, study.iso_points.loss,
                               "active parameters"))]))
    if study.joint.law is not None:
        out.append(study.joint.section)
    elif study.joint.declined:
        omitted.append(f"Approach 3 (L(N, D)): no fit ({study.joint.declined}).")
    if study.downstream.section is not None:
        out.append(study.downstream.section)
    omitted += study.downstream.omitted
    if study.mixture.section is not None and study.kind.name != "mixture":
        out.append(study.mixture.section)
    if study.kind.name != "mixture":
        omitted += study.mixture.omitted
    if study.transfers and study.kind.name != "transfer":
        out.append(Section("Learning-rate transfer",
                           tables=[("Learning-rate transfer", transfer.table(study.transfers))],
                           figures=[Figure("transfer", "Learning-rate transfer",
                                           lambda: transfer.figure(study.transfers))]))
    return out, omitted


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
padding-left:1.2em}ul.omitted{color:#555;font-size:14px}p.text{line-height:1.5}
h3{font-size:15px;margin:1.2em 0 0}"""


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


def analyze(root: Path, holdout: str | None = None, metric: str | None = None,
            kl: float = 0.0) -> tuple[Path, str]:
    """Write DIR/analysis/ for the runs below `root`; returns that folder and the answer paragraph.
    `holdout="largest"` fits L(N, D) without the largest compute budget and checks its prediction;
    `metric` and `kl`: the data-mixture part's objective and pull to the natural mix."""
    return write(study(Path(root), holdout, metric, kl))


def write(s: Study) -> tuple[Path, str]:
    """Write the study's DIR/analysis/; returns that folder and the answer paragraph."""
    root = s.root
    lead = lead_of(s)
    rest, omitted = sections(s, lead)
    out = root / ANALYSIS
    _clear(out)
    rows = [{**r, LEFT_OUT: lead.left_out.get(r["run"], "")} for r in s.rows]
    columns = ["run", *s.fields, *COLUMNS, LEFT_OUT]
    with (out / "table.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    shown = ["run", *s.fields, *FIRST, *(c for c in COLUMNS if c not in FIRST)]
    if lead.left_out:
        shown.append(LEFT_OUT)
    runs_table = (shown, [[cell(c, r[c]) if c != LEFT_OUT else r[c] for c in shown] for r in rows])
    (out / "table.md").write_text(_markdown_table(*runs_table) + "\n")
    fixed = [f"{key} = {_clip(format_value(value))}"
             for key, value in fixed_settings(s.runs, s.fields).items()]
    record = {"kind": s.kind.name, **fits_record(s.scaling, s.iso), **s.joint.record,
              **s.downstream.record, **s.mixture.record, **lead.record}
    tags = {tag for run in s.runs for tag in run.scalars}
    write_report(out, f"Analysis of {root.resolve().name}", lead,
                 [*rest, Section("Runs", tables=[("Runs", runs_table)])], omitted, record, fixed,
                 tags)
    return out, lead.text


def analyze_points(table: points.Points, source: Path, out: Path,
                   holdout: str | None = None) -> tuple[Path, str]:
    """Write fits.json, the report and its figures to `out` for a table of points (`--points`)."""
    iso = fits.isoflop(table.flops, table.params, table.tokens, table.loss)
    law = joint.fit(table, iso, holdout)
    lead = Lead("Compute-optimal scaling", f"{len(table)} points from {source}.")
    if iso is not None:
        lead.tables.append(("IsoFLOP budgets", budgets_table(iso)))
        lead.figures.append(Figure("isoflop", "IsoFLOP curves", lambda: plots.isoflop(
            iso, table.params, table.loss, "parameters")))
        optimal = [b.flops for b in iso.budgets if b.n_opt is not None]
        if optimal:
            lead.text = " ".join(filter(None, [lead.text, agreement(iso, law.law, max(optimal))]))
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "tb", ignore_errors=True)  # not _clear: `out` may hold the user's PNGs
    omitted = [f"Approach 3 (L(N, D)): no fit ({law.declined})."] if law.declined else []
    write_report(out, f"Scaling laws of {source.name}", lead,
                 [law.section] if law.law is not None else [], omitted,
                 {**fits_record([], iso), **law.record})
    return out, lead.text


def analyze_mixture_points(table: mixture.Table, coefficients: dict[str, float],
                           caps: np.ndarray | None, natural: np.ndarray | None, kl: float,
                           source: Path, out: Path) -> tuple[Path, str]:
    """Write fits.json (its "mixture" entry), the report and its figures to `out` for a table of
    mixtures (`--mixture-points`)."""
    part = mixture_report.build(table, coefficients, caps, natural, kl, [])
    lead = Lead("Mixture laws", f"{len(table.names)} mixtures of {', '.join(table.sources)} from "
                f"{source}. {part.section.text}", tables=part.section.tables,
                figures=part.section.figures)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "tb", ignore_errors=True)  # not _clear: `out` may hold the user's PNGs
    write_report(out, f"Mixture laws of {source.name}", lead, [], part.omitted, part.record)
    return out, lead.text


def write_report(out: Path, title: str, lead: Section, rest: list[Section], omitted: list[str],
                 record: dict[str, Any], fixed: list[str] = (), tags: set[str] = frozenset()
                 ) -> None:
    """fits.json, the figures as PNGs, report.md, report.html and TensorBoard images, text and a
    custom-scalars layout for `tags` in `out`, headed by the date and code version: the lead
    (the answer, its tables and figures), the other sections, the omitted ones (a line each),
    then the `fixed` settings (`key = value` lines)."""
    (out / "fits.json").write_text(json.dumps(record, indent=1))
    meta = provenance()
    parts = [lead, *rest]
    pngs = {}
    for part in parts:
        for fig in part.figures:
            buffer = io.BytesIO()
            fig.draw().savefig(buffer, format="png", dpi=110)
            pngs[fig.stem] = buffer.getvalue()
            (out / f"{fig.stem}.png").write_bytes(pngs[fig.stem])

    md = [f"# {title}\n", f"_{meta}_\n", f"## {lead.title}\n"]
    page = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
            f"<p class='meta'>{html.escape(meta)}</p>", f"<h2>{html.escape(lead.title)}</h2>"]
    for i, part in enumerate(parts):
        if i:
            md.append(f"\n## {part.title}\n")
            page.append(f"<h2>{html.escape(part.title)}</h2>")
        for paragraph in filter(None, part.text.split("\n\n")):
            md.append(paragraph + "\n")
            page.append(f"<p class='{'answer' if i == 0 else 'text'}'>{html.escape(paragraph)}</p>")
        for fig in part.figures:
            md.append(f"![{fig.title}]({fig.stem}.png)\n")
            page.append(f"<img alt='{html.escape(fig.title)}' src='data:image/png;base64,"
                        f"{base64.b64encode(pngs[fig.stem]).decode()}'>")
        for name, table in part.tables:
            heading = "" if name == part.title else name
            md.append((f"**{heading}**\n\n" if heading else "") + _markdown_table(*table) + "\n")
            page.append((f"<h3>{html.escape(heading)}</h3>" if heading else "") + _html_table(*table))
    if omitted:
        md.append("\n## Omitted\n\n" + "\n".join(f"- {line}" for line in omitted) + "\n")
        page.append("<h2>Omitted</h2><ul class='omitted'>"
                    + "".join(f"<li>{html.escape(line)}</li>" for line in omitted) + "</ul>")
    if fixed:
        md.append("\n## Fixed settings (the same in every run)\n\n"
                  + "\n".join(f"- `{line}`" for line in fixed) + "\n")
        page.append("<h2>Fixed settings (the same in every run)</h2><ul class='fixed'>"
                    + "".join(f"<li>{html.escape(line)}</li>" for line in fixed) + "</ul>")
    (out / "report.md").write_text("\n".join(md))
    (out / "report.html").write_text("\n".join(page) + "</body></html>\n")

    from tensorboardX import SummaryWriter

    with SummaryWriter(str(out / "tb")) as writer:
        for stem, png in pngs.items():
            writer.file_writer.add_summary(_image_summary(f"analysis/{stem}", png), 0)
        writer.add_text("analysis/answer", f"{lead.text}\n\n_{meta}_", 0)
        for part in parts:
            for name, table in part.tables:
                writer.add_text("analysis/" + _slug(name), _code_block(*table), 0)
        if omitted:
            writer.add_text("analysis/omitted", "\n".join(f"- {line}" for line in omitted), 0)
        if fixed:
            writer.add_text("analysis/fixed", "```\n" + "\n".join(fixed) + "\n```", 0)
        charts = layout.layout(tags)
        if charts:
            writer.add_custom_scalars(charts)


def _slug(name: str) -> str:
    """`IsoFLOP budgets (Approach 2)` -> `isoflop_budgets_approach_2`."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
