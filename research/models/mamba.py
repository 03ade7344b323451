"""The Mamba-2 mixer (Dao & Gu 2024, "Transformers are SSMs"): a selective state-space layer
computed by the chunked SSD algorithm, i.e. mostly as matmuls.

Per head (H heads of size P, state size N, G groups sharing B and C like kv heads share k, v):

    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T        h_t in R^{P x N}, A < 0 a scalar per head
    y_t = h_t C_t + D x_t

`ssd_chunked` evaluates the recurrence in chunks of Q steps: within a chunk it is a masked
(Q x Q) "attention" C B^T weighted by decays; across chunks only the [P, N] states are passed.
`ssd_sequential` is the plain step-by-step scan, the reference for tests and the benchmark.

Decode: the conv keeps its last conv_width-1 inputs and the SSD its final state in the "cache"
collection, and new tokens continue from them through the same chunked SSD (a prefill runs in
matmul form, a single token is a chunk of one). The formulas are in docs/mamba.md.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.config import ModelConfig
from research.models.layers import BTD, Einsum, out_std

BTHP = ("act_batch", "act_seq", "act_mamba_heads", None)
BTH = ("act_batch", "act_seq", "act_mamba_heads")
BTGN = ("act_batch", "act_seq", None, None)


def cumsum(a: jax.Array, reverse: bool = False) -> jax.Array:
    """Cumulative sum over the last axis as a log-depth scan. jnp.cumsum lowers to a
    reduce_window, which XLA:CPU computes in O(T^2) and re-evaluates inside every fused consumer
    (6x slower SSD here)."""
    return jax.lax.associative_scan(jnp.add, a, reverse=reverse, axis=a.ndim - 1)


def decays(cum: jax.Array) -> jax.Array:
    """Cumulative log-decays [..., T] -> [..., T, T]: out[i, j] = exp(cum[i] - cum[j]) for i >= j,
    the decay from step j to step i, and 0 above the diagonal.

    A difference of cumulative sums, so the exponent's rounding error is ~1e-7 x |cum|
    (float32); masking to -inf *before* exp() keeps the positive differences above the diagonal
    from overflowing.
    """
    t = cum.shape[-1]
    lower = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]
    return jnp.exp(jnp.where(lower, cum[..., :, None] - cum[..., None, :], -jnp.inf))


def sum_heads(v: jax.Array, heads_per_group: int) -> jax.Array:
    """[b, H, ...] -> [b, G, ...]: the sum of each group's heads (the transpose of jnp.repeat
    over axis 1) as a chain of slice adds: XLA:CPU (jax 0.10.2) lowers a reduce over the
    repeated axis to a YNNPACK reduction 10x slower (a profile: 70 of 215 ms of the SSD's
    backward)."""
    v = v.reshape(v.shape[0], -1, heads_per_group, *v.shape[2:])
    return functools.reduce(jnp.add, [v[:, :, r] for r in range(heads_per_group)])


def ssd_chunked(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array,
                chunk_size: int, initial_state: jax.Array | None = None,
                ) -> tuple[jax.Array, jax.Array]:
    """The SSD recurrence (module docstring, without D) in chunks of `chunk_size`, as matmuls.

    x [b, T, H, P], dt [b, T, H] (> 0), A [H] (< 0), B, C [b, T, G, N] with head h reading group
    h // (H / G); initial_state [b, H, P, N] or None (zeros). Returns y [b, T, H, P] and the state
    after the last step [b, H, P, N], computed in float32 (float64 for float64 inputs).

    T need not be a multiple of the chunk: the tail is padded with dt = 0, i.e. a decay of exactly
    1 and no input, so padding changes neither the final state nor (being later) any real output.
    A sequence shorter than a chunk is one chunk of its own length.

    The gradient is hand-written (`_ssd_backward`, formulas in docs/mamba.md): autodiff's
    backward of the same forward ran ~30 elementwise ops over the [q, q] score and decay
    matrices; this one needs a single product of them and gets every decay gradient from
    row sums of products the matmuls already give.
    """
    dtype = jnp.result_type(x, dt, A, B, C, jnp.float32)
    if initial_state is None:
        initial_state = jnp.zeros((x.shape[0], x.shape[2], x.shape[3], B.shape[-1]), dtype)
    y, state = _ssd(*(v.astype(dtype) for v in (x, dt, A, B, C, initial_state)), chunk_size)
    return y, state


class _Chunked(NamedTuple):
    """The forward's values in the head-major chunk layout [b, heads, c, q, ...] (every matmul a
    batched dot with its batch dimensions leading), kept for the backward."""

    xdt: jax.Array  # dt_t x_t  [b, H, c, q, P]
    B: jax.Array  # [b, G, c, q, N]
    C: jax.Array  # [b, G, c, q, N]
    a_cum: jax.Array  # log-decay from the chunk's start to each step  [b, H, c, q]
    decay: jax.Array  # within-chunk decays(a_cum)  [b, H, c, q, q]
    scores: jax.Array  # (C_l . B_s) decay[l, s]  [b, H, c, q, q]
    chunk_decay: jax.Array  # decays between chunk boundaries  [b, H, c + 1, c + 1]
    inputs: jax.Array  # initial state, then what each chunk adds  [b, H, c + 1, P, N]
    states: jax.Array  # state at each chunk boundary  [b, H, c + 1, P, N]
    y: jax.Array  # [b, H, c, q, P]


def _chunks(v: jax.Array, q: int) -> jax.Array:
    """[b, T, heads, ...] -> [b, heads, c, q, ...], T padded with zeros to c * q."""
    b, t = v.shape[:2]
    c = -(-t // q)
    v = jnp.pad(v, [(0, 0), (0, c * q - t)] + [(0, 0)] * (v.ndim - 2))
    return jnp.moveaxis(v, 2, 1).reshape(b, v.shape[2], c, q, *v.shape[3:])


def _unchunk(v: jax.Array, t: int) -> jax.Array:
    """[b, heads, c, q, ...] -> [b, t, heads, ...], the padding dropped."""
    b, heads, c, q = v.shape[:4]
    return jnp.moveaxis(v.reshape(b, heads, c * q, *v.shape[4:]), 1, 2)[:, :t]


def _ssd_forward(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array,
                 initial_state: jax.Array, chunk_size: int) -> _Chunked:
    b, t, H, P = x.shape
    G, N = B.shape[-2:]
    R = H // G
    q = min(chunk_size, t)
    xdt = _chunks(x * dt[..., None], q)
    B, C = _chunks(B, q), _chunks(C, q)
    a_cum = cumsum(_chunks(dt * A, q))
    # 1. within each chunk: y_l = sum_{s <= l} (C_l . B_s) decay[l, s] dt_s x_s
    decay = decays(a_cum)
    scores = jnp.repeat(jnp.einsum("bgcln,bgcsn->bgcls", C, B), R, axis=1) * decay
    y = jnp.einsum("bhcls,bhcsp->bhclp", scores, xdt)
    # 2. what each chunk adds to the state at its end
    to_end = jnp.exp(a_cum[..., -1:] - a_cum)
    added = jnp.einsum("bhcsp,bhcsn->bhcpn", xdt * to_end[..., None], jnp.repeat(B, R, axis=1))
    # 3. pass states across chunks: state at the start of chunk z, and after the last chunk
    inputs = jnp.concatenate([initial_state[:, :, None], added], 2)
    chunk_decay = decays(cumsum(jnp.pad(a_cum[..., -1], [(0, 0), (0, 0), (1, 0)])))
    c = a_cum.shape[2]
    states = jnp.einsum("bhzc,bhcm->bhzm", chunk_decay, inputs.reshape(b, H, c + 1, P * N))
    states = states.reshape(inputs.shape)
    # 4. each step reads the state entering its chunk, decayed to the step
    y_off = jnp.einsum("bhcln,bhcpn->bhclp", jnp.repeat(C, R, axis=1), states[:, :, :-1])
    y = y + y_off * jnp.exp(a_cum)[..., None]
    return _Chunked(xdt, B, C, a_cum, decay, scores, chunk_decay, inputs, states, y)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _ssd(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array,
         initial_state: jax.Array, chunk_size: int) -> tuple[jax.Array, jax.Array]:
    f = _ssd_forward(x, dt, A, B, C, initial_state, chunk_size)
    return _unchunk(f.y, x.shape[1]), f.states[:, :, -1]


def _ssd_fwd(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array,
             initial_state: jax.Array, chunk_size: int):
    f = _ssd_forward(x, dt, A, B, C, initial_state, chunk_size)
    return (_unchunk(f.y, x.shape[1]), f.states[:, :, -1]), (f, x, dt, A)


def _ssd_backward(chunk_size: int, saved: tuple[_Chunked, jax.Array, jax.Array, jax.Array],
                  grads: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, ...]:
    """Gradients w.r.t. x, dt, A, B, C, initial_state; the steps of `_ssd_forward` in reverse.

    Every log-decay enters as a difference of cumulative sums, and d/d(exponent) of
    exp(exponent) * (product) is that term itself, so the gradient w.r.t. a_cum[l] is a row sum
    minus a column sum of (decayed product x its cotangent), which the matmuls already hold:
    sum_p dy y (rows of steps 1 and 4), sum_p dxdt xdt (columns of steps 1 and 2), and per
    chunk boundary <d state, state> - <d input, input> (step 3). docs/mamba.md derives them.
    """
    f, x, dt, A = saved
    dy, d_final = grads
    b, t, H, P = x.shape
    G, N = f.B.shape[1], f.B.shape[-1]
    R, c, q = H // G, f.a_cum.shape[2], f.a_cum.shape[3]
    dy = _chunks(dy, q)
    # 4. y_off = (C_h states^T) exp(a_cum)
    dy_off = dy * jnp.exp(f.a_cum)[..., None]
    dC = jnp.einsum("bhclp,bhcpn->bhcln", dy_off, f.states[:, :, :-1])
    d_states = jnp.einsum("bhclp,bhcln->bhcpn", dy_off, jnp.repeat(f.C, R, axis=1))
    d_states = jnp.concatenate([d_states, d_final[:, :, None]], 2)
    # 3. states = chunk_decay inputs
    d_inputs = jnp.einsum("bhzc,bhzm->bhcm", f.chunk_decay,
                          d_states.reshape(b, H, c + 1, P * N)).reshape(d_states.shape)
    input_products = jnp.sum(d_inputs * f.inputs, (-2, -1))  # [b, H, c + 1]
    d_boundaries = jnp.sum(d_states * f.states, (-2, -1)) - input_products
    d_added = d_inputs[:, :, 1:]
    # 2. added = (xdt to_end)^T B_h
    to_end = jnp.exp(f.a_cum[..., -1:] - f.a_cum)[..., None]
    dxdt = jnp.einsum("bhcsn,bhcpn->bhcsp", jnp.repeat(f.B, R, axis=1), d_added) * to_end
    dB = jnp.einsum("bhcsp,bhcpn->bhcsn", f.xdt * to_end, d_added)
    # 1. y = (CB_h * decay) xdt
    d_scores = jnp.einsum("bhclp,bhcsp->bhcls", dy, f.xdt)
    dxdt = dxdt + jnp.einsum("bhcls,bhclp->bhcsp", f.scores, dy)
    dCB = sum_heads(d_scores * f.decay, R)
    dC = sum_heads(dC, R) + jnp.einsum("bgcls,bgcsn->bgcln", dCB, f.B)
    dB = sum_heads(dB, R) + jnp.einsum("bgcls,bgcln->bgcsn", dCB, f.C)
    # the decays: a_cum = cumsum(dt A) within each chunk; a chunk's total reaches the later ones
    d_a_cum = jnp.sum(dy * f.y - f.xdt * dxdt, -1)
    d_a_cum = d_a_cum.at[..., -1].add(input_products[..., 1:]
                                       + cumsum(d_boundaries, reverse=True)[..., 1:])
    da = _unchunk(cumsum(d_a_cum, reverse=True), t)
    dxdt = _unchunk(dxdt, t)
    return (dxdt * dt[..., None], jnp.sum(dxdt * x, -1) + da * A, jnp.sum(da * dt, (0, 1)),
            _unchunk(dB, t), _unchunk(dC, t), d_inputs[:, :, 0])


_ssd.defvjp(_ssd_fwd, _ssd_backward)


def ssd_sequential(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array,
                   initial_state: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """The same recurrence one step at a time (lax.scan): the reference for `ssd_chunked`."""
    b, t, H, P = x.shape
    R = H // B.shape[-2]
    dtype = jnp.result_type(x, dt, A, B, C, jnp.float32)
    B, C = jnp.repeat(B, R, axis=2), jnp.repeat(C, R, axis=2)  # groups -> heads
    state = jnp.zeros((b, H, P, B.shape[-1]), dtype) if initial_state is None else initial_state

    def step(h: jax.Array, inputs: tuple[jax.Array, ...]) -> tuple[jax.Array, jax.Array]:
        x_t, dt_t, B_t, C_t = inputs
        h = (jnp.exp(dt_t * A)[..., None, None] * h
             + (dt_t[..., None] * x_t)[..., None] * B_t[:, :, None, :])
        return h, jnp.einsum("bhpn,bhn->bhp", h, C_t)

    time_major = [v.astype(dtype).swapaxes(0, 1) for v in (x, dt, B, C)]
    state, y = jax.lax.scan(step, state.astype(dtype), time_major)
    return y.swapaxes(0, 1), state


class CausalConv(nn.Module):
    """Depthwise causal convolution over time of x [B, T, *channels], with bias, then SiLU.

    Weights and bias init as PyTorch's Conv1d (uniform +-1/sqrt(width)), which Mamba-2 keeps.
    In decode mode the last width-1 inputs live in the "cache" collection and stand in for the
    zero left-padding of the parallel form.
    """

    width: int
    axes: tuple[str | None, ...]  # logical names of the channel dims
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array, decode: bool = False) -> jax.Array:
        channels, w = x.shape[2:], self.width

        def init(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
            return jax.random.uniform(key, shape, dtype, -1 / w**0.5, 1 / w**0.5)

        dtype = jnp.dtype(self.param_dtype)
        kernel_init = nn.with_logical_partitioning(init, ("mamba_conv", *self.axes))
        kernel = self.param("kernel", kernel_init, (w, *channels), dtype)
        bias = self.param("bias", nn.with_logical_partitioning(init, self.axes), channels, dtype)
        history = jnp.zeros((x.shape[0], w - 1, *channels), x.dtype)
        if decode:
            cache = self.variable("cache", "inputs", jnp.zeros, history.shape, x.dtype)
            history = cache.value
        padded = jnp.concatenate([history, x], axis=1)
        if decode and not self.is_initializing():
            cache.value = padded[:, padded.shape[1] - (w - 1):]
        t = x.shape[1]
        y = sum(kernel[k] * padded[:, k:k + t] for k in range(w)) + bias
        return nn.silu(y)


class Mamba2(nn.Module):
    """Mamba-2 mixer: (x [B, T, D], positions, decode) -> (y [B, T, D], {}).

    in-projections -> causal conv + SiLU on x, B, C -> SSD -> + D x -> RMSNorm(y * silu(z)), per
    group -> out-projection. The input projection is held as two kernels, per head (z, x, dt)
    and per group (B, C), so that under tensor parallelism each shards along its own axis.
    Positions are unused: the recurrence itself orders the tokens. Segment ids are unused too:
    only padded rows reach a Mamba layer (padding follows the tokens, and the scan never reads
    ahead); the config refuses packed examples for models with Mamba layers.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, u: jax.Array, positions: jax.Array, decode: bool = False,
                 segment_ids: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        cfg, m = self.cfg, self.cfg.mamba
        d, P, G, N = cfg.d_model, m.head_dim, m.n_groups, m.d_state
        H = m.n_heads(d)
        proj = dict(dtype=cfg.compute_dtype, param_dtype=cfg.param_dtype, projection=cfg.projection)
        zxdt = Einsum("btd,dhc->bthc", (d, H, 2 * P + 1), ("embed", "mamba_heads", None),
                      cfg.init_std, name="in_zxdt", **proj)(u)
        bc = Einsum("btd,dgc->btgc", (d, G, 2 * N), ("embed", "mamba_groups", None),
                    cfg.init_std, name="in_bc", **proj)(u)
        z = nn.with_logical_constraint(zxdt[..., :P], BTHP)
        x = nn.with_logical_constraint(zxdt[..., P:2 * P], BTHP)
        x = CausalConv(m.conv_width, ("mamba_heads", None), cfg.param_dtype, name="conv_x")(
            x, decode)
        bc = CausalConv(m.conv_width, ("mamba_groups", None), cfg.param_dtype, name="conv_bc")(
            nn.with_logical_constraint(bc, BTGN), decode)
        B, C = bc[..., :N], bc[..., N:]

        heads = lambda init: nn.with_logical_partitioning(init, ("mamba_heads",))  # noqa: E731
        param_dtype = jnp.dtype(cfg.param_dtype)
        dt_bias = self.param("dt_bias", heads(self._dt_bias_init), (H,), param_dtype)
        A_log = self.param("A_log", heads(self._a_log_init), (H,), param_dtype)
        D = self.param("D", heads(nn.initializers.ones), (H,), param_dtype)
        dt = nn.with_logical_constraint(jax.nn.softplus(zxdt[..., 2 * P] + dt_bias), BTH)

        state = None
        if decode:
            cache = self.variable("cache", "ssm", jnp.zeros, (u.shape[0], H, P, N), jnp.float32)
            state = cache.value
        y, state = ssd_chunked(x, dt, -jnp.exp(A_log), B, C, m.chunk_size, state)
        if decode and not self.is_initializing():
            cache.value = state
        y = nn.with_logical_constraint(y + D[:, None] * x, BTHP)

        # gated RMSNorm over each group's H/G heads: norm(y * silu(z)) * scale
        y = (y * nn.silu(z)).reshape(*y.shape[:2], G, H // G * P)
        y = y * jax.lax.rsqrt(jnp.mean(y * y, axis=-1, keepdims=True) + cfg.norm_eps)
        scale = self.param("norm", nn.with_logical_partitioning(nn.initializers.ones,
                                                                ("mamba_heads", "norm")),
                           (H, P), param_dtype)
        y = nn.with_logical_constraint(y.reshape(*y.shape[:2], H, P) * scale, BTHP)
        out = Einsum("bthp,hpd->btd", (H, P, d), ("mamba_heads", "head_dim", "embed"),
                     out_std(cfg), name="out", **proj)(y)
        return nn.with_logical_constraint(out, BTD), {}

    def _dt_bias_init(self, key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
        """softplus^-1 of dt ~ log-uniform[dt_min, dt_max] (floored at 1e-4), so that
        softplus(0 + dt_bias) starts each head at its own time scale."""
        m = self.cfg.mamba
        log_dt = jax.random.uniform(key, shape, dtype, jnp.log(m.dt_min), jnp.log(m.dt_max))
        dt = jnp.maximum(jnp.exp(log_dt), 1e-4)
        return dt + jnp.log(-jnp.expm1(-dt))

    def _a_log_init(self, key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
        """A = -U(a_init_min, a_init_max), stored as log(-A) so it stays negative in training."""
        m = self.cfg.mamba
        return jnp.log(jax.random.uniform(key, shape, dtype, m.a_init_min, m.a_init_max))
