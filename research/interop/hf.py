"""Hugging Face interop: config.json <-> ModelConfig, parameter names and layouts per family,
and safetensors read/write with numpy (no torch, no pickle at run time).

Families (the model code computes the same functions as the transformers classes):

| HF model_type | our layer_pattern | notes |
|---|---|---|
| llama   | attention:mlp  | GQA, tied or untied embeddings, rope_theta (default rope only) |
| mistral | attention:mlp  | + sliding_window |
| mixtral | attention:moe  | softmax top-k router renormalised over the top k |
| mamba2  | mamba:none     | in_proj split into (z, x, dt) per head and (B, C) per group |

Conversion is a pure mapping of trees: a `Rule` says which of our parameters (paths inside a
layer, or global) come from which HF tensors, and how to reshape them both ways. Rotary needs no
permutation: ours uses the same half-split pairing as HF Llama (layers.rotary).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from research import config as config_lib
from research.config import ConfigError, ModelConfig
from research.models.parameterization import is_standard_function

Path_ = tuple[str, ...]
Arrays = tuple[np.ndarray, ...]

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "mixtral": "MixtralForCausalLM", "mamba2": "Mamba2ForCausalLM"}
PATTERNS = {"llama": ("attention:mlp",), "mistral": ("attention:mlp",),
            "mixtral": ("attention:moe",), "mamba2": ("mamba:none",)}
DEFAULT_THETA = {"llama": 10000.0, "mistral": 10000.0, "mixtral": 1e6}
DEFAULT_WINDOW = {"mistral": 4096}  # MistralConfig's default when config.json omits the key
IGNORED_TENSORS = ("rotary_emb.inv_freq",)  # buffers some old checkpoints carry


# ----------------------------------------------------------------------------- configs


def _refuse(where: str, field: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{where}: {field}={value!r} is not supported (allowed: {allowed})")


def _rope_theta(hf: dict[str, Any], family: str, where: str) -> float:
    """rope_theta from a v4 (rope_theta + rope_scaling) or v5 (rope_parameters) config.json."""
    params = hf.get("rope_parameters") or {}
    if hf.get("rope_scaling"):
        raise _refuse(where, "rope_scaling", hf["rope_scaling"], "null (default rotary)")
    if params.get("rope_type", "default") != "default":
        raise _refuse(where, "rope_parameters.rope_type", params["rope_type"], "default")
    if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise _refuse(where, "partial_rotary_factor", hf.get("partial_rotary_factor"), "1.0")
    return float(params.get("rope_theta", hf.get("rope_theta", DEFAULT_THETA[family])))


def model_from_hf(hf: dict[str, Any], where: str = "config.json") -> dict[str, Any]:
    """An HF config.json -> our `model:` section (raw dict), or a ConfigError naming the field
    that no ModelConfig expresses."""
    try:
        return _model_from_hf(hf, where)
    except KeyError as exc:
        raise ConfigError(f"{where}: missing field {exc.args[0]}") from None


def _model_from_hf(hf: dict[str, Any], where: str) -> dict[str, Any]:
    family = hf.get("model_type")
    if family not in ARCHITECTURES:
        raise _refuse(where, "model_type", family, ", ".join(ARCHITECTURES))
    if hf.get("hidden_act", "silu") != "silu":
        raise _refuse(where, "hidden_act", hf["hidden_act"], "silu")
    common = {"d_model": hf["hidden_size"], "n_layers": hf["num_hidden_layers"],
              "vocab_size": hf["vocab_size"], "layer_pattern": list(PATTERNS[family]),
              "tie_embeddings": bool(hf.get("tie_word_embeddings", family != "mamba2"))}
    if family == "mamba2":
        for field, allowed in (("use_bias", False), ("use_conv_bias", True)):
            if hf.get(field, allowed) != allowed:
                raise _refuse(where, field, hf[field], str(allowed))
        limit = hf.get("time_step_limit", [0.0, math.inf])
        if limit[0] != 0.0 or limit[1] not in (math.inf, {"__float__": "Infinity"}):
            raise _refuse(where, "time_step_limit", limit, "[0.0, inf]")
        heads = hf["expand"] * hf["hidden_size"] // hf["head_dim"]
        if hf.get("num_heads", heads) != heads:
            raise _refuse(where, "num_heads", hf["num_heads"],
                          f"expand*hidden_size/head_dim={heads}")
        return {**common, "norm_eps": hf.get("layer_norm_epsilon", 1e-5),
                "mamba": {"d_state": hf["state_size"], "head_dim": hf["head_dim"],
                          "expand": hf["expand"], "n_groups": hf["n_groups"],
                          "chunk_size": hf["chunk_size"], "conv_width": hf["conv_kernel"],
                          "dt_min": hf.get("time_step_min", 1e-3),
                          "dt_max": hf.get("time_step_max", 1e-1)}}
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field):
            raise _refuse(where, field, hf[field], "false")
    out = {**common, "n_heads": hf["num_attention_heads"],
           "n_kv_heads": hf.get("num_key_value_heads") or hf["num_attention_heads"],
           "head_dim": hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
           "d_ff": hf["intermediate_size"], "rope_theta": _rope_theta(hf, family, where),
           "norm_eps": hf.get("rms_norm_eps", 1e-6),
           "sliding_window": hf.get("sliding_window", DEFAULT_WINDOW.get(family))}
    if family == "mixtral":
        out["moe"] = {"n_experts": hf["num_local_experts"], "top_k": hf["num_experts_per_tok"],
                      "balance_coef": hf.get("router_aux_loss_coef", 0.001)}
    return out


def check_init_from(cfg: ModelConfig) -> None:
    """model.init_from names an HF folder whose architecture is `cfg`'s; else a ConfigError
    naming the first field that differs."""
    family_of(cfg)  # a model no HF class expresses cannot start from HF weights either
    hf_dir = Path(cfg.init_from).expanduser()
    theirs = config_lib.flatten(model_from_hf(read_config(hf_dir), f"{hf_dir}/config.json"))
    mine = {**config_lib.flatten(cfg.model_dump(mode="json")), "head_dim": cfg.head_size,
            "n_kv_heads": cfg.kv_heads, "d_ff": cfg.ff_size}  # None means the derived value
    # fields that do not change the parameters (training and compute choices) may differ, as
    # they may between two runs (research/train/state.params_from_run)
    free = config_lib.fields_with_role(*config_lib.ALL_ROLES)
    for key, value in theirs.items():
        if f"model.{key}" not in free and mine[key] != value:
            raise ConfigError(f"model.{key}={mine[key]!r} differs from {value!r} in "
                              f"model.init_from={cfg.init_from}")


def family_of(cfg: ModelConfig) -> str:
    """The HF family that expresses `cfg`, or a ConfigError naming the field that none does."""
    if not is_standard_function(cfg):
        raise ConfigError(f"model.parameterization={cfg.parameterization} away from its base shape "
                          "(or model.output_multiplier or model.embedding_multiplier != 1) "
                          "scales the forward pass in ways no Hugging Face class expresses "
                          "(allowed: standard, both multipliers 1)")
    if cfg.qk_norm:
        raise ConfigError("model.qk_norm=true: none of the Hugging Face families written here "
                          f"({', '.join(ARCHITECTURES)}) normalises queries and keys (allowed: "
                          "false)")
    kinds = set(cfg.layer_pattern)
    allowed = "[attention:mlp], [attention:moe] or [mamba:none]"
    if len(kinds) != 1 or next(iter(kinds)) not in ("attention:mlp", "attention:moe", "mamba:none"):
        raise ConfigError(f"model.layer_pattern={list(cfg.layer_pattern)}: no Hugging Face class "
                          f"expresses this layer pattern (allowed: {allowed})")
    kind = next(iter(kinds))
    if kind == "mamba:none":
        return "mamba2"
    if kind == "attention:moe":
        if cfg.moe.n_shared_experts:
            raise ConfigError(f"model.moe.n_shared_experts={cfg.moe.n_shared_experts}: Mixtral "
                              "has no shared experts (allowed: 0)")
        return "mixtral"
    return "mistral" if cfg.sliding_window else "llama"


def model_to_hf(cfg: ModelConfig, vocab_size: int, eos_id: int,
                max_positions: int) -> dict[str, Any]:
    """Our model section -> an HF config.json dict (ConfigError if no HF class expresses it)."""
    family = family_of(cfg)
    common = {"architectures": [ARCHITECTURES[family]], "model_type": family,
              "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
              "vocab_size": vocab_size, "tie_word_embeddings": cfg.tie_embeddings,
              "hidden_act": "silu", "bos_token_id": eos_id, "eos_token_id": eos_id,
              "torch_dtype": cfg.param_dtype}
    if family == "mamba2":
        m = cfg.mamba
        return {**common, "num_heads": m.n_heads(cfg.d_model), "head_dim": m.head_dim,
                "state_size": m.d_state, "expand": m.expand, "n_groups": m.n_groups,
                "chunk_size": m.chunk_size, "conv_kernel": m.conv_width,
                "layer_norm_epsilon": cfg.norm_eps, "use_bias": False, "use_conv_bias": True,
                "time_step_min": m.dt_min, "time_step_max": m.dt_max, "residual_in_fp32": True,
                "pad_token_id": eos_id}
    out = {**common, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads,
           "head_dim": cfg.head_size, "intermediate_size": cfg.ff_size,
           "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
           "max_position_embeddings": max_positions, "attention_bias": False}
    if family == "llama":
        out["mlp_bias"] = False
    else:
        out["sliding_window"] = cfg.sliding_window
    if family == "mixtral":
        out.update(intermediate_size=cfg.moe.d_expert or cfg.ff_size,
                   num_local_experts=cfg.moe.n_experts, num_experts_per_tok=cfg.moe.top_k,
                   router_aux_loss_coef=cfg.moe.balance_coef)
    return out


# ----------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class Rule:
    """Our parameters `ours` (paths) <-> HF tensors `hf` (names), with the layout change both
    ways: `to_ours(*hf_arrays) -> our arrays`, `to_hf(*our_arrays) -> hf arrays`."""

    ours: tuple[Path_, ...]
    hf: tuple[str, ...]
    to_ours: Callable[..., Arrays]
    to_hf: Callable[..., Arrays]


def _same(path: Path_, name: str) -> Rule:
    return Rule((path,), (name,), lambda a: (a,), lambda a: (a,))


def _linear(path: Path_, name: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> Rule:
    """torch Linear weight [out, in] <-> our kernel [*in_shape, *out_shape]."""
    n_in = math.prod(in_shape)
    return Rule((path,), (name,), lambda w: (w.T.reshape(*in_shape, *out_shape),),
                lambda k: (k.reshape(n_in, -1).T,))


def _split(sizes: list[int], axis: int, array: np.ndarray) -> list[np.ndarray]:
    return np.split(array, np.cumsum(sizes)[:-1], axis=axis)


def _attention_rules(cfg: ModelConfig) -> list[Rule]:
    d, n, kv, h = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_size
    return [_linear(("attention", "q", "kernel"), "self_attn.q_proj.weight", (d,), (n, h)),
            _linear(("attention", "k", "kernel"), "self_attn.k_proj.weight", (d,), (kv, h)),
            _linear(("attention", "v", "kernel"), "self_attn.v_proj.weight", (d,), (kv, h)),
            _linear(("attention", "o", "kernel"), "self_attn.o_proj.weight", (n, h), (d,)),
            _same(("mixer_norm", "scale"), "input_layernorm.weight")]


def _mlp_rules(cfg: ModelConfig) -> list[Rule]:
    d, f = cfg.d_model, cfg.ff_size
    return [_linear(("mlp", "gate", "kernel"), "mlp.gate_proj.weight", (d,), (f,)),
            _linear(("mlp", "up", "kernel"), "mlp.up_proj.weight", (d,), (f,)),
            _linear(("mlp", "down", "kernel"), "mlp.down_proj.weight", (f,), (d,)),
            _same(("ffn_norm", "scale"), "post_attention_layernorm.weight")]


def _moe_rules(cfg: ModelConfig) -> list[Rule]:
    """Mixtral's per-expert w1 (gate), w3 (up), w2 (down) <-> our stacked [E, ...] kernels."""
    e = cfg.moe.n_experts
    rules = [_linear(("moe", "router", "kernel"), "block_sparse_moe.gate.weight",
                     (cfg.d_model,), (e,)),
             _same(("ffn_norm", "scale"), "post_attention_layernorm.weight")]
    for ours, theirs in (("gate", "w1"), ("up", "w3"), ("down", "w2")):
        names = tuple(f"block_sparse_moe.experts.{i}.{theirs}.weight" for i in range(e))
        rules.append(Rule((("moe", ours),), names,
                          lambda *ws: (np.stack([w.T for w in ws]),),
                          lambda k: tuple(k.transpose(0, 2, 1))))
    return rules


def _mamba_rules(cfg: ModelConfig) -> list[Rule]:
    """HF's fused in_proj rows [z (H*P), x (H*P), B (G*N), C (G*N), dt (H)] and conv channels
    [x, B, C] <-> our per-head (z, x, dt) and per-group (B, C) kernels (docs/interop.md)."""
    m, d = cfg.mamba, cfg.d_model
    H, P, G, N, W = m.n_heads(d), m.head_dim, m.n_groups, m.d_state, m.conv_width
    inner, rows = H * P, [H * P, H * P, G * N, G * N, H]

    def in_to_ours(w: np.ndarray) -> Arrays:
        z, x, b, c, dt = (part.T for part in _split(rows, 0, w))
        zxdt = np.concatenate([z.reshape(d, H, P), x.reshape(d, H, P), dt.reshape(d, H, 1)], -1)
        return zxdt, np.concatenate([b.reshape(d, G, N), c.reshape(d, G, N)], -1)

    def in_to_hf(zxdt: np.ndarray, bc: np.ndarray) -> Arrays:
        z, x, dt = _split([P, P, 1], -1, zxdt)
        b, c = _split([N, N], -1, bc)
        return (np.concatenate([v.reshape(d, -1) for v in (z, x, b, c, dt)], -1).T,)

    def conv_to_ours(w: np.ndarray, bias: np.ndarray) -> Arrays:
        (wx, wb, wc), (bx, bb, bc) = _split(rows[1:4], 0, w[:, 0]), _split(rows[1:4], 0, bias)
        kbc = np.concatenate([wb.T.reshape(W, G, N), wc.T.reshape(W, G, N)], -1)
        bbc = np.concatenate([bb.reshape(G, N), bc.reshape(G, N)], -1)
        return wx.T.reshape(W, H, P), kbc, bx.reshape(H, P), bbc

    def conv_to_hf(kx: np.ndarray, kbc: np.ndarray, bx: np.ndarray, bbc: np.ndarray) -> Arrays:
        kb, kc = _split([N, N], -1, kbc)
        bb, bc = _split([N, N], -1, bbc)
        weight = np.concatenate([v.reshape(W, -1) for v in (kx, kb, kc)], -1).T[:, None, :]
        return weight, np.concatenate([v.reshape(-1) for v in (bx, bb, bc)])

    conv = ("mamba", "conv_x"), ("mamba", "conv_bc")
    return [Rule((("mamba", "in_zxdt", "kernel"), ("mamba", "in_bc", "kernel")),
                 ("mixer.in_proj.weight",), in_to_ours, in_to_hf),
            Rule(tuple((*c, "kernel") for c in conv) + tuple((*c, "bias") for c in conv),
                 ("mixer.conv1d.weight", "mixer.conv1d.bias"), conv_to_ours, conv_to_hf),
            _same(("mamba", "dt_bias"), "mixer.dt_bias"),
            _same(("mamba", "A_log"), "mixer.A_log"),
            _same(("mamba", "D"), "mixer.D"),
            Rule((("mamba", "norm"),), ("mixer.norm.weight",), lambda w: (w.reshape(H, P),),
                 lambda s: (s.reshape(inner),)),
            _linear(("mamba", "out", "kernel"), "mixer.out_proj.weight", (H, P), (d,)),
            _same(("mixer_norm", "scale"), "norm.weight")]


LAYER_RULES = {"attention": _attention_rules, "mamba": _mamba_rules, "mlp": _mlp_rules,
               "moe": _moe_rules, "none": lambda cfg: []}


def _global_rules(cfg: ModelConfig, vocab: int) -> tuple[str, list[Rule]]:
    """(HF prefix of layer i, the rules outside the layers)."""
    if family_of(cfg) == "mamba2":
        prefix, embed, norm = ("backbone.layers.{}.", "backbone.embeddings.weight",
                               "backbone.norm_f.weight")
    else:
        prefix, embed, norm = "model.layers.{}.", "model.embed_tokens.weight", "model.norm.weight"
    rules = [_same(("embed", "embedding"), embed), _same(("final_norm", "scale"), norm)]
    if not cfg.tie_embeddings:
        rules.append(_linear(("lm_head", "kernel"), "lm_head.weight", (cfg.d_model,), (vocab,)))
    return prefix, rules


def _layer_plan(cfg: ModelConfig) -> Iterator[tuple[Path_, list[int], list[Rule]]]:
    """(our path prefix, the layers it holds, the rules) per position of the period: scanned
    stacks hold layers j, j+P, ... along a leading axis; unscanned ones one layer each."""
    period = cfg.period
    for j, (mixer, ffn) in enumerate(period):
        rules = LAYER_RULES[mixer](cfg) + LAYER_RULES[ffn](cfg)
        layers = list(range(j, cfg.n_layers, len(period)))
        if cfg.scan_layers:
            yield ("layers", f"block_{j}"), layers, rules
        else:
            for i in layers:
                yield (f"layer_{i}",), [i], rules


def hf_to_params(cfg: ModelConfig, vocab: int, read: Callable[[str], np.ndarray]
                 ) -> Iterator[tuple[Path_, np.ndarray]]:
    """Our parameters, one (path, array) at a time, from `read(hf_name)`; a scanned stack's
    leaf stacks its layers (so at most one stacked parameter is in host memory at once)."""
    prefix, rules = _global_rules(cfg, vocab)
    for rule in rules:
        yield from zip(rule.ours, rule.to_ours(*map(read, rule.hf)), strict=True)
    for path, layers, layer_rules in _layer_plan(cfg):
        for rule in layer_rules:
            per_layer = [rule.to_ours(*(read(prefix.format(i) + n) for n in rule.hf))
                         for i in layers]
            for k, ours in enumerate(rule.ours):
                arrays = [out[k] for out in per_layer]
                yield (*path, *ours), np.stack(arrays) if cfg.scan_layers else arrays[0]


def params_to_hf(cfg: ModelConfig, vocab: int, get: Callable[[Path_], np.ndarray]
                 ) -> Iterator[tuple[str, np.ndarray]]:
    """HF tensors (name, array), from `get(our path)` of host arrays."""
    prefix, rules = _global_rules(cfg, vocab)
    for rule in rules:
        yield from zip(rule.hf, rule.to_hf(*map(get, rule.ours)), strict=True)
    for path, layers, layer_rules in _layer_plan(cfg):
        for rule in layer_rules:
            stacked = [get((*path, *ours)) for ours in rule.ours]
            for r, i in enumerate(layers):
                arrays = [a[r] for a in stacked] if cfg.scan_layers else stacked
                names = [prefix.format(i) + n for n in rule.hf]
                yield from zip(names, rule.to_hf(*arrays), strict=True)


# ----------------------------------------------------------------------------- files


class SafetensorsReader:
    """Lazy, pickle-free reads of an HF folder's (possibly sharded) model*.safetensors."""

    def __init__(self, folder: Path) -> None:
        import ml_dtypes  # noqa: F401 (registers bfloat16 with numpy for bf16 checkpoints)
        from safetensors import safe_open

        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                raise ConfigError(f"{index}: not a safetensors index (JSON with a weight_map of "
                                  "tensor name -> file)") from None
        else:
            files = ["model.safetensors"]
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise ConfigError(f"{folder}: {missing[0]} is missing (an HF model folder holds "
                              "config.json and model.safetensors or a sharded index)")
        self.folder = folder
        self.handles = {f: self._read(f, lambda f=f: safe_open(str(folder / f), framework="np"))
                        for f in files}
        self.where = {name: f for f, h in self.handles.items() for name in h.keys()}
        self.used: set[str] = set()

    def _read(self, file: str, read: Callable[[], Any]) -> Any:
        """`read()`, with a truncated or malformed file (the library's SafetensorError, or the
        OS's error on a short read) turned into one line naming it."""
        from safetensors import SafetensorError

        try:
            return read()
        except (SafetensorError, OSError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(f"{self.folder / file}: not a readable safetensors file ({reason}); "
                              "is it truncated? download it again") from None

    def __call__(self, name: str) -> np.ndarray:
        if name not in self.where:
            raise ConfigError(f"{self.folder}: tensor {name} is missing from the safetensors files")
        self.used.add(name)
        file = self.where[name]
        return self._read(file, lambda: self.handles[file].get_tensor(name))

    def unused(self) -> list[str]:
        return sorted(n for n in self.where if n not in self.used
                      and not n.endswith(IGNORED_TENSORS) and n != "lm_head.weight")


def read_config(hf_dir: Path) -> dict[str, Any]:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ConfigError(f"{hf_dir}: not a Hugging Face model folder (no config.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON ({exc.msg}, line {exc.lineno})") from None


def load_params(hf_dir: str | Path, cfg: ModelConfig, abstract: Any) -> Any:
    """The params tree of `cfg` from an HF folder, each leaf placed straight into its sharding:
    `abstract` is the params' ShapeDtypeStruct tree carrying shardings (StateSpec.abstract), and
    `jax.make_array_from_callback` hands every device only its slice, so the model is never
    whole on one device (the host holds one, layer-stacked, parameter at a time)."""
    import jax
    from flax.traverse_util import flatten_dict, unflatten_dict

    read = SafetensorsReader(Path(hf_dir))
    targets = flatten_dict(abstract)
    vocab = targets[("embed", "embedding")].shape[0]
    out = {}
    for path, array in hf_to_params(cfg, vocab, read):
        target = targets[path]
        if array.shape != target.shape:
            raise ConfigError(f"{read.folder}: {'/'.join(path)} gets shape {list(array.shape)} "
                              f"from the HF tensors but the model has {list(target.shape)}")
        array = array.astype(target.dtype)
        out[path] = jax.make_array_from_callback(array.shape, target.sharding,
                                                 lambda index, a=array: a[index])
    missing = sorted(targets.keys() - out.keys())
    if missing:
        raise ConfigError(f"model: no HF tensor maps to {'/'.join(missing[0])} (a layout the "
                          "conversion does not know)")
    unused = read.unused()
    if unused:
        raise ConfigError(f"{read.folder}: tensor {unused[0]} has no counterpart in the model "
                          "(an unsupported option or architecture)")
    return unflatten_dict(out)


def write_safetensors(tensors: dict[str, np.ndarray], folder: Path, max_shard_bytes: int) -> None:
    """model.safetensors, or model-0000i-of-0000n.safetensors + the index above max_shard_bytes."""
    from safetensors.numpy import save_file

    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in tensors.items():
        if shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = np.ascontiguousarray(array)
        size += array.nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())},
             "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def document_start(hf: dict[str, Any], tokenizer_json: Path | None, eos_id: int) -> str | int:
    """data.document_start for an imported model, so a prompt starts as its own tokenizer starts
    a text for transformers: the token its tokenizer.json's post-processor puts first (Llama's
    BOS), or nothing ('none'); without a tokenizer.json, config.json's bos_token_id. A BOS that
    is the eos token is this framework's own convention, 'eos'."""
    if tokenizer_json is not None:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tokenizer_json))
        plain = tok.encode("a", add_special_tokens=False).ids
        full = tok.encode("a", add_special_tokens=True).ids
        starts = [i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain]
        prefix = full[:starts[0]] if starts else []
        if len(prefix) > 1:
            raise _refuse(str(tokenizer_json), "post_processor", prefix,
                          "at most one token before a text")
        bos = prefix[0] if prefix else None
    else:
        bos = hf.get("bos_token_id")
        bos = bos if isinstance(bos, int) else None
    return "none" if bos is None else "eos" if bos == eos_id else bos


def byte_tokenizer_json() -> str:
    """A `tokenizers` tokenizer.json equal to data.tokenizer='byte': token b is UTF-8 byte b
    (a byte-level BPE with the 256 bytes and no merges), 256 is <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: b for b, char in _gpt2_bytes().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    return tok.to_str()


def _gpt2_bytes() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (what ByteLevel pre-tokenizes into)."""
    keep = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), 256)}
    moved = [b for b in range(256) if b not in keep]
    return {b: chr(b) if b in keep else chr(256 + moved.index(b)) for b in range(256)}
