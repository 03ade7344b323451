"""Data mixtures: proportions and stages counted from the produced batches, process sharding,
resume (also after SIGKILL, across a stage change), per-domain eval against float64 numpy,
built-in domains, bad input."""

from __future__ import annotations

import inspect
import json
import math
import os
import random
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import newest_checkpoint
from tests.test_train import _start
from research import cli
from research import config as config_lib
from research.config import ConfigError, DataConfig
from research.data import mixture
from research.data.corpus import read_documents, source_files
from research.data.pipeline import TokenCache
from research.data.tokenizer import ByteTokenizer
from research.train.rundir import read_metrics

SPAN = 10**6  # token value // SPAN says which source a window came from
SEQ = 4


def synthetic(sizes: dict[str, int], stages: list[tuple[int, dict[str, float]]]) -> mixture.Mixture:
    """Sources whose tokens are source_index * SPAN + position: a window names its origin."""
    caches = {name: TokenCache(train=(i * SPAN + np.arange(n * SEQ + 1)).astype(np.uint32),
                               heldout=np.zeros(0, np.uint32), tokenizer=ByteTokenizer(),
                               heldout_bytes_per_token=1.0, path=Path("."))
              for i, (name, n) in enumerate(sizes.items())}
    return mixture.Mixture(caches, {name: f"data.sources.{name}.source" for name in sizes},
                           tuple(stages), ByteTokenizer())


def produced(mix: mixture.Mixture, batches: int, *, batch: int, seed: int = 0, **kw) -> np.ndarray:
    """[batches, rows] (source index, window) pairs read back from the produced token rows."""
    it = mixture.train_iterator(mix, seq_len=SEQ, global_batch=batch, seed=seed, **kw)
    rows = np.stack([next(it)["tokens"] for _ in range(batches)])
    np.testing.assert_array_equal(rows, rows[..., :1] + np.arange(SEQ + 1))  # whole windows
    return np.stack([rows[..., 0] // SPAN, rows[..., 0] % SPAN // SEQ], axis=-1)


def test_blocks_hold_each_share_within_one_sequence_and_stages_land_on_their_step():
    weights = [{"a": 0.6, "b": 0.3, "c": 0.1}, {"a": 0.0, "b": 0.25, "c": 0.75}]
    batch, first = 8, 300  # a block is 1024 sequences = 128 batches; the stage starts mid-block
    mix = synthetic({"a": 5000, "b": 700, "c": 90}, [(1, weights[0]), (first, weights[1])])
    got = produced(mix, first - 1 + 256, batch=batch)
    sources = got[..., 0]
    before, after = sources[:first - 1].ravel(), sources[first - 1:].ravel()
    assert 0 in before[-batch:] and 0 not in after  # the step-300 batch is the first without a
    for flat, w in ((before, weights[0]), (after, weights[1])):
        for start in range(0, len(flat) - 1023, 1024):  # every whole block of each stage
            counts = np.bincount(flat[start:start + 1024], minlength=3)
            assert np.all(np.abs(counts - 1024 * np.array(list(w.values()))) < 1), counts
    # a source that runs out repeats: c's first 90 draws are each of its windows once, and so
    # are the next 90 (a new shuffle)
    windows_c = got[..., 1][sources == 2]
    assert sorted(windows_c[:90]) == list(range(90)) == sorted(windows_c[90:180])
    assert windows_c[:90].tolist() != windows_c[90:180].tolist()
    # the data metrics count the same draws as the batches
    plan = mixture.Plan(mix, global_batch=batch, seed=0)
    counted = np.bincount(sources.ravel(), minlength=3)
    metrics = mixture.data_metrics(mix, plan, len(got), SEQ)
    assert [metrics[f"data/{n}/tokens"] for n in "abc"] == (counted * SEQ).tolist()
    assert metrics["data/c/epochs"] == pytest.approx(counted[2] / 90)


def test_order_depends_only_on_the_seed_and_not_on_the_process_count():
    mix = synthetic({"a": 300, "b": 200, "c": 50}, [(1, {"a": 1, "b": 1, "c": 1}),
                                                    (6, {"a": 0.2, "b": 0.8})])
    whole = produced(mix, 12, batch=8, seed=3)
    np.testing.assert_array_equal(whole, produced(mix, 12, batch=8, seed=3))
    assert not np.array_equal(whole, produced(mix, 12, batch=8, seed=4))
    halves = [produced(mix, 12, batch=8, seed=3, process_index=p, process_count=2) for p in (0, 1)]
    np.testing.assert_array_equal(np.concatenate(halves, axis=1), whole)
    # resumed from a JSON state mid-stage and across the stage change: the same batches
    for k in (3, 5, 9):
        it = mixture.train_iterator(mix, seq_len=SEQ, global_batch=8, seed=3)
        fresh = mixture.train_iterator(mix, seq_len=SEQ, global_batch=8, seed=3)
        for _ in range(k):
            next(it)
        fresh.set_state(json.loads(json.dumps(it.get_state())))
        for _ in range(4):
            np.testing.assert_array_equal(next(fresh)["tokens"], next(it)["tokens"])


def test_block_counts_are_largest_remainder_rounding():
    counts = mixture.block_counts([0.6, 0.3, 0.1], 1000)
    assert counts.tolist() == [600, 300, 100]
    counts = mixture.block_counts([1, 1, 1], 1024)  # 341.33 each: one gets the spare sequence
    assert counts.tolist() == [342, 341, 341]
    assert mixture.block_counts([5, 0, 1e-6], 16).tolist() == [16, 0, 0]


def test_changing_stages_at_resume_is_allowed_only_for_the_future():
    def data(*stages):
        return DataConfig(sources={"a": {"source": "x"}, "b": {"source": "y", "weight": 0.5}},
                          stages=[{"from_step": s, "weights": w} for s, w in stages])

    old = data((10, {"a": 1}))
    assert mixture.check_resume(old, data((10, {"a": 1})), 8) is None
    note = mixture.check_resume(old, data((10, {"b": 1})), 8)
    assert note.startswith("data.stages changed from step 9 on") and "\n" not in note
    assert mixture.check_resume(old, data((10, {"a": 1}), (20, {"b": 1})), 12)
    for new in (data((10, {"b": 1})), data((9, {"a": 1})), data()):
        with pytest.raises(ConfigError, match="data.stages: the weights up to step 12 .* only "
                                              "stages from step 13 on may change"):
            mixture.check_resume(old, new, 12)


# ----------------------------------------------------------------------------- built-in domains


def test_builtin_domains_split_the_standard_library():
    every = {f.doc_id for f in source_files("builtin")}
    code, tests = ({f.doc_id for f in source_files(f"builtin:{d}")} for d in ("code", "tests"))
    assert code | tests == every and not code & tests
    assert "os.py" in code and "test/test_os.py" in tests and "unittest/case.py" in code
    docs = source_files("builtin:docs")
    assert docs[0].extract == "topics" and {f.doc_id for f in docs[1:]} <= code
    topics = list(read_documents(docs[:1], "text"))
    from pydoc_data.topics import topics as reference  # the texts help() shows

    assert {d.doc_id.split(":")[1]: d.text for d in topics} == reference
    textwrap = next(f for f in docs if f.doc_id == "textwrap.py")
    (doc,) = read_documents([textwrap], "text")
    import textwrap as module

    assert doc.text.startswith(module.__doc__.strip())
    assert inspect.cleandoc(module.TextWrapper.wrap.__doc__) in doc.text
    with pytest.raises(ConfigError, match="data.sources.x.source: unknown built-in source "
                                          "'builtin:prose' \\(allowed: builtin, builtin:code"):
        source_files("builtin:prose", "data.sources.x.source")


# ----------------------------------------------------------------------------- evaluation


def test_per_domain_eval_against_float64(tiny, tmp_path):
    """eval/<name>/loss and bpb of every set equal float64 numpy over the same windows; the
    macro means are plain means; eval_loss/eval_bpb mix the training sets by weight."""
    from research.train.loop import evaluate, prepare
    from research.train.state import init_state

    prose = tmp_path / "prose"
    prose.mkdir()
    for i in range(40):
        (prose / f"{i}.txt").write_text(f"Paragraph {i}: the quick brown fox. " * (20 + i))
    cfg = tiny("data.sources.code.source=builtin:code", "data.sources.code.weight=3",
               "data.sources.tests.source=builtin:tests", "data.sources.tests.weight=1",
               "data.sources.idle.source=builtin:code", "data.sources.idle.weight=0",
               f"data.eval_only.prose={prose}", "mesh.data=1")
    setup = prepare(cfg, jax.devices()[:1])  # one device: the quickest compile
    sets = mixture.eval_sets(setup.data, seq_len=32, global_batch=8, n_batches=2)
    assert list(sets) == ["code", "tests", "idle", "prose"]
    with setup.context():
        params = init_state(setup.model, setup.tx, jnp.zeros((1, 32), jnp.int32), setup.spec,
                            cfg.train.seed)["params"]
        scores = evaluate(setup, params, sets)
        logits_fn = jax.jit(lambda p, t: setup.model.apply({"params": p}, t)[0])
        reference = {}
        for name, batches in sets.items():
            nll = []
            for t in batches:
                logits = np.asarray(logits_fn(params, jnp.asarray(t[:, :-1])), np.float64)
                logits -= logits.max(-1, keepdims=True)
                logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
                nll.append(-np.take_along_axis(logp, t[:, 1:, None], -1)[..., 0])
            heldout = np.asarray(setup.data.caches[name].heldout)
            bytes_per_token = np.count_nonzero(heldout != 256) / len(heldout)
            loss = float(np.mean(nll))
            reference[name] = (loss, loss / math.log(2) / bytes_per_token, bytes_per_token)
    for name, (loss, bpb, _) in reference.items():
        assert scores[f"eval/{name}/loss"] == pytest.approx(loss, rel=1e-5), name
        assert scores[f"eval/{name}/bpb"] == pytest.approx(bpb, rel=1e-5), name
    training = ("code", "tests", "idle")
    assert scores["eval/macro_loss"] == np.mean([scores[f"eval/{n}/loss"] for n in training])
    assert scores["eval/macro_bpb"] == np.mean([scores[f"eval/{n}/bpb"] for n in training])
    loss = 0.75 * reference["code"][0] + 0.25 * reference["tests"][0]
    per_byte = 0.75 * reference["code"][2] + 0.25 * reference["tests"][2]
    assert scores["eval_loss"] == pytest.approx(loss, rel=1e-5)
    assert scores["eval_bpb"] == pytest.approx(loss / math.log(2) / per_byte, rel=1e-5)
    table = mixture.eval_table(setup.data, scores, {n: len(b) for n, b in sets.items()}, 256)
    assert [line.split()[:2] for line in table.splitlines()[1:5]] == [
        ["code", "0.750"], ["tests", "0.250"], ["idle", "0.000"], ["prose", "eval"]]


# ----------------------------------------------------------------------------- runs


MIXED = ["data.sources.code.source=builtin:code", "data.sources.code.weight=0.7",
         "data.sources.tests.source=builtin:tests", "data.sources.tests.weight=0.3",
         "data.stages=[{from_step: 10, weights: {code: 0.2, tests: 0.8}}]"]


def test_sigkill_then_resume_is_bit_exact_across_a_stage_change(tmp_path, tiny_overrides, capsys):
    overrides = ["experiments/dense_tiny.yaml", *tiny_overrides, *MIXED, "train.steps=24",
                 "checkpoint.every=4", "train.eval_every=8"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    uninterrupted = _start(straight, overrides)
    kill_after = random.choice((4, 8, 12))  # before the stage (step 10) or after it; the steps
    # left after it keep the run alive until the kill, however fast the machine
    proc = _start(killed, overrides)
    assert uninterrupted.communicate(timeout=300) and uninterrupted.returncode == 0
    deadline = time.time() + 300
    while newest_checkpoint(killed) < kill_after:
        assert time.time() < deadline and proc.poll() is None, f"no checkpoint >= {kill_after}"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed_from = newest_checkpoint(killed)
    restarted = _start(killed, overrides)
    out, err = restarted.communicate(timeout=300)
    assert restarted.returncode == 0, err
    assert f"resuming from step {resumed_from}" in out

    exact = lambda run: [{k: v for k, v in e.items() if not k.startswith(("step_time", "tokens_per",  # noqa: E731
                                                                        "mfu"))}
                         for e in read_metrics(run)]
    assert exact(killed) == exact(straight), f"killed after checkpoint {resumed_from}"
    last = read_metrics(straight)[-2]
    assert last["data/code/tokens"] + last["data/tests/tokens"] == 24 * 8 * 32
    evals = [e for e in read_metrics(straight) if "eval_loss" in e]
    assert {"eval/code/loss", "eval/tests/bpb", "eval/macro_loss"} <= set(evals[-1])

    # a stage change that rewrites trained steps is refused, before anything is written
    before = (killed / "config.yaml").read_text()
    code = cli.main(["train", "--run-dir", str(killed), *overrides, "train.steps=30",
                     "data.stages=[{from_step: 12, weights: {tests: 1}}]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "data.stages: the weights up to step 24" in err[0]
    assert (killed / "config.yaml").read_text() == before


def test_bad_mixtures_are_one_line_and_write_nothing(tmp_path, tiny_overrides, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    one = tmp_path / "one.txt"
    one.write_text("x" * 20)
    experiment = tmp_path / "experiment.yaml"
    experiment.write_text("{}\n")
    base = ["train", str(experiment), f"--run-dir={tmp_path / 'run'}", *tiny_overrides,
            "data.sources.code.source=builtin:code"]
    cases = {
        "data.sources.code.weight: Input should be greater than or equal to 0":
            ["data.sources.code.weight=-0.5"],
        "data.sources.code.weight: Input should be a valid number": ["data.sources.code.weight=lots"],
        "data.sources: all weights are 0": ["data.sources.code.weight=0"],
        "data.stages[0].weights.prose: unknown source (sources: code)":
            ["data.stages=[{from_step: 3, weights: {prose: 1}}]"],
        "data.stages[0].from_step=7 is beyond train.steps=6":
            ["data.stages=[{from_step: 7, weights: {code: 1}}]"],
        "data.stages[1].from_step=2: stages must be in increasing step order":
            ["data.stages=[{from_step: 4, weights: {code: 1}}, {from_step: 2, weights: {code: 1}}]"],
        "data.sources.e.source: no .txt/.jsonl/.parquet files match":
            [f"data.sources.e.source={tmp_path}/nothing*.txt"],
        "data.sources.e.source: its train split has 1 tokens": [f"data.sources.e.source={empty}"],
        "data.eval_only.one: the held-out split has 1 tokens": [f"data.eval_only.one={one}"],
        "data.eval_only.code: 'code' is already a training source name":
            ["data.eval_only.code=builtin:tests"],
        "data.source and data.sources are both set": ["data.source=builtin"],
    }
    for expected, extra in cases.items():
        code = cli.main([*base, *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and expected in err[0], (expected, err)
    twice = tmp_path / "twice.yaml"
    twice.write_text("data:\n  sources:\n    a: {source: builtin}\n    a: {source: builtin}\n")
    assert cli.main(["train", str(twice), f"--run-dir={tmp_path / 'run'}"]) == 2
    assert "'a' appears twice in one mapping" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    cfg = config_lib.load(None, [*base[3:], "data.sources.code.weight=0.5"])  # a sweep's override
    assert cfg.data.sources["code"].weight == 0.5


def test_a_per_domain_metric_is_a_sweep_objective_and_an_analysis_series(tmp_path):
    """eval/code/bpb from metrics.jsonl: a sweep's objective, and the series the analysis (and
    its mixture laws, `analyze --metric eval/code/bpb`) read for a run."""
    from research.analysis.mixture_report import final
    from research.analysis.runs import load_runs
    from research.sweep import rundir
    from research.sweep.spec import Objective
    from tests.test_analysis import write_run

    write_run(tmp_path / "run", params=10**6, tokens_per_step=512, steps=100, eval_loss=2.4)
    with (tmp_path / "run" / "metrics.jsonl").open("a") as f:
        for step, value in ((50, 3.1), (100, 2.6)):
            f.write(json.dumps({"step": step, "eval_loss": 2.0, "eval/code/bpb": value}) + "\n")
    entries = read_metrics(tmp_path / "run")
    assert rundir.objective_value(entries, Objective(metric="eval/code/bpb")) == 2.6
    assert rundir.objective_value(entries, Objective(metric="eval/code/bpb", reduce="best")) == 2.6
    (run,), _ = load_runs(tmp_path)
    assert run.series("eval/code/bpb") == [(50, 3.1), (100, 2.6)]
    assert final(run, "eval/code/bpb") == 2.6
