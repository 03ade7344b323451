"""Grouped-query causal self-attention with rotary positions and an optional sliding window.

The module projects and rotates; `causal_attention` is a pure function of (q, k, v). In decode
mode a KV cache sits between them: the new q, k are rotated at their absolute `positions`, k and
v are written into the cache at its index, and q attends over the whole cache with a mask built
from positions (key slot s holds position s), which also applies the sliding window.

Without a cache the implementation is `model.attention_impl` (`config.for_backend`: `auto` is
chunked on CPU, cuDNN on an NVIDIA GPU in bf16, else XLA's); all compute the same function to
float tolerance (tests/test_attention_impl.py). Decoding always uses `cached_attention`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.config import ModelConfig, for_backend
from research.models.layers import BTD, Einsum, RMSNorm, backend, out_std, projection_args, rotary
from research.models.parameterization import forward

BTNH = ("act_batch", "act_seq", "act_heads", None)
BTKH = ("act_batch", "act_seq", "act_kv_heads", None)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                     sliding_window: int | None = None, scale: float | None = None,
                     segment_ids: jax.Array | None = None,
                     query_chunk: int | None = None) -> jax.Array:
    """softmax(q k^T * scale + causal mask) v for q [B, T, N, H] and k, v [B, T, K, H]; scale
    defaults to 1/sqrt(H) (μP-style parameterizations pass their own).

    K must divide N: query head n reads kv head n // (N / K) (grouped-query attention).
    With `sliding_window` = W, position t sees keys t-W+1 .. t (W keys, itself included).
    With `segment_ids` [B, T] (packed examples), a token sees only keys of its own segment.

    The queries go in chunks of `query_chunk` rows (default: 32, or T/16 for long sequences),
    and each chunk scores only the keys it can see (up to its last row, from its first row's
    window start): the masked half of the causal score matrix is never computed. On CPU that
    made attention's forward+backward 2x faster at T=128 and 256 than scoring all of it
    (docs/performance.md); the chunks are unrolled, so their count is kept at most 16.
    """
    t = q.shape[1]
    chunk = query_chunk or max(32, -(-t // 16))
    kh, vh = _head_major(k), _head_major(v)
    outs = []
    for start in range(0, t, chunk):
        end = min(start + chunk, t)
        first = 0 if sliding_window is None else max(0, start - sliding_window + 1)
        rows, cols = jnp.arange(start, end)[:, None], jnp.arange(first, end)[None, :]
        allowed = (cols <= rows)[None]
        if sliding_window is not None:
            allowed &= rows - cols < sliding_window
        if segment_ids is not None:
            allowed &= segment_ids[:, start:end, None] == segment_ids[:, None, first:end]
        outs.append(_attend(q[:, start:end], kh[:, :, first:end], vh[:, :, first:end],
                            allowed, scale))
    return _token_major(jnp.concatenate(outs, axis=3))


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str,
                    sliding_window: int | None = None, scale: float | None = None,
                    segment_ids: jax.Array | None = None) -> jax.Array:
    """The same function as `causal_attention`, by jax.nn.dot_product_attention with
    `implementation` "xla" or "cudnn" (cuDNN's flash attention: NVIDIA GPUs, bf16/fp16): the
    window becomes a left window of W-1 keys, packed segments a boolean mask [B, 1, T, T]."""
    mask = None
    if segment_ids is not None:
        mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    window = None if sliding_window is None else (sliding_window - 1, 0)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=True,
                                        local_window_size=window, implementation=implementation)


def attention_logit_max(q: jax.Array, k: jax.Array, scale: float | None = None,
                        segment_ids: jax.Array | None = None) -> jax.Array:
    """The largest causal attention logit q·k * scale over batch, heads and positions (a
    diagnostic: growing logits come before attention-entropy collapse); sliding windows are
    ignored, so it is the max over every key a full causal attention would see."""
    n, kv = q.shape[2], k.shape[2]
    scores = jnp.einsum("btnh,bsnh->bnts", q.astype(jnp.float32),
                        jnp.repeat(k.astype(jnp.float32), n // kv, axis=2))
    scores = scores * (q.shape[-1] ** -0.5 if scale is None else scale)
    t = jnp.arange(q.shape[1])
    allowed = (t[:, None] >= t[None, :])[None, None]
    if segment_ids is not None:
        allowed = allowed & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    return jnp.where(allowed, scores, -jnp.inf).max()


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
                     sliding_window: int | None = None, scale: float | None = None) -> jax.Array:
    """Queries at `positions` [1 or B, T] over a cache k, v [B, S, K, H] whose slot s holds
    position s: query p sees slots p-W+1 .. p (unwritten slots lie beyond p, so are masked)."""
    offset = positions[:, :, None] - jnp.arange(k.shape[1])  # [B, T, S]
    allowed = offset >= 0
    if sliding_window is not None:
        allowed &= offset < sliding_window
    return _token_major(_attend(q, _head_major(k), _head_major(v), allowed, scale))


def _head_major(x: jax.Array) -> jax.Array:
    """[B, S, K, H] -> [B, K, S, H]: every kv head's keys contiguous, for batched matmuls."""
    return x.transpose(0, 2, 1, 3)


def _token_major(out: jax.Array) -> jax.Array:
    """[B, K, G, T, H] -> [B, T, K * G, H] (query head n = kv head n // G, member n % G)."""
    b, kv, g, t, h = out.shape
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, kv * g, h)


def _attend(q: jax.Array, kh: jax.Array, vh: jax.Array, allowed: jax.Array,
            scale: float | None) -> jax.Array:
    """q [B, T, N, H] over head-major kh, vh [B, K, S, H] where `allowed` [1 or B, T, S]
    -> [B, K, G, T, H] (G = N / K query heads per kv head).

    The G query heads of a kv head are stacked into one [G * T, H] matrix, so the scores
    are one [G * T, H] x [H, S] matmul per (batch, kv head), with no copy of k or v per
    query head. Scores and softmax are float32; the probabilities are cast back to v's dtype.
    """
    b, t, n, h = q.shape
    kv = kh.shape[1]
    g = n // kv
    qh = q.reshape(b, t, kv, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, h)
    scores = jnp.einsum("bkqh,bksh->bkqs", qh, kh, preferred_element_type=jnp.float32)
    scores = scores * (h ** -0.5 if scale is None else scale)
    mask = jnp.tile(allowed, (1, g, 1))[:, None]  # [1 or B, 1, G * T, S]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(vh.dtype)
    out = jnp.einsum("bkqs,bksh->bkqh", probs, vh, preferred_element_type=jnp.float32)
    return out.astype(q.dtype).reshape(b, kv, g, t, h)


class Attention(nn.Module):
    """Self-attention sublayer: returns (y, aux) like every mixer."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, decode: bool = False,
                 segment_ids: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        cfg = self.cfg
        d, n, kv, h = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_size
        dtype = jnp.dtype(cfg.compute_dtype)
        proj = projection_args(cfg)
        q = Einsum("btd,dnh->btnh", (d, n, h), ("embed", "heads", "head_dim"), cfg.init_std,
                   name="q", **proj)(x)
        k = Einsum("btd,dkh->btkh", (d, kv, h), ("embed", "kv_heads", "head_dim"), cfg.init_std,
                   name="k", **proj)(x)
        v = Einsum("btd,dkh->btkh", (d, kv, h), ("embed", "kv_heads", "head_dim"), cfg.init_std,
                   name="v", **proj)(x)
        if cfg.qk_norm:  # one scale per head feature, shared by the heads (as Qwen3, Gemma 3)
            q = RMSNorm(cfg.norm_eps, cfg.param_dtype, name="q_norm")(q)
            k = RMSNorm(cfg.norm_eps, cfg.param_dtype, name="k_norm")(k)
        q = nn.with_logical_constraint(rotary(q, positions, cfg.rope_theta).astype(dtype), BTNH)
        k = nn.with_logical_constraint(rotary(k, positions, cfg.rope_theta).astype(dtype), BTKH)
        v = nn.with_logical_constraint(v.astype(dtype), BTKH)
        attention_scale = forward(cfg).attention_scale
        if self.is_mutable_collection("intermediates") and not decode:
            self.sow("intermediates", "logit_max",
                     attention_logit_max(q, k, attention_scale, segment_ids))
        if decode:
            k, v = self._append_to_cache(k, v)
            out = cached_attention(q, k, v, positions, cfg.sliding_window, attention_scale)
        elif (implementation := for_backend(cfg, backend()).attention_impl) == "chunked":
            out = causal_attention(q, k, v, cfg.sliding_window, attention_scale, segment_ids)
        else:
            out = fused_attention(q, k, v, implementation, cfg.sliding_window, attention_scale,
                                  segment_ids)
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
