"""Analysis: scaling-law fits against known laws, event files against metrics.jsonl, and reports from
real tiny runs and a real tiny sweep (failed and eval-less runs included), TensorBoard over loopback."""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import TINY

from research import config
from research.analysis import add_analysis_commands, fits, plots, replicates
from research.analysis.board import serve
from research.analysis.events import read_scalars, scalars_from_metrics
from research.analysis.questions import lead
from research.analysis.report import analyze, study
from research.analysis.runs import load_runs, row
from research.analysis.scaling import scaling_fits
from research.config import ConfigError
from research.sweep.rundir import SWEEP_FILE
from research.train import rundir

REPO = Path(__file__).resolve().parents[1]

# Hoffmann et al. 2022's fitted law, L(N, D) = E + A/N^alpha + B/D^beta: with C = 6ND its
# compute-optimal sizes grow as N_opt ∝ C^(beta/(alpha+beta)), D_opt ∝ C^(alpha/(alpha+beta)).
E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28


def chinchilla_loss(n: np.ndarray, d: np.ndarray) -> np.ndarray:
    return E + A * n**-ALPHA + B * d**-BETA


def true_n_opt(c: float) -> float:
    """argmin over N of the loss at C = 6ND, by dense search (independent of any closed form)."""
    n = np.geomspace(1e3, 1e13, 200_001)
    return float(n[np.argmin(chinchilla_loss(n, c / (6 * n)))])


def isoflop_grid(rng: np.random.Generator, budgets=(1e15, 1e16, 1e17, 1e18, 1e19)):
    """Per budget, 9 sizes spanning 1.6 decades around the optimum (off-centre by up to 0.2)."""
    for c in budgets:
        centre = true_n_opt(c) * 10 ** rng.uniform(-0.2, 0.2)
        for n in centre * np.logspace(-0.8, 0.8, 9):
            yield c, n, c / (6 * n)


# ----------------------------------------------------------------------------- fits


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_power_law_fit_recovers_a_known_law(seed):
    rng = np.random.default_rng(seed)
    x = np.logspace(5, 9, 12)
    y = (1.7 + 400.0 * x**-0.34) * np.exp(rng.normal(0, 0.005, x.size))  # 0.5% noise
    fit = fits.fit_power_law(x, y)
    assert fit.alpha == pytest.approx(0.34, abs=0.015)
    assert fit.E == pytest.approx(1.7, abs=0.04)
    assert fit.A == pytest.approx(400.0, rel=0.12)
    assert fit.n_points == 12
    for name, value in (("alpha", fit.alpha), ("E", fit.E), ("A", fit.A)):
        low, high = fit.intervals[name]
        assert low <= value <= high and high - low < 0.3 * abs(value)
    assert fit.intervals["alpha"][0] <= 0.34 <= fit.intervals["alpha"][1]


def test_power_law_fit_says_why_it_cannot_fit():
    with pytest.raises(fits.FitError, match="too few points to fit: 3 distinct values, need 4"):
        fits.fit_power_law([1e6, 1e7, 1e8, 1e8], [3.0, 2.5, 2.2, 2.21])
    with pytest.raises(fits.FitError, match="no power law"):
        fits.fit_power_law(np.logspace(5, 8, 6), [2.0, 2.1, 2.2, 2.3, 2.4, 2.5])  # rising
    with pytest.raises(fits.FitError, match="positive"):
        fits.fit_power_law([1, 2, 3, 4], [1.0, 0.0, 1.0, 1.0])


def test_frontier_keeps_the_runs_no_smaller_or_equal_run_beats():
    x = np.array([1, 2, 2, 3, 4, 5, 5])
    y = np.array([3.0, 2.5, 2.4, 2.6, 2.0, 2.1, 1.9])
    naive = [not any(x[j] <= x[i] and (y[j], j) < (y[i], i) for j in range(len(x)) if j != i)
             for i in range(len(x))]
    assert fits.frontier(x, y).tolist() == naive == [True, False, True, False, True, False, True]


@pytest.mark.parametrize("seed", [0, 1])
def test_isoflop_approach_2_recovers_compute_optimal_exponents(seed):
    rng = np.random.default_rng(seed)
    c, n, d = map(np.array, zip(*isoflop_grid(rng)))
    loss = chinchilla_loss(n, d) * np.exp(rng.normal(0, 0.002, n.size))
    iso = fits.isoflop(c * np.exp(rng.uniform(-0.05, 0.05, c.size)), n, d, loss)  # budgets ±5%
    assert len(iso.budgets) == 5 and all(b.n_opt is not None for b in iso.budgets)
    assert iso.params.exponent == pytest.approx(BETA / (ALPHA + BETA), abs=0.02)
    assert iso.tokens.exponent == pytest.approx(ALPHA / (ALPHA + BETA), abs=0.02)
    assert 0 < iso.params.stderr < 0.02
    for budget in iso.budgets:
        assert budget.n_opt == pytest.approx(true_n_opt(budget.flops), rel=0.35)


def test_isoflop_needs_two_budgets_with_a_minimum_inside():
    rng = np.random.default_rng(0)
    c, n, d = map(np.array, zip(*isoflop_grid(rng, budgets=(1e17,))))
    assert fits.isoflop(c, n, d, chinchilla_loss(n, d)) is None  # one budget
    # Sizes all far below the optimum at two budgets: loss falls across each, no minimum inside.
    c = np.repeat([1e17, 1e18], 5)
    n = np.tile(np.geomspace(1e3, 1e5, 5), 2)
    iso = fits.isoflop(c, n, c / (6 * n), chinchilla_loss(n, c / (6 * n)))
    assert iso.params is None and "0 of 2 budgets" in iso.note
    assert all("minimum above the sizes tried" in b.note for b in iso.budgets)


# ----------------------------------------------------------------------------- replicates


def test_welch_comparison_matches_a_float64_reference():
    a, b = np.array([3.10, 3.12, 3.09, 3.11]), np.array([3.15, 3.13, 3.18])
    c = replicates.compare(a, b)
    # Welch by hand: standard error, Welch-Satterthwaite degrees of freedom, two-sided t.
    va, vb = a.var(ddof=1) / 4, b.var(ddof=1) / 3
    df = (va + vb) ** 2 / (va**2 / 3 + vb**2 / 2)
    t = (b.mean() - a.mean()) / math.sqrt(va + vb)
    from scipy import integrate, optimize, special

    density = lambda x: special.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * special.gamma(df / 2)) \
        * (1 + x * x / df) ** (-(df + 1) / 2)  # noqa: E731
    p = 2 * integrate.quad(density, abs(t), np.inf)[0]
    assert c.difference == pytest.approx(b.mean() - a.mean(), abs=1e-12)
    assert c.p_value == pytest.approx(p, rel=1e-6)
    low, high = c.interval  # the interval excludes 0 exactly when p < 0.05
    assert (low > 0) == (c.p_value < 0.05) and high - c.difference == pytest.approx(c.difference - low)
    # its half-width is the t quantile (solved from the density above) times the standard error
    tail = lambda q: 2 * integrate.quad(density, q, np.inf)[0] - 0.05  # noqa: E731
    quantile = optimize.brentq(tail, 0.0, 50.0, xtol=1e-12)
    assert high - low == pytest.approx(2 * quantile * math.sqrt(va + vb), rel=1e-6)
    assert not replicates.compare([3.1], b).tested  # one run: noise unknown, nothing tested
    assert "noise is unknown" in replicates.compare([3.1], b).verdict()


def test_seed_noise_test_flags_real_gaps_and_not_null_ones():
    """Synthetic settings with known noise (sd 0.01, 3 seeds each, 400 draws per case): a gap of
    5 sd is flagged about 95% of the time (Welch's power at 4 degrees of freedom), no gap at most
    about 5% (the test's level; Welch is slightly conservative here), a gap of 0.35 sd rarely."""
    rng = np.random.default_rng(0)
    def flagged(gap: float, trials: int = 400) -> float:
        return np.mean([replicates.compare(rng.normal(3.0, 0.01, 3),
                                           rng.normal(3.0 + gap, 0.01, 3)).distinguishable
                        for _ in range(trials)])
    assert flagged(0.05) > 0.9
    assert 0.01 < flagged(0.0) < 0.08
    assert flagged(0.0035) < 0.12


# ----------------------------------------------------------------------------- runs on disk


def write_run(path: Path, *, params: int, tokens_per_step: int, steps: int, eval_loss: float | None,
              state: str = "done", trial: dict | None = None, active: int | None = None) -> None:
    """A run directory as `research train` leaves it, minus checkpoints and tb/ (no training)."""
    path.mkdir(parents=True)
    entries = [{"step": s, "loss": 6.0 - s / steps, "tokens": s * tokens_per_step,
                "tokens_per_sec": 1000.0 + s, "mfu": 0.01} for s in (steps // 2, steps)]
    if eval_loss is not None:
        entries.append({"step": steps, "eval_loss": eval_loss, "eval_bpb": eval_loss / math.log(2)})
    (path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    rundir.write_json(path / "summary.json", {
        "name": path.name, "state": state, "step": steps, "steps": steps, "params_total": params,
        "params_active": active or params, "params_embedding": 0, "params_non_embedding": params,
        "flops_per_token": 6.0 * (active or params), "tokens_per_step": tokens_per_step,
        "error": None})
    if trial is not None:
        rundir.write_json(path / rundir.TRIAL_RECORD, trial)


def write_configured_run(path: Path, eval_loss: float, *overrides: str, trial: dict | None = None,
                         state: str = "done") -> None:
    """A run with the config.yaml `research train` writes for dense_tiny + overrides."""
    cfg = config.load(REPO / "experiments" / "dense_tiny.yaml", list(overrides))
    from research.train import flops

    write_run(path, params=flops.param_counts(cfg.model, 256)["total"],
              tokens_per_step=cfg.train.batch_size * cfg.train.seq_len, steps=cfg.train.steps,
              eval_loss=eval_loss, trial=trial, state=state)
    (path / "config.yaml").write_text(config.to_yaml(config.resolved(cfg, 256)))


def test_mixed_folder_gets_distinct_labels_and_no_cross_family_line_or_fit(tmp_path):
    """The README's run, a shorter run at another learning rate and the layers sweep, side by
    side: labels name every differing field, lines and fits stay within one family."""
    write_configured_run(tmp_path / "readme", 2.50)
    write_configured_run(tmp_path / "lr", 2.30, "optim.lr=1e-2", "train.steps=80")
    for i, (layers, loss) in enumerate([(1, 2.90), (2, 2.70), (4, 2.52), (8, 2.45)]):
        name = f"t{i:03d}-n_layers={layers}"
        write_configured_run(tmp_path / "layers" / name, loss, f"model.n_layers={layers}",
                             "train.eval_every=50", trial={
                                 "trial": i, "name": name, "params": {"model.n_layers": layers},
                                 "derived": {}, "seed": None, "state": "done"})
    runs, fields = load_runs(tmp_path)
    assert fields == ["model.n_layers", "optim.lr", "train.steps"]
    labels = {run.name: run.label for run in runs}
    assert len(set(labels.values())) == len(runs)
    assert labels["lr"] == "n_layers=4, lr=0.01, steps=80"
    assert labels["readme"] == "n_layers=4, lr=0.003, steps=300, seed=0 [readme]"  # as t002
    rows = [row(run) for run in runs]
    (fit,) = [s for s in scaling_fits(runs, rows, fields) if s.key == "params_total"]
    assert "lr" not in fit.fitted and set(fit.left_out) == {"lr"}
    assert fit.left_out["lr"] == ("differs from the fitted runs in optim.lr (0.01 vs 0.003), "
                                  "train.steps (80 vs 300)")
    figure = plots.swept(runs, rows, fields, fields, plots.palette(runs))
    joined = [line.get_xydata().tolist() for ax in figure.axes for line in ax.lines
              if line.get_color() == "0.6"]
    # n_layers: one line through the sweep's family (readme repeats t002, seed 0 and all, so it
    # adds no replicate); nothing through the lr run; lr and steps panels: each value a different
    # family, so no line at all.
    assert joined == [[[1, 2.90], [2, 2.70], [4, 2.52], [8, 2.45]]]
    # The trials sweep n_layers alone: a ladder; the lr run differs in two more fields, so it is
    # counted out of the ranking rather than crowned best for training 80 steps at another lr.
    answer = lead(study(tmp_path))
    assert answer.title == "How eval loss changes with n_layers"
    assert answer.text.startswith("At 614k training tokens per run, final eval loss against "
                                  "n_layers: 1: 2.9000, 2: 2.7000, "
                                  "4: 2.5200, 8: 2.4500. n_layers=8, lr=0.003, steps=300 reached "
                                  "the lowest final eval loss, 2.4500 nats/token")
    assert "Not compared: 1 run differs in optim.lr and train.steps (table.csv names each)." \
        in answer.text
    assert answer.left_out == {"lr": "not compared: " + fit.left_out["lr"]}


def test_analyze_recovers_exponents_from_an_isoflop_sweep_on_disk(tmp_path):
    rng = np.random.default_rng(3)
    for i, (c, n, d) in enumerate(isoflop_grid(rng, budgets=(1e15, 1e16, 1e17, 1e18))):
        steps = round(d / 1024)
        write_run(tmp_path / f"t{i:03d}", params=round(n), tokens_per_step=1024, steps=steps,
                  eval_loss=float(chinchilla_loss(n, steps * 1024) * np.exp(rng.normal(0, 0.002))),
                  trial={"trial": i, "name": f"t{i:03d}", "params": {"model.d_model": round(n)},
                         "state": "done", "objective": None, "error": None})
    out, answer = analyze(tmp_path)
    record = json.loads((out / "fits.json").read_text())["isoflop"]
    assert len(record["budgets"]) == 4
    assert record["n_opt_exponent"] == pytest.approx(BETA / (ALPHA + BETA), abs=0.03)
    assert record["d_opt_exponent"] == pytest.approx(ALPHA / (ALPHA + BETA), abs=0.03)
    assert f"N_opt ∝ C^{record['n_opt_exponent']:.3f}" in answer
    assert (out / "isoflop.png").stat().st_size > 10_000
    assert answer.endswith("36 runs: 36 done.")
    # Runs of different budgets are never ranked against each other, only within a budget.
    assert "lowest final eval loss" not in answer and "the worst" not in answer
    assert "The table ranks runs within each budget only." in answer


def test_moe_runs_get_a_fit_against_active_parameters_and_failures_no_fit(tmp_path):
    for experts in (2, 4, 8, 16, 32):  # 8 top-2 experts' worth of active params, more in total
        active = 10_000_000
        write_run(tmp_path / f"e{experts}", params=active * experts // 2, active=active,
                  tokens_per_step=512, steps=100, eval_loss=2.0 + 40.0 * (active * experts) ** -0.25)
    out, answer = analyze(tmp_path)
    record = json.loads((out / "fits.json").read_text())
    assert record["loss_vs_params_active"] == {  # all at one size: the best of them is the frontier
        "error": "too few points to fit: 1 distinct value, need 4", "runs": ["e32"], "left_out": {}}
    assert record["loss_vs_params_total"]["alpha"] == pytest.approx(0.25, abs=0.01)
    assert not (out / "loss_vs_params_active.png").exists()  # a declined fit: one line instead
    assert ("- Eval loss against active parameters: no fit (too few points to fit: 1 distinct "
            "value, need 4).") in (out / "report.md").read_text()
    assert answer.startswith("At 51.2k training tokens per run, e32 reached the lowest")

    for run in tmp_path.glob("e*"):  # all failed: a table and a plain answer, no fits or figures
        summary = rundir.read_json(run / "summary.json")
        rundir.write_json(run / "summary.json", {**summary, "state": "failed", "error": "OOM"})
    out, answer = analyze(tmp_path)
    assert answer == "No run finished with an eval loss (5 runs: 5 failed); the table shows each run's state."
    assert json.loads((out / "fits.json").read_text()) == {"kind": "grid"}
    assert sorted(p.name for p in out.glob("*.png")) == ["curves.png"]
    assert (out / "table.csv").read_text().count(",failed,") == 5


def _events(tb_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb_dir))
    events.Reload()
    return events


@pytest.fixture(scope="module")
def trained(tmp_path_factory, token_cache_dir) -> Path:
    """Two real tiny runs of 1 and 2 layers (no trial.json), 8 steps each."""
    from research.train.loop import train

    root = tmp_path_factory.mktemp("runs")
    for layers in (1, 2):
        train(config.load(None, [*TINY, f"data.cache_dir={token_cache_dir}", "train.steps=8",
                                 "train.eval_every=4", f"model.n_layers={layers}"]),
              root / f"layers{layers}")
    return root


def test_event_files_hold_the_same_scalars_as_metrics_jsonl(trained):
    run = trained / "layers2"
    from_events = read_scalars(run / "tb")
    from_jsonl = scalars_from_metrics(rundir.read_metrics(run))
    assert set(from_jsonl) == set(from_events) and {"train/loss", "eval/loss"} <= set(from_events)
    assert [s for s, _ in from_events["eval/loss"]] == [4, 8]
    for tag, points in from_jsonl.items():
        assert [s for s, _ in from_events[tag]] == [s for s, _ in points], tag
        np.testing.assert_allclose([v for _, v in from_events[tag]], [v for _, v in points],
                                   rtol=1e-6, err_msg=tag)  # events hold float32


def test_event_reading_drops_what_a_resumed_run_purged(tmp_path):
    from tensorboardX import SummaryWriter

    with SummaryWriter(str(tmp_path)) as writer:  # logged to step 7, checkpoint at 4
        for step in range(1, 8):
            writer.add_scalar("train/loss", float(step), step)
    time.sleep(1.1)  # a new event file (names carry the second)
    with SummaryWriter(str(tmp_path), purge_step=5) as writer:  # what RunLog does on resume
        for step in range(5, 10):
            writer.add_scalar("train/loss", 100.0 + step, step)
    assert read_scalars(tmp_path)["train/loss"] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 105.0), (6, 106.0), (7, 107.0), (8, 108.0),
        (9, 109.0)]


def test_report_from_real_runs_shows_failed_and_eval_less_runs(trained, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(trained, root, ignore=shutil.ignore_patterns("checkpoints", "analysis"))
    # A run that crashed before its first eval (no tb/ either: read from metrics.jsonl) ...
    shutil.copytree(root / "layers1", root / "crashed")
    shutil.rmtree(root / "crashed" / "tb")
    lines = (root / "crashed" / "metrics.jsonl").read_text().splitlines()
    (root / "crashed" / "metrics.jsonl").write_text(
        "".join(line + "\n" for line in lines if json.loads(line)["step"] < 4 and "loss" in line))
    summary = rundir.read_json(root / "crashed" / "summary.json")
    rundir.write_json(root / "crashed" / "summary.json",
                      {**summary, "state": "failed", "error": "FloatingPointError: non-finite loss at step 3"})
    # ... and one whose config was rejected: nothing but its config.
    (root / "rejected").mkdir()
    (root / "rejected" / "config.yaml").write_text(
        config.load(None, [*TINY, "train.steps=8", "model.n_layers=4"]).to_yaml())

    out, answer = analyze(root)
    with (out / "table.csv").open() as f:
        table = {r["run"]: r for r in csv.DictReader(f)}
    assert set(table) == {"layers1", "layers2", "crashed", "rejected"}
    assert [table[name]["model.n_layers"] for name in ("layers1", "layers2", "rejected")] == [
        "1", "2", "4"]  # the config field that differs
    crashed = table["crashed"]
    assert crashed["state"] == "failed" and "non-finite loss" in crashed["error"]
    assert crashed["final_eval_loss"] == "" and crashed["step"] == "3"
    assert table["rejected"]["state"] == "unknown" and table["rejected"]["final_eval_loss"] == ""
    for n in (1, 2):
        row, jsonl = table[f"layers{n}"], rundir.read_metrics(root / f"layers{n}")
        evals = [e["eval_loss"] for e in jsonl if "eval_loss" in e]
        assert float(row["final_eval_loss"]) == pytest.approx(evals[-1], rel=1e-6)
        assert float(row["best_eval_loss"]) == pytest.approx(min(evals), rel=1e-6)
        summary = rundir.read_json(root / f"layers{n}" / "summary.json")
        assert int(row["params_total"]) == summary["params_total"]
        assert float(row["tokens"]) == 8 * summary["tokens_per_step"]
        assert float(row["flops"]) == pytest.approx(summary["flops_per_token"] * 8 * summary["tokens_per_step"])

    # The answer names the best finished run and its margin over the next best, from the table.
    done = sorted((float(table[f"layers{n}"]["final_eval_loss"]), n) for n in (1, 2))
    (best, n_best), (second, n_second) = done[0], done[1]
    losses = {n: float(table[f"layers{n}"]["final_eval_loss"]) for n in (1, 2)}
    assert answer.startswith(f"At {8 * summary['tokens_per_step'] / 1000:.3g}k training tokens per run, "
                             f"final eval loss against n_layers: 1: {losses[1]:.4f}, 2: "
                             f"{losses[2]:.4f}. n_layers={n_best} reached the lowest final eval "
                             f"loss, {best:.4f}")
    assert f"{second - best:.4f} nats ({100 * (second - best) / second:.2g}%) below the next " \
           f"best, n_layers={n_second} ({second:.4f}): the run-to-run noise is unknown" in answer
    assert "4 runs: 2 done, 1 failed, 1 unknown." in answer
    omitted = (out / "report.md").read_text().split("## Omitted")[1]
    assert "- Eval loss against parameters (total): no fit (too few points to fit: 2 distinct " \
           "values, need 4)." in omitted

    # The ladder's figure (loss against n_layers) and the curves; the declined fits draw nothing.
    assert sorted(p.stem for p in out.glob("*.png")) == ["curves", "loss_vs_n_layers"]
    for name in ("curves", "loss_vs_n_layers"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    assert page.count("src='data:image/png;base64,") == 2 and "src='http" not in page
    assert "crashed" in page and "non-finite loss at step 3" in page
    events = _events(out / "tb")
    assert sorted(events.Tags()["images"]) == ["analysis/curves", "analysis/loss_vs_n_layers"]
    assert events.Images("analysis/loss_vs_n_layers")[0].encoded_image_string == (
        out / "loss_vs_n_layers.png").read_bytes()
    assert "custom_scalars__config__" in events.Tags()["tensors"]  # the layout (layout.py)

    analyze(root)  # again: replaces its output, no second set of TensorBoard images
    assert len(list((out / "tb").iterdir())) == 1


def test_a_real_sweep_over_seeds_shows_live_progress_and_reports_mean_and_spread(
        tmp_path, tiny_overrides, monkeypatch):
    """One point over two seeds: the runner's output names each trial's steps while it trains,
    each trial.log is plain lines naming its trial, and the report gives the seeds' mean ± sd."""
    from research.sweep import runner as runner_module
    from research.sweep import spec
    from research.sweep.runner import Runner, default_storage

    sweep_file = tmp_path / "layers.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "base": str(REPO / "experiments" / "dense_tiny.yaml"), "seeds": 2,
        "search": {"params": {"model.n_layers": [1]}}}))
    out = tmp_path / "sweep"
    overrides = [o for o in tiny_overrides if not o.startswith(("model.n_layers=", "logging.progress"))]
    lines: list[str] = []
    monkeypatch.setattr(runner_module, "POLL_S", 0.02)  # read each trial's steps as they come
    runner = Runner(spec.load(sweep_file, overrides), out, default_storage(out), say=lines.append,
                    progress_s=0.0)
    assert runner.run() == 0
    names = ["t000-n_layers=1-seed=0", "t001-n_layers=1-seed=1"]
    for name in names:
        done = lines.index(next(line for line in lines if line.startswith(f"[{name}] done")))
        steps = [int(m[1]) for line in lines[:done] if (m := re.match(rf"\[{name}\] step (\d)/6, ", line))]
        # progress while the trial still ran (a step before its last), then its last step
        assert steps and steps == sorted(steps) and steps[0] < 6 and steps[-1] == 6, lines
        log = (out / name / "trial.log").read_text()
        assert "\r" not in log and re.search(rf"^{name}: step 6/6 loss=", log, re.M), log
        assert "overrides" not in rundir.read_json(out / name / "trial.json")
    analysis, answer = analyze(out)
    with (analysis / "table.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["run"], r["state"]) for r in rows] == [(name, "done") for name in names]
    objectives = [rundir.read_json(out / name / "trial.json")["objective"] for name in names]
    assert objectives[0] != objectives[1]  # the seeds differ
    # One point over seeds: the report's question is the noise itself (kinds.py, from sweep.json).
    assert rundir.read_json(out / SWEEP_FILE)["method"] == "grid"
    spread = f"{np.mean(objectives):.4f} ± {np.std(objectives, ddof=1):.4f} nats/token (mean ± sd)"
    assert answer.startswith(f"At 1.54k training tokens per run, n_layers=1 over 2 seeds: final "
                             f"eval loss {spread}, range {min(objectives):.4f} – {max(objectives):.4f}.")


def test_empty_missing_or_foreign_folders_are_config_errors(tmp_path):
    parser = argparse.ArgumentParser()
    add_analysis_commands(parser.add_subparsers())
    foreign = tmp_path / "foreign"
    (foreign / "sub").mkdir(parents=True)
    (foreign / "sub" / "config.yaml").write_text("server: {port: 80}\n")  # not an experiment
    (foreign / "notes.txt").write_text("hello")
    (tmp_path / "empty").mkdir()
    for folder, message in [(tmp_path / "empty", "no run directories below it"),
                            (foreign, "no run directories below it"),
                            (tmp_path / "missing", "no such directory")]:
        args = parser.parse_args(["analyze", str(folder)])
        with pytest.raises(ConfigError, match=message):
            args.func(args)
    with pytest.raises(ConfigError, match="no TensorBoard event files"):
        with serve(foreign):
            pass


def test_board_serves_the_runs_over_loopback_until_stopped(trained):
    command = ("import argparse, sys; from research.analysis import add_analysis_commands; "
               "p = argparse.ArgumentParser(); add_analysis_commands(p.add_subparsers()); "
               "a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))")
    board = subprocess.Popen([sys.executable, "-c", command, "board", str(trained)], cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO)}, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        line = board.stdout.readline()  # printed once TensorBoard answers (serve gives up at 120 s)
        url = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert url, line + board.stdout.read()
        with urllib.request.urlopen(url[0], timeout=5) as page:
            assert page.status == 200 and b"<html" in page.read().lower()
        deadline = time.monotonic() + 30
        while True:
            with urllib.request.urlopen(url[0] + "data/runs", timeout=5) as response:
                runs = json.loads(response.read())
            if len(runs) >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert {"layers1/tb", "layers2/tb"} <= set(runs)
        # The custom-scalars layout of the runs' tags: loss first, then speed and the rest.
        with urllib.request.urlopen(url[0] + "data/plugin/custom_scalars/layout", timeout=5) as r:
            categories = [c["title"] for c in json.loads(r.read())["category"]]
        assert categories[0] == "loss" and "speed" in categories
        with pytest.raises(ConfigError, match=f"--port {url[1]}: already in use"):
            with serve(trained, int(url[1])):
                pass
    finally:
        board.terminate()  # SIGTERM: the command stops its TensorBoard as Ctrl-C would
        assert board.wait(30) == 0
    with pytest.raises(OSError):  # nothing left listening
        urllib.request.urlopen(url[0], timeout=2)
