"""The decoder-only Transformer: embed -> n_layers x Block -> RMSNorm -> logits.

A Block is pre-norm `x + mixer(norm(x))` then `x + ffn(norm(x))`, with the mixer and the
feed-forward chosen by name from MIXERS and FFNS ("none": no feed-forward, no norm). The stack
repeats the period `cfg.period` (from `model.layer_pattern`; dense Llama: (("attention",
"mlp"),)) n_layers / P times; with `cfg.scan_layers` the repeats run under `nn.scan`, so compile
time does not grow with depth and every parameter gains a leading "layers" axis of length
n_layers / P.

Every sublayer returns (y, aux): aux maps names to per-layer values. "aux_loss" is summed into
the scalar the trainer adds to the loss; every other key is named "<sublayer>/<metric>" (e.g.
"moe/drop_frac") and stacked over the layers that have that sublayer, in layer order, so
`layer_metrics` can name each value by its layer.

Decode mode (generation): mixers keep their state (KV cache, SSM state) in the "cache"
collection, created by `init(..., decode=True)` with tokens of the maximum length and updated
by `apply(..., decode=True, mutable=["cache"])` on the next tokens at their absolute positions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.config import ConfigError, ModelConfig
from research.models.attention import Attention
from research.models.layers import BTD, BTV, MLP, Einsum, Embed, RMSNorm, projection_args
from research.models.mamba import Mamba2
from research.models.moe import MoE
from research.models.parameterization import forward, scale

Aux = dict[str, jax.Array]

# Sublayer constructors, by the names the schema validates (config.MIXERS, config.FFNS): MIXERS
# take (x, positions, decode, segment_ids), FFNS take (x); both return (y, aux). The
# feed-forward "none" is no module at all (see Block).
MIXERS: dict[str, Callable[..., nn.Module]] = {"attention": Attention, "mamba": Mamba2}
FFNS: dict[str, Callable[..., nn.Module]] = {"mlp": MLP, "moe": MoE}

# Rematerialisation: what the backward pass may keep from each block's forward.
# "full" keeps only the block input; "dots" also keeps the projections' outputs (matmuls with no
# batch dimension, and the custom projections, whose custom_vjp hides their dot from that rule:
# they are named "projection") and recomputes norms, activations and the attention scores/softmax.
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
        jax.checkpoint_policies.save_only_these_names("projection")),
}


def padded_vocab(cfg: ModelConfig, tokenizer_vocab: int) -> int:
    """The embedding rows: model.vocab_size if set, else the tokenizer's rounded up to 128."""
    if cfg.vocab_size is None:
        return -(-tokenizer_vocab // 128) * 128
    if cfg.vocab_size < tokenizer_vocab:
        raise ConfigError(f"model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's "
                          f"vocabulary ({tokenizer_vocab}); raise it or leave it null")
    return cfg.vocab_size


def stack_aux(auxes: Sequence[Aux]) -> Aux:
    """Per-layer aux dicts -> {key: values stacked over the layers that have the key}."""
    keys = dict.fromkeys(k for aux in auxes for k in aux)
    return {k: jnp.stack([aux[k] for aux in auxes if k in aux]) for k in keys}


def layer_metrics(aux: Aux, cfg: ModelConfig) -> dict[str, jax.Array]:
    """The decoder's stacked aux -> scalars named by layer: "moe/drop_frac" [L_moe] becomes
    "moe/layer{i}/drop_frac"; a per-layer vector "moe/expert_frac" [L_moe, E] becomes
    "moe/layer{i}/expert_frac/{e}". Layer i is the i-th layer of the whole stack."""
    out = {}
    for key, values in aux.items():
        if key == "aux_loss":
            continue
        sublayer, _, metric = key.partition("/")
        layers = [i for i in range(cfg.n_layers) if sublayer in cfg.period[i % len(cfg.period)]]
        for layer, value in zip(layers, values, strict=True):
            name = f"{sublayer}/layer{layer}/{metric}"
            if value.ndim == 0:
                out[name] = value
            else:
                out.update({f"{name}/{j}": v for j, v in enumerate(value.reshape(-1))})
    return out


class Block(nn.Module):
    """One pre-norm residual layer: a token mixer, then a feed-forward."""

    cfg: ModelConfig
    mixer: str
    ffn: str
    decode: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array,
                 segment_ids: jax.Array | None = None) -> tuple[jax.Array, Aux]:
        cfg = self.cfg
        norm = dict(eps=cfg.norm_eps, param_dtype=cfg.param_dtype)
        branch = forward(cfg).residual
        y, mixer_aux = MIXERS[self.mixer](cfg, name=self.mixer)(
            RMSNorm(name="mixer_norm", **norm)(x), positions, decode=self.decode,
            segment_ids=segment_ids)
        x = nn.with_logical_constraint(x + scale(y, branch), BTD)
        if self.ffn == "none":  # a mixer-only layer (Mamba-2 style)
            return x, mixer_aux
        y, ffn_aux = FFNS[self.ffn](cfg, name=self.ffn)(RMSNorm(name="ffn_norm", **norm)(x))
        x = nn.with_logical_constraint(x + scale(y, branch), BTD)
        aux = dict(mixer_aux)  # a key both sublayers report (e.g. two aux losses) is summed
        for k, v in ffn_aux.items():
            aux[k] = aux[k] + v if k in aux else v
        return x, aux


def _block(cfg: ModelConfig, scanned: bool) -> type[Block]:
    if cfg.remat == "none":
        return Block
    # Under scan, CSE across iterations cannot defeat remat, so the guard only costs speed.
    return nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not scanned)


class PeriodBlocks(nn.Module):
    """One repeat of the period: P blocks; the unit `nn.scan` iterates over."""

    cfg: ModelConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array,
                 segment_ids: jax.Array | None = None) -> tuple[jax.Array, Aux]:
        block = _block(self.cfg, scanned=True)
        auxes = []
        for j, (mixer, ffn) in enumerate(self.cfg.period):
            x, aux = block(self.cfg, mixer, ffn, self.decode, name=f"block_{j}")(
                x, positions, segment_ids)
            auxes.append(aux)
        return x, stack_aux(auxes)


class Decoder(nn.Module):
    """tokens int32 [B, T] -> (logits float32 [B, T, vocab_size], aux).

    `positions` [1 or B, T] are the tokens' absolute positions (default 0..T-1); in decode mode
    they say where the new tokens continue the cached sequence. `segment_ids` [B, T] (packed
    examples, see research/data/examples.py) keep attention within each segment; positions
    then restart at every segment.
    """

    cfg: ModelConfig
    vocab_size: int

    @nn.compact
    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 decode: bool = False, segment_ids: jax.Array | None = None
                 ) -> tuple[jax.Array, Aux]:
        cfg = self.cfg
        embed = Embed(self.vocab_size, cfg, name="embed")
        x = nn.with_logical_constraint(scale(embed(tokens), forward(cfg).embedding), BTD)
        if positions is None:
            positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]

        if cfg.scan_layers:
            stack = nn.scan(PeriodBlocks,
                            variable_axes={"params": 0, "cache": 0, "intermediates": 0},
                            split_rngs={"params": True}, in_axes=nn.broadcast,
                            length=cfg.n_layers // len(cfg.period),
                            metadata_params={nn.PARTITION_NAME: "layers"})
            x, aux = stack(cfg, decode, name="layers")(x, positions, segment_ids)
            # [repeats, per-period count, ...] -> [layers with the key, ...], in layer order
            aux = {k: v.reshape(-1, *v.shape[2:]) for k, v in aux.items()}
        else:
            block = _block(cfg, scanned=False)
            auxes = []
            for i in range(cfg.n_layers):
                mixer, ffn = cfg.period[i % len(cfg.period)]
                x, layer_aux = block(cfg, mixer, ffn, decode, name=f"layer_{i}")(
                    x, positions, segment_ids)
                auxes.append(layer_aux)
            aux = stack_aux(auxes)

        x = RMSNorm(cfg.norm_eps, cfg.param_dtype, name="final_norm")(x)
        if cfg.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = Einsum("btd,dv->btv", (cfg.d_model, self.vocab_size), ("embed", "vocab"),
                            cfg.init_std, name="lm_head", **projection_args(cfg))(x)
        logits = scale(logits, forward(cfg).logits)
        if "aux_loss" in aux:
            aux["aux_loss"] = aux["aux_loss"].sum()
        return nn.with_logical_constraint(logits, BTV), aux
