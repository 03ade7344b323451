"""Grouped-query causal self-attention with rotary positions and an optional sliding window.

The module projects and rotates; `causal_attention` is a pure function of (q, k, v), so a
decoding KV cache can be slotted in between them later: rotate the new q, k at their absolute
`positions`, append k, v to the cache, and attend over the cache with a position-based mask.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.config import ModelConfig
from research.models.layers import BTD, Einsum, out_std, rotary

BTNH = ("act_batch", "act_seq", "act_heads", None)
BTKH = ("act_batch", "act_seq", "act_kv_heads", None)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                     sliding_window: int | None = None) -> jax.Array:
    """softmax(q k^T / sqrt(H) + causal mask) v for q [B, T, N, H] and k, v [B, T, K, H].

    K must divide N: query head n reads kv head n // (N / K) (grouped-query attention).
    With `sliding_window` = W, position t sees keys t-W+1 .. t (W keys, itself included).
    Logits and softmax are float32 (jax.nn.dot_product_attention does this for bf16 inputs).
    """
    window = None if sliding_window is None else (sliding_window - 1, 0)
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=window)


class Attention(nn.Module):
    """Self-attention sublayer: returns (y, aux) like every mixer."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array,
                 positions: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        cfg = self.cfg
        d, n, kv, h = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_size
        dtype = jnp.dtype(cfg.compute_dtype)
        proj = dict(dtype=cfg.compute_dtype, param_dtype=cfg.param_dtype)
        q = Einsum("btd,dnh->btnh", (d, n, h), ("embed", "heads", "head_dim"), cfg.init_std,
                   name="q", **proj)(x)
        k = Einsum("btd,dkh->btkh", (d, kv, h), ("embed", "kv_heads", "head_dim"), cfg.init_std,
                   name="k", **proj)(x)
        v = Einsum("btd,dkh->btkh", (d, kv, h), ("embed", "kv_heads", "head_dim"), cfg.init_std,
                   name="v", **proj)(x)
        q = nn.with_logical_constraint(rotary(q, positions, cfg.rope_theta).astype(dtype), BTNH)
        k = nn.with_logical_constraint(rotary(k, positions, cfg.rope_theta).astype(dtype), BTKH)
        v = nn.with_logical_constraint(v.astype(dtype), BTKH)
        out = nn.with_logical_constraint(causal_attention(q, k, v, cfg.sliding_window), BTNH)
        y = Einsum("btnh,nhd->btd", (n, h, d), ("heads", "head_dim", "embed"), out_std(cfg),
                   name="o", **proj)(out)
        return nn.with_logical_constraint(y, BTD), {}
