"""Mixture-of-Experts feed-forward: a softmax top-k router over E SwiGLU experts (Mixtral), with
optional always-on shared experts and fine-grained experts (DeepSeekMoE).

Every token picks its top_k experts by router probability; its output is the sum of those
experts' outputs weighted by their probabilities renormalised over the top_k (Mixtral), plus the
shared experts' output. Two dispatch paths compute the same function (`model.moe.dispatch`):

- capacity: each sequence is a group; expert e takes at most C = capacity(T) of its tokens into
  a padded buffer [E, B, C, D], in token order (so whether a token is dropped depends only on
  earlier tokens: no information flows backwards through drops). Overflow choices are dropped:
  they contribute nothing (the residual carries the token on). Buffers are filled by gathering
  token rows at cumsum-computed slots, not by one-hot dispatch einsums (measured faster on CPU,
  see docs/moe.md). Its [E, B, C, D] buffer is what expert parallelism shards.
- dropless: all B*T*top_k choices laid out by expert in blocks (each expert's group padded to
  whole blocks) and run through one batched matmul over the blocks, each with its expert's
  weights (block-sparse, MegaBlocks-style). Nothing is dropped.

Losses (raw values are metrics; their coefficient-weighted sum is "aux_loss"):
- balance: E * sum_e f_e * p_e (Switch Transformer), f_e = fraction of the T*top_k choices
  routed to e (before any drop), p_e = mean router probability of e. Perfectly uniform routing
  gives exactly 1.0, for any E and top_k.
- z-loss: mean over tokens of logsumexp(router logits)^2 (ST-MoE): keeps logits small.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.config import ModelConfig, MoEConfig
from research.models.layers import MLP, Einsum, cumsum, matmul, out_std

Aux = dict[str, jax.Array]
EBCD = ("act_expert", "act_batch", None, "act_embed")  # the capacity buffers


def capacity(tokens: int, cfg: MoEConfig) -> int:
    """Slots per expert for a group of `tokens`: ceil(factor * tokens * top_k / E), at least 1,
    at most `tokens` (an expert never sees a token twice, so more slots would stay empty)."""
    return max(1, min(tokens, math.ceil(cfg.capacity_factor * tokens * cfg.top_k / cfg.n_experts)))


def route(logits: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """float32 router logits [..., E] -> (weights [..., k] summing to 1, experts [..., k],
    probs [..., E])."""
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    return weights / weights.sum(-1, keepdims=True), experts, probs


def router_losses(logits: jax.Array, probs: jax.Array, experts: jax.Array) -> Aux:
    """Switch balancing loss (1.0 when uniform), z-loss, and the per-expert routed fraction f."""
    n_experts = logits.shape[-1]
    counts = jax.nn.one_hot(experts, n_experts, dtype=jnp.float32).sum(axis=-2)  # [..., E]
    frac = counts.reshape(-1, n_experts).mean(0) / experts.shape[-1]
    mean_prob = probs.reshape(-1, n_experts).mean(0)
    z = jnp.square(jax.nn.logsumexp(logits, axis=-1)).mean()
    return {"balance_loss": n_experts * jnp.sum(frac * mean_prob), "z_loss": z,
            "expert_frac": frac}


def swiglu(dot: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array,
           gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
    """down(silu(gate x) * up x) for all experts at once; `dot` applies per-expert weights."""
    return dot(nn.silu(dot(x, gate)) * dot(x, up), down)


def expert_matmul(a: jax.Array, w: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """[G, rows, in] x [G, in, out] -> [G, rows, out]: one matmul per expert (or block). The
    batch dimension leads: XLA:CPU refuses bf16 batched dots whose batch dimension is not the
    leading one."""
    return matmul("egi,eio->ego", a, w, dtype)


def capacity_dispatch(x: jax.Array, experts: jax.Array, weights: jax.Array, n_experts: int,
                      slots: int, expert_fn: Callable[[jax.Array], jax.Array]
                      ) -> tuple[jax.Array, jax.Array]:
    """x [B, T, D], choices [B, T, k] -> (y [B, T, D], kept [B, T, k]); expert_fn maps the
    padded buffer [E, B, C, D] to the experts' outputs of the same shape."""
    b, t, d = x.shape
    choice = experts.reshape(b, -1)  # [B, T*k], token-major: a token's choices before the next's
    slot = rank_in_expert(choice, n_experts)
    kept = slot < slots
    rows = n_experts * b * slots  # the buffer's rows, flat in [E, B, C] order (no transposes)
    dest = jnp.where(kept, (choice * b + jnp.arange(b)[:, None]) * slots + slot, rows)
    buffer, combine = dispatch_rows(x.reshape(-1, d), dest.reshape(b * t, -1), rows)
    out = expert_fn(nn.with_logical_constraint(buffer.reshape(n_experts, b, slots, d), EBCD))
    picked = combine(nn.with_logical_constraint(out, EBCD).reshape(rows, d))
    picked = picked.reshape(*experts.shape, d)
    return (picked * weights[..., None]).sum(-2), kept.reshape(experts.shape)


def dispatch_rows(tokens: jax.Array, dest: jax.Array, rows: int
                  ) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
    """tokens [N, D], dest [N, k]: each choice's row in a buffer of `rows` rows (`rows`: dropped)
    -> (buffer [rows, D], its rows' tokens, zero where no choice landed; combine: the experts'
    output rows [rows, D] -> [N, k, D], each choice's row, zero where dropped).

    Both moves are `move_rows` with the map and its inverse swapped, so each one's gradient is
    the other one (a gather), not autodiff's scatter-add into a zeroed buffer."""
    n, k = dest.shape
    occupant = jnp.full(rows + 1, n * k).at[dest.reshape(-1)].set(jnp.arange(n * k))[:rows]
    buffer = move_rows(tokens, occupant // k, dest)  # n * k // k = n: an empty row
    return buffer, lambda out: move_rows(out, dest, occupant[:, None])


@jax.custom_vjp
def move_rows(x: jax.Array, index: jax.Array, inverse: jax.Array) -> jax.Array:
    """x [R, D] -> [*index.shape, D], row x[index] (out of range: a zero row).

    `inverse` [R, r] lists, for each row of x, the flat positions of the result that read it
    (out of range: none); every position reads at most one row, so the gradient is a gather by
    `inverse` summed over r. On XLA:CPU (jax 0.10.2) autodiff's scatter-add with its zeroed
    buffer, and the [B, E*C, D] buffers' transposes into expert-major order that this layout
    avoids, cost 2-8% of a moe_tiny train step (docs/performance.md).
    """
    return jnp.take(x, index, axis=0, mode="fill", fill_value=0)


def _move_rows_fwd(x: jax.Array, index: jax.Array, inverse: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
    return move_rows(x, index, inverse), inverse


def _move_rows_bwd(inverse: jax.Array, g: jax.Array) -> tuple[jax.Array, None, None]:
    grad = jnp.take(g.reshape(-1, g.shape[-1]), inverse, axis=0, mode="fill", fill_value=0)
    return grad.sum(-2), None, None


move_rows.defvjp(_move_rows_fwd, _move_rows_bwd)


def rank_in_expert(choice: jax.Array, n_experts: int) -> jax.Array:
    """[..., n] expert choices -> [..., n] how many earlier choices along the last axis picked
    the same expert (token order: a choice's rank among its expert's choices)."""
    onehot = jax.nn.one_hot(choice, n_experts, dtype=jnp.int32, axis=-2)  # [..., E, n]
    return (cumsum(onehot) * onehot).sum(-2) - 1


def block_rows(choices: int, n_experts: int) -> int:
    """Rows per block of the dropless path: the largest power of two <= choices / (4 E), at least
    8. Padding each expert's group to whole blocks then adds at most E (block - 1) <= choices / 4
    rows, while the blocks stay large enough for efficient matmuls (docs/moe.md)."""
    return max(8, 1 << max(0, (choices // (4 * n_experts)).bit_length() - 1))


def dropless_dispatch(x: jax.Array, experts: jax.Array, weights: jax.Array,
                      params: tuple[jax.Array, jax.Array, jax.Array], dtype: jnp.dtype
                      ) -> jax.Array:
    """x [B, T, D], choices [B, T, k] -> y [B, T, D]: every choice computed, none dropped.

    Block-sparse grouped matmul (MegaBlocks-style): the B*T*k choices are laid out by expert, in
    token order, each expert's group padded to whole blocks of `block_rows` rows, so every block
    holds one expert's choices; one batched matmul over the blocks runs each block against its
    expert's weights. The layout is static: the worst-case padding, E (block - 1) rows, is always
    allocated (unused blocks hold zero rows). On XLA:CPU this is ~10x faster than
    `jax.lax.ragged_dot` over the sorted rows (docs/moe.md).
    """
    d, n_experts = x.shape[-1], params[0].shape[0]
    choice = experts.reshape(-1)
    block = block_rows(choice.size, n_experts)
    n_blocks = -(-(choice.size + n_experts * (block - 1)) // block)
    sizes = -(-jnp.bincount(choice, length=n_experts) // block) * block  # padded group sizes
    ends = jnp.cumsum(sizes)
    dest = (ends - sizes)[choice] + rank_in_expert(choice, n_experts)  # each choice's row
    n_rows = n_blocks * block  # padding rows stay zero
    blocks, combine = dispatch_rows(x.reshape(-1, d), dest.reshape(-1, experts.shape[-1]), n_rows)
    blocks = blocks.reshape(n_blocks, block, d)
    block_expert = jnp.minimum(jnp.searchsorted(ends, jnp.arange(n_blocks) * block, "right"),
                               n_experts - 1)  # unused blocks: the last expert, on zero rows

    dot = functools.partial(expert_matmul, dtype=dtype)
    out = swiglu(dot, blocks, *(w[block_expert] for w in params)).reshape(n_rows, d)
    picked = combine(out).reshape(*experts.shape, d)
    return (picked * weights[..., None]).sum(-2)


class MoE(nn.Module):
    """Routed (+ shared) SwiGLU experts. Returns (y, aux) like every feed-forward.

    In decode mode (the "cache" collection is mutable, see research/generate.py) the capacity
    path gets C = T slots, so no token is ever dropped: a generated token's output then does not
    depend on how the prompt was chunked, and equals the dropless result.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, Aux]:
        cfg, moe = self.cfg, self.cfg.moe
        d, f, e = cfg.d_model, moe.d_expert or cfg.ff_size, moe.n_experts
        dtype = jnp.dtype(cfg.compute_dtype)

        def param(name: str, shape: tuple[int, ...], axes: tuple[str, ...], std: float):
            init = nn.with_logical_partitioning(nn.initializers.normal(std), axes)
            return self.param(name, init, shape, jnp.dtype(cfg.param_dtype))

        params = (param("gate", (e, d, f), ("expert", "embed", "mlp"), cfg.init_std),
                  param("up", (e, d, f), ("expert", "embed", "mlp"), cfg.init_std),
                  param("down", (e, f, d), ("expert", "mlp", "embed"), out_std(cfg)))
        logits = Einsum("btd,de->bte", (d, e), ("embed", None), cfg.init_std, "float32",
                        cfg.param_dtype, cfg.projection, name="router")(x)
        weights, experts, probs = route(logits, moe.top_k)
        aux = router_losses(logits, probs, experts)

        if moe.dispatch == "dropless":
            y = dropless_dispatch(x, experts, weights, params, dtype)
            aux["drop_frac"] = jnp.zeros((), jnp.float32)
        else:
            def expert_fn(buffer: jax.Array) -> jax.Array:
                flat = buffer.reshape(e, -1, d)  # [E, B*C, D]: one matmul per expert
                dot = functools.partial(expert_matmul, dtype=dtype)
                return swiglu(dot, flat, *params).reshape(buffer.shape)

            decoding = self.is_mutable_collection("cache") and not self.is_initializing()
            slots = x.shape[1] if decoding else capacity(x.shape[1], moe)
            y, kept = capacity_dispatch(x, experts, weights, e, slots, expert_fn)
            aux["drop_frac"] = (~kept).sum().astype(jnp.float32) / kept.size  # exactly 0: a count

        if moe.n_shared_experts:
            shared = cfg.model_copy(update={"d_ff": moe.n_shared_experts * f})
            y = y + MLP(shared, name="shared")(x)[0]
        aux["aux_loss"] = moe.balance_coef * aux["balance_loss"] + moe.z_loss_coef * aux["z_loss"]
        return y, {k if k == "aux_loss" else f"moe/{k}": v for k, v in aux.items()}
