"""The "Data mixture" part of a report: mixture laws fitted to runs (or a CSV), the proposal, its
figures and a sentence on trust, as a `sections.Part` that research/analysis/report.py places
(a mixture swarm's report leads with it).

Runs at several data mixtures are found by their `data.sources.<name>.weight` config fields; runs
that differ in anything else (a model size of the grid) form families and the largest is fitted.
Runs whose folder name starts with `proposal` are a proposal's validation runs (the recipe in
docs/analysis.md): they are not fitted, and the report sets their measured objective beside the
law's prediction at their mix, and, over seeds, beside the runs at the natural and the uniform mix.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from research.analysis import mixture, plots, replicates
from research.analysis.sections import Figure, Part, Section
from research.analysis.runs import Run, family
from research.config import ConfigError
from research.sweep.swarm import DECIMALS, SOURCE_KEY, project, source_of

PROPOSAL = "proposal"  # folder-name prefix of a proposal's validation runs
SAME_MIX = 10.0 ** (1 - DECIMALS)  # runs whose weights differ by less are at one mix (rounding)


def final(run: Run, metric: str) -> float | None:
    """A metric's last value, named as in metrics.jsonl (`eval_loss`, `eval/code/bpb`) or as a
    TensorBoard tag."""
    for tag in (metric, f"eval/{metric.removeprefix('eval_')}", f"eval/{metric}"):
        if series := run.series(tag):
            return series[-1][1]
    return None


def run_weights(run: Run) -> dict[str, float]:
    """A run's normalized source weights from its config or its trial's swept values ({} when
    it has no named sources)."""
    values = {**run.config, **(run.trial or {}).get("params", {})}
    raw = {name: float(v) for k, v in values.items()
           if (name := source_of(k)) is not None and isinstance(v, (int, float))}
    total = sum(raw.values())
    return {k: v / total for k, v in raw.items()} if total > 0 else {}


def default_metrics(runs: list[Run], sources: list[str], objective: str) -> dict[str, float]:
    """The mean of the per-domain metrics in the objective's unit (bpb or loss) when the runs
    logged them, else the objective itself."""
    unit = "bpb" if "bpb" in objective else "loss"
    per_domain = [f"eval/{s}/{unit}" for s in sources]
    if all(any(final(r, m) is not None for r in runs) for m in per_domain):
        return {m: 1 / len(per_domain) for m in per_domain}
    return {objective: 1.0}


Measured = list[tuple[str, np.ndarray, list[float]]]  # (run name, weights, metric values)
Scored = list[tuple[str, np.ndarray, float]]  # (run name, weights, objective)


def table_from_runs(runs: list[Run], fields: list[str], metrics: list[str]
                    ) -> tuple[mixture.Table, Measured, Measured, list[str]] | None:
    """The largest family's mixtures (seeds averaged), each of its runs and each validation run
    one by one, and the runs left out with why; None without two or more mixtures."""
    weighted = [(r, w) for r in runs if len(w := run_weights(r)) >= 2]
    if not weighted:
        return None
    sources = list(weighted[0][1])
    usable, validation, left_out = [], [], []
    for run, w in weighted:
        values = [final(run, m) for m in metrics]
        if run.state != "done":  # a running or failed run's last eval is a shorter run's
            left_out.append(f"{run.name} ({run.state})")
        elif list(w) != sources or None in values:
            left_out.append(f"{run.name} (no {metrics[values.index(None)]})" if None in values
                            else f"{run.name} (other sources)")
        else:
            (validation if run.name.startswith(PROPOSAL) else usable).append(
                (run, np.array([w[s] for s in sources]), values))
    free = ("data.sources.",)
    families: dict[tuple, list] = {}
    for item in usable:
        families.setdefault(family(item[0], fields, free), []).append(item)
    if not families:
        return None
    key, chosen = max(families.items(), key=lambda kv: len(kv[1]))
    fitted = {item[0].name for item in chosen}
    left_out += [f"{run.name} (another setting)" for run, _, _ in usable if run.name not in fitted]
    checks = []  # a proposal run checks the law only in the setting it was fitted to
    for run, w, values in validation:
        if (differs := [v for v in family(run, fields, free) if v not in key]):
            left_out.append(f"{run.name} (another setting than the fitted runs: "
                            f"{', '.join(differs)})")
        else:
            checks.append((run.name, w, values))
    points: dict[tuple, list] = {}
    for run, w, values in chosen:
        points.setdefault(tuple(np.round(w, 6)), []).append((run, values))
    if len(points) < 2:
        return None
    names = [" / ".join(r.name for r, _ in members) for members in points.values()]
    weights = np.array([list(key) for key in points])
    table = {m: np.array([np.mean([v[i] for _, v in members]) for members in points.values()])
             for i, m in enumerate(metrics)}
    fitted_runs = [(run.name, w, values) for run, w, values in chosen]
    return mixture.Table(names, sources, weights, table), fitted_runs, checks, left_out


def at_mix(runs: Scored, mix: np.ndarray) -> Scored:
    """The runs at one mix (weights equal up to their rounding)."""
    return [item for item in runs if np.max(np.abs(item[1] - mix)) < SAME_MIX]


def seed_comparison(result: mixture.MixtureFit, checks: Scored, fitted: Scored,
                    natural: np.ndarray | None, caps: np.ndarray | None
                    ) -> tuple[dict[str, Any], str, list[list[str]]]:
    """The validation runs' objective over their seeds against the runs at the natural and the
    uniform mix (the swarm's reference points, with whatever seeds were trained there): fits.json's
    entry, a sentence and table rows (mix, weights, runs, measured mean ± sd, predicted)."""
    k = len(result.table.sources)
    uniform = project(np.full(k, 1 / k), np.ones(k) if caps is None else caps)
    groups: dict[str, Scored] = {}
    for item in checks:  # validation runs of one mix form one group, named by the first run
        name = next((g for g, members in groups.items() if at_mix(members, item[1])), None)
        groups.setdefault(name or ("proposal" if not groups else item[0]), []).append(item)
    for name, mix in (("natural", natural), ("uniform", uniform)):
        if mix is not None and (members := at_mix(fitted, mix)):
            groups[name] = members
    entry, rows = {}, []
    for name, members in groups.items():
        values = [v for _, _, v in members]
        group = replicates.Group(name, (), tuple(values))
        predicted = float(result.objective(result.best, members[0][1][None])[0])
        entry[name] = {"weights": dict(zip(result.table.sources, members[0][1].tolist())),
                       "runs": [n for n, _, _ in members], "measured": values,
                       "mean": group.mean, "std": group.std, "predicted": predicted}
        rows.append([name, *(f"{w:.4f}" for w in members[0][1]), str(group.n),
                     group.describe(), f"{predicted:.4f}"])
    proposals = [g for g in groups if g not in ("natural", "uniform")]
    references = [g for g in ("natural", "uniform") if g in groups]
    if not references:
        return entry, "", rows
    words = []
    for name in proposals:
        for ref in references:
            c = replicates.compare(entry[ref]["measured"], entry[name]["measured"])
            entry[name][f"vs_{ref}"] = {"difference": c.difference, "p_value": c.p_value,
                                        "interval": c.interval}
            words.append(f"{name} {'lower' if c.difference < 0 else 'higher'} than {ref} by "
                         f"{abs(c.difference):.4f}, {c.verdict()}")
    text = (" Measured over seeds (mean ± sd): " + ", ".join(
        f"{name} {r[-2]} ({r[-3]} runs)" for name, r in zip(groups, rows)) + "; "
        + "; ".join(words) + ".")
    return entry, text, rows


def mixtures_table(result: mixture.MixtureFit) -> tuple[list[str], list[list[str]]]:
    """Every fitted mixture by its measured objective: weights, measured, the better law's
    prediction fitted to all and held out."""
    table, form = result.table, result.best
    measured, fitted = result.measured(), result.objective(form, table.weights)
    held = result.held_out[form]["objective"]
    header = ["mixture", *table.sources, "measured", "predicted", "held out"]
    return header, [[table.names[i], *(f"{w:.4f}" for w in table.weights[i]), f"{measured[i]:.4f}",
                     f"{fitted[i]:.4f}", f"{held[i]:.4f}"] for i in np.argsort(measured)]


def _figures(result: mixture.MixtureFit, validation: dict[str, tuple[float, float]]
             ) -> list[Figure]:
    return [Figure("mixture_weights", "Data mixture: metrics against weights",
                   lambda: _weights_figure(result)),
            Figure("mixture_predicted", "Data mixture: predicted against measured",
                   lambda: _predicted_figure(result, validation))]


def _weights_figure(result: mixture.MixtureFit) -> Any:
    table = result.table
    k = len(table.sources)
    fig, axes = plots._figure(k)
    for j, (ax, source) in enumerate(zip(axes, table.sources)):
        for m, y in table.metrics.items():
            ax.plot(table.weights[:, j], y, "o", ms=4, label=m)
        ax.axvline(result.proposal["weights"][source], color="k", lw=0.8, ls="--")
        ax.set_xlabel(f"weight of {source}")
    axes[0].set_ylabel("metric")
    axes[-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    plots._title(fig, "Each metric against each source's weight (dashed: the proposal)")
    return fig


def _predicted_figure(result: mixture.MixtureFit, validation: dict[str, tuple[float, float]]
                      ) -> Any:
    form = result.best
    fig, (ax,) = plots._figure(1)
    measured = result.measured()
    ax.plot(measured, result.objective(form, result.table.weights), "o", ms=5, label="fitted to all")
    ax.plot(measured, result.held_out[form]["objective"], "o", ms=7, mfc="none",
            label=f"held out (leave-{len(mixture.folds(len(measured))[0])}-out)")
    for name, (value, predicted) in validation.items():
        ax.plot(value, predicted, "*", ms=14, label=f"proposal: {name}")
    low, high = ax.get_xlim()
    ax.plot([low, high], [low, high], color="0.6", lw=0.8)
    ax.set_xlabel("measured objective")
    ax.set_ylabel(f"predicted objective ({mixture.TITLES[form]})")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    plots._title(fig, "Predicted against measured, every mixture")
    return fig


def build(table: mixture.Table, coefficients: dict[str, float], caps: np.ndarray | None,
          natural: np.ndarray | None, kl: float, validation: Measured,
          origins: dict[str, str] | None = None, left_out: list[str] = (),
          fitted: Measured = ()) -> Part:
    """Fit, propose, and everything that reports it. `validation`: the proposal's runs;
    `fitted`: the fitted runs one by one (seeds not averaged), for the comparison over seeds."""
    result = mixture.fit_table(table, coefficients)
    mixture.propose(result, caps, natural, kl)
    label = mixture.label(coefficients)

    def objective(values: list[float]) -> float:
        return float(sum(c * v for c, v in zip(coefficients.values(), values)))

    checks = [(name, w, objective(values)) for name, w, values in validation]
    measured = {name: (v, float(result.objective(result.best, w[None])[0]))
                for name, w, v in checks}
    text = mixture.trust(result, label)
    order = np.argsort(result.measured())
    text += (f" Measured, the best of the {len(order)} mixtures is {table.names[order[0]]} "
             f"({result.measured()[order[0]]:.4f}), the worst {table.names[order[-1]]} "
             f"({result.measured()[order[-1]]:.4f}).")
    if measured:
        text += " Measured at the proposal: " + ", ".join(
            f"{name} {v:.4f} (predicted at its mix {p:.4f})"
            for name, (v, p) in measured.items()) + "."
    compared, words, rows = seed_comparison(
        result, checks, [(name, w, objective(values)) for name, w, values in fitted], natural,
        caps) if checks else ({}, "", [])
    text += words
    if left_out:
        text += f" Not fitted: {'; '.join(left_out)}."
    p = result.proposal
    text += f" Proposed mix: {mixture.overrides(p['weights'])}."
    entry = mixture.record(result, label)
    entry["block"] = mixture.sources_block(p["weights"], origins)
    if measured:
        entry["measured"] = {name: v for name, (v, _) in measured.items()}
    if compared:
        entry["compared"] = compared
    header, body = mixture.proposal_table(result)
    body += [[name, *(f"{x:.4f}" for x in w), f"{measured[name][1]:.4f}", f"{v:.4f}"]
             for name, w, v in checks]
    tables = [("Data mixture: laws (cross-validated)", mixture.laws_table(result)),
              ("Data mixture: proposal", (header, body)),
              ("Data mixture: the mixtures, best measured first", mixtures_table(result))]
    if rows:
        tables.append(("Data mixture: measured over seeds",
                       (["mix", *table.sources, "runs", "measured (mean ± sd)", "predicted"],
                        rows)))
    return Part(record={"mixture": entry}, section=Section(
        "Data mixture", text=text, tables=tables, figures=_figures(result, measured)))


def section(runs: list[Run], fields: list[str], info: dict[str, Any] | None,
            metric: str | None = None, kl: float = 0.0) -> Part:
    """The report's "Data mixture" part for runs at several mixtures; empty without them.
    `info`: the sweep's sweep.json (its objective metric, and a mixture sweep's natural mix and
    caps); `metric`: `--metric` (else the per-domain metrics of the objective's unit)."""
    weighted = [r for r in runs if len(run_weights(r)) >= 2]
    if not weighted:
        if metric or kl:
            raise ConfigError(f"{'--metric' if metric else '--kl'}: no run below the folder has "
                              "data.sources weights to fit a mixture law to")
        return Part()
    sources = list(run_weights(weighted[0]))
    objective = (info or {}).get("metric", "eval_loss")
    coefficients = (mixture.parse_metrics(metric) if metric else
                    default_metrics(weighted, sources, objective))
    if not metric and (info or {}).get("direction") == "maximize" and objective in coefficients:
        return Part(omitted=[f"Data mixture: no fit (the laws are minimized, the sweep "
                             f"maximizes {objective}, and the runs logged no per-domain losses; "
                             "name metrics to minimize with --metric)."])
    found = table_from_runs(runs, fields, list(coefficients))
    if found is None:
        return Part()
    table, fitted, validation, left_out = found
    plan = (info or {}).get("mixture") or {}
    order = lambda d: None if not d else np.array([d[s] for s in table.sources])  # noqa: E731
    origins = {s: weighted[0].config.get(SOURCE_KEY.format(s)) for s in table.sources}
    if kl > 0 and not plan.get("natural"):
        raise ConfigError("--kl: the runs are not a mixture sweep's, so there is no natural mix "
                          "to pull towards")
    try:
        return build(table, coefficients, order(plan.get("caps")), order(plan.get("natural")), kl,
                     validation, {k: v for k, v in origins.items() if v}, left_out, fitted)
    except ConfigError as exc:
        return Part(record={"mixture": {"error": str(exc)}},
                    omitted=[f"Data mixture: no fit ({exc})."])
