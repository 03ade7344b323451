"""Analytic parameter counts against the initialised model and published sizes; FLOPs by hand."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from research.config import ModelConfig
from research.models.decoder import Decoder
from research.train.flops import flops_per_token, param_counts


@pytest.mark.parametrize("kw, vocab", [
    (dict(d_model=32, n_layers=2, n_heads=4), 64),
    (dict(d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, tie_embeddings=False), 128),
    (dict(d_model=48, n_layers=1, n_heads=6, n_kv_heads=1, head_dim=4, d_ff=40), 100),
    (dict(d_model=64, n_layers=2, n_heads=2, scan_layers=False, tie_embeddings=False), 256),
])
def test_param_counts_equal_the_initialised_model(kw, vocab):
    cfg = ModelConfig(**kw)
    shapes = nn.unbox(jax.eval_shape(Decoder(cfg, vocab).init, jax.random.key(0),
                                     jnp.zeros((1, 4), jnp.int32)))["params"]
    total = sum(math.prod(a.shape) for a in jax.tree.leaves(shapes))
    embedding = sum(math.prod(shapes[k][name].shape)
                    for k, name in (("embed", "embedding"), ("lm_head", "kernel")) if k in shapes)
    counts = param_counts(cfg, vocab)
    assert counts == {"total": total, "embedding": embedding,
                      "non_embedding": total - embedding, "active": total}


def test_param_counts_match_published_llama2_and_mistral_7b():
    llama2 = ModelConfig(d_model=4096, n_layers=32, n_heads=32, d_ff=11008, tie_embeddings=False)
    mistral = llama2.model_copy(update=dict(n_kv_heads=8, d_ff=14336))
    assert param_counts(llama2, 32000)["total"] == 6_738_415_616
    assert param_counts(mistral, 32000)["total"] == 7_241_732_096


def test_flops_per_token_by_hand():
    cfg = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128)
    # per layer: q 64*64 + k,v 2*64*32 + o 64*64 = 12288; SwiGLU 3*64*128 = 24576; head 256*64
    matmul_params = 2 * (12288 + 24576) + 256 * 64
    scores = 12 * 2 * 32 * (4 * 16)  # 12 * layers * T * n_heads * head_size
    assert flops_per_token(cfg, 256, 32) == 6 * matmul_params + scores
    # The head is a matmul whether or not it shares the embedding's weights.
    untied = cfg.model_copy(update=dict(tie_embeddings=False))
    assert flops_per_token(untied, 256, 32) == flops_per_token(cfg, 256, 32)
    # A sliding window caps the keys per query; a window wider than the sequence changes nothing.
    windowed = cfg.model_copy(update=dict(sliding_window=8))
    assert flops_per_token(windowed, 256, 32) == 6 * matmul_params + 12 * 2 * 8 * 64
    wide = cfg.model_copy(update=dict(sliding_window=1000))
    assert flops_per_token(wide, 256, 32) == flops_per_token(cfg, 256, 32)
