"""Downstream evaluation: task files, the ranked-choice scorer against float64 numpy, the in-loop
evaluator, the commands, and the lm-evaluation-harness adapter."""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.cli import main
from research.config import ConfigError
from research.evaluation.evaluator import Downstream
from research.evaluation.scoring import Scorer, task_metrics, task_rows
from research.evaluation.tasks import Item, Task, harness_yaml, read_task
from research.train.loop import prepare, train
from research.train.rundir import read_metrics
from research.train.state import init_state

ROOT = Path(__file__).resolve().parents[1]
PHRASES = ["the cat sat on the mat\n", "one two three four five\n", "red green blue yellow\n",
           "alpha beta gamma delta\n"]
NOISE = "#@!$%^&*~|<>?"


def write_task(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def memorized_items(rng: random.Random) -> list[dict]:
    """The start of a phrase of the corpus; the choices: its true rest, or noise as long."""
    items = []
    for phrase in PHRASES:
        for cut in (3, 5, 8):
            rest = phrase[cut:]
            noise = "".join(rng.choice(NOISE) for _ in rest)
            choices = [rest, noise] if rng.random() < 0.5 else [noise, rest]
            items.append({"context": phrase[:cut], "choices": choices,
                          "label": choices.index(rest)})
    return items


def mixed_items(rng: random.Random) -> list[dict]:
    """Items whose answer the model cannot know (accuracy strictly between 0 and 1)."""
    words = " ".join(PHRASES).split()
    return [{"context": " ".join(rng.sample(words, 3)) + " ",
             "choices": [" ".join(rng.sample(words, rng.randint(1, 3))) for _ in range(3)],
             "label": rng.randrange(3)} for _ in range(24)]


@pytest.fixture(scope="module")
def memorized_run(tmp_path_factory, token_cache_dir):
    """A tiny run trained on four repeated phrases, scoring its tasks in the loop: `memorized`
    (true rest vs noise), `mixed` (unknowable) and `broken` (its scoring fails at step 15)."""
    from research import config
    from conftest import TINY

    root = tmp_path_factory.mktemp("memorized")
    rng = random.Random(0)
    corpus = root / "corpus.txt"
    corpus.write_text("".join(rng.choice(PHRASES) for _ in range(3000)))
    tasks = root / "tasks"
    tasks.mkdir()
    write_task(tasks / "memorized.jsonl", memorized_items(rng))
    write_task(tasks / "mixed.jsonl", mixed_items(rng))
    write_task(tasks / "broken.jsonl", mixed_items(rng)[:2])
    cfg = config.load(None, [*TINY, f"data.cache_dir={token_cache_dir}", f"data.source={corpus}",
                             "train.steps=30", "train.eval_every=15", "checkpoint.every=15",
                             "optim.lr=1e-2", f"eval.tasks={tasks}", "eval.tasks_every=15"])
    original, calls = Downstream._score, []

    def fail_once(self, params, rows):
        if rows.task.name == "broken":
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("out of memory")
        return original(self, params, rows)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Downstream, "_score", fail_once)
        capture = io.StringIO()
        with contextlib.redirect_stdout(capture):
            summary = train(cfg, root / "run")
    (tasks / "broken.jsonl").unlink()  # (the other tests score the two others)
    return SimpleNamespace(dir=root / "run", tasks=tasks, cfg=cfg, summary=summary,
                           output=capture.getvalue())


# ----------------------------------------------------------------------------- task files


@pytest.mark.parametrize("line, message", [
    ("{not json", r"bad.jsonl:2: malformed JSON"),
    ('{"context": "a", "choices": ["b", "c"], "label": 2}', r"bad.jsonl:2: label 2 is not an "
                                                            r"index of the 2 choices \(0\.\.1\)"),
    ('{"context": "a", "choices": ["b"], "label": 0}', r"bad.jsonl:2: 1 choice\(s\); an item "
                                                       r"needs at least 2"),
    ('{"context": "a", "label": 0}', r"bad.jsonl:2: missing field 'choices'"),
])
def test_bad_task_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"context": "a", "choices": ["b", "c"], "label": 0}\n' + line + "\n")
    with pytest.raises(ConfigError, match=message):
        read_task(path)


def test_bad_task_specs_stop_before_anything_is_written(tiny_overrides, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    run_dir = tmp_path / "run"
    for spec, message in ((str(empty), "empty.jsonl: empty task (no items)"),
                          ("nosuchtask", "eval.tasks: unknown task 'nosuchtask' (allowed: builtin")):
        assert main(["train", str(ROOT / "experiments/dense_tiny.yaml"), "--run-dir", str(run_dir),
                     *tiny_overrides, f"eval.tasks={spec}"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err, err
        assert not run_dir.exists()


def test_builtin_tasks_have_enough_items_and_known_chance(tiny):
    from research.evaluation.tasks import BUILTIN, builtin_tasks

    paths = builtin_tasks(tiny().data)
    assert list(paths) == list(BUILTIN)
    for name, path in paths.items():
        task = read_task(path)
        assert len(task.items) >= 200, name
        numerator, denominator = map(int, BUILTIN[name].chance.split("/"))
        assert task.chance == pytest.approx(numerator / denominator)
        labels = [item.label for item in task.items]
        # no answer position (or, for fixed choices, answer) is much commoner than chance
        assert max(labels.count(k) for k in set(labels)) / len(labels) < 1.5 * task.chance, name


# ----------------------------------------------------------------------------- scoring


def log_softmax64(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    top = x.max(-1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def scoring_setup(token_cache_dir):
    """A tiny untrained model on all 8 devices, and a task with a context longer than seq_len."""
    from research import config
    from conftest import TINY

    cfg = config.load(None, [*TINY, f"data.cache_dir={token_cache_dir}", "train.seq_len=64"])
    rng = random.Random(1)
    words = "def return self value None import class for while".split()
    items = [Item(" ".join(rng.choices(words, k=rng.randint(1, 6))),
                  tuple(" " + " ".join(rng.choices(words, k=rng.randint(1, 4))) for _ in range(3)),
                  rng.randrange(3)) for _ in range(10)]
    items.append(Item("x = 1\n" * 20, ("y", "y = 2\n"), 1))  # 120 characters: cut to fit 64
    return cfg, Task("words", tuple(items))


def make_scorer(cfg, devices=None):
    setup = prepare(cfg, devices)
    with setup.context():
        params = init_state(setup.model, setup.tx, jnp.zeros((1, cfg.train.seq_len), jnp.int32),
                            setup.spec, cfg.train.seed)["params"]
    scorer = Scorer(setup.model, setup.mesh, setup.spec.shardings["params"], cfg.train.batch_size,
                    cfg.train.seq_len, setup.data.tokenizer.eos_id)
    return setup, params, scorer


@pytest.fixture(scope="module")
def untrained(scoring_setup):
    """(setup, params, scorer) of the scoring config's untrained model on 8 devices."""
    return make_scorer(scoring_setup[0])


def test_scores_equal_a_float64_reference(scoring_setup, untrained):
    """Each choice's summed log-probability (and acc, acc_norm, gold_bpb from them) as numpy
    computes them in float64 from the model's logits of each row alone, cut from the left."""
    cfg, task = scoring_setup
    setup, params, scorer = untrained
    tokenizer, limit = setup.data.tokenizer, cfg.train.seq_len + 1
    rows = task_rows(task, tokenizer, cfg.train.seq_len)
    assert rows.truncated == 1
    with setup.context():
        sums, _ = scorer(params, rows.rows)
    requests = [(np.concatenate([[tokenizer.eos_id], tokenizer.encode(item.context),
                                 tokenizer.encode(choice)])[-limit:], len(choice))  # bytes
                for item in task.items for choice in item.choices]
    padded = np.zeros((len(requests), limit), np.int32)  # (causal: padding after changes nothing)
    for r, (ids, _) in enumerate(requests):
        padded[r, :len(ids)] = ids
    logits = setup.model.apply({"params": jax.device_get(params)}, padded[:, :-1])[0]
    expected = []
    for (ids, n), row_logits in zip(requests, np.asarray(logits)):
        log_probs = log_softmax64(row_logits[:len(ids) - 1])
        expected.append(log_probs[np.arange(len(ids) - 1), ids[1:]][-n:].sum())
    np.testing.assert_allclose(sums, expected, rtol=1e-5, atol=1e-4)

    acc, acc_norm, bpb, i = [], [], [], 0
    for item in task.items:
        scores = expected[i:i + len(item.choices)]
        i += len(item.choices)
        best = max(range(len(scores)), key=lambda c: scores[c])
        best_norm = max(range(len(scores)), key=lambda c: scores[c] / len(item.choices[c]))
        acc.append(best == item.label)
        acc_norm.append(best_norm == item.label)
        bpb.append(-scores[item.label] / math.log(2) / len(item.choices[item.label].encode()))
    metrics = task_metrics(task, sums)
    assert metrics["acc"] == pytest.approx(np.mean(acc))
    assert metrics["acc_norm"] == pytest.approx(np.mean(acc_norm))
    assert metrics["gold_bpb"] == pytest.approx(np.mean(bpb), rel=1e-5)


def test_eight_devices_score_as_one(scoring_setup):
    """Data, fsdp and tensor parallel scoring (params sharded as in training) equals one
    device."""
    cfg, task = scoring_setup
    results = []
    for mesh, devices in (({"data": 2, "fsdp": 2, "tensor": 2}, None), ({}, jax.devices()[:1])):
        setup, params, scorer = make_scorer(
            cfg.model_copy(update={"mesh": type(cfg.mesh)(**mesh)}), devices)
        assert len(setup.mesh.devices.flat) == (8 if devices is None else 1)
        with setup.context():
            results.append(scorer(params, task_rows(task, setup.data.tokenizer,
                                                    cfg.train.seq_len).rows)[0])
    np.testing.assert_allclose(results[0], results[1], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- in the loop


def test_memorized_task_reaches_accuracy_one_in_the_loop(memorized_run):
    entries = [e for e in read_metrics(memorized_run.dir) if "downstream/macro_acc" in e]
    assert [e["step"] for e in entries] == [15, 30]
    final = entries[-1]
    assert final["downstream/memorized/acc"] == 1.0
    assert final["downstream/memorized/acc_norm"] == 1.0
    assert final["downstream/memorized/gold_bpb"] < entries[0]["downstream/memorized/gold_bpb"]
    assert final["downstream/macro_acc"] == pytest.approx(
        (1.0 + final["downstream/mixed/acc"] + final["downstream/broken/acc"]) / 3)
    # the task that failed at step 15 was reported and left out; training went on
    assert "downstream task broken failed (RuntimeError: out of memory); training goes on" in \
        memorized_run.output
    assert "downstream/broken/acc" not in entries[0] and "downstream/mixed/acc" in entries[0]
    assert memorized_run.summary["state"] == "done"
    assert memorized_run.summary["final"]["downstream/memorized/acc"] == 1.0
    from research.analysis.events import read_scalars

    tags = read_scalars(memorized_run.dir / "tb")
    assert [step for step, _ in tags["downstream/memorized/acc"]] == [15, 30]


def test_eval_command_scores_checkpoints_as_the_loop_did(memorized_run, capsys):
    logged = {e["step"]: e for e in read_metrics(memorized_run.dir) if "downstream/macro_acc" in e}
    assert main(["eval", str(memorized_run.dir), "--tasks", str(memorized_run.tasks),
                 "--all-steps", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert sorted(out) == ["15", "30"]
    for step, tasks in out.items():
        for task, metrics in tasks.items():
            for name, value in metrics.items():
                assert value == pytest.approx(logged[int(step)][f"downstream/{task}/{name}"],
                                              rel=1e-5)
    assert main(["eval", str(memorized_run.dir), "--all-steps"]) == 2
    assert "--all-steps and --json go with --tasks" in capsys.readouterr().err


def test_trained_beats_untrained_on_builtin_tasks(scoring_setup, untrained, tmp_path):
    """40 steps of the tiny model on the built-in corpus: word_order accuracy above the
    untrained model's (the same initial params) by at least 0.05 (measured: 0.24 -> 0.33;
    docs/evaluation.md has the 300-step dense_tiny figures for every built-in task)."""
    cfg = scoring_setup[0]
    cfg = cfg.model_copy(update={
        "train": cfg.train.model_copy(update={"steps": 40, "eval_every": 40}),
        "checkpoint": cfg.checkpoint.model_copy(update={"every": 40}),
        "optim": cfg.optim.model_copy(update={"lr": 3e-3}),
        "eval": cfg.eval.model_copy(update={"tasks": "word_order", "tasks_every": 40})})
    setup, params, _ = untrained
    downstream = Downstream.build(cfg, "word_order", setup.model, setup.mesh,
                                  setup.spec.shardings["params"], setup.data.tokenizer)
    with setup.context():
        before = downstream.scores(params)["word_order"]["acc"]
    train(cfg, tmp_path / "run")
    after = read_metrics(tmp_path / "run")[-1]["downstream/word_order/acc"]
    assert after >= before + 0.05, (before, after)


# ----------------------------------------------------------------------------- harness


class Request(SimpleNamespace):
    """What the harness hands an LM: `args`."""


@pytest.fixture(scope="module")
def harness_lm(memorized_run):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness: pip install -e '.[eval]'")
    from research.evaluation.harness import ResearchLM
    from research.generate import load

    setup, params, _ = load(memorized_run.dir)
    cfg = setup.cfg
    scorer = Scorer(setup.model, setup.mesh, setup.spec.shardings["params"], cfg.train.batch_size,
                    cfg.train.seq_len, setup.data.tokenizer.eos_id)
    return setup, ResearchLM(setup.model, params, setup.data.tokenizer, scorer)


def test_harness_loglikelihood_equals_the_evaluator(harness_lm, memorized_run):
    setup, lm = harness_lm
    task = read_task(memorized_run.tasks / "mixed.jsonl")
    rows = task_rows(task, setup.data.tokenizer, setup.cfg.train.seq_len)
    with setup.context():
        expected, _ = lm.scorer(lm.params, rows.rows)
        got = lm.loglikelihood([Request(args=(item.context, choice))
                                for item in task.items for choice in item.choices])
        # a whole text (shorter than seq_len): every token after the document start
        rolling = lm.loglikelihood_rolling([Request(args=(PHRASES[1],))])[0]
        whole = lm.loglikelihood([Request(args=("", PHRASES[1]))])[0][0]
        long = lm.loglikelihood_rolling([Request(args=(PHRASES[1] * 4,))])[0]
        greedy = lm.generate_until([Request(args=("the cat sat", {"max_gen_toks": 6}))])[0]
        stop = greedy[3:5]
        stopped = lm.generate_until([Request(args=("the cat sat", {"until": [stop],
                                                                   "max_gen_toks": 6}))])[0]
        # greedy decoding without the cache: the full forward pass's top token, 6 times
        tokenizer = setup.data.tokenizer
        ids = [tokenizer.eos_id, *tokenizer.encode("the cat sat").tolist()]
        for _ in range(6):
            logits = setup.model.apply({"params": lm.params}, np.array([ids]))[0]
            ids.append(int(np.argmax(logits[0, -1, :tokenizer.vocab_size])))
    np.testing.assert_array_equal([ll for ll, _ in got], expected)
    assert rolling == pytest.approx(whole, rel=1e-6)
    assert 4 * rolling < long < 0  # the repeats are likelier in context
    assert greedy == tokenizer.decode(np.array(ids[-6:]))
    assert stopped == greedy[:greedy.index(stop)]  # up to the stop string, without it


def test_harness_and_in_loop_accuracy_agree(memorized_run, tmp_path, capsys):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness: pip install -e '.[eval]'")
    for name in ("memorized", "mixed"):
        (tmp_path / f"{name}.yaml").write_text(
            harness_yaml(f"research_{name}", memorized_run.tasks / f"{name}.jsonl"))
    assert main(["harness", str(memorized_run.dir), "--tasks", "research_memorized,research_mixed",
                 "--include-path", str(tmp_path), "--json"]) == 0
    harness = json.loads(capsys.readouterr().out)
    final = read_metrics(memorized_run.dir)[-1]
    assert 0 < final["downstream/mixed/acc"] < 1
    for name in ("memorized", "mixed"):
        for metric in ("acc", "acc_norm"):
            assert harness[f"research_{name}"][metric] == final[f"downstream/{name}/{metric}"]
    saved = json.loads((memorized_run.dir / "harness" / "step_30.json").read_text())
    assert saved["results"] == harness


def test_harness_not_installed_is_one_line(memorized_run, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if the extra were not installed
    assert main(["harness", str(memorized_run.dir), "--tasks", "x"]) == 2
    assert capsys.readouterr().err == ("error: lm-evaluation-harness is not installed: pip "
                                       "install -e '.[eval]'\n")


# ----------------------------------------------------------------------------- loss to accuracy


def true_bpb(c):
    return 0.8 + 300.0 * np.asarray(c, float) ** -0.15


def true_acc(bpb):  # (the runs' final task losses span 3.0 to 5.3 bits per byte)
    return 0.25 + 0.6 / (1 + np.exp(2.5 * (np.asarray(bpb, float) - 4.0)))


def test_two_step_prediction_recovers_a_known_law_and_checks_the_largest(tmp_path, capsys):
    """Runs whose downstream metrics follow a known compute -> task loss -> accuracy chain
    (with noise): analyze --holdout largest fits both steps without the largest run and
    predicts it; predict gives the true accuracy 10x past the largest run within its
    interval."""
    from tests.test_analysis import write_run

    rng = np.random.default_rng(0)
    steps, tokens_per_step = 100, 10_000
    for i, params in enumerate(np.geomspace(1e5, 3e7, 9).astype(int)):
        path = tmp_path / "sweep" / f"run{i}"
        write_run(path, params=int(params), tokens_per_step=tokens_per_step, steps=steps,
                  eval_loss=3.0)
        with (path / "metrics.jsonl").open("a") as f:
            for step in (25, 50, 75, 100):
                c = 6.0 * params * tokens_per_step * step
                bpb = float(true_bpb(c) * (1 + rng.normal(0, 0.005)))
                acc = float(np.clip(true_acc(bpb) + rng.normal(0, 0.01), 0, 1))
                f.write(json.dumps({"step": step, "downstream/t/gold_bpb": bpb,
                                    "downstream/t/acc": acc}) + "\n")
    assert main(["analyze", str(tmp_path / "sweep"), "--holdout", "largest"]) == 0
    record = json.loads((tmp_path / "sweep" / "analysis" / "fits.json").read_text())["downstream"]
    for check in record["t"]["holdout"]:
        value, low, high = check["predicted"]
        assert low <= check["measured"] + 0.03 and check["measured"] - 0.03 <= high
    assert "Downstream: task loss and accuracy" in \
        (tmp_path / "sweep" / "analysis" / "report.md").read_text()
    largest = 6.0 * 3e7 * tokens_per_step * steps
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "sweep"), "--flops", str(10 * largest)]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if " t accuracy " in l)
    value, low, high = map(float, line.split(" t accuracy ")[1].replace("[", "").replace(
        "],", "").replace(",", "").split()[:3])
    truth = float(true_acc(true_bpb(10 * largest)))
    assert low <= truth <= high and abs(value - truth) < 0.05, (line, truth)
