"""The typed experiment config: schema, YAML + `key=value` loading, validation.

Every field lives here, with its default, its allowed values and a one-line reason. A config is
data: it is loaded from YAML, patched with dotted overrides, validated once, and then passed
around frozen. Anything wrong fails here, before any compute, as a `ConfigError` whose message
names the field and what is allowed.
"""

from __future__ import annotations

import difflib
import re
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)


class ConfigError(ValueError):
    """A config problem, reported to the user as one line (exit code 2)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


# ----------------------------------------------------------------------------- field roles
# Most fields define the experiment: change one and it is another run. A field tagged with a role
# says what changing it leaves alone, and every rule about "what may differ" is derived from the
# tags (a resumed run, a run starting from another's weights, the analysis's distinguishing
# fields), so those rules cannot disagree.
BOOKKEEPING = "bookkeeping"  # changes neither the parameters, the trajectory nor the measurement
EXTENT = "extent"  # changes how long the run goes on or how much it measures, not its past
NUMERICS = "numerics"  # changes how the model computes or trains, not what its parameters are
ALL_ROLES = (BOOKKEEPING, EXTENT, NUMERICS)  # none of them changes the parameters


def _role(role: str) -> dict[str, Any]:
    return {"json_schema_extra": {"role": role}}


# Default logical-axis -> mesh-axis rules. Parameters and activations carry logical names
# (see research/models); these rules say which mesh axes shard each name.
# Rules apply in order and a mesh axis is used once per array: in MoE buffers [expert, ...] the
# expert dimension takes the expert axis first, and the batch then falls back to data x fsdp.
DEFAULT_AXIS_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    # activations
    ("act_expert", ("expert",)),
    ("act_batch", ("data", "fsdp", "expert")),
    ("act_batch", ("data", "fsdp")),
    ("act_seq", ()),
    ("act_embed", ()),
    ("act_heads", ("tensor",)),
    ("act_kv_heads", ("tensor",)),
    ("act_mlp", ("tensor",)),
    ("act_vocab", ("tensor",)),
    ("act_mamba_heads", ("tensor",)),
    # parameters
    ("embed", ("fsdp",)),
    ("vocab", ("tensor",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("mlp", ("tensor",)),
    ("expert", ("expert",)),
    ("mamba_heads", ("tensor",)),
    ("mamba_groups", ()),
    ("mamba_conv", ()),
    ("head_dim", ()),
    ("layers", ()),
    ("norm", ()),
)


MIXERS = ("attention", "mamba")
FFNS = ("mlp", "moe", "none")


class MoEConfig(_Section):
    """Mixture-of-Experts feed-forward (used by layers whose pattern entry ends in ':moe')."""

    n_experts: int = Field(8, gt=0, description="routed experts")
    top_k: int = Field(2, gt=0, description="experts per token")
    n_shared_experts: int = Field(0, ge=0, description="always-on experts (DeepSeekMoE)")
    d_expert: int | None = Field(None, gt=0, description="expert hidden width; None: model.d_ff "
                                 "(smaller values give fine-grained experts)")
    dispatch: Literal["capacity", "dropless"] = Field(
        "capacity", **_role(NUMERICS), description="capacity: padded per-expert buffers, overflow dropped; "
        "dropless: every choice computed, laid out by expert in blocks (block-sparse matmul)")
    capacity_factor: float = Field(1.25, gt=0, **_role(NUMERICS), description="buffer = factor * tokens * top_k / E")
    balance_coef: float = Field(0.01, ge=0, **_role(NUMERICS), description="Switch load-balancing loss coefficient")
    z_loss_coef: float = Field(1e-3, ge=0, **_role(NUMERICS), description="router z-loss coefficient")

    @model_validator(mode="after")
    def _k(self) -> MoEConfig:
        if self.top_k > self.n_experts:
            raise ValueError(f"model.moe.top_k={self.top_k} must be <= model.moe.n_experts="
                             f"{self.n_experts}")
        return self


class MambaConfig(_Section):
    """Mamba-2 mixer (used by layers whose pattern entry starts with 'mamba:')."""

    d_state: int = Field(64, gt=0, description="SSM state size N")
    head_dim: int = Field(32, gt=0, description="SSM head dim P; heads = expand*d_model/head_dim")
    expand: int = Field(2, gt=0, description="inner width = expand * d_model")
    n_groups: int = Field(1, gt=0, description="groups sharing B and C (like kv heads)")
    chunk_size: int = Field(64, gt=0, **_role(NUMERICS), description="SSD chunk length")
    conv_width: int = Field(4, gt=1, description="causal depthwise convolution width")
    dt_min: float = Field(1e-3, gt=0, **_role(NUMERICS), description="dt initialisation range")
    dt_max: float = Field(1e-1, gt=0, **_role(NUMERICS))
    a_init_min: float = Field(1.0, gt=0, **_role(NUMERICS), description="A = -U(a_init_min, a_init_max)")
    a_init_max: float = Field(16.0, gt=0, **_role(NUMERICS))

    @model_validator(mode="after")
    def _ranges(self) -> MambaConfig:
        for low, high in (("dt_min", "dt_max"), ("a_init_min", "a_init_max")):
            if getattr(self, low) > getattr(self, high):
                raise ValueError(f"model.mamba.{low}={getattr(self, low)} must be <= "
                                 f"model.mamba.{high}={getattr(self, high)}")
        return self

    def n_heads(self, d_model: int) -> int:
        return self.expand * d_model // self.head_dim


class ModelConfig(_Section):
    """Decoder shape and numerics."""

    d_model: int = Field(256, gt=0)
    n_layers: int = Field(4, gt=0)
    n_heads: int = Field(4, gt=0)
    n_kv_heads: int | None = Field(None, gt=0, description="None: same as n_heads (plain MHA)")
    head_dim: int | None = Field(None, gt=0, description="None: d_model // n_heads")
    d_ff: int | None = Field(None, gt=0, description="None: SwiGLU width 8/3 d_model rounded up to 64")
    vocab_size: int | None = Field(None, gt=0, description="None: the tokenizer's, padded to 128")
    rope_theta: float = Field(10000.0, gt=0)
    norm_eps: float = Field(1e-5, gt=0)
    sliding_window: int | None = Field(None, gt=0, description="None: full causal attention")
    tie_embeddings: bool = True
    init_std: float = Field(0.02, gt=0, **_role(NUMERICS))
    init_from: str | None = Field(None, **_role(NUMERICS), description="start a new run from these weights, with a "
                                  "fresh optimizer: RUN_DIR[@STEP] (a run's params, latest "
                                  "checkpoint or STEP; docs/post-training.md) or a Hugging Face "
                                  "model folder (config.json + *.safetensors) whose architecture "
                                  "equals this section (docs/interop.md)")
    compute_dtype: Literal["float32", "bfloat16"] = Field("float32", **_role(NUMERICS))
    backward_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", **_role(NUMERICS), description="operand dtype of the projections' backward "
        "matmuls, the cotangent rounded to it: float32 keeps the gradients at float32 precision; "
        "bfloat16 (needs compute_dtype=bfloat16) is PyTorch autocast's backward and runs on the "
        "bf16 matmul units (docs/performance.md)")
    param_dtype: Literal["float32"] = "float32"
    remat: Literal["none", "full", "dots"] = Field("none", **_role(NUMERICS))
    projection: Literal["auto", "custom", "plain"] = Field(
        "auto", **_role(NUMERICS), description="custom: projections as 2-D matmuls with a hand-written backward "
        "(faster on CPU, docs/performance.md); plain: einsum + autodiff; auto: custom on CPU, plain "
        "on GPU/TPU (recorded resolved in the run's config.yaml)")
    attention_impl: Literal["auto", "chunked", "xla", "cudnn"] = Field(
        "auto", **_role(NUMERICS), description="chunked: query chunks scoring only the keys they "
        "see (fastest on CPU); xla, cudnn: jax.nn.dot_product_attention's implementation (cudnn: "
        "NVIDIA GPUs, bfloat16); auto: chunked on CPU, cudnn on an NVIDIA GPU in bfloat16, else "
        "xla (docs/performance.md; recorded resolved in the run's config.yaml)")
    scan_layers: bool = True
    layer_pattern: tuple[str, ...] = Field(
        ("attention:mlp",), description="the repeating period of 'mixer:ffn' layers; mixers: "
        "attention, mamba; ffns: mlp, moe, none. n_layers must be a multiple of its length")
    moe: MoEConfig = MoEConfig()
    mamba: MambaConfig = MambaConfig()
    parameterization: Literal["standard", "mup", "depth_mup", "completep"] = Field(
        "standard", description="how init, lr, wd, Adam eps and forward multipliers follow width "
        "and depth relative to the base shape (docs/transfer.md); standard: no scaling")
    base_d_model: int | None = Field(None, gt=0, description="the tuned proxy's width; None: d_model")
    base_n_layers: int | None = Field(None, gt=0, description="the proxy's depth; None: n_layers")
    base_d_ff: int | None = Field(None, gt=0, description="the proxy's MLP width; None: d_ff "
                                  "scaled by base_d_model/d_model (the 8/3 rule if d_ff is null)")
    base_d_expert: int | None = Field(None, gt=0, description="the proxy's expert width; None: "
                                      "moe.d_expert scaled by base_d_model/d_model")
    output_multiplier: float = Field(1.0, gt=0, allow_inf_nan=False, description="alpha_out: "
                                     "logits x alpha_out/m_N (m_N is 1 under standard)")
    embedding_multiplier: float = Field(1.0, gt=0, allow_inf_nan=False, description="alpha_emb: "
                                        "the token embedding's output x alpha_emb, at every width "
                                        "(a tied head's logits are not scaled by it)")
    qk_norm: bool = Field(False, description="RMSNorm of each head's queries and keys before "
                          "rotary (OLMo 2, Gemma 3, Qwen3): bounds the attention logits")

    @property
    def period(self) -> tuple[tuple[str, str], ...]:
        """layer_pattern as (mixer, ffn) pairs."""
        return tuple(tuple(entry.split(":")) for entry in self.layer_pattern)  # type: ignore[misc]

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def ff_size(self) -> int:
        return self.d_ff or -(-(8 * self.d_model // 3) // 64) * 64

    @model_validator(mode="after")
    def _shapes(self) -> ModelConfig:
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(
                f"model.n_heads={self.n_heads} must divide model.d_model={self.d_model} "
                "(or set model.head_dim)"
            )
        if self.n_heads % self.kv_heads:
            raise ValueError(
                f"model.n_kv_heads={self.kv_heads} must divide model.n_heads={self.n_heads}"
            )
        if self.head_size % 2:
            raise ValueError(f"head size {self.head_size} must be even for rotary positions")
        if not self.layer_pattern:
            raise ValueError("model.layer_pattern must name at least one 'mixer:ffn' layer")
        for entry in self.layer_pattern:
            mixer, _, ffn = entry.partition(":")
            if mixer not in MIXERS or ffn not in FFNS:
                raise ValueError(f"model.layer_pattern entry {entry!r}: expected 'mixer:ffn' with "
                                 f"mixer in {'/'.join(MIXERS)} and ffn in {'/'.join(FFNS)}")
        if self.n_layers % len(self.layer_pattern):
            raise ValueError(f"model.n_layers={self.n_layers} must be a multiple of the "
                             f"{len(self.layer_pattern)} entries of model.layer_pattern")
        if any(m == "mamba" for m, _ in self.period):
            inner = self.mamba.expand * self.d_model
            if inner % self.mamba.head_dim:
                raise ValueError(f"model.mamba.head_dim={self.mamba.head_dim} must divide "
                                 f"expand*d_model={inner}")
            heads = self.mamba.n_heads(self.d_model)
            if heads % self.mamba.n_groups:
                raise ValueError(f"model.mamba.n_groups={self.mamba.n_groups} must divide the "
                                 f"{heads} Mamba heads")
        if self.backward_dtype == "bfloat16" and self.compute_dtype != "bfloat16":
            raise ValueError("model.backward_dtype=bfloat16 needs model.compute_dtype=bfloat16 "
                             "(a float32 forward with a bf16 backward is not mixed precision "
                             "anyone trains with); allowed with float32: float32")
        if self.attention_impl == "cudnn" and self.compute_dtype != "bfloat16":
            raise ValueError("model.attention_impl=cudnn needs model.compute_dtype=bfloat16 "
                             "(cuDNN's fused attention takes bf16/fp16 only); float32: auto, "
                             "chunked or xla")
        if self.qk_norm and all(m != "attention" for m, _ in self.period):
            raise ValueError("model.qk_norm=true needs an attention layer in model.layer_pattern "
                             "(allowed with attention-free patterns: false)")
        if self.parameterization != "standard":
            base_width_config(self)  # the proxy's shape must be a valid model too
        return self


def base_width_config(cfg: ModelConfig) -> ModelConfig:
    """The model at the proxy's width (depth unchanged, so its parameter tree matches cfg's):
    the base shapes every fan-in ratio is taken against. ValueError naming the field if invalid."""
    ratio = Fraction(cfg.base_d_model or cfg.d_model, cfg.d_model)

    def scaled(field: str, value: int | None, base: int | None) -> int | None:
        if base is not None or value is None:
            return base
        if (value * ratio).denominator != 1:
            raise ValueError(f"model.{field}={value} times base_d_model/d_model={ratio} is not an "
                             f"integer; set model.base_{field}")
        return int(value * ratio)

    raw = cfg.model_dump()
    raw.update(d_model=int(cfg.d_model * ratio), parameterization="standard",
               d_ff=scaled("d_ff", cfg.d_ff, cfg.base_d_ff))
    raw["moe"]["d_expert"] = scaled("d_expert", cfg.moe.d_expert, cfg.base_d_expert)
    try:
        return ModelConfig.model_validate(raw)
    except ValidationError as exc:
        message = exc.errors()[0]["msg"].removeprefix("Value error, ")
        raise ValueError(f"the base shape (model.base_d_model={raw['d_model']}) is not a valid "
                         f"model: {message}") from None


SOURCE_NAME = r"^[A-Za-z0-9_-]+$"  # a metric tag part (eval/<name>/loss) and a dotted-key part


class SourceConfig(_Section):
    """One named training source: what `data.source` accepts, and its share of the batches."""

    source: str = Field(min_length=1, description="builtin, builtin:code|tests|docs, or a path/"
                        "glob/comma list of .txt, .jsonl or .parquet files")
    weight: float = Field(1.0, ge=0, allow_inf_nan=False,
                          description="share of training sequences (normalized); 0: evaluated only")


class StageConfig(_Section):
    """New weights from a training step on (sources not named get weight 0)."""

    from_step: int = Field(gt=0, description="the first step (1-based) trained on these weights")
    weights: dict[str, float] = Field(min_length=1)


def _weights(field: str, weights: dict[str, float], names: Any) -> None:
    """Weights must name known sources, be finite and >= 0, and not all be 0."""
    for name, weight in weights.items():
        if name not in names:
            raise ValueError(f"{field}.{name}: unknown source (sources: {', '.join(names)})")
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or \
                not 0 <= weight < float("inf"):
            raise ValueError(f"{field}.{name}: weight must be a finite number >= 0, got {weight!r}")
    if not any(weights.values()):
        raise ValueError(f"{field}: all weights are 0; give at least one source a positive weight")


class DataConfig(_Section):
    """Where text comes from and how it becomes tokens (docs/data.md)."""

    source: str | None = Field(None, description="one source, named 'main': 'builtin' (the "
                               "stdlib's source), builtin:code|tests|docs or a path/glob of .txt, "
                               ".jsonl or .parquet files; default 'builtin' unless data.sources")
    sources: dict[str, SourceConfig] = Field({}, description="named, weighted training sources")
    stages: tuple[StageConfig, ...] = Field((), **_role(EXTENT), description="new weights from a "
                                            "step on; a resumed run may change the steps it has "
                                            "not trained (mixture.check_resume guards the past)")
    eval_only: dict[str, str] = Field({}, description="extra held-out sets: name -> source")
    text_field: str = Field("text", description="column/key holding the text in .jsonl/.parquet")
    tokenizer: str = Field("byte", description="'byte' or a path to a Hugging Face tokenizer.json")
    heldout_percent: float = Field(2.0, gt=0, lt=100, description="documents held out, by hash")
    cache_dir: str = Field("~/.cache/research/tokens", **_role(BOOKKEEPING), description="token cache (content-keyed)")
    document_start: str | int = Field(
        "eos", description="what a document starts after: 'eos' (this framework's separator, "
        "which ends every document), a token id written before each document (a Hugging Face "
        "tokenizer's BOS), or 'none'; import-hf sets it from the model folder, and generate "
        "starts a prompt the same way (docs/interop.md)")

    @field_validator("document_start", mode="before")
    @classmethod
    def _document_start(cls, value: Any) -> str | int:
        if value in ("eos", "none") or (type(value) is int and value >= 0):
            return value
        raise ValueError(f"data.document_start={value!r}: allowed are 'eos', 'none' or a token "
                         "id >= 0")

    @model_validator(mode="before")
    @classmethod
    def _one_source_form(cls, raw: Any) -> Any:
        """data.source and data.sources exclude each other; neither means source=builtin."""
        if isinstance(raw, dict):
            if raw.get("source") is not None and raw.get("sources"):
                raise ValueError("data.source and data.sources are both set; use one (data.source: "
                                 "X is data.sources: {main: {source: X}})")
            if raw.get("source") is None and not raw.get("sources"):
                raw = {**raw, "source": "builtin"}
        return raw

    @model_validator(mode="after")
    def _mixture(self) -> DataConfig:
        names = self.named_sources()
        for name in [*names, *self.eval_only]:
            if not re.fullmatch(SOURCE_NAME, name):
                raise ValueError(f"data.sources.{name}: a source name is letters, digits, _ and - "
                                 "(it becomes part of metric names and dotted keys)")
        for name, source in self.eval_only.items():
            if name in names:
                raise ValueError(f"data.eval_only.{name}: {name!r} is already a training source "
                                 "name; two sources cannot share a name")
            if not source:
                raise ValueError(f"data.eval_only.{name}: empty source")
        _weights("data.sources", {n: s.weight for n, s in names.items()}, names)
        previous = 0
        for i, stage in enumerate(self.stages):
            if stage.from_step <= previous:
                raise ValueError(f"data.stages[{i}].from_step={stage.from_step}: stages must be in "
                                 f"increasing step order (the one before starts at {previous})")
            previous = stage.from_step
            _weights(f"data.stages[{i}].weights", stage.weights, names)
        return self

    def named_sources(self) -> dict[str, SourceConfig]:
        """The training sources by name: data.sources, or data.source as one source 'main'."""
        return dict(self.sources) or {"main": SourceConfig(source=self.source or "builtin")}


OPTIMIZERS = ("adamw", "muon", "lion", "adafactor")


class MuonConfig(_Section):
    """Muon (optim.name=muon): momentum orthogonalized by Newton-Schulz for the hidden matrices;
    embeddings, the head, norms and other vectors take AdamW (optim.beta1/beta2/eps)."""

    momentum: float = Field(0.95, ge=0, lt=1, description="momentum decay of the matrices' update")
    nesterov: bool = Field(True, description="Nesterov momentum (Keller Jordan's default)")
    ns_steps: int = Field(5, gt=0, description="Newton-Schulz iterations")
    adam_lr_ratio: float = Field(0.1, gt=0, description="AdamW's peak lr (embeddings, head, "
                                 "vectors) = optim.lr x this; Muon's lr is far larger than Adam's")


class LionConfig(_Section):
    """Lion (optim.name=lion): the sign of an interpolated momentum (Chen et al. 2023)."""

    beta1: float = Field(0.9, ge=0, lt=1, description="interpolation of momentum and gradient")
    beta2: float = Field(0.99, ge=0, lt=1, description="momentum decay")


class AdafactorConfig(_Section):
    """Adafactor (optim.name=adafactor): factored second moments (Shazeer & Stern 2018), via
    optax.scale_by_factored_rms; the absolute step size is optim.lr (no relative step)."""

    decay_rate: float = Field(0.8, gt=0, le=1, description="second-moment decay 1 - t^-decay_rate")
    factored: bool = Field(True, description="row and column statistics for matrices")
    min_dim_size_to_factor: int = Field(128, gt=0, description="smaller matrices keep a full "
                                        "second moment")
    eps: float = Field(1e-30, gt=0, description="added to the squared gradient")
    clipping_threshold: float | None = Field(1.0, gt=0, description="update clipping by RMS; "
                                             "None disables")
    multiply_by_parameter_scale: bool = Field(False, description="scale the step by the "
                                              "parameter's RMS (Adafactor's relative step); "
                                              "standard parameterization only")


# The fields each optimizer reads besides the shared ones (lr, schedule, weight_decay, ...).
OPTIMIZER_FIELDS = {"adamw": ("beta1", "beta2", "eps"), "muon": ("beta1", "beta2", "eps", "muon"),
                    "lion": ("lion",), "adafactor": ("adafactor",)}


class OptimConfig(_Section):
    """The optimizer (name and its own hyperparameters) and a warmup + decay schedule."""

    name: Literal["adamw", "muon", "lion", "adafactor"] = Field(
        "adamw", description="docs/optimizers.md; each takes its own fields below")
    lr: float = Field(1e-3, gt=0)
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = Field(20, ge=0)
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd: final fraction spent decaying")
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    schedule_steps: int | None = Field(None, gt=0, description="the length the schedule is laid "
                                       "out for; None: train.steps (a branch keeps its parent's)")
    cooldown_from: int | None = Field(None, ge=0, description="from this step the lr decays "
                                      "linearly from the schedule's value to min_lr_ratio at "
                                      "train.steps (a cooldown branch, docs/training.md)")
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1, description="Adam's (adamw, and muon's AdamW part)")
    beta2: float = Field(0.95, ge=0, lt=1, description="Adam's (adamw, and muon's AdamW part)")
    eps: float = Field(1e-8, gt=0, description="Adam's (adamw, and muon's AdamW part)")
    grad_clip: float | None = Field(1.0, gt=0, description="global norm; None disables")
    z_loss: float = Field(0.0, ge=0, description="coefficient of the output logits' squared "
                          "log-partition, mean over the loss's tokens, added to the loss (PaLM: "
                          "1e-4); 0: off")
    muon: MuonConfig = MuonConfig()
    lion: LionConfig = LionConfig()
    adafactor: AdafactorConfig = AdafactorConfig()

    @model_validator(mode="after")
    def _own_fields(self) -> OptimConfig:
        """A hyperparameter of another optimizer, changed from its default, is a mistake."""
        for name, fields in OPTIMIZER_FIELDS.items():
            for field in fields:
                if field in OPTIMIZER_FIELDS[self.name]:
                    continue
                value, default = getattr(self, field), type(self).model_fields[field].default
                changed = ([f"{field}.{k}" for k, v in value if v != getattr(default, k)]
                           if isinstance(value, BaseModel) else [field] * (value != default))
                if changed:
                    users = [n for n, f in OPTIMIZER_FIELDS.items() if field in f]
                    raise ValueError(f"optim.{changed[0]}: a hyperparameter of "
                                     f"{' and '.join(users)}, but optim.name={self.name} (its "
                                     f"own: {', '.join(OPTIMIZER_FIELDS[self.name])})")
        return self


class BranchConfig(_Section):
    """Where a branch started: another run's full state (params, optimizer, data position) at a
    step (`research train --branch-from RUN@STEP`, docs/training.md). Set by that flag."""

    parent: str | None = Field(None, description="the parent's run directory; None: not a branch")
    step: int | None = Field(None, gt=0, description="the parent's checkpoint step it starts from")

    @model_validator(mode="after")
    def _both(self) -> BranchConfig:
        if (self.parent is None) != (self.step is None):
            raise ValueError("branch.parent and branch.step go together (set both with "
                             "--branch-from RUN@STEP)")
        return self


class TrainConfig(_Section):
    """Length, batch and evaluation cadence of a run."""

    steps: int = Field(200, gt=0, **_role(EXTENT), description="a resumed run may extend or "
                       "shorten it (a cosine schedule then follows the new length)")
    seed: int = Field(0, ge=0, lt=2**32)
    batch_size: int = Field(16, gt=0, description="global batch, in sequences")
    seq_len: int = Field(256, gt=0)
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    eval_every: int = Field(100, gt=0, **_role(BOOKKEEPING))
    eval_batches: int = Field(4, gt=0, **_role(EXTENT))
    log_every: int = Field(10, gt=0, **_role(BOOKKEEPING))
    objective: Literal["lm", "sft", "dpo"] = Field(
        "lm", description="lm: next-token loss on data.source; sft: response tokens of the "
        "examples; dpo: preference pairs of the examples (docs/post-training.md)")
    skip_spikes: bool = Field(False, description="skip (inside the step) an update whose loss or "
                              "gradient norm exceeds mean + spike_sigma std of the last "
                              "spike_window accepted steps (docs/training.md)")
    spike_window: int = Field(128, gt=1, description="accepted steps the spike statistics cover")
    spike_sigma: float = Field(6.0, gt=0, description="standard deviations above the mean that "
                               "count as a spike")
    on_nonfinite: Literal["stop", "rollback"] = Field(
        "stop", description="a non-finite loss: stop (save nothing newer), or restore the last "
        "good checkpoint, skip the batch that failed and continue")
    max_rollbacks: int = Field(3, gt=0, **_role(EXTENT),
                               description="rollbacks in one run before it stops")
    rollback_lr_factor: float = Field(1.0, gt=0, le=1, description="the lr is multiplied by this "
                                      "for rollback_lr_steps steps after a rollback")
    rollback_lr_steps: int = Field(0, ge=0, description="steps after a rollback at the lowered lr")
    fault_steps: tuple[int, ...] = Field((), description="testing tool: the batches these steps "
                                         "read (in a run without skipped batches) get a spike or "
                                         "NaN loss (train.fault)")
    fault: Literal["spike", "nan"] = Field("spike", description="spike: loss x 1e4; nan: loss NaN")

    @model_validator(mode="after")
    def _accum(self) -> TrainConfig:
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"train.grad_accum={self.grad_accum} must divide train.batch_size={self.batch_size}"
            )
        beyond = [s for s in self.fault_steps if not 1 <= s <= self.steps]
        if beyond:
            raise ValueError(f"train.fault_steps={list(self.fault_steps)}: {beyond[0]} is outside "
                             f"the run (allowed: 1..train.steps={self.steps})")
        return self


class EvalConfig(_Section):
    """Downstream ranked-choice tasks scored during training (docs/evaluation.md)."""

    tasks: str | None = Field(None, **_role(EXTENT), description="'builtin' (the built-in tasks), built-in task "
                              "names, folders of .jsonl tasks or .jsonl files, comma-separated; "
                              "None: no downstream evaluation")
    tasks_every: int | None = Field(None, gt=0, **_role(BOOKKEEPING), description="score the tasks every N steps (and "
                                    "at the end); None: train.eval_every")


class ExamplesConfig(_Section):
    """Prompt/response (sft) and preference (dpo) examples: where they are and how they fit."""

    source: str = Field("builtin", description="'builtin' (derived from the standard library on "
                        "first use) or a path/glob of .jsonl files")
    overlong: Literal["truncate", "drop"] = Field(
        "truncate", description="an example longer than train.seq_len+1 tokens is cut to fit, or "
        "skipped")
    pack: bool = Field(True, description="sft: several examples per row (attention never crosses "
                       "them); false: one example per row, padded")


class DPOConfig(_Section):
    """Direct Preference Optimization (train.objective=dpo)."""

    beta: float = Field(0.1, gt=0, description="strength of the implicit KL penalty")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="assumed probability that a "
                                   "preference label is flipped (conservative DPO)")


class MeshConfig(_Section):
    """Device mesh; exactly one axis may be -1 (filled with the remaining devices)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1
    rules: tuple[tuple[str, tuple[str, ...]], ...] = DEFAULT_AXIS_RULES

    @property
    def axis_names(self) -> tuple[str, ...]:
        return ("data", "fsdp", "expert", "tensor")

    @model_validator(mode="after")
    def _sizes(self) -> MeshConfig:
        sizes = {name: getattr(self, name) for name in self.axis_names}
        if sum(v == -1 for v in sizes.values()) > 1:
            raise ValueError("at most one of mesh.data/fsdp/expert/tensor may be -1")
        for name, value in sizes.items():
            if value == 0 or value < -1:
                raise ValueError(f"mesh.{name}={value}: must be a positive integer or -1")
        for logical, axes in self.rules:
            for axis in axes:
                if axis not in sizes:
                    raise ValueError(f"mesh.rules: {logical!r} maps to unknown mesh axis {axis!r}; "
                                     f"allowed: {', '.join(self.axis_names)}")
        return self

    def shape(self, n_devices: int) -> dict[str, int]:
        """Axis sizes for `n_devices`, filling the -1 axis; raises ConfigError on mismatch."""
        sizes = {name: getattr(self, name) for name in self.axis_names}
        fixed = 1
        for value in sizes.values():
            fixed *= value if value > 0 else 1
        auto = [name for name, value in sizes.items() if value == -1]
        if auto:
            if n_devices % fixed:
                raise ConfigError(f"mesh: fixed axes multiply to {fixed}, which does not divide "
                                  f"the {n_devices} available devices")
            sizes[auto[0]] = n_devices // fixed
        elif fixed != n_devices:
            raise ConfigError(f"mesh: data*fsdp*expert*tensor = {fixed} but {n_devices} devices "
                              "are available; make them equal or set one axis to -1")
        return sizes


class CheckpointConfig(_Section):
    """When to save and what to keep."""

    every: int = Field(100, gt=0, description="save every N steps (and at the end)")
    keep_last: int = Field(2, gt=0, description="the latest K checkpoints are kept")
    keep_every: int | None = Field(None, gt=0, description="every N-th step is kept forever")
    async_save: bool = True


class LoggingConfig(_Section):
    """Where metrics go."""

    tensorboard: bool = True
    progress: bool = True
    peak_flops: float | None = Field(None, gt=0, description="per-device peak FLOP/s for MFU; "
                                     "None: known accelerator table or a cached CPU measurement")
    profile_steps: tuple[int, int] | None = Field(
        None, description="[first, last]: a jax.profiler trace of these steps in the run's tb/ "
        "(TensorBoard's profile tab); None: no trace")
    norms_every: int | None = Field(None, gt=0, description="per-layer gradient, update and "
                                    "parameter norms (and the attention-logit max without "
                                    "qk_norm) every N steps; None: off")

    @model_validator(mode="after")
    def _profile(self) -> LoggingConfig:
        if self.profile_steps and not 1 <= self.profile_steps[0] <= self.profile_steps[1]:
            raise ValueError(f"logging.profile_steps={list(self.profile_steps)}: expected "
                             "[first, last] steps with 1 <= first <= last")
        return self


class ExperimentConfig(_Section):
    """One training run."""

    name: str = Field("experiment", **_role(BOOKKEEPING))
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    # a new mesh reshards a checkpoint on load and changes only the float reduction order
    mesh: MeshConfig = Field(MeshConfig(), **_role(BOOKKEEPING))
    checkpoint: CheckpointConfig = Field(CheckpointConfig(), **_role(BOOKKEEPING))
    logging: LoggingConfig = Field(LoggingConfig(), **_role(BOOKKEEPING))
    examples: ExamplesConfig = ExamplesConfig()
    dpo: DPOConfig = DPOConfig()
    eval: EvalConfig = EvalConfig()
    branch: BranchConfig = BranchConfig()

    @model_validator(mode="after")
    def _schedule(self) -> ExperimentConfig:
        cooldown, steps = self.optim.cooldown_from, self.train.steps
        if cooldown is not None and cooldown >= steps:
            raise ValueError(f"optim.cooldown_from={cooldown} must be below train.steps={steps}")
        if self.branch.step is not None and self.branch.step >= steps:
            raise ValueError(f"branch.step={self.branch.step} must be below train.steps={steps}")
        if (self.optim.name == "adafactor" and self.optim.adafactor.multiply_by_parameter_scale
                and self.model.parameterization != "standard"):
            raise ValueError("optim.adafactor.multiply_by_parameter_scale=true scales each step "
                             "by the parameter's RMS, which already follows width: it works "
                             "only with model.parameterization=standard (docs/optimizers.md)")
        return self

    @model_validator(mode="after")
    def _stages_in_run(self) -> ExperimentConfig:
        for i, stage in enumerate(self.data.stages):
            if stage.from_step > self.train.steps:
                raise ValueError(f"data.stages[{i}].from_step={stage.from_step} is beyond "
                                 f"train.steps={self.train.steps}")
        return self

    @model_validator(mode="after")
    def _packing(self) -> ExperimentConfig:
        if (self.train.objective == "sft" and self.examples.pack
                and any(m == "mamba" for m, _ in self.model.period)):
            raise ValueError("examples.pack=true needs attention-only layers (a Mamba state would "
                             "carry across packed examples); set examples.pack=false")
        return self

    @model_validator(mode="after")
    def _rollback(self) -> ExperimentConfig:
        """A rollback needs a checkpoint before the failure to go back to."""
        if self.train.on_nonfinite != "rollback":
            return self
        every = self.checkpoint.every
        if every >= self.train.steps:
            raise ValueError(f"train.on_nonfinite=rollback: checkpoint.every={every} leaves no "
                             f"checkpoint before the end (train.steps={self.train.steps}) to roll "
                             "back to; lower checkpoint.every")
        early = [s for s in self.train.fault_steps if s <= every]
        if early:
            raise ValueError(f"train.fault_steps: step {early[0]} comes before the first "
                             f"checkpoint (checkpoint.every={every}), so there is no checkpoint "
                             "yet to roll back to (allowed: steps > checkpoint.every)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return to_yaml(self.to_dict())


# ----------------------------------------------------------------------------- per backend
# What `auto` runs on each backend (research.models.layers.backend(): cpu, cuda, rocm, tpu, or
# another jax.default_backend() name); the reasons and measurements are in docs/performance.md.
CUDNN_HEAD_SIZES = range(8, 129, 8)  # cuDNN flash attention: head dim a multiple of 8, <= 128


def auto_projection(platform: str) -> str:
    """custom on CPU (XLA:CPU copies transposed operands for N-D dots' gradients); plain
    elsewhere, where layout assignment folds those transposes into the GEMM."""
    return "custom" if platform == "cpu" else "plain"


def auto_attention(model: ModelConfig, platform: str) -> str:
    """chunked on CPU; cuDNN's fused (flash) attention on an NVIDIA GPU where it takes the
    shapes (bf16, head size a multiple of 8 up to 128); XLA's attention everywhere else (TPU,
    ROCm, float32 on a GPU): portable and never refused."""
    if platform == "cpu":
        return "chunked"
    if platform == "cuda" and model.compute_dtype == "bfloat16" \
            and model.head_size in CUDNN_HEAD_SIZES:
        return "cudnn"
    return "xla"


def for_backend(model: ModelConfig, platform: str) -> ModelConfig:
    """The model section as it runs on `platform`: `auto` replaced by that backend's choice. A
    choice that cannot run there is a ConfigError (cuDNN anywhere but on an NVIDIA GPU)."""
    if model.attention_impl == "cudnn" and platform != "cuda":
        raise ConfigError(f"model.attention_impl=cudnn needs an NVIDIA GPU (cuDNN); this JAX "
                          f"backend is {platform}: use auto, chunked or xla")
    return auto_resolved(model, platform)


def auto_resolved(model: ModelConfig, platform: str) -> ModelConfig:
    """The model section with each `auto` replaced by `platform`'s choice, whether or not the
    other choices can run there (reading a run that ran elsewhere)."""
    update = {}
    if model.projection == "auto":
        update["projection"] = auto_projection(platform)
    if model.attention_impl == "auto":
        update["attention_impl"] = auto_attention(model, platform)
    return model.model_copy(update=update)


def resolved(cfg: ExperimentConfig, vocab_size: int | None,
             platform: str | None = None) -> dict[str, Any]:
    """The config as the run uses it, for its config.yaml: every derived size filled in
    (n_kv_heads, head_dim, d_ff, vocab_size: the padded embedding rows, moe.d_expert), the
    moe/mamba sections left out when no layer uses them and other optimizers' fields left out.
    With `platform`, the `auto` choices are those that run there (`for_backend`). Validating it
    gives the same run."""
    if platform is not None:
        cfg = cfg.model_copy(update={"model": for_backend(cfg.model, platform)})
    out = cfg.to_dict()
    model = out["model"]
    model.update(n_kv_heads=cfg.model.kv_heads, head_dim=cfg.model.head_size,
                 d_ff=cfg.model.ff_size, vocab_size=vocab_size)
    mixers, ffns = {m for m, _ in cfg.model.period}, {f for _, f in cfg.model.period}
    if "moe" in ffns:
        model["moe"]["d_expert"] = cfg.model.moe.d_expert or cfg.model.ff_size
    else:
        del model["moe"]
    if "mamba" not in mixers:
        del model["mamba"]
    optim = out["optim"]
    for field in {f for fields in OPTIMIZER_FIELDS.values() for f in fields}:
        if field not in OPTIMIZER_FIELDS[cfg.optim.name]:
            del optim[field]
    return out


def to_yaml(tree: dict[str, Any]) -> str:
    return yaml.safe_dump(tree, sort_keys=False)


def fields_with_role(*roles: str, section: type[BaseModel] = ExperimentConfig) -> frozenset[str]:
    """The dotted names of the fields tagged with one of `roles` (every field of a tagged
    section), e.g. fields_with_role(BOOKKEEPING) holds "name" and "logging.progress"."""
    out: set[str] = set()
    for name, info in section.model_fields.items():
        extra = info.json_schema_extra
        tagged = isinstance(extra, dict) and extra.get("role") in roles
        sub = info.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            inner = _leaves(sub) if tagged else fields_with_role(*roles, section=sub)
            out |= {f"{name}.{leaf}" for leaf in inner}
        elif tagged:
            out.add(name)
    return frozenset(out)


def _leaves(section: type[BaseModel]) -> list[str]:
    """Every field of a section, nested sections flattened ("moe.top_k")."""
    out = []
    for name, info in section.model_fields.items():
        sub = info.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            out += [f"{name}.{leaf}" for leaf in _leaves(sub)]
        else:
            out.append(name)
    return out


# ----------------------------------------------------------------------------- loading


def _section_fields(model_cls: type[BaseModel], path: list[str]) -> list[str]:
    """Field names valid at `path` (for close-match suggestions)."""
    cls: Any = model_cls
    for part in path:
        field = cls.model_fields.get(part)
        if field is None or not (isinstance(field.annotation, type)
                                 and issubclass(field.annotation, BaseModel)):
            return []
        cls = field.annotation
    return list(cls.model_fields)


def _format_error(err: dict[str, Any], model_cls: type[BaseModel]) -> str:
    loc = [str(p) for p in err["loc"]]
    field = ".".join(loc) or "config"
    if err["type"] == "extra_forbidden":
        allowed = _section_fields(model_cls, loc[:-1])
        close = difflib.get_close_matches(loc[-1], allowed, n=1)
        hint = f"; did you mean {'.'.join(loc[:-1] + close)}?" if close else ""
        return f"{field}: unknown field{hint} (allowed: {', '.join(allowed)})"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "value_error" or not loc:
        names_a_field = "." in msg.split(" ", 1)[0]
        return msg if names_a_field or not loc else f"{field}: {msg}"
    return f"{field}: {msg} (got {err.get('input')!r})"


def validate(raw: dict[str, Any], model_cls: type[BaseModel] = ExperimentConfig) -> Any:
    """Validate a raw dict into `model_cls`, turning pydantic errors into one-line ConfigErrors."""
    try:
        return model_cls.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc.errors()[0], model_cls)) from None


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as {"section.field": value}, for field-by-field comparison."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        out.update(flatten(value, name + ".") if isinstance(value, dict) and value
                   else {name: value})
    return out


def first_difference(mine: dict[str, Any], theirs: dict[str, Any],
                     ignore: frozenset[str] = frozenset()) -> tuple[str, Any, Any] | None:
    """(dotted field, my value, their value) of the first field (in my config's order, then
    theirs) whose values differ, skipping the dotted names in `ignore`; None when they all
    agree."""
    a, b = flatten(mine), flatten(theirs)
    return next(((key, a.get(key), b.get(key)) for key in [*a, *(k for k in b if k not in a)]
                 if key not in ignore and a.get(key) != b.get(key)), None)


def parse_value(text: str) -> Any:
    """A `key=value` right-hand side, read as YAML so `3e-3`, `true`, `[1,2]`, `null` work."""
    try:
        return yaml.load(text, Loader=YamlLoader) if text != "" else ""
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted `a.b=value` overrides to a nested dict (returns a new dict)."""
    import copy

    out = copy.deepcopy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.steps=200")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
            node = child
        node[parts[-1]] = parse_value(value)
    return out


class YamlLoader(yaml.SafeLoader):
    """The one YAML reader of experiments, sweeps and overrides: safe_load, but with YAML 1.2
    floats (`1e-4` is a number; PyYAML's YAML 1.1 reads it as a string) and a key given twice in
    one mapping (say, two `train:` sections) an error instead of the last one silently winning."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} appears twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_yaml(path: str | Path, kind: str = "config",
              sections: str = "sections (model, train, ...)") -> dict[str, Any]:
    """A YAML file's top-level mapping ({} when empty); any problem is one ConfigError line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such {kind} file")
    try:
        raw = yaml.load(path.read_text(), Loader=YamlLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of {sections}")
    return raw


def load(path: str | Path | None, overrides: list[str] = ()) -> ExperimentConfig:
    """YAML file (or defaults when None) + dotted overrides -> validated config."""
    raw = read_yaml(path) if path is not None else {}
    if path is not None and "name" not in raw:
        raw["name"] = Path(path).stem
    return validate(apply_overrides(raw, list(overrides)))
