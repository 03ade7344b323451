"""The small pieces of a decoder: projections, RMSNorm, rotary positions, SwiGLU MLP, embeddings.

Dtype policy (the one place it lives is `matmul`): parameters and the residual stream are
float32; every matmul casts its operands to the config's compute dtype and accumulates in
float32 (`preferred_element_type`): on accelerators the usual mixed-precision recipe; on a CPU
it pays only where the CPU has bf16 matmul units (AMX, avx512_bf16; figures in
docs/performance.md). The projections' backward matmuls take their operands in the config's
backward dtype (float32 by default; bfloat16 rounds the cotangent, as PyTorch autocast does).
Norms, rotary and the SwiGLU gate run in float32.

Every parameter carries logical axis names (`nn.with_logical_partitioning`) and the main
activations are constrained with `nn.with_logical_constraint`; research/config.py's
DEFAULT_AXIS_RULES map those names onto mesh axes. Without rules in scope both are no-ops.
"""

from __future__ import annotations

import functools
import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from research.config import ModelConfig, auto_projection

# Logical names of the main activation layouts.
BTD = ("act_batch", "act_seq", "act_embed")
BTF = ("act_batch", "act_seq", "act_mlp")
BTV = ("act_batch", "act_seq", "act_vocab")


def backend() -> str:
    """The platform the `auto` choices are made for (config.for_backend): cpu, tpu, cuda or
    rocm (jax.default_backend() says "gpu" for both), or another backend's name."""
    name = jax.default_backend()
    if name == "gpu":
        return "rocm" if "rocm" in jax.devices()[0].client.platform_version.lower() else "cuda"
    return name


def matmul(spec: str, x: jax.Array, w: jax.Array, dtype: jnp.dtype,
           projection: str = "plain", backward_dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """einsum with `dtype` operands and a float32 result: the dtype policy of every projection.

    projection="custom" runs a projection spec (see `projection_dims`) as one 2-D matmul over
    the flattened tokens with a hand-written backward (`project`); "plain" is einsum + autodiff;
    "auto" is this backend's choice (config.auto_projection).
    The backward matmuls multiply `backward_dtype` operands (the cotangent rounded to it) into
    float32. With float32, plain is autodiff's own backward; with bfloat16 it is the same
    einsums written out (`_einsum`), since autodiff would multiply the float32 cotangent.
    """
    if projection == "auto":
        projection = auto_projection(backend())
    if projection == "custom":
        n_in, transposed = projection_dims(spec)
        return project(x, w, n_in, transposed, dtype, backward_dtype)
    if jnp.dtype(backward_dtype) == jnp.float32:
        return _plain(spec, x, w, dtype)
    y = _einsum(spec, x, w, jnp.dtype(dtype), jnp.dtype(backward_dtype))
    # The custom_vjp hides the dot from remat's rule for dots without batch dimensions
    # (decoder.REMAT_POLICIES): the name keeps what "dots" saves the same as autodiff's einsum.
    inputs, ys = spec.split("->")
    batched = set.intersection(*map(set, (*inputs.split(","), ys)))
    return y if batched else checkpoint_name(y, "projection")


def _plain(spec: str, x: jax.Array, w: jax.Array, dtype: jnp.dtype) -> jax.Array:
    return jnp.einsum(spec, x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3, 4))
def _einsum(spec: str, x: jax.Array, w: jax.Array, dtype: jnp.dtype,
            backward_dtype: jnp.dtype) -> jax.Array:
    return _plain(spec, x, w, dtype)


def _einsum_fwd(spec, x, w, dtype, backward_dtype):
    return _einsum(spec, x, w, dtype, backward_dtype), (x, w)


def _einsum_bwd(spec, dtype, backward_dtype, residuals, g):
    """The gradients of y = einsum("X,W->Y"): einsum("Y,W->X") and einsum("X,Y->W"). Valid
    when no index is summed within one operand: each is in two of X, W, Y (a projection's) or
    in all three (a batch index, as the expert matmul's e)."""
    x, w = residuals
    inputs, ys = spec.split("->")
    xs, ws = inputs.split(",")
    dx = jnp.einsum(f"{ys},{ws}->{xs}", g.astype(backward_dtype), w.astype(backward_dtype),
                    preferred_element_type=jnp.float32)
    dw = jnp.einsum(f"{xs},{ys}->{ws}", x.astype(backward_dtype), g.astype(backward_dtype),
                    preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_einsum.defvjp(_einsum_fwd, _einsum_bwd)


def projection_dims(spec: str) -> tuple[int, bool]:
    """(n_in, transposed) of a projection einsum: x's last n_in axes contract with w's first
    n_in axes (transposed: its last), and the output is x's other axes then w's other axes.
    E.g. "btd,dnh->btnh" -> (1, False), "btnh,nhd->btd" -> (2, False), "btd,vd->btv" -> (1, True).
    """
    inputs, out = spec.split("->")
    xs, ws = inputs.split(",")
    contracted = "".join(c for c in xs if c in ws)
    n = len(contracted)
    rest = ws.replace(contracted, "", 1)
    if n and xs.endswith(contracted) and ws.startswith(contracted) and out == xs[:-n] + rest:
        return n, False
    if n and xs.endswith(contracted) and ws.endswith(contracted) and out == xs[:-n] + rest:
        return n, True
    raise ValueError(f"einsum {spec!r} is not a projection (x[..., in] times w[in, out])")


def project(x: jax.Array, w: jax.Array, n_in: int, transposed: bool, dtype: jnp.dtype,
            backward_dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """x [..., *in] times w [*in, *out] (transposed: w [*out, *in]) as one 2-D matmul
    [tokens, in] @ [in, out] with `dtype` operands and a float32 result; the backward's
    matmuls take `backward_dtype` operands.

    The reshapes are free (row-major), and the custom backward computes both gradients as 2-D
    dot_generals that read their operands transposed in place: XLA:CPU's autodiff of the
    N-D einsum instead materialises transposed copies of activations and cotangents (26% of a
    dense_tiny step in a profile) before the weight-gradient matmul.
    """
    k = math.prod(x.shape[x.ndim - n_in:])
    out = w.shape[:w.ndim - n_in] if transposed else w.shape[n_in:]
    w2 = w.reshape(-1, k) if transposed else w.reshape(k, -1)
    y = _matmul_2d(x.reshape(-1, k), w2, transposed, jnp.dtype(dtype), jnp.dtype(backward_dtype))
    y = checkpoint_name(y, "projection")
    return y.reshape(*x.shape[:x.ndim - n_in], *out)


def _dot(a: jax.Array, b: jax.Array, a_axis: int, b_axis: int, dtype: jnp.dtype) -> jax.Array:
    """2-D a @ b contracting a's `a_axis` with b's `b_axis`, `dtype` operands, float32 result."""
    dims = (((a_axis,), (b_axis,)), ((), ()))
    return jax.lax.dot_general(a.astype(dtype), b.astype(dtype), dims,
                               preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _matmul_2d(x: jax.Array, w: jax.Array, transposed: bool, dtype: jnp.dtype,
               backward_dtype: jnp.dtype) -> jax.Array:
    return _dot(x, w, 1, 1 if transposed else 0, dtype)


def _matmul_2d_fwd(x, w, transposed, dtype, backward_dtype):
    return _matmul_2d(x, w, transposed, dtype, backward_dtype), (x, w)


def _matmul_2d_bwd(transposed, dtype, backward_dtype, residuals, g):
    x, w = residuals
    dx = _dot(g, w, 1, 0 if transposed else 1, backward_dtype)
    dw = _dot(g, x, 0, 0, backward_dtype) if transposed else _dot(x, g, 0, 0, backward_dtype)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_matmul_2d.defvjp(_matmul_2d_fwd, _matmul_2d_bwd)


def cumsum(a: jax.Array, reverse: bool = False) -> jax.Array:
    """Cumulative sum over the last axis as a log-depth scan, materialised. jnp.cumsum lowers to
    a reduce_window, which XLA:CPU computes in O(T^2) (6x slower SSD; also the MoE dispatch's
    ranks); and the scan, fused into a consumer such as the exp of a [T, T] decay matrix, is
    re-run per element (the optimization barrier: 1.2-1.4x on the SSD's forward+backward)."""
    return jax.lax.optimization_barrier(
        jax.lax.associative_scan(jnp.add, a, reverse=reverse, axis=a.ndim - 1))


def out_std(cfg: ModelConfig) -> float:
    """Init std of projections that write into the residual stream (GPT-2: 1/sqrt(2 n_layers)),
    so the stream's variance does not grow with depth at init."""
    return cfg.init_std / math.sqrt(2 * cfg.n_layers)


class Einsum(nn.Module):
    """A bias-free projection `einsum(spec, x, kernel)` with a logically named kernel.

    With `splits` (sizes along the kernel's last axis) it returns one output per part, each its
    own matmul with a slice of the one kernel. Slicing a single output instead makes the
    backward pad every part's cotangent back to the full width and add them: for Mamba-2's
    z / x / dt, a pass over [tokens, H * (2P + 1)] that took 6 ms of a 136 ms mamba_tiny step.
    """

    spec: str
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    std: float
    dtype: str  # compute dtype of the operands
    param_dtype: str = "float32"
    projection: str = "plain"  # ModelConfig.projection: "custom" (2-D, own backward), "plain", "auto"
    backward_dtype: str = "float32"  # ModelConfig.backward_dtype: the backward matmuls' operands
    splits: tuple[int, ...] = ()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array | tuple[jax.Array, ...]:
        init = nn.with_logical_partitioning(nn.initializers.normal(self.std), self.axes)
        kernel = self.param("kernel", init, self.shape, jnp.dtype(self.param_dtype))
        dot = functools.partial(matmul, self.spec, dtype=jnp.dtype(self.dtype),
                                projection=self.projection,
                                backward_dtype=jnp.dtype(self.backward_dtype))
        if not self.splits:
            return dot(x, kernel)
        ends = itertools.accumulate(self.splits)
        return tuple(dot(x, kernel[..., end - size:end]) for size, end in zip(self.splits, ends))


def projection_args(cfg: ModelConfig) -> dict[str, str]:
    """The Einsum fields every projection of a model takes from its config: dtypes and kind."""
    return dict(dtype=cfg.compute_dtype, param_dtype=cfg.param_dtype, projection=cfg.projection,
                backward_dtype=cfg.backward_dtype)


class RMSNorm(nn.Module):
    """x / rms(x) * scale, computed in float32 whatever the input dtype."""

    eps: float = 1e-5
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.with_logical_partitioning(nn.initializers.ones, ("norm",))
        scale = self.param("scale", init, (x.shape[-1],), jnp.dtype(self.param_dtype))
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return x * scale.astype(jnp.float32)


def rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding of x [B, T, heads, H] at integer positions [B, T] (or [T]).

    Half-split layout (GPT-NeoX / Hugging Face Llama): feature i pairs with i + H/2 and rotates
    by angle pos * theta^(-2i/H). Computed in float32; returns x's dtype. Positions are explicit
    so a decoding cache can rotate new tokens at their absolute offsets.
    """
    half = x.shape[-1] // 2
    freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = positions.astype(jnp.float32)[..., None] * freq  # [B, T, half]
    sin = jnp.sin(angle)[..., None, :]  # broadcast over heads
    cos = jnp.cos(angle)[..., None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Returns (y, aux) like every sublayer."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        cfg = self.cfg
        d, f = cfg.d_model, cfg.ff_size
        proj = projection_args(cfg)
        gate = Einsum("btd,df->btf", (d, f), ("embed", "mlp"), cfg.init_std, name="gate", **proj)
        up = Einsum("btd,df->btf", (d, f), ("embed", "mlp"), cfg.init_std, name="up", **proj)
        down = Einsum("btf,fd->btd", (f, d), ("mlp", "embed"), out_std(cfg), name="down", **proj)
        h = nn.silu(gate(x)) * up(x)
        h = nn.with_logical_constraint(h, BTF)
        return down(h), {}


class Embed(nn.Module):
    """Token embedding table [V, D]; `attend` reuses it as the (tied) output projection."""

    vocab_size: int
    cfg: ModelConfig

    def setup(self) -> None:
        init = nn.with_logical_partitioning(nn.initializers.normal(self.cfg.init_std),
                                            ("vocab", "embed"))
        self.embedding = self.param("embedding", init, (self.vocab_size, self.cfg.d_model),
                                    jnp.dtype(self.cfg.param_dtype))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        # Gather from a table sharded over vocab only (masked lookup + all-reduce); an
        # fsdp-sharded embed dim here makes the partitioner replicate the whole output.
        table = nn.with_logical_constraint(self.embedding, ("vocab", None))
        return jnp.take(table, tokens, axis=0).astype(jnp.float32)

    def attend(self, x: jax.Array) -> jax.Array:
        """Logits x @ embedding^T, float32."""
        cfg = self.cfg
        return matmul("btd,vd->btv", x, self.embedding, jnp.dtype(cfg.compute_dtype),
                      cfg.projection, jnp.dtype(cfg.backward_dtype))
