"""Mixture swarms and mixture laws: the sampler's draws against the Dirichlet they come from, the
caps, sweep files and their bad input, a resumed swarm (trials are tests/sweep_fake_trial.py),
laws refitted to data made from known laws, the proposal against a brute-force optimum, and
`research analyze --mixture-points`."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats

from research import cli, config
from research.analysis import mixture as laws
from research.analysis.report import analyze
from research.config import ConfigError
from research.sweep import rundir, spec, swarm
from research.sweep.plan import print_plan
from research.sweep.store import Store
from test_sweep import BASE, REPO, _env, _wait_for, write_sweep

FAKE_TRIAL = Path(__file__).resolve().parent / "sweep_fake_trial.py"
TOKENS = {"code": 6000, "docs": 3000, "tests": 1000}


def stand_in(set_attribute) -> None:
    """Mixture sweeps over TOKENS' sources: the data layer's token counts are stood in for, so
    that the caps and the natural mix are known exactly."""
    set_attribute(swarm, "source_tokens", lambda cfg: dict(TOKENS))


@pytest.fixture
def sources(monkeypatch):
    stand_in(monkeypatch.setattr)


# A `research sweep` whose trials are the fake trial, with the stand-ins above.
WORKER = f"""
import sys
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from test_mixture_laws import stand_in
stand_in(setattr)
from research.sweep import runner, spec
runner.POLL_S = 0.1
sys.exit(runner.Runner(spec.load(sys.argv[1]), Path(sys.argv[2]), sys.argv[3],
                       trial_command=(sys.executable, sys.argv[4])).run())
"""


def _mixture_sweep(tmp_path: Path, **search) -> Path:
    """A mixture sweep over TOKENS' sources; its base is dense_tiny.yaml with those sources (each
    the whole built-in corpus)."""
    path = write_sweep(tmp_path / "mix.yaml", overrides={"optim.lr": 0.001, "train.steps": 10},
                       search={"method": "mixture", "sources": list(TOKENS), "trials": 8,
                               **search})
    base = yaml.safe_load(BASE.read_text())
    base.setdefault("data", {}).pop("source", None)
    base["data"]["sources"] = {name: {"source": "builtin"} for name in TOKENS}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    raw = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**raw, "base": str(tmp_path / "base.yaml")}))
    return path


# ----------------------------------------------------------------------------- the sampler


def test_draws_have_the_requested_dirichlet_mean_and_spread():
    p = swarm.natural(TOKENS)
    concentration, n = 2.0, 3000
    draws = swarm.draw(TOKENS, n + 2, concentration, np.ones(3), seed=5)
    w = np.array([list(d.values()) for d in draws])
    assert np.allclose(w[0], p) and np.allclose(w[1], 1 / 3, atol=1e-4)  # natural, uniform first
    alpha0 = concentration * len(p)
    variance = p * (1 - p) / (alpha0 + 1)  # Dirichlet(alpha0 * p): mean p, this variance
    z = (w[2:].mean(0) - p) / np.sqrt(variance / n)
    assert np.all(np.abs(z) < 4), z  # the mean, to four standard errors
    assert np.allclose(w[2:].var(0), variance, rtol=0.15)
    assert np.allclose(w.sum(1), 1, atol=1e-9)
    assert swarm.draw(TOKENS, 20, 2.0, np.ones(3), seed=5) == draws[:20]  # seeded
    assert swarm.draw(TOKENS, 20, 2.0, np.ones(3), seed=6) != draws[:20]


def test_draws_respect_the_repetition_caps():
    # 20k training tokens, at most 4 passes: tests (1000 tokens) may take 20% of the run.
    upper = swarm.caps(TOKENS, 20_000, 4)
    assert np.allclose(upper, [1.0, 0.6, 0.2])
    draws = swarm.draw(TOKENS, 200, 1.0, upper, seed=0)
    w = np.array([list(d.values()) for d in draws])
    assert np.all(w <= upper + swarm.CAP_SLACK) and np.all(w >= 0)
    assert np.allclose(w[1], [0.4, 0.4, 0.2])  # the uniform mix, moved onto the caps
    assert w[:, 2].max() > 0.19  # the cap binds: draws reach it
    with pytest.raises(ValueError, match="no mixture satisfies them"):
        swarm.draw(TOKENS, 8, 1.0, swarm.caps(TOKENS, 50_000, 4), seed=0)


def test_projection_onto_the_capped_simplex_is_the_nearest_point():
    rng = np.random.default_rng(0)
    upper = np.array([0.5, 0.3, 0.4, 0.6])
    others = [swarm.project(rng.dirichlet(np.ones(4)), upper) for _ in range(50)]  # feasible
    for target in rng.normal(0.25, 0.3, (10, 4)):
        w = swarm.project(target, upper)
        assert abs(w.sum() - 1) < 1e-9 and np.all(w >= 0) and np.all(w <= upper + 1e-12)
        assert all(np.sum((w - target) ** 2) <= np.sum((o - target) ** 2) + 1e-12 for o in others)


def test_source_tokens_counts_each_training_source(tmp_path, token_cache_dir):
    texts = {"a": "x" * 5000, "b": "y" * 2000, "c": "z" * 700}
    for name, text in texts.items():
        (tmp_path / f"{name}.txt").write_text(text)
    sources = {n: {"source": str(tmp_path / f"{n}.txt"), "weight": 0.0 if n == "c" else 1.0}
               for n in texts}
    cfg = config.ExperimentConfig.model_validate(
        {"data": {"sources": sources, "cache_dir": token_cache_dir}})
    # One document per file, byte tokens plus an end-of-document token; a single document is
    # held out by its last 2% of tokens (docs/data.md). Weight 0 (evaluation only) is left out.
    expected = {n: len(t) + 1 - max(int((len(t) + 1) * 0.02), 1) for n, t in texts.items()}
    assert swarm.source_tokens(cfg) == {n: expected[n] for n in ("a", "b")}


# ----------------------------------------------------------------------------- sweep files


def test_mixture_sweep_plans_each_mixture_at_each_grid_point(tmp_path, sources, capsys):
    path = _mixture_sweep(tmp_path, params={"model.n_layers": [1, 2]})
    path.write_text(path.read_text() + "seeds: 2\n")
    sweep = spec.load(path)
    trials = sweep.planned_trials()
    assert len(trials) == 2 * 8 * 2
    mixes = sweep.mixture_plan["mixtures"]
    assert mixes[0] == dict(zip(TOKENS, [0.6, 0.3, 0.1]))  # natural, then uniform
    assert mixes[1] == {"code": 0.3334, "docs": 0.3333, "tests": 0.3333}
    assert trials[0].name == "t000-n_layers=1-code=0.6-docs=0.3-tests=0.1-seed=0"
    assert trials[17].params == {"model.n_layers": 2, **{swarm.weight_key(k): v
                                                         for k, v in mixes[0].items()}}
    assert "data.sources.code.weight=0.6" in trials[0].overrides
    assert [t.params for t in spec.load(path).planned_trials()] == [t.params for t in trials]
    print_plan(sweep, measure=False)
    plan = capsys.readouterr().out
    header = plan.splitlines()[0].split()
    assert header[:5] == ["trial", "n_layers", "code", "docs", "tests"]
    assert "32 trials" not in plan and plan.count("\nt0") == 32


BAD_MIXTURES = [
    ({"sources": ["code", "docs", "prose"]}, "search.sources: 'prose' is not a training source of "
     "the base experiment (its data.sources: code, docs, tests)"),
    ({"sources": ["code", "docs"]}, "list every training source of the base experiment"),
    ({"trials": 6}, "trials: the mixture laws over 3 sources have 4 parameters and are "
     "cross-validated leaving 1/5 out: they need at least 7 mixtures, got 6"),
    ({"concentration": 0}, "search.concentration: Input should be greater than 0"),
    ({"concentration": -1.0}, "search.concentration: Input should be greater than 0"),
    ({"max_repetition": 0.01}, "search.max_repetition: 0.01: the sources hold 10000 training "
     "tokens and a run trains on"),
    ({"sources": ["code"]}, "two or more distinct source names"),
]


@pytest.mark.parametrize("search, message", BAD_MIXTURES)
def test_bad_mixture_sweeps_are_one_line(tmp_path, sources, search, message):
    path = _mixture_sweep(tmp_path, **search)
    with pytest.raises(ConfigError) as err:
        spec.load(path)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert str(err.value).startswith(str(path))


def _worker(sweep: Path, out: Path, url: str, trial_s: float = 0.1) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WORKER, str(sweep), str(out), url,
                             str(FAKE_TRIAL)], cwd=REPO, env={**_env(), "FAKE_TRIAL_S": str(trial_s)},
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_a_resumed_mixture_sweep_runs_every_trial_once_and_analyzes(tmp_path, sources):
    path, out = _mixture_sweep(tmp_path), tmp_path / "out"
    url = f"sqlite:///{tmp_path}/mix.db"
    first = _worker(path, out, url, trial_s=1.0)
    _wait_for(lambda: out.exists() and sum((d / "calls").exists() for d in out.iterdir()) == 4)
    first.kill()  # while its fourth trial runs
    first.communicate(timeout=60)
    again = _worker(path, out, url)
    log = again.communicate(timeout=300)[0]
    assert again.returncode == 0, log
    rows = Store(url, "mix").rows()
    assert [(r["state"], r["attempt"]) for r in rows] == [("done", 1)] * 3 + [("done", 2)] + [
        ("done", 1)] * 4
    calls = {d.name: len((d / "calls").read_text().splitlines()) for d in sorted(out.iterdir())
             if (d / "calls").exists()}
    assert list(calls.values()) == [1, 1, 1, 2, 1, 1, 1, 1]  # only the killed trial ran again
    trials = spec.load(path).planned_trials()
    assert sorted(calls) == sorted(t.name for t in trials)  # the same mixtures after the restart
    info = json.loads((out / "sweep.json").read_text())
    assert info["mixture"]["natural"] == dict(zip(TOKENS, [0.6, 0.3, 0.1]))

    # The fake trials' per-domain losses follow 1 + exp(-2 w_s + 0.5 (1 - w_s)): a law of both
    # forms; the mean over the three domains is lowest at the uniform mix.
    analysis, _ = analyze(out)
    entry = json.loads((analysis / "fits.json").read_text())["mixture"]
    assert entry["objective"] == "mean of eval/code/loss, eval/docs/loss, eval/tests/loss"
    assert np.allclose(list(entry["weights"].values()), 1 / 3, atol=0.01)
    truth = 1 + math.exp(-2 / 3 + 0.5 * 2 / 3)
    assert abs(entry["predicted"] - truth) < 1e-3
    assert entry["interval"][0] <= entry["predicted"] <= entry["interval"][1]
    assert entry["gain_vs_natural"][0] > 0
    page = (analysis / "report.html").read_text()
    assert "Data mixture" in page and "ranks held-out mixtures with Spearman 1.00" in page

    # The proposal trained over three seeds (docs/analysis.md's recipe: run folders named
    # proposal*): measured beside predicted at its mix, and not fitted; seeds 1 and 2 of the
    # natural and the uniform mix (fitted, averaged with the swarm's seed 0, whose loss they
    # straddle, so the fit does not move) are what it is compared with, seed by seed.
    def train(name: str, weights: dict[str, float], seed: int, noise: float) -> float:
        run = out / name
        run.mkdir()
        sources = {s: {"source": "builtin", "weight": w} for s, w in weights.items()}
        (run / "config.yaml").write_text(yaml.safe_dump({"data": {"sources": sources},
                                                         "train": {"seed": seed}}))
        losses = {f"eval/{s}/loss": 1 + math.exp(-2 * w + 0.5 * (1 - w)) + noise
                  for s, w in weights.items()}
        (run / "metrics.jsonl").write_text(json.dumps({"step": 10, "eval_loss": 1.0, **losses}))
        (run / "summary.json").write_text(json.dumps({"state": "done"}))
        return float(np.mean(list(losses.values())))

    swarm_trials = {t.name: {swarm.source_of(k): v for k, v in t.params.items()} for t in trials}
    natural_trial, uniform_trial = list(swarm_trials)[:2]
    truth = {name: float(np.mean([1 + math.exp(-2 * w + 0.5 * (1 - w)) for w in mix.values()]))
             for name, mix in swarm_trials.items()}
    expected = {"proposal": [train(f"proposal-seed{s}", entry["weights"], s, e)
                             for s, e in enumerate((0.0, 0.002, -0.002))]}
    for mix, trial in (("natural", natural_trial), ("uniform", uniform_trial)):
        expected[mix] = [truth[trial], *(train(f"{mix}-seed{s}", swarm_trials[trial], s, e)
                                         for s, e in ((1, 0.001), (2, -0.001)))]
    analyze(out)
    again = json.loads((analysis / "fits.json").read_text())["mixture"]
    assert again["mixtures"] == 8 and again["weights"] == entry["weights"]
    assert abs(again["measured"]["proposal-seed0"] - expected["proposal"][0]) < 1e-12
    compared = again["compared"]
    assert list(compared) == ["proposal", "natural", "uniform"]
    for mix, values in expected.items():
        assert np.allclose(sorted(compared[mix]["measured"]), sorted(values), atol=1e-12), mix
        assert abs(compared[mix]["std"] - np.std(values, ddof=1)) < 1e-12
    assert abs(compared["proposal"]["predicted"] - expected["proposal"][0]) < 1e-3  # the law
    for mix, distinguishable in (("natural", True), ("uniform", False)):
        a, b = np.array(expected[mix]), np.array(expected["proposal"])
        va, vb = a.var(ddof=1) / 3, b.var(ddof=1) / 3  # Welch's test written out
        t = (b.mean() - a.mean()) / math.sqrt(va + vb)
        df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 2)
        versus = compared["proposal"][f"vs_{mix}"]
        assert abs(versus["difference"] - (b.mean() - a.mean())) < 1e-12
        assert abs(versus["p_value"] - 2 * stats.t.sf(abs(t), df)) < 1e-9
        assert (versus["p_value"] < 0.05) == distinguishable
    report = (analysis / "report.md").read_text()
    assert "Measured at the proposal: proposal-seed0 1.7165 (predicted at its mix 1.716" in report
    assert "proposal lower than natural by 0.0937, larger than seed noise" in report
    assert "Data mixture: measured over seeds" in report
    # Each run's eval_loss mixes the domains by its own weights: the lead does not rank by it.
    assert "lowest final eval loss" not in report
    assert f"the best of the 8 mixtures is {uniform_trial} / uniform-seed1 / uniform-seed2" in report


def test_the_largest_family_is_fitted_with_its_seeds_averaged(tmp_path):
    """Two model sizes (a grid) and two seeds: the size with more mixtures is fitted, each
    mixture once, at the mean of its seeds (noise of +-e cancels exactly)."""
    rng = np.random.default_rng(4)
    number = 0
    for layers, mixtures in ((2, 7), (4, 2)):
        for w in rng.dirichlet(np.ones(3), mixtures):
            for seed, e in enumerate((0.01, -0.01)):
                losses = {f"eval/{s}/loss": 1 + math.exp(-2 * v + 0.5 * (1 - v)) + e
                          for s, v in zip(TOKENS, w)}
                params = {"model.n_layers": layers, **{swarm.weight_key(s): float(v)
                                                       for s, v in zip(TOKENS, w)}}
                run = tmp_path / f"t{number:03d}"
                run.mkdir()
                rundir.write_record(run, {"number": number, "name": run.name, "params": params,
                                          "derived": {}, "seed": seed}, "done", 1.0, None)
                (run / "metrics.jsonl").write_text(json.dumps({"step": 5, "eval_loss": 1.0,
                                                               **losses}) + "\n")
                number += 1
    # The proposal trained at each size (only the fitted size checks it), and a mixture still
    # running (its last eval is a shorter run's: not fitted).
    for name, layers, state in (("proposal-layers2", 2, "done"), ("proposal-layers4", 4, "done"),
                                ("running", 2, "running")):
        run = tmp_path / name
        run.mkdir()
        params = {"model.n_layers": layers, **{swarm.weight_key(s): 1 / 3 for s in TOKENS}}
        rundir.write_record(run, {"number": number, "name": run.name, "params": params,
                                  "derived": {}, "seed": 0}, state, 1.0, None)
        losses = {f"eval/{s}/loss": 1 + math.exp(-2 / 3 + 0.5 * 2 / 3) for s in TOKENS}
        (run / "metrics.jsonl").write_text(json.dumps({"step": 5, "eval_loss": 1.0, **losses}))
        number += 1
    analysis, _ = analyze(tmp_path)
    entry = json.loads((analysis / "fits.json").read_text())["mixture"]
    assert entry["mixtures"] == 7
    assert entry["cross_validation"]["mixing_law"]["objective"]["rmse"] < 1e-6
    assert np.allclose(list(entry["weights"].values()), 1 / 3, atol=0.01)
    assert list(entry["measured"]) == ["proposal-layers2"]
    report = (analysis / "report.md").read_text()
    assert report.count("(another setting)") == 4  # the other size's 2 mixtures x 2 seeds
    assert ("proposal-layers4 (another setting than the fitted runs: model.n_layers=4)"
            in report)
    assert "running (running)" in report


# ----------------------------------------------------------------------------- the laws


def _dml(c: np.ndarray, k: np.ndarray, t: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Per-domain Data-Mixing-Law losses, written out independently of the module: n x M."""
    return np.stack([c[i] + k[i] * np.exp(w @ t[i]) for i in range(len(c))], axis=1)


C, K_, T = (np.array([1.0, 1.5, 1.2]), np.array([1.2, 0.8, 1.0]),
            np.array([[-2.0, 0.3, 0.2], [0.4, -1.5, 0.1], [0.2, 0.5, -2.5]]))


def _table(w: np.ndarray, y: np.ndarray) -> laws.Table:
    return laws.Table([f"m{i}" for i in range(len(w))], ["a", "b", "c"], w,
                      {f"L{i}": y[:, i] for i in range(y.shape[1])})


def _brute_force_optimum(loss) -> np.ndarray:
    grid = np.linspace(0, 1, 401)
    points = np.array([(a, b, 1 - a - b) for a in grid for b in grid if a + b <= 1 + 1e-12])
    return points[np.argmin(loss(points))]


def test_laws_refit_known_per_domain_laws_and_propose_their_optimum():
    rng = np.random.default_rng(0)
    w = rng.dirichlet(np.ones(3), 30)
    noise = 0.003  # about 0.15% of the losses
    y = _dml(C, K_, T, w) + rng.normal(0, noise, (30, 3))
    fitted = laws.fit_table(_table(w, y), {f"L{i}": 1 / 3 for i in range(3)})
    test = rng.dirichlet(np.ones(3), 500)
    truth = _dml(C, K_, T, test)
    for form in laws.FORMS:  # with k > 0 both forms hold the truth
        for i in range(3):
            predicted = laws.predict(form, fitted.laws[form][f"L{i}"], test)
            assert np.max(np.abs(predicted - truth[:, i])) < 3 * noise, form
        q = fitted.quality[form]["objective"]
        assert q.rmse < noise and q.spearman > 0.99
    # The log-linear law's own parameters: exp(c) = the floor, theta = t + log k (sum w = 1).
    params = fitted.laws["log_linear"]["L0"]
    assert abs(math.exp(params[0]) - C[0]) < 0.05
    assert np.allclose(params[1:], T[0] + math.log(K_[0]), atol=0.1)

    optimum = _brute_force_optimum(lambda p: _dml(C, K_, T, p).mean(1))
    assert 0.1 < optimum.min()  # an interior point
    natural = np.array([0.5, 0.3, 0.2])
    proposal = laws.propose(fitted, natural=natural, bootstrap=40)
    found = np.array(list(proposal["weights"].values()))
    assert np.abs(found - optimum).max() < 0.02  # the stated distance: 0.02 in every weight
    lo, hi = proposal["interval"]
    assert lo <= proposal["predicted"] <= hi and hi - lo < 0.01
    true_gain = _dml(C, K_, T, natural[None]).mean() - _dml(C, K_, T, optimum[None]).mean()
    assert abs(proposal["gain_vs_natural"][0] - true_gain) < 0.005

    # Caps and a KL pull: the proposal stays on the caps' side and moves towards natural.
    capped = laws.propose(fitted, caps=np.array([1.0, 1.0, 0.3]), natural=natural, bootstrap=5)
    assert capped["weights"]["c"] <= 0.3 + 1e-4
    capped_optimum = _brute_force_optimum(
        lambda p: np.where(p[:, 2] <= 0.3, _dml(C, K_, T, p).mean(1), np.inf))
    assert np.abs(np.array(list(capped["weights"].values())) - capped_optimum).max() < 0.02
    pulled = laws.propose(fitted, natural=natural, kl=1.0, bootstrap=5)
    pulled_w = np.array(list(pulled["weights"].values()))
    assert np.abs(pulled_w - natural).sum() < np.abs(found - natural).sum()


def test_a_concave_mixing_law_is_told_apart_from_the_log_linear_one():
    rng = np.random.default_rng(1)
    w = rng.dirichlet(np.ones(3), 24)
    t = np.array([[1.5, -0.5, 0.2]])
    y = _dml(np.array([3.0]), np.array([-0.4]), t, w) + rng.normal(0, 0.002, (24, 1))  # k < 0
    fitted = laws.fit_table(_table(w, y), {"L0": 1.0})
    assert fitted.best == "mixing_law"
    assert fitted.quality["mixing_law"]["L0"].rmse < 0.004
    assert fitted.quality["log_linear"]["L0"].rmse > 2 * fitted.quality["mixing_law"]["L0"].rmse


def test_the_trust_sentence_calls_out_a_poor_rank_and_extrapolation():
    rng = np.random.default_rng(5)
    w = rng.dirichlet(np.full(3, 30.0), 12)  # all near the middle of the simplex
    y = _dml(np.array([1.0]), np.array([1.0]), np.array([[-0.3, 0.0, 0.0]]), w)
    y += rng.normal(0, 0.05, y.shape)  # noise far above the law's spread
    fitted = laws.fit_table(_table(w, y), {"L0": 1.0})
    laws.propose(fitted, natural=np.full(3, 1 / 3), bootstrap=30)
    text = laws.trust(fitted, "L0")
    assert "no better than a guess" in text
    assert "The proposal lies outside the mixtures tried: a 1.00 (tried 0.25 to 0.41)" in text
    # A bootstrap law that runs off along an exponential gives a bound that reads as a number.
    assert laws.interval(2.66744, 4.4398e65) == "[2.6674, 4.44e+65]"


def test_bootstrap_refits_that_overflow_are_counted_not_averaged():
    """Mixtures bunched in the middle, two domains pulling opposite ways: the proposal is a
    corner, where some bootstrap refits overflow (inf, nan). The interval and the gain over the
    natural mix stay finite, the gain is the refits' median (their mean would be infinite), and
    the sentence counts the refits left out."""
    rng = np.random.default_rng(1)
    w = rng.dirichlet(np.full(3, 30.0), 12)
    y = _dml(np.ones(2), np.ones(2), np.array([[-0.3, 0.2, 0.0], [0.3, -0.3, 0.0]]), w)
    y += rng.normal(0, 0.05, y.shape)
    fitted = laws.fit_table(_table(w, y), {"L0": 0.5, "L1": 0.5})
    p = laws.propose(fitted, natural=np.full(3, 1 / 3), bootstrap=30)
    assert p["bootstrap_runaway"] > 0
    assert np.all(np.isfinite([*p["interval"], *p["gain_vs_natural"]]))
    assert p["interval"][0] <= p["predicted"]
    json.dumps(p, allow_nan=False)  # fits.json stays standard JSON
    assert f"{p['bootstrap_runaway']} bootstrap refits overflow" in laws.trust(fitted, "L")


def test_minimum_mixtures_leave_more_points_than_parameters_in_every_fold():
    for k in range(2, 9):
        n = swarm.min_trials(k)
        assert min(n - len(f) for f in laws.folds(n)) > swarm.law_parameters(k)
        assert min((n - 1) - len(f) for f in laws.folds(n - 1)) <= swarm.law_parameters(k)


# ----------------------------------------------------------------------------- a CSV


def _write_csv(path: Path, w: np.ndarray, y: np.ndarray) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["a", "b", "c", "L0", "L1", "L2"])
        writer.writerows([[*row, *values] for row, values in zip(w, y)])
    return path


def test_mixture_points_command_writes_the_proposal(tmp_path, capsys):
    rng = np.random.default_rng(2)
    w = np.round(rng.dirichlet(np.ones(3), 16), 4)
    w[:, 0] = 1 - w[:, 1:].sum(1)
    points = _write_csv(tmp_path / "p.csv", w, _dml(C, K_, T, w))
    out = tmp_path / "out"
    code = cli.main(["analyze", "--mixture-points", str(points), "--sources", "a,b,c",
                     "--metric", "L0=0.5,L1=0.25,L2=0.25", "--out", str(out),
                     "--natural", "a=0.5,b=0.3,c=0.2"])
    printed = capsys.readouterr().out
    assert code == 0
    entry = json.loads((out / "fits.json").read_text())["mixture"]
    assert set(entry) >= {"weights", "predicted", "interval", "regressor"}
    optimum = _brute_force_optimum(lambda p: _dml(C, K_, T, p) @ np.array([0.5, 0.25, 0.25]))
    assert np.abs(np.array(list(entry["weights"].values())) - optimum).max() < 0.02
    block = "\n".join(f"    {s}: {{weight: {entry['weights'][s]:.4f}}}   # keep its source"
                      for s in "abc")
    assert f"data:\n  sources:\n{block}" in printed
    assert (out / "report.html").is_file() and (out / "mixture_predicted.png").is_file()


@pytest.mark.parametrize("change, args, message", [
    ("row 5", [], "p.csv: row 5: the weights a, b, c must be >= 0 and sum to 1"),
    ("few", [], "p.csv: 6 rows: the laws over 3 sources have 4 parameters"),
    (None, ["--metric", "L9"], "p.csv: no column 'L9'"),
    (None, ["--kl", "0.1"], "--kl: a pull towards the natural mix needs --natural"),
    (None, ["--max-weight", "a=0.2,b=0.2,c=0.2"], "--max-weight: the caps sum to 0.6 < 1"),
])
def test_bad_mixture_points_are_one_line_and_write_nothing(tmp_path, capsys, change, args, message):
    rng = np.random.default_rng(3)
    w = rng.dirichlet(np.ones(3), 12)
    if change == "row 5":
        w[3] *= 1.1  # the CSV's fifth line (after the header)
    if change == "few":
        w = w[:6]
    points = _write_csv(tmp_path / "p.csv", w, _dml(C, K_, T, w))
    out = tmp_path / "out"
    options = {"--mixture-points": str(points), "--sources": "a,b,c", "--metric": "L0,L1,L2",
               "--out": str(out), **dict(zip(args[::2], args[1::2]))}
    base = ["analyze", *(item for pair in options.items() for item in pair)]
    assert cli.main(base) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists()
