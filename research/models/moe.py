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
- dropless: all top_k choices of a batch shard's tokens laid out by expert in blocks (each
  expert's group padded to whole blocks), run through one batched matmul over the blocks, each
  with its expert's weights (block-sparse, MegaBlocks-style). Nothing is dropped.
Both move rows only within a sequence (capacity) or a batch shard (dropless), so a batch split
over devices stays split.

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
from research.parallel.mesh import logical_axis_size

Aux = dict[str, jax.Array]
EBCD = ("act_expert", "act_batch", None, "act_embed")  # the capacity buffers, on their experts
BCD = (None, "act_batch", None, "act_embed")  # the same, back with their tokens' devices


def capacity(tokens: int, cfg: MoEConfig) -> int:
    """Slots per expert for a group of `tokens`: ceil(factor * tokens * top_k / E), at least 1,
    at most `tokens` (an expert never sees a token twice, so more slots would stay empty)."""
    return max(1, min(tokens, math.ceil(cfg.capacity_factor * tokens * cfg.top_k / cfg.n_experts)))


def route(logits: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """float32 router logits [..., E] -> (weights [..., k] summing to 1, experts [..., k],
    probs [..., E])."""
    probs = jax.nn.softmax(logits, axis=-1)
    experts = top_indices(probs, top_k)
    weights = jnp.take_along_axis(probs, experts, axis=-1)
    return weights / weights.sum(-1, keepdims=True), experts, probs


def top_indices(x: jax.Array, k: int) -> jax.Array:
    """[..., n] -> [..., k] the indices of the k largest values, largest first, the lower index
    first among equals (as lax.top_k). k argmax passes: XLA's SPMD partitioner leaves lax.top_k
    unpartitioned (on a batch split over devices it all-gathered the router's probabilities), and
    on XLA:CPU the passes take 0.04 ms at moe_tiny's [16, 128, 8] where top_k takes 0.11 and a
    stable argsort 0.97."""
    picked = []
    for _ in range(k):
        picked.append(jnp.argmax(x, axis=-1))
        x = jnp.where(jnp.arange(x.shape[-1]) == picked[-1][..., None], -jnp.inf, x)
    return jnp.stack(picked, axis=-1)


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


def expert_matmul(a: jax.Array, w: jax.Array, dtype: jnp.dtype,
                  backward_dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """[G, rows, in] x [G, in, out] -> [G, rows, out]: one matmul per expert (or block). The
    batch dimension leads: XLA:CPU refuses bf16 batched dots whose batch dimension is not the
    leading one."""
    return matmul("egi,eio->ego", a, w, dtype, backward_dtype=backward_dtype)


def capacity_dispatch(x: jax.Array, experts: jax.Array, weights: jax.Array, n_experts: int,
                      slots: int, expert_fn: Callable[[jax.Array], jax.Array]
                      ) -> tuple[jax.Array, jax.Array]:
    """x [B, T, D], choices [B, T, k] -> (y [B, T, D], kept [B, T, k]); expert_fn maps the
    padded buffer [E, B, C, D] to the experts' outputs of the same shape."""
    b, t, k = experts.shape
    slot = rank_in_expert(experts.reshape(b, -1), n_experts).reshape(b, t, k)  # token order
    kept = slot < slots
    dest = jnp.stack([jnp.where(kept, experts, n_experts), jnp.where(kept, slot, 0)], -1)
    buffer, combine = dispatch_rows(x, dest, n_experts, slots)
    # Filled and emptied on the tokens' devices (BCD), computed on the experts' (EBCD): under
    # expert parallelism each move between them is an all-to-all, forward and backward; without
    # these, XLA gathered masked rows on every expert shard and all-reduced them.
    buffer = nn.with_logical_constraint(nn.with_logical_constraint(buffer, BCD), EBCD)
    out = nn.with_logical_constraint(expert_fn(buffer), EBCD)
    picked = combine(nn.with_logical_constraint(out, BCD))
    return (picked * weights[..., None]).sum(-2), kept


def dispatch_rows(tokens: jax.Array, dest: jax.Array, groups: int, slots: int
                  ) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
    """tokens [B, T, D] (B independent sets of T rows: sequences, or batch shards' tokens),
    dest [B, T, k, 2]: each choice's (group, slot) among its own set's slots of a buffer
    [groups, B, slots, D] (group >= groups: dropped) -> (the buffer, zero where no choice
    landed; combine: the experts' output [groups, B, slots, D] -> [B, T, k, D], each choice's
    row, zero where dropped).

    Every move keeps the batch as a batching dimension of its gather or scatter, so a batch split
    over devices stays split (flat row indices over the whole batch made XLA all-gather the
    tokens and buffers). Both moves are `move_rows` with the map and its inverse swapped, so each
    one's gradient is the other one (a gather), not autodiff's scatter-add into a zeroed buffer.
    """
    b, t, k, _ = dest.shape
    flat = dest.reshape(b, t * k, 2)

    def occupants(dest: jax.Array) -> jax.Array:  # one sequence: [T*k, 2] -> [groups, slots]
        empty = jnp.full((groups, slots), t * k)
        return empty.at[dest[:, 0], dest[:, 1]].set(jnp.arange(t * k), mode="drop")

    occupant = jax.vmap(occupants, out_axes=1)(flat)  # [groups, B, slots]: a choice, or t*k
    buffer = move_rows(into_buffer, out_of_buffer, tokens, occupant // k, dest)  # t: a zero row
    return buffer, lambda out: move_rows(out_of_buffer, into_buffer, out, flat,
                                         occupant[..., None]).reshape(b, t, k, -1)


def into_buffer(rows: jax.Array, index: jax.Array) -> jax.Array:
    """rows [B, N, D], index [G, B, S, *r] -> [G, B, S, *r, D]: rows[b, index] (>= N: zeros)."""
    dims = jax.lax.GatherDimensionNumbers(
        offset_dims=(index.ndim,), collapsed_slice_dims=(1,), start_index_map=(1,),
        operand_batching_dims=(0,), start_indices_batching_dims=(1,))
    return jax.lax.gather(rows, index[..., None], dims, (1, 1, rows.shape[-1]),
                          mode="fill", fill_value=0)


def out_of_buffer(buffer: jax.Array, index: jax.Array) -> jax.Array:
    """buffer [G, B, S, D], index [B, N, *r, 2] (group, slot) -> [B, N, *r, D]: buffer[group, b,
    slot] (group >= G: zeros)."""
    dims = jax.lax.GatherDimensionNumbers(
        offset_dims=(index.ndim - 1,), collapsed_slice_dims=(0, 2), start_index_map=(0, 2),
        operand_batching_dims=(1,), start_indices_batching_dims=(0,))
    return jax.lax.gather(buffer, index, dims, (1, 1, 1, buffer.shape[-1]),
                          mode="fill", fill_value=0)


Read = Callable[[jax.Array, jax.Array], jax.Array]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def move_rows(read: Read, read_back: Read, x: jax.Array, index: jax.Array, inverse: jax.Array
              ) -> jax.Array:
    """read(x, index): rows of x moved by a gather.

    `inverse` lists, for each row of x, the positions of the result that read it (out of range:
    none), with a trailing axis r; every position reads at most one row, so the gradient is
    `read_back(g, inverse)` summed over r. On XLA:CPU (jax 0.10.2) autodiff's scatter-add with
    its zeroed buffer, and the [B, E*C, D] buffers' transposes into expert-major order that
    this layout avoids, cost 2-8% of a moe_tiny train step (docs/performance.md).
    """
    return read(x, index)


def _move_rows_fwd(read: Read, read_back: Read, x: jax.Array, index: jax.Array,
                   inverse: jax.Array) -> tuple[jax.Array, jax.Array]:
    return read(x, index), inverse


def _move_rows_bwd(read: Read, read_back: Read, inverse: jax.Array, g: jax.Array
                   ) -> tuple[jax.Array, None, None]:
    return read_back(g, inverse).sum(-2), None, None


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
                      params: tuple[jax.Array, jax.Array, jax.Array],
                      dot: Callable[[jax.Array, jax.Array], jax.Array],
                      groups: int = 1) -> jax.Array:
    """x [B, T, D], choices [B, T, k] -> y [B, T, D]: every choice computed, none dropped;
    `dot` is the per-expert matmul (`expert_matmul` with the model's dtypes).

    Block-sparse grouped matmul (MegaBlocks-style): each group's choices (`groups` consecutive
    slices of the batch: one per batch shard, so no choice leaves its device) are laid out by
    expert, in token order, each expert's choices padded to whole blocks of `block_rows` rows,
    so every block holds one expert's choices; one batched matmul over all groups' blocks runs
    each block against its expert's weights. The layout is static: the worst-case padding,
    E (block - 1) rows per group, is always allocated (unused blocks hold zero rows). On
    XLA:CPU this is ~10x faster than `jax.lax.ragged_dot` over the sorted rows (docs/moe.md).
    """
    d, n_experts, k = x.shape[-1], params[0].shape[0], experts.shape[-1]
    choice = experts.reshape(groups, -1)  # [G, n]
    n = choice.shape[1]
    block = block_rows(n, n_experts)
    n_blocks = -(-(n + n_experts * (block - 1)) // block)
    count = jax.vmap(functools.partial(jnp.bincount, length=n_experts))(choice)
    sizes = -(-count // block) * block  # [G, E] padded expert sizes
    ends = jnp.cumsum(sizes, axis=-1)
    row = jnp.take_along_axis(ends - sizes, choice, -1) + rank_in_expert(choice, n_experts)
    dest = jnp.stack([row // block, row % block], -1).reshape(groups, -1, k, 2)
    blocks, combine = dispatch_rows(x.reshape(groups, -1, d), dest, n_blocks, block)
    starts = jnp.arange(n_blocks) * block
    block_expert = jnp.minimum(jax.vmap(lambda e: jnp.searchsorted(e, starts, "right"))(ends),
                               n_experts - 1)  # [G, n_blocks]; unused: the last, on zero rows

    # group-major, so a device's blocks stay one contiguous (shardable) run of the batched matmul
    grouped = blocks.swapaxes(0, 1).reshape(-1, block, d)  # padding rows stay zero
    out = swiglu(dot, grouped, *(w[block_expert.reshape(-1)] for w in params))
    out = out.reshape(groups, n_blocks, block, d).swapaxes(0, 1)
    picked = combine(out).reshape(*experts.shape, d)
    return (picked * weights[..., None]).sum(-2)


def batch_groups(batch: int) -> int:
    """How many slices of a batch of `batch` rows lie on different devices: the devices that
    split "act_batch", at most a divisor of `batch`."""
    return math.gcd(batch, logical_axis_size("act_batch"))


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
        dot = functools.partial(expert_matmul, dtype=jnp.dtype(cfg.compute_dtype),
                                backward_dtype=jnp.dtype(cfg.backward_dtype))

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
            y = dropless_dispatch(x, experts, weights, params, dot, batch_groups(x.shape[0]))
            aux["drop_frac"] = jnp.zeros((), jnp.float32)
        else:
            def expert_fn(buffer: jax.Array) -> jax.Array:
                flat = buffer.reshape(e, -1, d)  # [E, B*C, D]: one matmul per expert
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
