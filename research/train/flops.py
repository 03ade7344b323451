"""Analytic parameter counts and training FLOPs per token, from the config alone (no JAX).

Counts follow research/models exactly (tests compare them with the initialised model). Each
layer family has its own small function, looked up by the names in the config's layer period
(`cfg.period`): a new mixer or feed-forward adds an entry to MIXER_PARAMS / FFN_PARAMS and, if
it does work that no weight accounts for (attention scores, an SSD scan), to MIXER_EXTRA_FLOPS.

FLOPs per token for training (forward + backward = 3 x forward, a multiply-add = 2 FLOPs):

    6 * (active projection params of the layers + d_model * vocab)
      + 12 * sum over attention layers of T_eff * n_heads * head_size

The first term is every projection, the output head included even when tied (the input
embedding is a lookup, not a matmul; norm scales are not matmuls). A MoE layer's active
parameters are its router, its shared experts and top_k routed experts: the work a token needs,
not the capacity padding or the dispatch gathers actually executed. The second is q k^T and
probs @ v: 2 matmuls x 2 FLOPs x T_eff keys x n_heads * head_size per token, times 3, with
T_eff = min(sliding_window, seq_len). Like PaLM (appendix B) it counts the full T x T square,
not the causal half that actually matters, so MFU is comparable with the literature.

A Mamba-2 layer (H heads of size P, state N, G groups, chunk Q; docs/mamba.md) counts all its
parameters in the first term: the projections and the depthwise conv are one multiply-add per
weight per token; the per-head/per-channel vectors (biases, A_log, D, norm scale; under 1%)
are counted alike for simplicity. Its SSD adds, per token, the matmuls of research/models/
mamba.py's `ssd_chunked` on T padded to c = ceil(T/q) chunks of q = min(Q, T) steps, times 3:

    [c * (2 q^2 (G N + H P) + 4 q H P N) + 2 H P N (c + 1)^2] / T

i.e. C B^T and its product with x within chunks (2 q G N + 2 q H P per token), each chunk's
state and each step's read of it (4 H P N), and the state passing between chunks, done as one
(c+1) x (c+1) decay matmul (2 H P N (c+1)^2 per sequence).
"""

from __future__ import annotations

from research.config import ModelConfig


def attention_params(cfg: ModelConfig) -> tuple[int, int]:
    """(stored, active per token) weights of q, k, v, o."""
    n = cfg.d_model * cfg.head_size * (2 * cfg.n_heads + 2 * cfg.kv_heads)
    return n, n


def mlp_params(cfg: ModelConfig) -> tuple[int, int]:
    """(stored, active per token) weights of the SwiGLU gate, up and down projections."""
    n = 3 * cfg.d_model * cfg.ff_size
    return n, n


def moe_params(cfg: ModelConfig) -> tuple[int, int]:
    """(stored, active per token): router + shared experts + E (stored) or top_k (active)
    routed SwiGLU experts of width d_expert."""
    moe = cfg.moe
    expert = 3 * cfg.d_model * (moe.d_expert or cfg.ff_size)
    always = cfg.d_model * moe.n_experts + moe.n_shared_experts * expert
    return always + moe.n_experts * expert, always + moe.top_k * expert


def attention_score_flops(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of q k^T and probs @ v (full square, see the module docstring)."""
    window = min(cfg.sliding_window or seq_len, seq_len)
    return 4.0 * window * cfg.n_heads * cfg.head_size


def mamba_params(cfg: ModelConfig) -> tuple[int, int]:
    """(stored, active per token) parameters of a Mamba-2 mixer (research/models/mamba.py):
    in-projections to z, x, dt (per head) and B, C (per group), the conv's weights and bias over
    x, B, C, dt_bias, A_log and D per head, the gated norm's scale, the out-projection."""
    m = cfg.mamba
    inner = m.expand * cfg.d_model
    heads, bc = m.n_heads(cfg.d_model), 2 * m.n_groups * m.d_state
    n = (cfg.d_model * (2 * inner + bc + heads) + (m.conv_width + 1) * (inner + bc) + 3 * heads
         + inner + inner * cfg.d_model)
    return n, n


def ssd_flops(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of the chunked SSD's matmuls (see the module docstring)."""
    m = cfg.mamba
    heads = m.n_heads(cfg.d_model)
    q = min(m.chunk_size, seq_len)
    chunks = -(-seq_len // q)
    hpn = heads * m.head_dim * m.d_state
    per_chunk = 2 * q * q * (m.n_groups * m.d_state + heads * m.head_dim) + 4 * q * hpn
    return (chunks * per_chunk + 2 * hpn * (chunks + 1) ** 2) / seq_len


MIXER_PARAMS = {"attention": attention_params, "mamba": mamba_params}
FFN_PARAMS = {"mlp": mlp_params, "moe": moe_params, "none": lambda cfg: (0, 0)}
MIXER_EXTRA_FLOPS = {"attention": attention_score_flops, "mamba": ssd_flops}


def _layers(cfg: ModelConfig) -> list[tuple[str, str]]:
    return [cfg.period[i % len(cfg.period)] for i in range(cfg.n_layers)]


def param_counts(cfg: ModelConfig, vocab_size: int) -> dict[str, int]:
    """total, embedding (the vocab matrices: embedding, plus the head when untied),
    non_embedding (= total - embedding) and active (used per token; = total without MoE)."""
    embedding = vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    total = active = embedding + cfg.d_model  # + final norm
    for mixer, ffn in _layers(cfg):
        mixer_n, mixer_active = MIXER_PARAMS[mixer](cfg)
        ffn_n, ffn_active = FFN_PARAMS[ffn](cfg)
        norms = cfg.d_model * (1 if ffn == "none" else 2)  # a layer without ffn has no ffn norm
        total += mixer_n + ffn_n + norms
        active += mixer_active + ffn_active + norms
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding,
            "active": active}


def flops_per_token(cfg: ModelConfig, vocab_size: int, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward); the formula is in the module docstring."""
    forward = 2.0 * cfg.d_model * vocab_size  # output head
    for mixer, ffn in _layers(cfg):
        forward += 2.0 * (MIXER_PARAMS[mixer](cfg)[1] + FFN_PARAMS[ffn](cfg)[1])
        if mixer in MIXER_EXTRA_FLOPS:
            forward += MIXER_EXTRA_FLOPS[mixer](cfg, seq_len)
    return 3.0 * forward
