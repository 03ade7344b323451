"""Grouped-query causal self-attention with rotary positions and an optional sliding window.

The module projects and rotates; `causal_attention` is a pure function of (q, k, v). In decode
mode a KV cache sits between them: the new q, k are rotated at their absolute `positions`, k and
v are written into the cache at its index, and q attends over the whole cache with a mask built
from positions (key slot s holds position s), which also applies the sliding window.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.config import ModelConfig
from research.models.layers import BTD, Einsum, out_std, rotary
from research.models.parameterization import forward

BTNH = ("act_batch", "act_seq", "act_heads", None)
BTKH = ("act_batch", "act_seq", "act_kv_heads", None)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                     sliding_window: int | None = None, scale: float | None = None,
                     segment_ids: jax.Array | None = None) -> jax.Array:
    """softmax(q k^T * scale + causal mask) v for q [B, T, N, H] and k, v [B, T, K, H]; scale
    defaults to 1/sqrt(H) (μP-style parameterizations pass their own).

    K must divide N: query head n reads kv head n // (N / K) (grouped-query attention).
    With `sliding_window` = W, position t sees keys t-W+1 .. t (W keys, itself included).
    With `segment_ids` [B, T] (packed examples), a token sees only keys of its own segment.
    Logits and softmax are float32 (jax.nn.dot_product_attention does this for bf16 inputs).
    """
    window = None if sliding_window is None else (sliding_window - 1, 0)
    mask = None if segment_ids is None else \
        (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    return jax.nn.dot_product_attention(q, k, v, scale=scale, mask=mask, is_causal=True,
                                        local_window_size=window)


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
                     sliding_window: int | None = None, scale: float | None = None) -> jax.Array:
    """Queries at `positions` [1 or B, T] over a cache k, v [B, S, K, H] whose slot s holds
    position s: query p sees slots p-W+1 .. p (unwritten slots lie beyond p, so are masked)."""
    slots = jnp.arange(k.shape[1])
    offset = positions[:, :, None] - slots  # [B, T, S]
    allowed = offset >= 0
    if sliding_window is not None:
        allowed &= offset < sliding_window
    return jax.nn.dot_product_attention(q, k, v, scale=scale, mask=allowed[:, None])


class Attention(nn.Module):
    """Self-attention sublayer: returns (y, aux) like every mixer."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, decode: bool = False,
                 segment_ids: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        cfg = self.cfg
        d, n, kv, h = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_size
        dtype = jnp.dtype(cfg.compute_dtype)
        proj = dict(dtype=cfg.compute_dtype, param_dtype=cfg.param_dtype, projection=cfg.projection)
        q = Einsum("btd,dnh->btnh", (d, n, h), ("embed", "heads", "head_dim"), cfg.init_std,
                   name="q", **proj)(x)
        k = Einsum("btd,dkh->btkh", (d, kv, h), ("embed", "kv_heads", "head_dim"), cfg.init_std,
                   name="k", **proj)(x)
        v = Einsum("btd,dkh->btkh", (d, kv, h), ("embed", "kv_heads", "head_dim"), cfg.init_std,
                   name="v", **proj)(x)
        q = nn.with_logical_constraint(rotary(q, positions, cfg.rope_theta).astype(dtype), BTNH)
        k = nn.with_logical_constraint(rotary(k, positions, cfg.rope_theta).astype(dtype), BTKH)
        v = nn.with_logical_constraint(v.astype(dtype), BTKH)
        attention_scale = forward(cfg).attention_scale
        if decode:
            k, v = self._append_to_cache(k, v)
            out = cached_attention(q, k, v, positions, cfg.sliding_window, attention_scale)
        else:
            out = causal_attention(q, k, v, cfg.sliding_window, attention_scale, segment_ids)
        out = nn.with_logical_constraint(out, BTNH)
        y = Einsum("btnh,nhd->btd", (n, h, d), ("heads", "head_dim", "embed"), out_std(cfg),
                   name="o", **proj)(out)
        return nn.with_logical_constraint(y, BTD), {}

    def _append_to_cache(self, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Write the new k, v [B, T, K, H] at the cache index; return the whole cache.

        The first call (init, with tokens of the maximum length) only creates the buffers
        [B, max_len, K, H] in the compute dtype and the index 0, and returns k, v themselves.
        """
        if not self.has_variable("cache", "cached_key"):
            self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
            self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
            self.variable("cache", "index", jnp.zeros, (), jnp.int32)
            return k, v
        cached_k = self.variable("cache", "cached_key")
        cached_v = self.variable("cache", "cached_value")
        index = self.variable("cache", "index")
        start = (0, index.value, 0, 0)
        cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k, start)
        cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v, start)
        index.value = index.value + k.shape[1]
        return cached_k.value, cached_v.value
