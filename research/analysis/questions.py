"""The report's lead: the answer to the question the sweep asks (see kinds.py), in words, with
its figure and table.

Every ranking and comparison here is between runs that differ in the question's fields alone:
within one compute budget for an IsoFLOP sweep, along one lr curve for a transfer grid, within
the largest family of the swept fields otherwise. Runs outside it are counted in the text
("11 runs differ in train.steps") and named, with the reason, in table.csv.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml
from scipy import stats

from research.analysis import families, fits, joint, plots, replicates, transfer
from research.analysis.kinds import Kind
from research.analysis.points import Points
from research.analysis.runs import Run, branch_of, finished, format_value, short_names
from research.analysis.scaling import ScalingFit
from research.analysis.sections import Figure, Part, Section, Table
from research.format import si

NEAR_EDGE = 0.15  # an optimum within this fraction of a budget's log-size range from its end
ENOUGH_BUDGETS = 5  # fewer budget optima leave Approach 2's exponent with few degrees of freedom
TRANSFERS = 0.5  # octaves: a best-lr drift within this is "transfers"
AGREE = "The two approaches agree"
ALLOCATION = 2.0  # Approach 2 and 3 putting D/N this many times apart do not agree


@dataclass
class Study:
    """Everything the report is built from, computed once."""

    root: Path
    runs: list[Run]
    rows: list[dict[str, Any]]
    fields: list[str]
    kind: Kind
    scaling: list[ScalingFit]
    iso: fits.IsoFlop | None
    iso_points: Points  # the runs Approach 2 used, in its budgets' index order
    joint: joint.Joint
    transfers: list[transfer.Transfer]
    palette: plots.Palette
    downstream: Part  # the two-step accuracy prediction (downstream.py), when runs logged tasks
    mixture: Part  # mixture laws and a proposed mix (mixture_report.py), for runs at several mixes

    @property
    def done(self) -> list[tuple[Run, dict[str, Any]]]:
        return finished(self.runs, self.rows)

    def family(self) -> families.Family:
        """The finished runs that differ in the question's fields alone (and the seed)."""
        return families.largest(self.done, self.fields, self.kind.free)


@dataclass
class Lead(Section):
    left_out: dict[str, str] = field(default_factory=dict)  # run -> why it is not compared
    record: dict[str, Any] = field(default_factory=dict)  # fits.json entries of the answer


# ----------------------------------------------------------------------------- words


def states(runs: list[Run]) -> str:
    """`12 runs: 11 done, 1 failed.`, and which are cooldown branches (docs/training.md)."""
    counts = Counter(run.state for run in runs)
    text = f"{len(runs)} run{'s' * (len(runs) != 1)}: " + ", ".join(
        f"{n} {state}" for state, n in counts.most_common()) + "."
    if branches := [b for run in runs if (b := branch_of(run))]:
        text += (f" {len(branches)} of them are cooldown branches of a longer run (column branch: "
                 f"{', '.join(branches)}), each a fully decayed model at its token count that "
                 "shares its first steps with that run.")
    return text


def same_tokens(done: list[tuple[Run, dict[str, Any]]]) -> str:
    """`At 614k training tokens per run, ` when every finished run saw as many, else ''."""
    tokens = {r["tokens"] for _, r in done}
    return (f"At {si(tokens.pop())} training tokens per run, "
            if len(tokens) == 1 and None not in tokens else "")


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def _short_verdict(c: replicates.Comparison) -> str:
    if not c.tested:
        return "untested: one run each"
    return f"p = {c.p_value:.2g}" + ("" if c.distinguishable else ", within seed noise")


def ranking(groups: list[replicates.Group], done: list[tuple[Run, dict[str, Any]]]) -> str:
    """The best setting, its margin over the next and whether that beats seed noise, the worst."""
    best = groups[0]
    bpb = [r["final_eval_bpb"] for run, r in done if run in best.runs and r["final_eval_bpb"]]
    notes = [f"{np.mean(bpb):.4f} bits/byte"] if bpb else []
    if best.n > 1:
        notes.append(f"mean ± sd over {best.n} seeds")
    loss = f"{best.describe()} nats/token" + (f" ({'; '.join(notes)})" if notes else "")
    if len(groups) == 1:
        return f"{best.label} reached eval loss {loss}; it is the only setting that finished."
    second = groups[1]
    c = replicates.compare(best.losses, second.losses)
    text = (f"{best.label} reached the lowest final eval loss, {loss}, {c.difference:.4f} nats "
            f"({100 * c.difference / second.mean:.2g}%) below the next best, {second.label} "
            f"({second.describe()}): {c.verdict()}")
    if len(groups) > 2:
        text += f"; the worst, {groups[-1].label}, reached {groups[-1].describe()}"
    return text + "."


def replicates_table(groups: list[replicates.Group]) -> Table:
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


def best_setting(values: dict[str, Any], loss: str) -> dict[str, Any]:
    """fits.json's "best_setting": the winning swept values as the YAML block an experiment
    takes and as key=value overrides (floats to 3 significant digits), and its loss."""
    short = {k: float(f"{v:.3g}") if isinstance(v, float) else v for k, v in values.items()}
    nested: dict[str, Any] = {}
    for key, value in short.items():
        *sections, name = key.split(".")
        node = nested
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = value
    return {"block": yaml.safe_dump(nested, sort_keys=False).rstrip(), "loss": loss,
            "overrides": " ".join(f"{k}={v}" for k, v in short.items())}


def _groups(pairs: list[tuple[Run, dict[str, Any]]]) -> list[replicates.Group]:
    return replicates.groups([(run, r["final_eval_loss"]) for run, r in pairs])


def _left_out(family: families.Family) -> tuple[str, dict[str, str]]:
    """(` 11 runs differ in train.steps and are not compared (table.csv says how).`, reasons)."""
    summary = family.summary()
    text = f" Not compared: {summary} (table.csv names each)." if summary else ""
    return text, {name: f"not compared: {why}" for name, why in family.reasons().items()}


def _close(lead: Lead, study: Study, family: families.Family, words: str,
           groups: list[replicates.Group]) -> None:
    """End a lead that compares one family's settings: its words, the runs left out of the
    comparison, the runs' states, and the settings table (only when there is more than one
    setting or seed to show)."""
    text, lead.left_out = _left_out(family)
    lead.text = f"{words}{text} {states(study.runs)}"
    if len(groups) > 1 or groups[0].n > 1:
        lead.tables.append(("Settings and seed noise", replicates_table(groups)))


def _swept_figure(study: Study, key: str) -> Figure:
    return Figure(f"loss_vs_{key.split('.')[-1]}", f"Final eval loss against {key}",
                  lambda: plots.swept(study.runs, study.rows, study.fields, [key], study.palette))


# ----------------------------------------------------------------------------- isoflop


def _budget_runs(study: Study) -> list[tuple[float, list[tuple[Run, dict[str, Any]]]]]:
    """(compute, finished runs) per budget: Approach 2's budgets, else groups of equal compute."""
    by_name = {run.name: (run, r) for run, r in study.done}
    pts = study.iso_points
    if study.iso is not None:
        return [(b.flops, [by_name[pts.names[i]] for i in b.members]) for b in study.iso.budgets]
    done = [(run, r) for run, r in study.done if r["flops"]]
    flops = np.array([r["flops"] for _, r in done], float)
    return [(float(np.exp(np.mean(np.log(flops[g])))), [done[i] for i in g])
            for g in fits.group_budgets(flops)] if len(done) else []


def _swept_label(study: Study, group: replicates.Group) -> str:
    """The group's values of the swept fields alone (`d_model=32`), not of those derived from
    them: within a budget, steps and heads follow from the width."""
    values = group.runs[0].values
    short = short_names(study.fields)
    return ", ".join(f"{short[k]}={format_value(values[k])}" for k in study.kind.swept
                     if k in values) or group.label


def optima_table(study: Study) -> Table:
    """Per budget: the best run measured and its margin within the budget, and the parabola's
    optimum (Approach 2)."""
    header = ["compute C (FLOPs)", "runs", "best run", "its loss", "next best in the budget",
              "N_opt (parabola)", "D_opt", "loss at N_opt", "note"]
    parabola = {b.flops: b for b in study.iso.budgets} if study.iso else {}
    body = []
    for c, members in _budget_runs(study):
        groups = _groups(members)
        best = groups[0]
        nxt = "–"
        if len(groups) > 1:
            comparison = replicates.compare(best.losses, groups[1].losses)
            nxt = (f"{_swept_label(study, groups[1])} +{comparison.difference:.4f} "
                   f"({_short_verdict(comparison)})")
        b = parabola.get(c)
        optimum = (["–"] * 3 if b is None or b.n_opt is None
                   else [si(b.n_opt), si(b.d_opt), f"{b.loss_opt:.4f}"])
        note = b.note if b is not None else "fewer than 3 sizes: no parabola"
        body.append([si(c), str(len(members)), _swept_label(study, best), best.describe(), nxt,
                     *optimum, note])
    if study.iso is not None and study.iso.params is not None:
        iso = study.iso
        body.append([f"exponents over {sum(b.n_opt is not None for b in iso.budgets)} budgets",
                     "", "", "", "", f"∝ C^{iso.params.describe()}", f"∝ C^{iso.tokens.describe()}",
                     "", "± standard error"])
    if not any(line[-1] for line in body):  # no notes: no empty column to scroll past
        header, body = header[:-1], [line[:-1] for line in body]
    return header, body


def agreement(iso: fits.IsoFlop | None, law: Any, largest: float) -> str:
    """Whether Approach 2's and 3's compute-optimal exponents agree within their 95% intervals,
    how far apart they put tokens per parameter at the largest budget, and so whether they agree
    in what matters: a factor of ALLOCATION or more in D/N is not agreement, whatever the
    intervals say. Approach 2's interval is a t-interval over its budgets (few budgets, wide)."""
    if iso is None or iso.params is None or law is None:
        return ""
    a2, se = iso.params.exponent, iso.params.stderr
    used = sum(b.n_opt is not None for b in iso.budgets)
    if se is not None:
        half = float(stats.t.ppf(0.975, used - 2)) * se
        low2, high2 = a2 - half, a2 + half
        two = f"Approach 2 puts N_opt ∝ C^{a2:.3f} [{low2:.3f}, {high2:.3f}]"
    else:
        low2 = high2 = a2
        two = f"Approach 2 puts N_opt ∝ C^{a2:.3f} (two budgets: no interval)"
    low3, high3 = law.intervals().get("a", (math.nan, math.nan))
    three = f"Approach 3 C^{law.a:.3f} [{low3:.3f}, {high3:.3f}] (95% intervals)"
    ratio2 = float(iso.tokens(largest) / iso.params(largest))
    opt = law.optimal(largest)
    ratio3 = opt["d_opt"][0] / opt["n_opt"][0]
    factor = max(ratio2, ratio3) / min(ratio2, ratio3)
    ratios = (f"at C = {si(largest)} they put D/N at {ratio2:.3g} and {ratio3:.3g}, a factor "
              + (f"{factor:.1f}" if factor < 10 else f"{factor:.3g}") + " apart")
    if math.isnan(low3):
        return f"{two}; {three} has no bootstrap interval, so their agreement is untested; {ratios}."
    if not (low2 <= high3 and low3 <= high2):
        gap = max(low3 - high2, low2 - high3)
        return (f"The two approaches disagree: {two}, {three}; the intervals miss each other by "
                f"{gap:.3f} in the exponent, and {ratios}.")
    if factor >= ALLOCATION:
        return (f"The two approaches are consistent only because their intervals are wide: "
                f"{two}, {three} overlap, but {ratios}.")
    return f"{AGREE}: {two} and {three} overlap, and {ratios}."


def settle(iso: fits.IsoFlop, law: Any, points: Points, agree: bool) -> str:
    """What more runs would make the compute-optimal exponents trustworthy."""
    optimal = [b for b in iso.budgets if b.n_opt is not None]
    wants = []
    if len(optimal) < ENOUGH_BUDGETS:
        wants.append(f"more budgets (Approach 2's exponent rests on {len(optimal)} budget optima)")
    edge = []
    for b in iso.budgets:
        sizes = np.log10(points.params[b.members])
        if b.n_opt is None or min(np.log10(b.n_opt) - sizes.min(),
                                  sizes.max() - np.log10(b.n_opt)) < NEAR_EDGE * np.ptp(sizes):
            edge.append(si(b.flops))
    if edge:
        wants.append("a wider width range (the optimum at C = " + ", ".join(edge)
                     + " lies at or near the edge of the sizes tried)")
    if law is not None:
        low, high = law.intervals().get("a", (math.nan, math.nan))
        if not high - low <= joint.WIDE * law.a:
            wants.append("more sizes per budget (Approach 3's interval is wide)")
    if not wants:
        return ("To check the law before betting compute on it, hold out the largest budget: "
                "`research analyze DIR --holdout largest`.")
    return ("To narrow it further: " if agree else "What would settle it: ") + "; ".join(wants) + "."


def isoflop_lead(study: Study) -> Lead:
    """The optimum per budget, both approaches' exponents and whether they agree."""
    lead = Lead("The compute-optimal model size per budget")
    budgets = _budget_runs(study)
    if not budgets:
        lead.text = f"No run finished with an eval loss and a FLOP count. {states(study.runs)}"
        return lead
    iso = study.iso
    verdict: list[str] = []  # the first paragraph: the exponents and whether they agree
    law = study.joint.law
    if iso is not None and iso.params is not None:
        largest = max(b.flops for b in iso.budgets if b.n_opt is not None)
        agree = agreement(iso, law, largest)
        verdict.append(agree or (
            f"Approach 2 puts N_opt ∝ C^{iso.params.describe()}, D_opt ∝ "
            f"C^{iso.tokens.describe()}; Approach 3 has no fit ({study.joint.declined}) to check "
            "it against."))
        verdict.append(settle(iso, law, study.iso_points, agree.startswith(AGREE)))
    elif iso is not None:
        verdict.append(f"No compute-optimal exponents: {iso.note}.")
    else:
        verdict.append("No IsoFLOP fit: the runs form no two budgets of 3 or more sizes.")
    optima = []
    if iso is not None:
        found = [f"C = {si(b.flops)}: N_opt {si(b.n_opt)}, D_opt {si(b.d_opt)}, loss "
                 f"{b.loss_opt:.4f}" for b in iso.budgets if b.n_opt is not None]
        missing = [f"C = {si(b.flops)} ({b.note})" for b in iso.budgets if b.n_opt is None]
        optima.append("Per budget, the minimum of a parabola in log N through the budget's runs "
                      "(Approach 2): " + ("; ".join(found) or "none") + "."
                      + (f" No optimum at {', '.join(missing)}." if missing else ""))
    optima.append("The table ranks runs within each budget only. " + states(study.runs))
    lead.text = " ".join(verdict) + "\n\n" + " ".join(optima)
    lead.tables.append(("Per-budget optima (runs compared within a budget only)",
                        optima_table(study)))
    if iso is not None:
        lead.figures.append(Figure("isoflop", "IsoFLOP curves", lambda: plots.isoflop(
            iso, study.iso_points.params, study.iso_points.loss, "active parameters")))
    pts = study.iso_points
    used = ({pts.names[i] for b in iso.budgets for i in b.members} if iso is not None
            else {run.name for run, _ in study.done})
    outside = {run.name for run, _ in study.done} - used
    lead.left_out = {name: "not in an IsoFLOP budget of 3+ sizes" for name in outside}
    return lead


# ----------------------------------------------------------------------------- lr and transfer


def transfer_lead(study: Study) -> Lead:
    """Per parameterization: where the best lr goes from the smallest size to the largest."""
    if not study.transfers:
        lead = grid_lead(study)
        lead.text = ("The lr x size grid needs 3 or more learning rates at each of 2 or more "
                     "sizes for a transfer curve; it has fewer, so the settings are ranked as a "
                     "grid. " + lead.text)
        return lead
    lead = Lead("Does the best learning rate move with size?")
    words = []
    for t in study.transfers:
        name = t.size_field.split(".")[-1]
        small, large = t.curves[0], t.curves[-1]
        where = (f"Under {t.parameterization}, the best lr goes from {small.best_lr:.3g} at "
                 f"{name}={format_value(small.size)} to {large.best_lr:.3g} at "
                 f"{name}={format_value(large.size)}")
        if t.drift is None:
            edge = [format_value(c.size) for c in (small, large) if c.at_edge]
            words.append(f"{where}, but at {name}={', '.join(edge)} it is on the edge of the "
                         f"grid: {transfer.UNKNOWN}; widen the grid there.")
        else:
            verdict = ("it transfers" if abs(t.drift) <= TRANSFERS
                       else "it moves: retune per size, or try a parameterization that transfers")
            words.append(f"{where}: {transfer.octaves(t.drift)} octaves, {verdict}.")
        g = transfer.gap(study.transfers, t, large)
        if g is not None:
            words.append(f"Transferred (lr {t.base_lr:.3g}, the smallest size's best) to "
                         f"{name}={format_value(large.size)}, it reaches "
                         f"{transfer.describe(g.transferred)} against {transfer.describe(g.tuned)} "
                         f"for the best tuned there ({g.tuned_by}): a transfer gap of "
                         f"{g.comparison.difference:+.4f}, {g.comparison.verdict()}.")
        worse = [f"{lr:.3g} ({c.difference:+.4f}, "
                 + (f"p = {c.p_value:.2g})" if c.tested else "one seed)")
                 for lr, c in transfer.wider_is_better(t)
                 if c.difference > 0 and (c.distinguishable or not c.tested)]
        if worse:
            words.append(f"At {name}={format_value(large.size)} the loss is higher than at "
                         f"{name}={format_value(small.size)} at lr " + ", ".join(worse) +
                         ", within an octave of the base's best.")
    by_size: dict[tuple[str, int], list[tuple[float, str]]] = {}
    for t in study.transfers:
        by_size.setdefault((t.size_field, t.curves[-1].size), []).append(
            (t.curves[-1].best_loss, t.parameterization))
    for (size_field, size), optima in by_size.items():
        if len(optima) > 1:
            (best, p), (second, q) = sorted(optima)[:2]
            where = f"At {size_field.split('.')[-1]}={format_value(size)}, each at its best lr, "
            words.append(where + (f"{p} and {q} reach the same loss, {best:.4f}."
                                  if second - best < 5e-5 else
                                  f"{p} reaches {best:.4f}, {second - best:.4f} below {q}."))
    lead.text = " ".join([*words, states(study.runs)])
    lead.tables.append(("Learning-rate transfer", transfer.table(study.transfers)))
    lead.figures.append(Figure("transfer", "Learning-rate transfer",
                               lambda: transfer.figure(study.transfers)))
    return lead


def lr_lead(study: Study) -> Lead:
    """The best learning rate, refined between grid points, and whether the range brackets it."""
    family = study.family()
    groups = _groups(family.members)
    if not groups:
        return _nothing(study)
    lead = Lead("The best learning rate")
    key = transfer.LR
    by_lr = sorted((g.runs[0].values[key], g.mean) for g in groups)
    lrs, means = (np.array(v, float) for v in zip(*by_lr))
    best_lr, best_loss = transfer.optimum(lrs, means)
    words = [same_tokens(family.members) + ranking(groups, family.members)]
    if len(lrs) >= 3:
        if best_lr in (lrs[0], lrs[-1]):
            side = "smallest" if best_lr == lrs[0] else "largest"
            words.append(f"The best is the {side} lr tried ({best_lr:.3g}): the optimum may lie "
                         "beyond it; extend the range on that side.")
        else:
            words.append(f"A parabola in log2(lr) through the best and its neighbours puts the "
                         f"optimum at lr = {best_lr:.3g} (loss {best_loss:.4f}).")
    lead.record["best_setting"] = best_setting({key: best_lr}, f"{best_loss:.4f}")
    _close(lead, study, family, " ".join(words), groups)
    lead.figures.append(_swept_figure(study, key))
    return lead


# ----------------------------------------------------------------------------- seeds, ladder, grid


def seeds_lead(study: Study) -> Lead:
    """How far apart the seeds of one setting land, and the smallest difference they resolve."""
    groups = _groups(study.done)
    if not groups:
        return _nothing(study)
    g = groups[0]
    lead = Lead("Run-to-run noise of one setting")
    words = [same_tokens(study.done) + f"{g.label} over {g.n} seeds: final eval loss "
             f"{g.describe()} nats/token (mean ± sd), range {min(g.losses):.4f} – "
             f"{max(g.losses):.4f}."]
    if g.std is not None and g.n > 1:
        df = 2 * g.n - 2
        detectable = (stats.t.ppf(0.975, df) + stats.t.ppf(0.8, df)) * g.std * math.sqrt(2 / g.n)
        words.append(f"The sd is {100 * g.std / g.mean:.2g}% of the mean. Two settings run with "
                     f"{g.n} seeds each, at this noise, differ detectably (Welch's t-test at 5%, "
                     f"80% of the time) when their means are about {detectable:.4f} nats apart; a "
                     "smaller difference needs more seeds.")
    lead.text = " ".join([*words, states(study.runs)])
    lead.tables.append(("Seeds", (["run", "seed", "final eval loss"],
                                  [[run.name, format_value(run.seed), f"{loss:.4f}"]
                                   for run, loss in zip(g.runs, g.losses)])))
    lead.figures.append(Figure("curves", "Loss curves", lambda: plots.curves(study.runs,
                                                                             study.palette)))
    return lead


def ladder_lead(study: Study) -> Lead:
    """Loss at each size of the ladder, where it stops improving, and the power law in parameters."""
    family = study.family()
    groups = _groups(family.members)
    if not groups:
        return _nothing(study)
    key = study.kind.swept[0]
    name = short_names([key])[key]
    lead = Lead(f"How eval loss changes with {name}")
    ladder = sorted(groups, key=lambda g: g.runs[0].values.get(key))
    words = [_capital(same_tokens(family.members) + f"final eval loss against {name}: " + ", ".join(
        f"{format_value(g.runs[0].values.get(key))}: {g.describe()}" for g in ladder) + ".")]
    words.append(ranking(groups, family.members))
    if len(ladder) > 2 and groups[0] is not ladder[-1]:
        words.append(f"Past {name}={format_value(groups[0].runs[0].values.get(key))} loss stops "
                     "improving at this training length.")
    law = next((s for s in study.scaling if s.key == "params_total"
                and isinstance(s.fit, fits.PowerLaw)), None)
    if law is not None:
        words.append(f"Against total parameters, eval loss follows {law.fit.formula(law.symbol)} "
                     f"(α 95% interval {law.fit.interval('alpha')}; {len(law.fitted)} runs on the "
                     "frontier).")
        lead.figures.append(Figure("loss_vs_params_total", "Eval loss against parameters (total)",
                                   lambda: plots.scaling(study.runs, study.rows, law.key, law.label,
                                                         law.symbol, law.fit, law.fitted,
                                                         law.left_out, study.palette)))
    _close(lead, study, family, " ".join(words), groups)
    lead.figures.insert(0, _swept_figure(study, key))
    return lead


def grid_lead(study: Study) -> Lead:
    """The best setting of the grid against the next, among runs that differ in swept fields only."""
    family = study.family()
    groups = _groups(family.members)
    if not groups:
        return _nothing(study)
    lead = Lead("The best setting")
    _close(lead, study, family, same_tokens(family.members) + ranking(groups, family.members),
           groups)
    lead.record["best_setting"] = best_setting(groups[0].runs[0].values, groups[0].describe())
    return lead


def mixture_lead(study: Study) -> Lead:
    """A mixture swarm's answer: the fitted laws, the proposed mix and how far to trust it
    (mixture_report.py). Its trials are not ranked by eval loss as a grid's are: each run's
    eval_loss mixes the domains' held-out streams by that run's own weights, so two mixtures'
    eval losses measure different text; the mixture part ranks them by its objective."""
    part = study.mixture.section
    if part is None:
        lead = grid_lead(study)
        lead.title = "Mixture swarm"
        lead.record.pop("best_setting", None)  # eval losses of different mixes: no winner
        lead.text = ("A mixture swarm, but no mixture law could be fitted "
                     f"({'; '.join(study.mixture.omitted) or 'no run sets two or more data.sources weights'}); its trials "
                     "are ranked as a grid (by eval loss, which each run measures on its own "
                     "mix of the domains). " + lead.text)
        return lead
    text, left_out = _left_out(study.family())
    return Lead("Mixture swarm", f"{part.text}{text} {states(study.runs)}", tables=part.tables,
                figures=part.figures, left_out=left_out)


def _nothing(study: Study) -> Lead:
    return Lead("No answer yet", f"No run finished with an eval loss ({states(study.runs)[:-1]}); "
                "the table shows each run's state.")


LEADS: dict[str, Callable[[Study], Lead]] = {
    "isoflop": isoflop_lead, "transfer": transfer_lead, "lr": lr_lead, "seeds": seeds_lead,
    "ladder": ladder_lead, "mixture": mixture_lead, "grid": grid_lead}


def lead(study: Study) -> Lead:
    if not study.done:
        return _nothing(study)
    return LEADS[study.kind.name](study)
