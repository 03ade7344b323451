"""Parameterizations: how init, learning rate, weight decay, Adam ε and three forward multipliers
follow width and depth, so that hyperparameters tuned on a small proxy (the base shape) keep their
optimum at scale. The rules are data, read by the model (forward multipliers), by train/state.py
(init) and by train/optim.py (per-parameter lr, wd, ε). The table and its sources are in
docs/transfer.md; in short, for AdamW, with m_N = fan_in / base fan_in (d_model / base_d_model
for the vector-like parameters), m_L = n_layers / base_n_layers and residual exponent α:

    parameter                      init std      lr               wd     ε
    hidden matrices                m_N^-1/2      m_N^-1 m_L^(α-1)  m_N    m_N^-1 m_L^-α
    norms and vectors in a block   1             m_L^(α-1)         1      m_L^-α
    embedding, unembedding         1             1                 1      m_N^-1
    final norm                     1             1                 1      1

plus embedding output x embedding_multiplier (α_emb, at every width), residual branches x m_L^-α,
logits x output_multiplier / m_N and attention logits
x sqrt(base head_dim) / head_dim (1/head_dim, equal to standard at the base shape).
μP ignores depth (its m_L is 1: Table 1's μP column); depth-μP has α = 1/2, CompleteP α = 1.
Multipliers are relative to standard, whose every multiplier is exactly 1 (and applied as no op).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
from jax.sharding import PartitionSpec

from research.config import ModelConfig, base_width_config

ALPHA = {"standard": 0.0, "mup": 0.0, "depth_mup": 0.5, "completep": 1.0}
DEPTH_AWARE = ("depth_mup", "completep")
_NOT_WIDTH_AXES = ("layers", "expert")  # stacking axes: neither fan-in nor fan-out


@dataclass(frozen=True)
class Rule:
    """One parameter's multipliers of the standard init std, peak lr, weight decay and Adam ε.

    `lr` is for updates whose entries have a fixed size (Adam, Lion, Adafactor); `spectral_lr`
    for a matrix update whose spectral norm is fixed (Muon's orthogonalized one, scaled by
    sqrt(fan_out/fan_in)): that shape scale already carries the width factor (Yang, Simon &
    Bernstein 2023), so only the depth factor remains (docs/optimizers.md).
    """

    init: float = 1.0
    lr: float = 1.0
    wd: float = 1.0
    eps: float = 1.0
    spectral_lr: float = 1.0


@dataclass(frozen=True)
class Forward:
    """Multipliers the model applies in its forward pass."""

    embedding: float  # the token embedding's output (α_emb; not the tied head's logits)
    residual: float  # each residual branch's output
    logits: float
    attention_scale: float | None  # softmax(scale q k^T); None: 1/sqrt(head_dim)


def width_ratio(cfg: ModelConfig) -> float:
    """m_N = d_model / base_d_model (1 under standard)."""
    return 1.0 if cfg.parameterization == "standard" else cfg.d_model / (cfg.base_d_model or cfg.d_model)


def depth_ratio(cfg: ModelConfig) -> float:
    """m_L = n_layers / base_n_layers for the depth-aware parameterizations, else 1."""
    if cfg.parameterization not in DEPTH_AWARE:
        return 1.0
    return cfg.n_layers / (cfg.base_n_layers or cfg.n_layers)


def forward(cfg: ModelConfig) -> Forward:
    if cfg.parameterization == "standard":
        return Forward(cfg.embedding_multiplier, 1.0, cfg.output_multiplier, None)
    base_head = base_width_config(cfg).head_size
    return Forward(cfg.embedding_multiplier, depth_ratio(cfg) ** -ALPHA[cfg.parameterization],
                   cfg.output_multiplier / width_ratio(cfg),
                   math.sqrt(base_head) / cfg.head_size)


def is_standard_function(cfg: ModelConfig) -> bool:
    """The forward pass is standard's (every forward multiplier 1; a non-standard model at its
    base shape is): what a Hugging Face config can express."""
    f = forward(cfg)
    return f.embedding == f.residual == f.logits == 1.0 and (
        f.attention_scale is None or math.isclose(f.attention_scale, cfg.head_size ** -0.5))


def scale(x: jax.Array, factor: float) -> jax.Array:
    """x * factor, and x itself for a factor of exactly 1 (standard stays the same program)."""
    return x if factor == 1.0 else x * factor


def _writes_residual(names: list[str | None]) -> bool:
    """A kernel whose last axis is "embed" writes into the residual stream (o, down, out)."""
    return [n for n in names if n not in _NOT_WIDTH_AXES][-1] == "embed"


def _fan_in(names: list[str | None], shape: tuple[int, ...]) -> int:
    """Input size of a matrix: one that writes into the residual stream reads all its other
    axes; any other reads the "embed" axis."""
    dims = [(n, d) for n, d in zip(names, shape) if n not in _NOT_WIDTH_AXES]
    if _writes_residual(names):
        return math.prod(d for _, d in dims[:-1])
    return dict(dims)["embed"]


def matrix_axes(names: list[str | None]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(input axes, output axes) of a "hidden" matrix, as `_fan_in` reads them; the stacking
    axes (layers, expert) are in neither: Muon orthogonalizes each of those slices."""
    width = [i for i, n in enumerate(names) if n not in _NOT_WIDTH_AXES]
    if _writes_residual(names):
        return tuple(width[:-1]), (width[-1],)
    inputs = tuple(i for i in width if names[i] == "embed")
    return inputs, tuple(i for i in width if i not in inputs)


def kind(names: list[str | None]) -> str:
    """"embedding" (vocab matrices), "hidden" (width x width matrices), or "vector" (norms,
    biases, per-head or per-channel parameters, the router, convolutions), from logical names."""
    names = [n for n in names if n not in _NOT_WIDTH_AXES]
    if "vocab" in names:
        return "embedding"
    if "embed" in names and len(names) >= 2 and "norm" not in names and names != ["embed", None]:
        return "hidden"
    return "vector"


def rule(cfg: ModelConfig, in_block: bool, names: list[str | None], shape: tuple[int, ...],
         base_shape: tuple[int, ...]) -> Rule:
    """The multipliers of one parameter (see the module docstring)."""
    if cfg.parameterization == "standard":
        return Rule()
    alpha, m_l = ALPHA[cfg.parameterization], depth_ratio(cfg)
    what = kind(names)
    if what == "embedding":
        return Rule(eps=1 / width_ratio(cfg))
    if what == "vector":
        return Rule(lr=m_l ** (alpha - 1), eps=m_l ** -alpha) if in_block else Rule()
    m_n = _fan_in(names, shape) / _fan_in(names, base_shape)
    # standard's residual-output init is init_std / sqrt(2 n_layers); the table's init does not
    # follow depth (the branch multiplier does), so it is taken back to base_n_layers
    depth_init = math.sqrt(m_l) if _writes_residual(names) else 1.0
    return Rule(init=m_n ** -0.5 * depth_init, lr=m_n ** -1 * m_l ** (alpha - 1), wd=m_n,
                eps=m_n ** -1 * m_l ** -alpha, spectral_lr=m_l ** (alpha - 1))


def rules(cfg: ModelConfig, specs: Any, shapes: Any, base_shapes: Any) -> Any:
    """A Rule per parameter, from its logical PartitionSpec, its shape and its shape in the
    base-width model (trees of the same structure; shapes: anything with .shape)."""
    def one(path: tuple, spec: PartitionSpec, leaf: Any, base: Any) -> Rule:
        first = str(getattr(path[0], "key", path[0]))
        return rule(cfg, first == "layers" or first.startswith("layer_"), list(spec),
                    tuple(leaf.shape), tuple(base.shape))

    return jax.tree_util.tree_map_with_path(
        one, specs, shapes, base_shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))


def is_identity(multipliers: Any) -> bool:
    return all(r == Rule() for r in jax.tree.leaves(multipliers, is_leaf=lambda x: isinstance(x, Rule)))
