"""Decoding with the cache reproduces the parallel forward for every family; sampling; the
`research generate` command end to end.

Tolerance: cached and parallel logits are both float32 computations of the same function,
compared at 1e-4 (the Mamba state is carried across calls, so rounding differs slightly).
"""

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.config import ConfigError, ModelConfig
from research.generate import add_generate_command, decode, generate, init_cache, load, sample
from research.models.decoder import Decoder
from research.train.loop import train

VOCAB = 64
TINY = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48)
MAMBA = dict(d_state=8, head_dim=16, chunk_size=4)
# Capacity factor E / top_k: the parallel forward drops no token either (decode mode never does).
ROOMY = dict(n_experts=4, capacity_factor=2.0)
FAMILIES = {
    "dense": dict(),
    "dense, sliding window": dict(sliding_window=3),
    "moe": dict(layer_pattern=("attention:mlp", "attention:moe"), moe=ROOMY),
    "moe dropless": dict(layer_pattern=("attention:moe",), moe=dict(dispatch="dropless")),
    "mamba": dict(layer_pattern=("mamba:none",), mamba=MAMBA),
    "hybrid": dict(n_layers=4, layer_pattern=("mamba:mlp", "mamba:moe", "mamba:mlp",
                                              "attention:moe"), mamba=MAMBA, moe=ROOMY),
    "hybrid, unscanned": dict(n_layers=2, scan_layers=False, sliding_window=4, mamba=MAMBA,
                              layer_pattern=("mamba:moe", "attention:mlp"), moe=ROOMY),
}


DECODE = jax.jit(decode, static_argnums=0)  # compiled once per model and token shape


def model_and_params(kw: dict) -> tuple[Decoder, dict]:
    model = Decoder(ModelConfig(**{**TINY, **kw}), VOCAB)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 8), jnp.int32)))
    return model, params["params"]


def decode_all(model, params, tokens, prefill):
    """Logits of `tokens` [B, T] decoded with the cache: a `prefill` chunk, then one at a time."""
    cache = init_cache(model, tokens.shape[0], tokens.shape[1])
    logits, cache = DECODE(model, params, cache, tokens[:, :prefill], jnp.arange(prefill)[None])
    got = [logits]
    for t in range(prefill, tokens.shape[1]):
        logits, cache = DECODE(model, params, cache, tokens[:, t:t + 1], jnp.full((1, 1), t))
        got.append(logits)
    return jnp.concatenate(got, axis=1)


def random_tokens(b=2, t=11):
    return jax.random.randint(jax.random.key(0), (b, t), 0, VOCAB, dtype=jnp.int32)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decoding_reproduces_the_parallel_forward(family):
    model, params = model_and_params(FAMILIES[family])
    tokens = random_tokens()
    want, _ = jax.jit(model.apply)({"params": params}, tokens)
    for prefill in (1, 6):  # one token at a time; a 6-token chunk, then one at a time
        np.testing.assert_allclose(decode_all(model, params, tokens, prefill), want,
                                   rtol=1e-4, atol=1e-4, err_msg=f"prefill {prefill}")


def test_moe_layers_never_drop_while_decoding():
    """Scarce capacity drops tokens in the parallel forward, but decoding (here under scan and
    remat) routes like the dropless path."""
    scarce = dict(n_experts=4, capacity_factor=0.5)
    model, params = model_and_params(dict(layer_pattern=("attention:moe",), moe=scarce,
                                          remat="full"))
    dropless = Decoder(model.cfg.model_copy(update={"moe": model.cfg.moe.model_copy(
        update={"dispatch": "dropless"})}), VOCAB)
    tokens = random_tokens()
    want, _ = jax.jit(dropless.apply)({"params": params}, tokens)
    dropping, aux = jax.jit(model.apply)({"params": params}, tokens)
    assert float(aux["moe/drop_frac"].min()) > 0
    assert not np.allclose(dropping, want, atol=1e-3)
    np.testing.assert_allclose(decode_all(model, params, tokens, 6), want, rtol=1e-4, atol=1e-4)


def greedy_by_full_forward(model, params, prompt, n):
    """Reference: re-run the whole sequence without a cache and take the argmax (padded to one
    length, so it compiles once: causality keeps the padding out of earlier logits)."""
    forward = jax.jit(lambda seq: model.apply({"params": params}, seq)[0])
    seq = list(prompt)
    for _ in range(n):
        logits = forward(jnp.asarray([seq + [0] * (len(prompt) + n - len(seq))], jnp.int32))
        seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    return seq[len(prompt):]


def test_greedy_generation_matches_the_uncached_argmax_and_is_deterministic():
    model, params = model_and_params(FAMILIES["moe"])
    prompt = [3, 14, 15, 9, 2]
    got = generate(model, params, prompt, 6, temperature=0.0)
    assert got == greedy_by_full_forward(model, params, prompt, 6)
    assert generate(model, params, prompt, 6, temperature=0.0, seed=7) == got


def test_sampling_is_seeded_and_stops_at_eos():
    model, params = model_and_params(FAMILIES["dense"])
    prompt = [1, 2, 3]
    a = generate(model, params, prompt, 12, temperature=1.5, seed=0)
    assert generate(model, params, prompt, 12, temperature=1.5, seed=0) == a
    assert generate(model, params, prompt, 12, temperature=1.5, seed=1) != a
    assert len(a) == 12
    stopped = generate(model, params, prompt, 12, temperature=1.5, seed=0, eos_id=a[4])
    assert stopped == a[:a.index(a[4]) + 1]
    # ids past the tokenizer's vocabulary (the model's padding rows) are never sampled
    limited = generate(model, params, prompt, 30, temperature=3.0, seed=0, vocab_limit=5)
    assert max(limited) < 5


def test_sample_follows_temperature_and_nucleus():
    probs = np.array([0.5, 0.25, 0.15, 0.07, 0.03])
    logits = jnp.log(jnp.asarray(probs, jnp.float32))[None]
    keys = jax.random.split(jax.random.key(0), 8000)
    draw = jax.jit(jax.vmap(lambda k, t, p: sample(logits, k, t, p)[0], in_axes=(0, None, None)),
                   static_argnums=(1, 2))

    def freq(temperature, top_p):
        return np.bincount(np.asarray(draw(keys, temperature, top_p)), minlength=5) / len(keys)

    # top_p = 0.8: tokens 0, 1, 2 (those ranked above token 3 hold 0.9 >= 0.8)
    np.testing.assert_allclose(freq(1.0, 0.8), np.r_[probs[:3] / 0.9, 0, 0], atol=0.02)
    tempered = probs ** 0.5 / (probs ** 0.5).sum()
    np.testing.assert_allclose(freq(2.0, 1.0), tempered, atol=0.02)
    assert freq(1.0, 0.01)[0] == 1.0  # a nucleus of one token is greedy
    assert int(sample(logits, keys[0], 0.0, 1.0)[0]) == 0


def test_generate_command_end_to_end(tiny, tmp_path, capsys):
    run_dir = tmp_path / "run"
    train(tiny("train.steps=3", "checkpoint.every=2"), run_dir)
    capsys.readouterr()
    parser = argparse.ArgumentParser()
    add_generate_command(parser.add_subparsers())

    def main(*argv: str) -> str:
        args = parser.parse_args(["generate", str(run_dir), *argv])
        assert args.func(args) == 0
        return capsys.readouterr().out

    out = main("--prompt", "def f(", "--max-new-tokens", "4", "--temperature", "0")
    assert out.startswith("def f(")
    # the continuation is the model's greedy choice, recomputed without the cache
    setup, params, step = load(run_dir)
    assert step == 3
    tokenizer = setup.data.tokenizer
    prompt = [tokenizer.eos_id, *tokenizer.encode("def f(").tolist()]
    with setup.context():
        want = greedy_by_full_forward(setup.model, params, prompt, 4)
    assert out == "def f(" + tokenizer.decode(np.asarray(want)) + "\n"
    assert main("--prompt", "x", "--max-new-tokens", "3", "--seed", "5", "--top-p", "0.9",
                "--step", "2") == main("--prompt", "x", "--max-new-tokens", "3", "--seed", "5",
                                       "--top-p", "0.9", "--step", "2")
    for bad, field in ((["--top-p", "0"], "--top-p"), (["--temperature", "-1"], "--temperature")):
        with pytest.raises(ConfigError, match=field):
            main(*bad)
    with pytest.raises(ConfigError, match="no checkpoint at step 1"):
        main("--step", "1")
