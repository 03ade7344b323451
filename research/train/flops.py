"""Analytic parameter counts and training FLOPs per token, from the config alone (no JAX).

Counts follow research/models exactly (tests compare them with the initialised model). Each
layer family has its own small function, looked up by the names the decoder's layer period
uses: a new mixer or feed-forward adds an entry to MIXER_PARAMS / FFN_PARAMS and, if it does
work that no weight accounts for (attention scores, an SSD scan), to MIXER_EXTRA_FLOPS.

FLOPs per token for training (forward + backward = 3 x forward, a multiply-add = 2 FLOPs):

    6 * (active projection params of the layers + d_model * vocab)
      + 12 * sum over attention layers of T_eff * n_heads * head_size

The first term is every projection, the output head included even when tied (the input
embedding is a lookup, not a matmul; norm scales are not matmuls). The second is q k^T and
probs @ v: 2 matmuls x 2 FLOPs x T_eff keys x n_heads * head_size per token, times 3, with
T_eff = min(sliding_window, seq_len). Like PaLM (appendix B) it counts the full T x T square,
not the causal half that actually matters, so MFU is comparable with the literature.
"""

from __future__ import annotations

from collections.abc import Sequence

from research.config import ModelConfig

DENSE: tuple[tuple[str, str], ...] = (("attention", "mlp"),)  # as research.models.decoder.DENSE


def attention_params(cfg: ModelConfig) -> tuple[int, int]:
    """(stored, active per token) weights of q, k, v, o."""
    n = cfg.d_model * cfg.head_size * (2 * cfg.n_heads + 2 * cfg.kv_heads)
    return n, n


def mlp_params(cfg: ModelConfig) -> tuple[int, int]:
    """(stored, active per token) weights of the SwiGLU gate, up and down projections."""
    n = 3 * cfg.d_model * cfg.ff_size
    return n, n


def attention_score_flops(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of q k^T and probs @ v (full square, see the module docstring)."""
    window = min(cfg.sliding_window or seq_len, seq_len)
    return 4.0 * window * cfg.n_heads * cfg.head_size


MIXER_PARAMS = {"attention": attention_params}
FFN_PARAMS = {"mlp": mlp_params}
MIXER_EXTRA_FLOPS = {"attention": attention_score_flops}


def _layers(cfg: ModelConfig, period: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    return [period[i % len(period)] for i in range(cfg.n_layers)]


def param_counts(cfg: ModelConfig, vocab_size: int,
                 period: Sequence[tuple[str, str]] = DENSE) -> dict[str, int]:
    """total, embedding (the vocab matrices: embedding, plus the head when untied),
    non_embedding (= total - embedding) and active (used per token; = total for dense)."""
    embedding = vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    total = active = embedding + cfg.d_model  # + final norm
    for mixer, ffn in _layers(cfg, period):
        mixer_n, mixer_active = MIXER_PARAMS[mixer](cfg)
        ffn_n, ffn_active = FFN_PARAMS[ffn](cfg)
        norms = 2 * cfg.d_model
        total += mixer_n + ffn_n + norms
        active += mixer_active + ffn_active + norms
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding,
            "active": active}


def flops_per_token(cfg: ModelConfig, vocab_size: int, seq_len: int,
                    period: Sequence[tuple[str, str]] = DENSE) -> float:
    """Training FLOPs per token (forward + backward); the formula is in the module docstring."""
    forward = 2.0 * cfg.d_model * vocab_size  # output head
    for mixer, ffn in _layers(cfg, period):
        forward += 2.0 * (MIXER_PARAMS[mixer](cfg)[1] + FFN_PARAMS[ffn](cfg)[1])
        if mixer in MIXER_EXTRA_FLOPS:
            forward += MIXER_EXTRA_FLOPS[mixer](cfg, seq_len)
    return 3.0 * forward
