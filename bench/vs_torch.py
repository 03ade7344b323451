"""Our decoders (dense, MoE, Mamba-2) against idiomatic PyTorch implementations of the same
models, side by side.

    PYTHONPATH=. python bench/vs_torch.py [--steps 4] [--repeats 5] [--variants ...]
        [--dtypes ...] [EXPERIMENT.yaml ...] [key=value ...]

PyTorch is a bench-only extra (`pip install '.[bench]'`). For each experiment (default
dense_tiny, dense_small, moe_tiny, mamba_tiny; `key=value` overrides apply to all) both
frameworks start from the same weights (ours, copied into the PyTorch modules), and the script
checks that the parameter counts are equal and that the loss of the first batch agrees within
1e-4 relative in float32 (2e-2 in bfloat16) before timing (MoE: ours computed with the dropless
dispatch, the exact function, since capacity dispatch may drop a token where the PyTorch model,
like transformers' Mixtral, drops none). Every variant runs in its own process (one process
works while the others wait: two frameworks' thread pools in one process take the cores from
each other) and trains on the same batches (AdamW, global-norm clipping at 1.0, the MoE
router's balance and z-losses on both sides), in turns: `--steps` steps each per round,
`--repeats` rounds after a warm-up round (compilation excluded). The script prints the median
tokens/s and our speed relative to each variant, then one `result:` line per headline figure
with its target.

The PyTorch models (`TorchDecoder`): Llama blocks with `scaled_dot_product_attention`; MoE
feed-forwards as transformers' Mixtral computes them (softmax top-k router, a loop over the
experts gathering their tokens, `index_add_`); Mamba-2 mixers with the chunked SSD of the
Mamba-2 paper's minimal PyTorch listing (`ssd_minimal_discrete`: einsums over chunks, no custom
kernels), not transformers' Mamba2 torch fallback, which without the CUDA kernels is a slow
naive path and would flatter us.

Variants: jax (our train step as configured), jax-plain, jax-custom (model.projection), jax-chunked,
jax-xla, jax-cudnn (model.attention_impl), jax-autocast (model.backward_dtype = the compute
dtype: in bfloat16 the backward matmuls round the cotangent to bf16, as autocast's do), torch
(eager), torch-compile (torch.compile of the model), each in float32 and in bfloat16 (ours: bf16
matmul operands with float32 accumulation, backward in float32 unless jax-autocast; PyTorch:
autocast to bf16; the SSD runs in float32 on both sides). On a GPU (JAX's backend) PyTorch runs
on CUDA.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.sidebyside import compiled_step, initial_state
from research import config
from research.config import ModelConfig
from research.launch import allocator
from research.models.decoder import Decoder
from research.train.objectives import lm_loss

ROOT = Path(__file__).resolve().parents[1]
OURS = {"jax": [], **{f"jax-{p}": [f"model.projection={p}"] for p in ("plain", "custom")},
        **{f"jax-{impl}": [f"model.attention_impl={impl}"] for impl in ("chunked", "xla", "cudnn")},
        "jax-autocast": ["model.backward_dtype={dtype}"]}  # {dtype}: the run's compute dtype
VARIANTS = (*OURS, "torch", "torch-compile")
EXPERIMENTS = ("dense_tiny", "dense_small", "moe_tiny", "mamba_tiny")


def tensor(a) -> torch.Tensor:
    """One of our (jax) arrays as a writable float32 torch tensor."""
    return torch.from_numpy(np.array(a, np.float32))


def linear_weight(kernel, n_in: int = 1) -> torch.Tensor:
    """Our projection kernel [*in (n_in axes), *out] -> nn.Linear.weight [out, in]."""
    return tensor(kernel.reshape(math.prod(kernel.shape[:n_in]), -1).T)


class Attention(nn.Module):
    """GQA attention with rotary positions, by `scaled_dot_product_attention`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, n, kv, h = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_size
        self.n, self.kv, self.h = n, kv, h
        self.q, self.k = nn.Linear(d, n * h, bias=False), nn.Linear(d, kv * h, bias=False)
        self.v, self.o = nn.Linear(d, kv * h, bias=False), nn.Linear(n * h, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.n, self.h).transpose(1, 2)
        k = self.k(x).view(b, t, self.kv, self.h).transpose(1, 2)
        v = self.v(x).view(b, t, self.kv, self.h).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))

    def load(self, p: dict) -> None:
        for name in ("q", "k", "v"):  # [D, heads, H]
            getattr(self, name).weight.copy_(linear_weight(p[name]["kernel"]))
        self.o.weight.copy_(linear_weight(p["o"]["kernel"], n_in=2))  # [N, H, D]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split rotary (Hugging Face Llama's rotate_half)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class MLP(nn.Module):
    """SwiGLU: down(silu(gate x) * up x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, f = cfg.d_model, cfg.ff_size
        self.gate, self.up = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False)
        self.down = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))

    def load(self, p: dict) -> None:
        for name in ("gate", "up", "down"):
            getattr(self, name).weight.copy_(linear_weight(p[name]["kernel"]))


class MoE(nn.Module):
    """Mixtral's sparse block as transformers writes it: a float32 softmax router, top-k weights
    renormalised, then per expert the rows routed to it gathered, run through its SwiGLU and
    added back with `index_add_`; plus the Switch balance and router z-losses (as ours)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        moe, d = cfg.moe, cfg.d_model
        f, e = moe.d_expert or cfg.ff_size, moe.n_experts
        self.cfg = moe
        self.router = nn.Linear(d, e, bias=False)
        self.gate, self.up = nn.Parameter(torch.empty(e, d, f)), nn.Parameter(torch.empty(e, d, f))
        self.down = nn.Parameter(torch.empty(e, f, d))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape, e, k = x.shape, self.cfg.n_experts, self.cfg.top_k
        x = x.reshape(-1, shape[-1])
        with torch.autocast(x.device.type, enabled=False):  # the router in float32, as ours
            logits = self.router(x.float())
        probs = logits.softmax(-1)
        weights, experts = probs.topk(k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for expert in range(e):
            token, slot = torch.where(experts == expert)
            rows = x[token]
            y = (F.silu(rows @ self.gate[expert]) * (rows @ self.up[expert])) @ self.down[expert]
            out.index_add_(0, token, (y * weights[token, slot, None]).to(out.dtype))
        frac = F.one_hot(experts, e).sum(1).float().mean(0) / k
        balance = e * (frac * probs.mean(0)).sum()
        z = logits.logsumexp(-1).square().mean()
        return out.view(shape), self.cfg.balance_coef * balance + self.cfg.z_loss_coef * z

    def load(self, p: dict) -> None:
        self.router.weight.copy_(linear_weight(p["router"]["kernel"]))
        for name in ("gate", "up", "down"):
            getattr(self, name).copy_(tensor(p[name]))


def segsum(a: torch.Tensor) -> torch.Tensor:
    """[..., T] -> [..., T, T]: sum of a[j+1..i] below the diagonal, -inf above (stable form)."""
    t = a.size(-1)
    a = a[..., None].expand(*a.shape, t)
    a = a.masked_fill(~torch.tril(torch.ones(t, t, dtype=torch.bool, device=a.device), -1), 0)
    out = torch.cumsum(a, dim=-2)
    return out.masked_fill(~torch.tril(torch.ones(t, t, dtype=torch.bool, device=a.device)),
                           -torch.inf)


def ssd(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
        chunk: int) -> torch.Tensor:
    """The Mamba-2 paper's `ssd_minimal_discrete` (x [b, T, H, P], dt [b, T, H], A [H], B, C
    [b, T, G, N]); T padded to whole chunks with dt = 0 (no input, no decay)."""
    b, t, h, _ = x.shape
    q = min(chunk, t)
    pad = -t % q
    x, dt = F.pad(x, (0, 0, 0, 0, 0, pad)), F.pad(dt, (0, 0, 0, pad))
    B, C = (F.pad(v, (0, 0, 0, 0, 0, pad)).repeat_interleave(h // v.shape[2], dim=2)
            for v in (B, C))  # groups -> heads
    c = (t + pad) // q
    X, B, C = (v.reshape(b, c, q, *v.shape[2:]) for v in (x * dt[..., None], B, C))
    a = (dt * A).reshape(b, c, q, h).permute(0, 3, 1, 2)  # [b, h, c, q]
    a_cum = torch.cumsum(a, dim=-1)
    y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, torch.exp(segsum(a)), X)
    decay_states = torch.exp(a_cum[..., -1:] - a_cum)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_states, X)
    states = torch.cat([torch.zeros_like(states[:, :1]), states], dim=1)
    decay_chunk = torch.exp(segsum(F.pad(a_cum[..., -1], (1, 0))))
    states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)[:, :-1]
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states, torch.exp(a_cum))
    return (y_diag + y_off).reshape(b, c * q, h, -1)[:, :t]


class Mamba2(nn.Module):
    """The Mamba-2 mixer: in-projections, depthwise causal convs + SiLU, SSD, + D x, gated
    RMSNorm per group, out-projection (mamba_ssm's Mamba2 layer, without its CUDA kernels)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        m, d = cfg.mamba, cfg.d_model
        h, p, g, n, w = m.n_heads(d), m.head_dim, m.n_groups, m.d_state, m.conv_width
        self.dims, self.chunk, self.eps = (h, p, g, n), m.chunk_size, cfg.norm_eps
        self.in_zxdt = nn.Linear(d, h * (2 * p + 1), bias=False)
        self.in_bc = nn.Linear(d, g * 2 * n, bias=False)
        self.conv_x = nn.Conv1d(h * p, h * p, w, groups=h * p, padding=w - 1)
        self.conv_bc = nn.Conv1d(g * 2 * n, g * 2 * n, w, groups=g * 2 * n, padding=w - 1)
        self.dt_bias, self.A_log, self.D = (nn.Parameter(torch.empty(h)) for _ in range(3))
        self.norm = nn.Parameter(torch.empty(h * p))
        self.out = nn.Linear(h * p, d, bias=False)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        (h, p, g, n), (b, t, _) = self.dims, u.shape
        zxdt = self.in_zxdt(u).view(b, t, h, 2 * p + 1)
        z, x = zxdt[..., :p], zxdt[..., p:2 * p].reshape(b, t, h * p)
        x = F.silu(self.conv_x(x.transpose(1, 2))[..., :t]).transpose(1, 2).view(b, t, h, p)
        bc = F.silu(self.conv_bc(self.in_bc(u).transpose(1, 2))[..., :t]).transpose(1, 2)
        B, C = bc.view(b, t, g, 2 * n).split(n, dim=-1)
        dt = F.softplus(zxdt[..., 2 * p].float() + self.dt_bias)
        with torch.autocast(u.device.type, enabled=False):  # the SSD in float32, as ours
            y = ssd(x.float(), dt, -torch.exp(self.A_log), B.float(), C.float(), self.chunk)
        y = (y + self.D[:, None] * x) * F.silu(z.float())
        y = y.reshape(b, t, g, -1)
        y = y * torch.rsqrt(y.square().mean(-1, keepdim=True) + self.eps)
        return self.out(y.reshape(b, t, h * p) * self.norm)

    def load(self, p: dict) -> None:
        self.in_zxdt.weight.copy_(linear_weight(p["in_zxdt"]["kernel"]))  # [D, H, 2P + 1]
        self.in_bc.weight.copy_(linear_weight(p["in_bc"]["kernel"]))  # [D, G, 2N]
        for name in ("conv_x", "conv_bc"):  # kernel [w, *channels] -> Conv1d weight [ch, 1, w]
            conv = getattr(self, name)
            conv.weight.copy_(linear_weight(p[name]["kernel"])[:, None, :])
            conv.bias.copy_(tensor(p[name]["bias"].reshape(-1)))
        for name in ("dt_bias", "A_log", "D"):
            getattr(self, name).copy_(tensor(p[name]))
        self.norm.copy_(tensor(p["norm"].reshape(-1)))
        self.out.weight.copy_(linear_weight(p["out"]["kernel"], n_in=2))  # [H, P, D]


MIXERS = {"attention": Attention, "mamba": Mamba2}
FFNS = {"mlp": MLP, "moe": MoE}


class Block(nn.Module):
    """Pre-norm `x + mixer(norm(x))`, then `x + ffn(norm(x))` (none: no feed-forward)."""

    def __init__(self, cfg: ModelConfig, mixer: str, ffn: str):
        super().__init__()
        self.mixer_norm, self.mixer = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps), MIXERS[mixer](cfg)
        self.names = (mixer, ffn)
        if ffn != "none":
            self.ffn_norm, self.ffn = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps), FFNS[ffn](cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor | float]:
        y = self.mixer_norm(x)
        x = x + (self.mixer(y, cos, sin) if self.names[0] == "attention" else self.mixer(y))
        if self.names[1] == "none":
            return x, 0.0
        y = self.ffn(self.ffn_norm(x))
        y, aux = y if self.names[1] == "moe" else (y, 0.0)
        return x + y, aux

    def load(self, p: dict) -> None:
        mixer, ffn = self.names
        self.mixer_norm.weight.copy_(tensor(p["mixer_norm"]["scale"]))
        self.mixer.load(p[mixer])
        if ffn != "none":
            self.ffn_norm.weight.copy_(tensor(p["ffn_norm"]["scale"]))
            self.ffn.load(p[ffn])


class TorchDecoder(nn.Module):
    """The same decoder as research.models.decoder.Decoder (tied embeddings): tokens ->
    (logits, the MoE layers' summed aux loss)."""

    def __init__(self, cfg: ModelConfig, vocab: int):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(vocab, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, *cfg.period[i % len(cfg.period)])
                                    for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float]:
        h = self.cfg.head_size
        freq = self.cfg.rope_theta ** (-torch.arange(h // 2, dtype=torch.float32) / (h // 2))
        angle = torch.arange(tokens.shape[1], dtype=torch.float32)[:, None] * freq
        cos, sin = (torch.cat([f(angle)] * 2, -1).to(tokens.device) for f in (torch.cos, torch.sin))
        x, aux = self.embed(tokens), 0.0
        for layer in self.layers:
            x, layer_aux = layer(x, cos, sin)
            aux = aux + layer_aux
        return F.linear(self.norm(x), self.embed.weight), aux

    @torch.no_grad()
    def load(self, params: dict) -> None:
        """Our (tied) params, scanned or unrolled layers -> these modules' weights."""
        self.embed.weight.copy_(tensor(params["embed"]["embedding"]))
        self.norm.weight.copy_(tensor(params["final_norm"]["scale"]))
        period = len(self.cfg.period)
        for i, layer in enumerate(self.layers):
            layer.load(jax.tree.map(lambda a, i=i: a[i // period],
                                    params["layers"][f"block_{i % period}"])
                       if "layers" in params else params[f"layer_{i}"])


def device() -> str:
    """Where PyTorch runs: CUDA when JAX runs on a GPU (the same one), else the CPU."""
    return "cuda" if jax.default_backend() == "gpu" else "cpu"


def torch_step(model: nn.Module, cfg: config.ExperimentConfig, bf16: bool):
    """One AdamW step on tokens [B, T+1] (numpy), like train_step; returns the loss."""
    o = cfg.optim
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                            weight_decay=o.weight_decay)

    def step(tokens: np.ndarray) -> torch.Tensor:
        tokens = torch.from_numpy(tokens).long().to(device())
        with torch.autocast(device(), dtype=torch.bfloat16, enabled=bf16):
            logits, aux = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        (loss + aux).backward()
        if o.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        return loss.detach()

    return step


def exact(cfg: ModelConfig) -> ModelConfig:
    """The model as the first-loss check computes it: MoE with the dropless dispatch (the exact
    function; capacity dispatch may drop a token that PyTorch's loop over experts keeps)."""
    if any(ffn == "moe" for _, ffn in cfg.period):
        return cfg.model_copy(update={"moe": cfg.moe.model_copy(update={"dispatch": "dropless"})})
    return cfg


def _jax_runner(cfg: config.ExperimentConfig):
    """(run(tokens) -> loss, first-batch loss, parameter count, batches) of our train step."""
    step, state, data = compiled_step(cfg)
    params = jax.device_get(state["params"])
    model = Decoder(exact(cfg.model), params["embed"]["embedding"].shape[0])
    batch = next(data)["tokens"]
    first = float(jax.jit(lambda p, b: lm_loss(p, model, {"tokens": b})[1]["loss"])(
        params, jnp.asarray(batch)))
    holder = {"state": state}

    def run(tokens: np.ndarray) -> jax.Array:
        holder["state"], metrics = step(holder["state"], tokens)
        return metrics["loss"]

    return run, first, sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)), data


def _torch_runner(cfg: config.ExperimentConfig, compiled: bool):
    """The same for the PyTorch model, from our initial weights (same seed, same init)."""
    _, state, data = initial_state(cfg)
    params = jax.device_get(state["params"])
    model = TorchDecoder(cfg.model, params["embed"]["embedding"].shape[0])
    model.load(params)
    model.to(device())
    count = sum(p.numel() for p in model.parameters())
    if compiled:
        model = torch.compile(model)
    bf16 = cfg.model.compute_dtype != "float32"
    batch = next(data)["tokens"]
    with torch.no_grad(), torch.autocast(device(), dtype=torch.bfloat16, enabled=bf16):
        tokens = torch.from_numpy(batch).long().to(device())
        logits = model(tokens[:, :-1])[0].float()
        first = float(F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()))
    return torch_step(model, cfg, bf16), first, count, data


def _worker(conn, experiment: Path, overrides: list[str], variant: str, dtype: str) -> None:
    """One variant in its own process: build it, report (first loss, parameter count), then
    answer every `steps` request with the seconds those steps took on the next batches.

    Separate processes, because the two frameworks' thread pools in one process steal the
    cores from each other: measured in one process, our dense_tiny step took 203 ms next to
    PyTorch and 144 ms alone.
    """
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    cfg = config.load(experiment, [*overrides, f"model.compute_dtype={dtype}",
                                   *(o.format(dtype=dtype) for o in OURS.get(variant, []))])
    if variant in OURS:
        run, first, count, data = _jax_runner(cfg)
        done = jax.block_until_ready
    else:
        run, first, count, data = _torch_runner(cfg, compiled=variant == "torch-compile")
        done = float
    conn.send((first, count))
    while (steps := conn.recv()) is not None:
        batches = [next(data)["tokens"] for _ in range(steps)]
        start = time.perf_counter()
        for tokens in batches:
            loss = run(tokens)
        done(loss)
        conn.send(time.perf_counter() - start)


def compare(experiment: Path, overrides: list[str], variants: list[str], dtype: str, steps: int,
            repeats: int) -> dict[str, dict[str, float]]:
    """Start one worker per variant, check them against the first (ours), then time them in
    turns: {variant: {"step_time": median seconds, "first_loss": ...}}."""
    context = multiprocessing.get_context("spawn")
    workers = {}
    for name in variants:
        parent, child = context.Pipe()
        process = context.Process(target=_worker,
                                  args=(child, experiment, overrides, name, dtype))
        process.start()
        workers[name] = (process, parent)
    checks = {name: conn.recv() for name, (_, conn) in workers.items()}
    reference = variants[0]
    tol = 1e-4 if dtype == "float32" else 2e-2
    for name, (loss, count) in checks.items():
        assert count == checks[reference][1], \
            f"{name}: {count} parameters, {reference} {checks[reference][1]}"
        assert math.isclose(loss, checks[reference][0], rel_tol=tol), (
            f"{name}: first-batch loss {loss:.6f} vs {reference} {checks[reference][0]:.6f} "
            f"(tol {tol})")

    times: dict[str, list[float]] = {name: [] for name in workers}
    for round_ in range(repeats + 1):  # round 0: compilation and warm-up
        for name, (_, conn) in workers.items():  # one process works, the others wait
            conn.send(steps)
            seconds = conn.recv()
            if round_:
                times[name].append(seconds / steps)
    for process, conn in workers.values():
        conn.send(None)
        process.join()
    return {name: {"step_time": float(np.median(t)), "first_loss": checks[name][0]}
            for name, t in times.items()}


def results(experiment: str, dtype: str, rows: dict[str, dict[str, float]]) -> list[str]:
    """The `result:` lines of one experiment and dtype: ours against PyTorch, with the targets
    of issue 25 (every family >= 1.0x eager in float32; dense >= 1.25x eager and >= 1.0x
    torch.compile in float32; dense_small >= 0.9x eager in bfloat16)."""
    dense, short = experiment.startswith("dense"), "f32" if dtype == "float32" else "bf16"
    targets = {("float32", "torch"): 1.25 if dense else 1.0}
    if dense:
        targets[("float32", "torch-compile")] = 1.0
    if experiment == "dense_small":
        targets[("bfloat16", "torch")] = 0.9
    ours = {"jax": short, "jax-autocast": f"{short} autocast"}  # autocast: backward in bf16 too
    out = []
    for (want_dtype, variant), target in targets.items():
        for us, name in ours.items():
            if want_dtype == dtype and variant in rows and us in rows \
                    and (us == "jax" or dtype == "bfloat16"):
                ratio = rows[variant]["step_time"] / rows[us]["step_time"]
                label = "eager" if variant == "torch" else "compile"
                out.append(f"result: {experiment} {name} vs {label} {ratio:.2f} "
                           f"(target >= {target})")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS,
                        default=["jax", "jax-plain", "torch", "torch-compile"])
    parser.add_argument("--dtypes", nargs="+", choices=("float32", "bfloat16"),
                        default=["float32", "bfloat16"])
    parser.add_argument("args", nargs="*", help="experiment YAML files and key=value overrides")
    args = parser.parse_args()
    variants = ["jax", *[v for v in args.variants if v != "jax"]]  # ours first: the reference
    experiments = [Path(a) for a in args.args if a.endswith(".yaml")] or [
        ROOT / f"experiments/{name}.yaml" for name in EXPERIMENTS]
    overrides = [a for a in args.args if "=" in a]
    print(f"{jax.devices()[0].device_kind}, {allocator()}, torch {torch.__version__} on {device()} "
          f"({len(os.sched_getaffinity(0))} threads), one process per variant, {args.repeats} "
          f"rounds of {args.steps} steps each, in turns")
    print("| experiment | dtype | variant | step ms | tokens/s | ours vs it (speed) | first loss |")
    print("|---|---|---|---:|---:|---:|---:|")
    lines = []
    for experiment in experiments:
        tokens = config.load(experiment, overrides).train
        tokens_per_step = tokens.batch_size * tokens.seq_len
        for dtype in args.dtypes:
            rows = compare(experiment, overrides, variants, dtype, args.steps, args.repeats)
            for name, row in rows.items():
                median = row["step_time"]
                print(f"| {experiment.stem} | {dtype} | {name} | {median * 1e3:.0f} | "
                      f"{tokens_per_step / median:,.0f} | "
                      f"{median / rows['jax']['step_time']:.2f}x | {row['first_loss']:.5f} |",
                      flush=True)
            lines += results(experiment.stem, dtype, rows)
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
