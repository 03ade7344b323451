"""The analysis figures (matplotlib's Agg backend, no pyplot state): one colour per setting in all
(the seeds of a setting share it).

Each function returns a Figure with constrained layout, its title on the left and its legend of
settings outside the axes on the right, so neither covers data. Replicated settings are drawn as
their mean with the seeds' standard deviation: error bars on points, bands around curves.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
from matplotlib import colormaps  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import ListedColormap, LogNorm, Normalize  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogFormatter, NullLocator  # noqa: E402

from research.analysis.approach3 import JointLaw  # noqa: E402
from research.analysis.fits import FitError, IsoFlop, PowerLaw, group_budgets  # noqa: E402
from research.analysis.points import Points  # noqa: E402
from research.analysis.replicates import Group, groups  # noqa: E402
from research.analysis.runs import Run, family, finished, format_value  # noqa: E402
from research.format import si  # noqa: E402

LOSS = "eval loss (nats/token)"
MAX_LEGEND = 6  # more budgets or sizes than this get a colour bar instead of a legend


class _Compact(LogFormatter):
    """matplotlib's choice of which log ticks to label, written short: 5k, 2.5G, 5.36."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        return si(x) if super().__call__(x, pos) else ""


def _log(ax: Axes, y: bool = False) -> None:
    """Log x (and y) axes with compact tick labels."""
    ax.set_xscale("log")
    axes = [ax.xaxis]
    if y:
        ax.set_yscale("log")
        axes.append(ax.yaxis)
    for axis in axes:
        axis.set_major_formatter(_Compact())
        axis.set_minor_formatter(_Compact(labelOnlyBase=False))


def _legend_columns(runs: list[Run]) -> int:
    settings = len({run.setting for run in runs})
    return max(1, -(-settings // 18))  # 18 entries fit beside one row of panels


def _legend_font(columns: int) -> str:
    return "small" if columns == 1 else "x-small"


_CHAR_INCHES = {"small": 0.066, "x-small": 0.055}  # mean glyph width of the default font there


@dataclass(frozen=True)
class Palette:
    """A colour per run, and the key that explains it: one colour per setting with a legend of
    settings, or, when the runs order along one number (compute, a size, the learning rate), a
    sequential map with a colour bar, so a figure never lists a dozen settings."""

    colors: dict[str, Any]  # run name -> colour
    scale: tuple[str, Normalize] | None = None  # (label, norm) of the colour bar

    def __getitem__(self, name: str) -> Any:
        return self.colors[name]

    def width(self, runs: list[Run]) -> float:
        """Inches the key takes on the right of a figure: a legend is as wide as its longest
        label (counted as if every run were hidden, the longest that label can be), so that long
        settings (a mixture's weights) widen the figure instead of squeezing its panels to
        nothing."""
        if self.scale:
            return 1.3
        columns = _legend_columns(runs)
        longest = max(len(label) for _, label in _legend_entries(runs, shown=set()))
        return columns * (0.6 + _CHAR_INCHES[_legend_font(columns)] * longest)

    def key(self, fig: Figure, runs: list[Run], shown: set[str] | None = None) -> None:
        if self.scale is None:
            _run_legend(fig, runs, self.colors, shown)
            return
        label, norm = self.scale
        bar = fig.colorbar(ScalarMappable(norm, SEQUENTIAL), ax=[a for a in fig.axes if a.get_visible()],
                           label=label, pad=0.02, fraction=0.04)
        if isinstance(norm, LogNorm):
            bar.ax.yaxis.set_major_formatter(_Compact())
            bar.ax.yaxis.set_minor_formatter(_Compact(labelOnlyBase=False))
        else:
            bar.ax.yaxis.set_major_formatter(FuncFormatter(lambda x, pos: si(x)))


# viridis without its palest tenth: the last setting's points stay visible on white
SEQUENTIAL = ListedColormap(colormaps["viridis"](np.linspace(0.0, 0.9, 256)))


def palette(runs: list[Run], by: dict[str, float] | None = None, label: str = "") -> Palette:
    """Colours for `runs`: along `by` (run name -> a positive number; log-scaled when it spans a
    decade) when every run has one and there are several, with a colour bar when there are more
    than MAX_LEGEND settings; else one per setting (qualitative colours while they last, then a
    sequential map in run order)."""
    values = [by.get(run.name) for run in runs] if by else []
    if values and None not in values and min(values) > 0 and len(set(values)) > 1:
        low, high = min(values), max(values)
        norm = LogNorm(low, high) if high / low >= 10 else Normalize(low, high)
        many = len({run.setting for run in runs}) > MAX_LEGEND
        return Palette({run.name: SEQUENTIAL(norm(v)) for run, v in zip(runs, values)},
                       (label, norm) if many else None)
    settings = list(dict.fromkeys(run.setting for run in runs))
    n = len(settings)
    if n <= 10:
        colors = [colormaps["tab10"](i) for i in range(n)]
    elif n <= 20:
        colors = [colormaps["tab20"](i) for i in range(n)]
    else:
        colors = [SEQUENTIAL(i / (n - 1)) for i in range(n)]
    by_setting = dict(zip(settings, colors))
    return Palette({run.name: by_setting[run.setting] for run in runs})


def _figure(panels: int, width: float = 5.0, key: float = 0.0) -> tuple[Figure, list[Axes]]:
    """Up to 3 panels a row, with `key` inches on the right for a legend or colour bar."""
    cols = min(panels, 3)
    rows = -(-panels // cols)
    fig = Figure(figsize=(width * cols + key, 3.8 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, list(axes[:panels])


def _title(fig: Figure, text: str) -> None:
    fig.suptitle(text, x=0.01, ha="left")  # left: clear of the run legend at the top right


def _legend_entries(runs: list[Run], shown: set[str] | None = None) -> list[tuple[Run, str]]:
    """(first run, label) per setting: the setting with its number of seeds; runs that did not
    finish say so, and whether they are drawn (`shown`: the runs drawn; None: all)."""
    members: dict[tuple, list[Run]] = {}
    for run in runs:
        members.setdefault(run.setting, []).append(run)

    def label(setting: str, members: list[Run]) -> str:
        notes = [f"{len(members)} seeds"] if len(members) > 1 else []
        states = Counter(run.state for run in members if run.state != "done")
        notes += [f"{n} {state}" if len(members) > 1 else state for state, n in states.items()]
        hidden = sum(shown is not None and run.name not in shown for run in members)
        if hidden:
            notes.append("not shown" if hidden == len(members) else f"{hidden} not shown")
        return f"{setting} ({', '.join(notes)})" if notes else setting

    return [(m[0], label(m[0].group, m)) for m in members.values()]


def _run_legend(fig: Figure, runs: list[Run], colors: dict[str, Any],
                shown: set[str] | None = None) -> None:
    """One legend entry per setting (`_legend_entries`), in columns beside the panels."""
    handles = [Line2D([], [], color=colors[run.name], marker="o", lw=1.5, label=label)
               for run, label in _legend_entries(runs, shown)]
    columns = _legend_columns(runs)
    fig.legend(handles=handles, loc="outside right upper", title="setting", ncols=columns,
               fontsize=_legend_font(columns))


def _smooth(values: np.ndarray) -> np.ndarray:
    """Debiased exponential moving average over about a twentieth of the points."""
    beta = 1 - 1 / max(1.0, len(values) / 20)
    out, avg = np.empty_like(values), 0.0
    for i, v in enumerate(values):
        avg = beta * avg + (1 - beta) * v
        out[i] = avg / (1 - beta ** (i + 1))
    return out


def _band(ax: Axes, series: list[np.ndarray], per_step: int, style: dict[str, Any],
          smooth: bool = False, **line: Any) -> None:
    """Mean over seeds at the steps every seed logged, with a ±1 standard deviation band."""
    common = sorted(set.intersection(*(set(s[:, 0]) for s in series)))
    if not common:
        return
    values = np.array([[dict(map(tuple, s))[step] for step in common] for s in series])
    if smooth:
        values = np.array([_smooth(v) for v in values])
    tokens = np.array(common) * per_step
    mean, sd = values.mean(0), values.std(0, ddof=1)
    ax.plot(tokens, mean, lw=1.5, **style, **line)
    ax.fill_between(tokens, mean - sd, mean + sd, color=style["color"], alpha=0.2, lw=0)


def curves(runs: list[Run], colors: Palette) -> Figure:
    """Training and eval loss against tokens seen, every setting (unfinished runs dashed); a
    setting run over several seeds is its mean with a ±1 standard deviation band."""
    fig, (train_ax, eval_ax) = _figure(2, key=colors.width(runs))
    _title(fig, "Loss curves")
    members: dict[tuple, list[Run]] = {}
    for run in runs:
        if run.tokens_per_step is not None:
            members.setdefault(run.setting, []).append(run)
    for setting in members.values():
        done = [run for run in setting if run.state == "done"]
        replicated = done if len(done) > 1 else []
        for run in setting:
            if run.name in {r.name for r in replicated}:
                continue
            style = {"color": colors[run.name], "ls": "-" if run.state == "done" else "--"}
            train = np.array(run.series("train/loss"), float).reshape(-1, 2)
            if len(train):
                tokens = train[:, 0] * run.tokens_per_step
                if len(train) >= 40:
                    train_ax.plot(tokens, train[:, 1], alpha=0.25, lw=0.8, color=style["color"])
                train_ax.plot(tokens, _smooth(train[:, 1]), lw=1.5, **style)
            evals = np.array(run.series("eval/loss"), float).reshape(-1, 2)
            if len(evals):
                eval_ax.plot(evals[:, 0] * run.tokens_per_step, evals[:, 1], marker="o", ms=3,
                             lw=1.5, **style)
        if replicated:
            style = {"color": colors[replicated[0].name], "ls": "-"}
            per_step = replicated[0].tokens_per_step
            for ax, tag, extra in ((train_ax, "train/loss", {"smooth": True}),
                                   (eval_ax, "eval/loss", {"marker": "o", "ms": 3})):
                series = [np.array(run.series(tag), float).reshape(-1, 2) for run in replicated]
                if all(len(s) for s in series):
                    _band(ax, series, per_step, style, **extra)
    for ax, what in ((train_ax, "training loss (nats/token, smoothed)"), (eval_ax, LOSS)):
        _log(ax)
        ax.set(xlabel="training tokens", ylabel=what)
        ax.grid(True, which="both", alpha=0.3)
    colors.key(fig, runs)
    return fig


def _finished(runs: list[Run], rows: list[dict[str, Any]], key: str) -> list[tuple[Run, dict]]:
    return [(run, r) for run, r in finished(runs, rows) if r.get(key) is not None]


def _settings(points: list[tuple[Run, dict]]) -> list[Group]:
    return groups([(run, r["final_eval_loss"]) for run, r in points])


def _mean_point(ax: Axes, x: float, g: Group, color: Any, **style: Any) -> None:
    """A setting's mean loss with its seeds' standard deviation as an error bar, and each seed
    as a small dot."""
    if g.n > 1:
        ax.scatter([x] * g.n, g.losses, color=color, s=10, alpha=0.5, zorder=3, lw=0)
    style = {"marker": "o", **style}
    ax.errorbar(x, g.mean, yerr=g.std, ls="none", ms=7, color=color, capsize=3, zorder=4, **style)


def swept(runs: list[Run], rows: list[dict[str, Any]], fields: list[str], panels: list[str],
          colors: Palette) -> Figure:
    """Final eval loss against each of `panels` (some distinguishing fields); a line joins only
    settings that differ in the plotted field alone, and "best" is marked only when all points
    form one such line."""
    fig, axes = _figure(len(panels), width=4.5, key=colors.width(runs))
    shown: set[str] = set()
    for ax, key in zip(axes, panels):
        points = _finished(runs, rows, key)
        shown |= {run.name for run, _ in points}
        values = [r[key] for _, r in points]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if numeric:
            position = {v: v for v in values}
        else:
            position = {str(v): i for i, v in enumerate(sorted(set(map(str, values))))}
        place = lambda v: position[v if numeric else str(v)]  # noqa: E731
        lines: dict[tuple, list[tuple[float, float]]] = {}
        settings = _settings(points)
        for g in settings:
            x = place(g.runs[0].values[key])
            _mean_point(ax, x, g, colors[g.runs[0].name])
            lines.setdefault(family(g.runs[0], fields, (key,)), []).append((x, g.mean))
        for line in lines.values():
            if len(line) > 1:
                xs, ys = zip(*sorted(line))
                ax.plot(xs, ys, color="0.6", lw=1, zorder=2)
        if settings and len(lines) == 1 and len(settings) > 1:
            best = settings[0]
            ax.annotate("best" + (" (mean)" if best.n > 1 else ""),
                        (place(best.runs[0].values[key]), best.mean), xytext=(0, 9),
                        textcoords="offset points", ha="center", fontsize="small")
        ticks = sorted(set(position.values()))
        if numeric and ticks and min(ticks) > 0 and max(ticks) / min(ticks) >= 10:
            _log(ax)
        if len(ticks) <= 12:
            labels = {p: (format_value(v) if numeric else v) for v, p in position.items()}
            ax.set_xticks(ticks, [labels[t] for t in ticks])
            ax.xaxis.set_minor_locator(NullLocator())
        ax.set(xlabel=key, ylabel=LOSS)
        if len(lines) > 1:
            ax.set_title(f"{len(lines)} families: a line joins runs that differ in {key} alone",
                         fontsize="small")
        ax.grid(True, alpha=0.3)
    _title(fig, (f"Final eval loss against {panels[0]}" if len(panels) == 1
                 else "Final eval loss by distinguishing field") + " (mean ± sd over seeds)")
    colors.key(fig, runs, shown)
    return fig


def scaling(runs: list[Run], rows: list[dict[str, Any]], key: str, xlabel: str, symbol: str,
            fit: PowerLaw | FitError, fitted: frozenset[str], left_out: dict[str, str],
            colors: Palette) -> Figure:
    """Final eval loss against `key` (log x), the fitted power law and its intervals; settings
    off the frontier (beaten by a smaller one) are hollow, runs left out of the fit for differing
    in other fields are crosses."""
    fig, (ax,) = _figure(1, width=6.0, key=colors.width(runs))
    points = _finished(runs, rows, key)
    x_of = {run.name: r[key] for run, r in points}
    for g in _settings(points):
        name = g.runs[0].name
        color = colors[name]
        x = float(np.mean([x_of[run.name] for run in g.runs]))
        if name in left_out:
            _mean_point(ax, x, g, color, marker="x")
        else:
            _mean_point(ax, x, g, color, mfc=color if name in fitted else "none")
    if isinstance(fit, PowerLaw):
        xs = np.array(list(x_of.values()), float)
        grid = np.geomspace(xs.min() / 1.5, xs.max() * 1.5, 200)
        label = (f"fit: {fit.formula(symbol)}\nα = {fit.alpha:.3g} {fit.interval('alpha')}, "
                 f"E = {fit.E:.3g} {fit.interval('E')}\n(95% bootstrap intervals; "
                 f"{len(fitted)} runs fitted)")
        ax.plot(grid, fit(grid), color="k", ls="--", lw=1.2, label=label, zorder=2)
    else:
        ax.plot([], [], " ", label=f"no fit: {fit}")
    if len(fitted) + len(left_out) < len(points):
        ax.scatter([], [], s=45, facecolor="none", edgecolor="0.3",
                   label="beaten by a smaller run (not fitted)")
    if left_out:
        ax.scatter([], [], s=45, marker="x", color="0.3",
                   label=f"other settings (not fitted): {len(left_out)} run{'s' * (len(left_out) != 1)}")
    ax.legend(loc="best", fontsize="small", framealpha=0.85)
    _log(ax)
    ax.set(xlabel=xlabel, ylabel=LOSS)
    ax.grid(True, which="both", alpha=0.3)
    _title(fig, f"Eval loss against {xlabel}")
    colors.key(fig, runs, {run.name for run, _ in points})
    return fig


def isoflop(iso: IsoFlop, params: np.ndarray, loss: np.ndarray, xlabel: str) -> Figure:
    """Left: loss against size per compute budget, parabola and minimum. Right: N_opt, D_opt vs C."""
    fig, (ax, opt_ax) = _figure(2, width=5.5)
    _title(fig, "IsoFLOP curves and compute-optimal scaling (Chinchilla approach 2)")
    flops = [b.flops for b in iso.budgets]
    norm = LogNorm(min(flops), max(flops))
    labelled = len(iso.budgets) <= MAX_LEGEND  # else a colour bar: no long legend
    for budget in iso.budgets:
        color = SEQUENTIAL(norm(budget.flops))
        n, l = params[budget.members], loss[budget.members]
        ax.scatter(n, l, color=color, s=35, zorder=3, label=f"C = {si(budget.flops)} FLOPs"
                   + (f" ({budget.note})" if budget.note else "") if labelled else None)
        grid = np.linspace(np.log10(n.min()) - 0.1, np.log10(n.max()) + 0.1, 100)
        ax.plot(10**grid, np.polyval(budget.parabola, grid), color=color, lw=1.2)
        if budget.n_opt is not None:
            ax.scatter(budget.n_opt, budget.loss_opt, marker="*", s=180, color=color,
                       edgecolor="k", zorder=4)
    _log(ax)
    ax.set(xlabel=xlabel, ylabel=LOSS)
    if labelled:
        ax.legend(loc="best", fontsize="small", title="★ = minimum of the parabola")
    else:
        ax.set_title("★ = minimum of the parabola", fontsize="small")
        Palette({}, ("training compute C (FLOPs)", norm)).key(fig, [])
    ax.grid(True, which="both", alpha=0.3)

    optimal = [b for b in iso.budgets if b.n_opt is not None]
    c = np.array([b.flops for b in optimal])
    for values, slope, name, color in ((np.array([b.n_opt for b in optimal]), iso.params,
                                        "N_opt (parameters)", "tab:blue"),
                                       (np.array([b.d_opt for b in optimal]), iso.tokens,
                                        "D_opt (tokens)", "tab:orange")):
        if not len(c):
            continue
        ax_label = name if slope is None else f"{name} ∝ C^{slope.describe()}"
        opt_ax.scatter(c, values, color=color, s=40, zorder=3, label=ax_label)
        if slope is not None:
            grid = np.geomspace(c.min() / 2, c.max() * 2, 50)
            opt_ax.plot(grid, slope(grid), color=color, lw=1.2, ls="--")
    _log(opt_ax, y=True)
    opt_ax.set(xlabel="training compute C (FLOPs)", ylabel="compute-optimal parameters / tokens")
    if iso.note:
        opt_ax.set_title(iso.note, fontsize="small")
    if optimal:
        opt_ax.legend(loc="upper left", fontsize="small")
    opt_ax.grid(True, which="both", alpha=0.3)
    return fig


MAX_SLICES = 8  # IsoFLOP slices drawn; more budgets than this are thinned evenly


def joint_fit(law: JointLaw, fitted: Points, held: Points | None) -> Figure:
    """Left: loss against N along IsoFLOP slices of L(N, D) through the points' budgets, with
    the points. Right: contours of L over (N, D), the points and the compute-optimal path.
    Colour is log compute; held-out points are hollow diamonds."""
    fig, (ax, contour_ax) = _figure(2, width=5.5)
    _title(fig, f"Approach 3: {law.formula()}")
    parts = [(fitted, "o", True)] + ([(held, "D", False)] if held is not None and len(held) else [])
    flops = np.concatenate([p.flops for p, _, _ in parts])
    n_all = np.concatenate([p.params for p, _, _ in parts])
    d_all = np.concatenate([p.tokens for p, _, _ in parts])
    norm = LogNorm(flops.min(), max(flops.max(), flops.min() * 1.01))
    cmap = colormaps["viridis"]
    groups = group_budgets(flops)
    for group in [groups[int(i)] for i in np.unique(np.linspace(0, len(groups) - 1, MAX_SLICES)
                                                    .round())]:
        c = float(np.exp(np.mean(np.log(flops[group]))))
        n_opt = law.optimal(c)["n_opt"][0]
        grid = np.geomspace(min(n_all[group].min() / 2, n_opt / 1.5),
                            max(n_all[group].max() * 2, n_opt * 1.5), 100)
        ax.plot(grid, law(grid, c / (law.k * grid)), color=cmap(norm(c)), lw=1.2)
        ax.scatter(n_opt, float(law(n_opt, c / (law.k * n_opt))), marker="*", s=140,
                   color=cmap(norm(c)), edgecolor="k", zorder=4)
    for points, marker, filled in parts:
        colors = cmap(norm(points.flops))
        face = colors if filled else "none"
        ax.scatter(points.params, points.loss, marker=marker, s=25, zorder=3, edgecolors=colors,
                   facecolors=face, label="held out" if not filled else None)
        contour_ax.scatter(points.params, points.tokens, marker=marker, s=20, zorder=3,
                           edgecolors=colors, facecolors=face)
    _log(ax)
    ax.set(xlabel="parameters N", ylabel=LOSS,
           title=f"IsoFLOP slices of L(N, D) (★ predicted optimum; {min(len(groups), MAX_SLICES)}"
                 f" of {len(groups)} budgets)")
    ax.title.set_fontsize("small")
    if len(parts) > 1:
        ax.legend(loc="best", fontsize="small")
    ax.grid(True, which="both", alpha=0.3)

    ns = np.geomspace(n_all.min() / 3, n_all.max() * 3, 120)
    ds = np.geomspace(d_all.min() / 3, d_all.max() * 3, 120)
    grid_n, grid_d = np.meshgrid(ns, ds)
    lines = contour_ax.contour(grid_n, grid_d, law(grid_n, grid_d), levels=12, cmap="Greys",
                               linewidths=0.8)
    contour_ax.clabel(lines, fontsize="x-small", fmt="%.2f")
    path_c = np.geomspace(law.k * ns.min() * ds.min(), law.k * ns.max() * ds.max(), 50)
    opt = [law.optimal(c) for c in path_c]
    contour_ax.plot([o["n_opt"][0] for o in opt], [o["d_opt"][0] for o in opt], color="tab:red",
                    lw=1.5, label=f"compute-optimal: N ∝ C^{law.a:.2f}, D ∝ C^{law.b:.2f}")
    contour_ax.set_xlim(ns.min(), ns.max())
    contour_ax.set_ylim(ds.min(), ds.max())
    _log(contour_ax, y=True)
    contour_ax.set(xlabel="parameters N", ylabel="training tokens D")
    contour_ax.set_title("contours of L(N, D)", fontsize="small")
    contour_ax.legend(loc="upper left", fontsize="small")
    bar = fig.colorbar(ScalarMappable(norm, cmap), ax=contour_ax, label="training compute C (FLOPs)")
    bar.ax.yaxis.set_major_formatter(_Compact())
    bar.ax.yaxis.set_minor_formatter(_Compact(labelOnlyBase=False))
    return fig


def extrapolation(law: JointLaw, fitted: Points, held: Points | None) -> Figure:
    """Predicted against measured loss: the fitted points, and held-out ones with their 95%
    prediction intervals; the diagonal is a perfect prediction."""
    fig, (ax,) = _figure(1, width=6.0)
    _title(fig, "Predicted against measured loss")
    ax.scatter(fitted.loss, law(fitted.params, fitted.tokens), s=20, color="tab:blue",
               label=f"fitted ({len(fitted)})", zorder=3)
    measured = [fitted.loss]
    if held is not None and len(held):
        predicted = np.array([law.predict(n, d) for n, d in zip(held.params, held.tokens)])
        ax.errorbar(held.loss, predicted[:, 0], yerr=[predicted[:, 0] - predicted[:, 1],
                                                      predicted[:, 2] - predicted[:, 0]],
                    fmt="D", color="tab:red", mfc="none", capsize=3, zorder=4,
                    label=f"held out ({len(held)}), 95% prediction interval")
        measured.append(held.loss)
    values = np.concatenate(measured)
    span = np.array([values.min(), values.max()])
    ax.plot(span, span, color="0.4", lw=1, ls="--", label="prediction = measurement")
    ax.set(xlabel=f"measured {LOSS}", ylabel="predicted by L(N, D)")
    ax.legend(loc="upper left", fontsize="small")
    ax.grid(True, alpha=0.3)
    return fig
