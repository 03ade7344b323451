"""Post-training: example files, packing, the sft and dpo objectives, and model.init_from."""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.config import ConfigError
from research.data.examples import (derive_examples, encode, load_examples, pack, parse_sft,
                                    render_messages)
from research.data.tokenizer import ByteTokenizer
from research.models.decoder import Decoder
from research.train.objectives import dpo_loss, dpo_terms, sft_loss

ROOT = Path(__file__).resolve().parents[1]
BYTES = ByteTokenizer()


def log_softmax64(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    return x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
        x.max(-1, keepdims=True)


def rows_of(texts: list[tuple[str, str]], length: int, packed: bool = True) -> dict[str, np.ndarray]:
    return pack([encode([(p, False), (r, True)], BYTES) for p, r in texts], length, BYTES.eos_id,
                packed)


@pytest.fixture(scope="module")
def small_model():
    from research import config

    cfg = config.load(None, ["model.d_model=32", "model.n_layers=2", "model.n_heads=4",
                             "model.n_kv_heads=2"]).model
    model = Decoder(cfg, 384)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"]
    return model, params


def forward(model, params, rows: dict[str, np.ndarray]) -> np.ndarray:
    """Logits [B, L, V] of the rows' inputs, segments kept apart."""
    apply = jax.jit(lambda p, t, pos, seg: model.apply({"params": p}, t, pos, segment_ids=seg)[0])
    return np.asarray(apply(params, rows["tokens"][:, :-1], rows["positions"][:, :-1],
                            rows["segment_ids"][:, :-1]))


# ----------------------------------------------------------------------------- data


def test_derived_examples_and_the_chat_template(example_dir):
    sft = [json.loads(line) for line in (example_dir / "sft.jsonl").read_text().splitlines()]
    dpo = [json.loads(line) for line in (example_dir / "dpo.jsonl").read_text().splitlines()]
    assert len(sft) >= 10 and len(dpo) >= 5
    for ex in sft:  # prompt + response is the whole function again; the prompt ends its docstring
        function = ast.parse(ex["prompt"] + ex["response"]).body[0]
        assert isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
        assert ast.get_docstring(function) is not None
        assert ex["prompt"].count("\n") == function.body[0].end_lineno - function.lineno + 1
    for ex in dpo:
        assert ex["chosen"] != ex["rejected"]
        assert sorted(ex["chosen"].splitlines()) == sorted(ex["rejected"].splitlines())

    segments = render_messages([{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "2+2?"},
                                {"role": "assistant", "content": "4"}], "f:1")
    ids, learned = encode(segments, BYTES)
    text = BYTES.decode(ids)
    assert text == "<|system|>\nBe brief.\n<|user|>\n2+2?\n<|assistant|>\n4\n"
    assert BYTES.decode(ids[learned == 1]) == "4\n" and ids[-1] == BYTES.eos_id and learned[-1]
    assert parse_sft({"prompt": "a", "response": "b"}, "f:1") == [("a", False), ("b", True)]


def test_packing_layout_and_overlong_policies(tiny, tmp_path):
    rows = rows_of([("ab", "cd"), ("e", "fgh"), ("xyz", "w")], 12)
    # "abcd"+eos = 5 tokens, "efgh"+eos = 5: both fit in 12; "xyzw"+eos starts a new row
    np.testing.assert_array_equal(rows["segment_ids"][0], [1] * 5 + [2] * 5 + [0] * 2)
    np.testing.assert_array_equal(rows["positions"][0], [0, 1, 2, 3, 4] * 2 + [0, 0])
    # learned: response + eos, never a segment's first token, never padding
    np.testing.assert_array_equal(rows["loss_mask"][0], [0, 0, 1, 1, 1, 0, 1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(rows["segment_ids"][1], [1] * 5 + [0] * 7)
    assert len(rows_of([("ab", "cd"), ("e", "fgh")], 12, packed=False)["tokens"]) == 2

    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": "p" * n, "response": "r" * 4})
                              for n in (2, 30, 40, 2, 2, 2, 2, 2, 2)) + "\n")
    base = ("train.objective=sft", f"examples.source={path}", "train.seq_len=32",
            "train.batch_size=2")
    # limit 33 tokens: 2+4+1 fits; 30+4+1 is cut inside the response; 40 leaves no response
    truncated = load_examples(tiny(*base), BYTES)
    assert (truncated.counts["examples"], truncated.counts["truncated"],
            truncated.counts["dropped"]) == (9, 1, 1)
    dropped = load_examples(tiny(*base, "examples.overlong=drop"), BYTES)
    assert (dropped.counts["truncated"], dropped.counts["dropped"]) == (0, 2)
    assert truncated.counts["learned_tokens"] == dropped.counts["learned_tokens"] + 3  # "rrr"


@pytest.mark.parametrize("content, match", [
    ('{"prompt": "a", "response": "b"}\n{"prompt": "a"\n', r"sft.jsonl:2: malformed JSON"),
    ('{"prompt": "a", "response": "b"}\n\n{"prompt": "a"}\n', r"sft.jsonl:3: missing field 'response'"),
    ('{"prompt": 3, "response": "b"}\n', r"sft.jsonl:1: field 'prompt' is int, not a string"),
    ('{"messages": [{"role": "bot", "content": "x"}]}\n', r"sft.jsonl:1: messages\[0\].role 'bot'"),
    ('{"messages": [{"role": "user"}]}\n', r"sft.jsonl:1: messages\[0\]: missing field 'content'"),
    ('{"messages": [{"role": "user", "content": "x"}]}\n', r"sft.jsonl:1: .*no assistant"),
])
def test_bad_example_lines_name_file_line_and_field(tiny, tmp_path, content, match):
    path = tmp_path / "sft.jsonl"
    path.write_text(content)
    with pytest.raises(ConfigError, match=match):
        load_examples(tiny("train.objective=sft", f"examples.source={path}"), BYTES)


def test_bad_dpo_line_is_one_line_exit_2_and_writes_nothing(tiny_overrides, tmp_path):
    path = tmp_path / "dpo.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "research", "train", "experiments/dense_tiny.yaml",
                             "--run-dir", str(run_dir),
                             *tiny_overrides, "train.objective=dpo", f"examples.source={path}"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert f"{path}:2: missing field 'rejected'" in result.stderr
    assert not run_dir.exists()


# ----------------------------------------------------------------------------- objectives


def test_sft_loss_is_the_mean_over_response_tokens_and_prompts_get_zero_gradient(small_model):
    model, params = small_model
    rows = rows_of([("def f(x):\n", "  return x\n"), ("# a\n", "b = 1\n"), ("q", "rs")], 40)
    batch = {k: jnp.asarray(v) for k, v in rows.items()}
    loss, metrics = jax.jit(lambda p, b: sft_loss(p, model, b))(params, batch)

    logits = forward(model, params, rows)
    logp = log_softmax64(logits)
    targets, mask = rows["tokens"][:, 1:], rows["loss_mask"][:, 1:].astype(bool)
    picked = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    want = -picked[mask].mean()  # float64, response tokens (and their eos) only
    assert float(loss) == pytest.approx(want, rel=1e-6)
    assert float(metrics["learned_tokens"]) == mask.sum() == len("  return x\n" "b = 1\n" "rs") + 3

    # gradient with respect to the logits themselves: exactly zero off the response tokens
    fake = SimpleNamespace(apply=lambda v, *a, **k: (v["params"], {}), cfg=model.cfg)
    grads = jax.jit(jax.grad(lambda z: sft_loss(z, fake, batch)[0]))(logits)
    assert np.all(np.asarray(grads)[~mask] == 0.0)
    assert np.all(np.abs(np.asarray(grads)[mask]).sum(-1) > 0)


def test_packed_examples_never_see_each_other(small_model):
    model, params = small_model

    def logits_of(texts):
        rows = rows_of(texts, 65)
        return forward(model, params, rows)[0], rows["segment_ids"][0, :-1]

    mine = ("def g(y):\n", "  return y\n")
    a, seg_a = logits_of([("x = [1, 2]\n", "y = 3\n"), mine])
    b, seg_b = logits_of([("import os\nimport sys\n", "pass\n"), mine])  # another neighbour
    alone, _ = logits_of([mine])
    here_a, here_b = seg_a == 2, seg_b == 2
    # Same tokens, other neighbour: equal up to float summation order (attention's query chunks
    # fall at other offsets of the row); a neighbour's influence would be far larger.
    np.testing.assert_allclose(a[here_a], b[here_b], rtol=0, atol=1e-6)
    np.testing.assert_allclose(a[here_a], alone[: here_a.sum()], rtol=0, atol=1e-5)  # positions restart


def test_dpo_terms_match_float64_and_label_smoothing():
    rng = np.random.default_rng(0)
    pairs, length, beta = 16, 20, 0.3
    logp = {name: -rng.exponential(1.0, (pairs, length)) for name in ("pc", "pr", "rc", "rr")}
    mask = {name: rng.random((pairs, length)) < 0.6 for name in logp}
    seq = {name: (logp[name] * mask[name]).sum(-1) for name in logp}  # float64 sums
    margin = beta * ((seq["pc"] - seq["rc"]) - (seq["pr"] - seq["rr"]))
    log_sig = lambda z: -np.log1p(np.exp(-z))  # noqa: E731
    for eps in (0.0, 0.2):
        loss, metrics = dpo_terms(*(jnp.asarray(seq[n], jnp.float32) for n in ("pc", "pr", "rc", "rr")),
                                  beta, eps)
        want = np.mean(-(1 - eps) * log_sig(margin) - eps * log_sig(-margin))
        assert float(loss) == pytest.approx(want, rel=1e-5)
        assert float(metrics["rewards/chosen"]) == pytest.approx(
            np.mean(beta * (seq["pc"] - seq["rc"])), rel=1e-5, abs=1e-6)
        assert float(metrics["rewards/rejected"]) == pytest.approx(
            np.mean(beta * (seq["pr"] - seq["rr"])), rel=1e-5, abs=1e-6)
        assert float(metrics["rewards/margin"]) == pytest.approx(margin.mean(), rel=1e-5, abs=1e-6)
        assert float(metrics["accuracy"]) == np.mean(margin > 0)


def test_dpo_loss_is_log_2_when_the_policy_is_the_reference(small_model):
    model, params = small_model
    pairs = [[(p, False), (c, True)] for p, c in
             [("def f():\n", "  return 1\n"), ("def f():\n", "  1 nruter\n"),
              ("a = ", "[]\n"), ("a = ", "{}\n")]]
    rows = pack([encode(s, BYTES) for s in pairs], 24, BYTES.eos_id, False)
    batch = {k: jnp.asarray(v.reshape(-1, 2, 24)) for k, v in rows.items()}
    objective = jax.jit(jax.value_and_grad(
        lambda p, b, ref: dpo_loss(p, model, b, ref, beta=0.1, label_smoothing=0.0), has_aux=True))
    (loss, metrics), grads = objective(params, batch, params)
    assert float(loss) == pytest.approx(math.log(2), abs=1e-7)
    assert float(metrics["accuracy"]) == 0.0 and float(metrics["rewards/margin"]) == 0.0
    assert float(jnp.abs(grads["embed"]["embedding"]).sum()) > 0  # the reference is frozen, not the policy


def test_dpo_loss_with_policy_unlike_the_reference_matches_float64(small_model, tiny, tmp_path):
    """Policy != reference (so the margin is not 0): loss and rewards against float64 sums of
    the chosen and rejected responses as the example file names them (a swap flips every
    margin), and no gradient reaches the reference."""
    model, reference = small_model
    noise = iter(jax.random.split(jax.random.key(7), len(jax.tree.leaves(reference))))
    policy = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(next(noise), p.shape), reference)
    pairs = [("def f():\n", "  return 1\n", "  1 nruter\n"), ("a = ", "[]\n", "{}\n"),
             ("x = 2", " + 2\n", " - 2\n"), ("# a\n", "b = 1\n", "1 = b\n")]
    path = tmp_path / "dpo.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n"
                            for p, c, r in pairs))
    rows = load_examples(tiny("train.objective=dpo", f"examples.source={path}",
                              "train.seq_len=24", "train.batch_size=2"), BYTES).rows
    for (prompt, chosen, rejected), tokens in zip(pairs, rows["tokens"], strict=True):
        assert [BYTES.decode(row) for row in tokens] == [prompt + chosen, prompt + rejected]

    flat = {k: v.reshape(-1, v.shape[-1]) for k, v in rows.items()}
    targets, mask = flat["tokens"][:, 1:], flat["loss_mask"][:, 1:].astype(bool)

    def sequence_logp(params) -> np.ndarray:  # float64 [pairs, 2]: (chosen, rejected)
        picked = np.take_along_axis(log_softmax64(forward(model, params, flat)),
                                    targets[..., None], -1)[..., 0]
        return np.where(mask, picked, 0.0).sum(-1).reshape(-1, 2)

    beta = 0.5
    pi, ref = sequence_logp(policy), sequence_logp(reference)
    chosen, rejected = beta * (pi[:, 0] - ref[:, 0]), beta * (pi[:, 1] - ref[:, 1])
    margin = chosen - rejected
    assert np.abs(margin).min() > 1e-3  # the policy moved: every pair has a margin to get right
    batch = {k: jnp.asarray(v) for k, v in rows.items()}
    loss, metrics = jax.jit(lambda p, b, r: dpo_loss(p, model, b, r, beta=beta,
                                                     label_smoothing=0.0))(policy, batch, reference)
    assert float(loss) == pytest.approx(np.mean(np.log1p(np.exp(-margin))), rel=1e-5)
    assert float(metrics["rewards/chosen"]) == pytest.approx(chosen.mean(), rel=1e-4, abs=1e-6)
    assert float(metrics["rewards/rejected"]) == pytest.approx(rejected.mean(), rel=1e-4, abs=1e-6)
    assert float(metrics["accuracy"]) == np.mean(margin > 0)

    to_reference = jax.jit(jax.grad(lambda r: dpo_loss(policy, model, batch, r, beta=beta,
                                                        label_smoothing=0.0)[0]))(reference)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(to_reference))


# ----------------------------------------------------------------------------- init_from


def test_init_from_loads_params_only_and_checks_the_model(tiny, tmp_path, example_dir):
    from research.train.checkpoint import Checkpointer
    from research.train.loop import prepare, train
    from research.train.state import load_initial_params

    pre = tmp_path / "pre"
    train(tiny("train.steps=2", "checkpoint.every=1", "checkpoint.keep_last=3"), pre)
    cfg = tiny("train.objective=sft", f"examples.source={example_dir}/sft.jsonl",
               f"model.init_from={pre}@1", "train.steps=1", "checkpoint.every=100",
               "train.seq_len=128")
    setup = prepare(cfg)
    saved = Checkpointer(pre / "checkpoints", cfg.checkpoint, read_only=True)
    with setup.context():
        loaded = jax.device_get(load_initial_params(setup.spec, cfg))
        at_1, at_2 = (jax.device_get(saved.restore(step, setup.spec.abstract)[0]["params"])
                      for step in (1, 2))
    assert jax.tree.all(jax.tree.map(np.array_equal, loaded, at_1))
    assert not jax.tree.all(jax.tree.map(np.array_equal, loaded, at_2))

    summary = train(cfg, tmp_path / "sft")  # the new run: its own step counter, fresh optimizer
    assert summary["step"] == 1 and summary["examples"]["rows"] > 0
    with pytest.raises(ConfigError, match=r"model.init_from: model.n_layers is 3 here but 2"):
        train(tiny(f"model.init_from={pre}", "model.n_layers=3"), tmp_path / "other")
    with pytest.raises(ConfigError, match=r"model.init_from: .*no checkpoint at step 7"):
        train(tiny(f"model.init_from={pre}@7"), tmp_path / "other")
    with pytest.raises(ConfigError, match=r"model.init_from: .* is neither a run directory"):
        train(tiny(f"model.init_from={tmp_path}/nowhere"), tmp_path / "other")
    assert not (tmp_path / "other").exists()
