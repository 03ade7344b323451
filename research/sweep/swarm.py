"""Mixture swarms: Dirichlet draws of data-source weights around the natural distribution.

A `search.method: mixture` sweep trains one small run per mixture of the base experiment's named
sources, so that research/analysis/mixture.py can fit a law from weights to loss and propose a
mix (RegMix, Data Mixing Laws, Olmix). The draws are

    w ~ Dirichlet(concentration * K * p),   p_i = tokens_i / sum_j tokens_j  (the natural mix)

so their mean is p and `concentration: 1` over K equally sized sources is the uniform
distribution on the simplex; larger values keep the draws closer to p. A repetition cap R keeps
each source's share of a run's D training tokens at w_i * D <= R * tokens_i: draws that break a
cap are redrawn (the accepted draws follow the Dirichlet conditioned on the caps). The natural mix
and the uniform mix (moved onto the caps when they cut it) come first, as reference points.

The data layer's side lives in these names here and nowhere else: `WEIGHT_KEY` and `SOURCE_KEY`,
a source's config fields, and `source_tokens`, the training tokens of each named source.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from research import config as config_lib
from research.config import ConfigError

WEIGHT_KEY = "data.sources.{}.weight"  # the data layer's override for one source's weight
SOURCE_KEY = "data.sources.{}.source"  # where a source's text comes from (a config field)
DECIMALS = 4  # weights are rounded to this many decimals (the data layer normalizes them)
CAP_SLACK = 10.0 ** -DECIMALS  # a rounded weight may pass its cap by this much
MAX_DRAWS_PER_TRIAL = 1000  # rejection sampling gives up past this many draws per accepted one
CV_FOLDS = 5  # leave-k-out with k = ceil(n / CV_FOLDS): the analysis's cross-validation


def weight_key(source: str) -> str:
    return WEIGHT_KEY.format(source)


def source_of(key: str) -> str | None:
    """The source a weight override sets (`data.sources.code.weight` -> `code`), else None."""
    head, _, tail = WEIGHT_KEY.partition("{}")
    if key.startswith(head) and key.endswith(tail) and "." not in key[len(head):-len(tail)]:
        return key[len(head):-len(tail)]
    return None


def source_tokens(cfg: config_lib.ExperimentConfig) -> dict[str, int]:
    """Training tokens of each training source (weight > 0) of an experiment's `data.sources`,
    from the data layer's token caches (built on first use, content-keyed, shared with training);
    evaluation-only sources (weight 0) are left out. A base whose weights change at
    `data.stages` is refused."""
    from research.data.pipeline import build_token_cache

    sources = getattr(cfg.data, "sources", None)
    if not sources:
        raise ConfigError("search.sources: a mixture search needs named sources in the base "
                          "experiment (data.sources: {NAME: {source: ..., weight: ...}})")
    if getattr(cfg.data, "stages", ()):
        raise ConfigError("search.sources: the base experiment changes its weights at "
                          "data.stages; a mixture search trains each run on one mix: remove them")
    return {name: len(build_token_cache(cfg.data, spec.source, f"data.sources.{name}.source").train)
            for name, spec in sources.items() if spec.weight > 0}


# ----------------------------------------------------------------------------- the simplex


def law_parameters(n_sources: int) -> int:
    """Free parameters of a mixture law on K sources: an offset and one exponent per source
    (research/analysis/mixture.py; the Data-Mixing-Law scale folds into the exponents)."""
    return n_sources + 1


def min_trials(n_sources: int) -> int:
    """Fewest mixtures for which every leave-k-out fold still leaves one more point than the law
    has parameters."""
    need = law_parameters(n_sources) + 1
    n = need
    while n - math.ceil(n / CV_FOLDS) < need:
        n += 1
    return n


def natural(tokens: Mapping[str, int]) -> np.ndarray:
    counts = np.array(list(tokens.values()), float)
    return counts / counts.sum()


def caps(tokens: Mapping[str, int], train_tokens: float, max_repetition: float | None
         ) -> np.ndarray:
    """Largest weight of each source: w_i * train_tokens <= max_repetition * tokens_i."""
    counts = np.array(list(tokens.values()), float)
    if max_repetition is None:
        return np.ones_like(counts)
    return np.minimum(1.0, max_repetition * counts / train_tokens)


def project(target: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """The point of {w : sum w = 1, 0 <= w <= upper} nearest `target` (Euclidean), by bisection on
    the shift tau in w = clip(target - tau, 0, upper)."""
    if upper.sum() < 1 - 1e-12:
        raise ValueError(f"caps sum to {upper.sum():.4g} < 1: no mixture satisfies them")
    low, high = float(np.min(target - upper)) - 1.0, float(np.max(target)) + 1.0
    for _ in range(200):
        tau = 0.5 * (low + high)
        if np.clip(target - tau, 0.0, upper).sum() > 1:
            low = tau
        else:
            high = tau
    return np.clip(target - 0.5 * (low + high), 0.0, upper)


def rounded(w: np.ndarray) -> np.ndarray:
    """Weights to DECIMALS decimals, the largest taking the rounding so they still sum to 1."""
    out = np.round(w, DECIMALS)
    top = int(np.argmax(out))
    out[top] = round(1.0 - (out.sum() - out[top]), DECIMALS)
    return out


def within(w: np.ndarray, upper: np.ndarray) -> bool:
    return bool(np.all(w >= 0) and np.all(w <= upper + CAP_SLACK))


def draw(tokens: Mapping[str, int], trials: int, concentration: float, upper: np.ndarray,
         seed: int) -> list[dict[str, float]]:
    """`trials` mixtures: the natural one, the uniform one (onto the caps), then Dirichlet draws
    that respect the caps; the same list for the same arguments on any machine."""
    names = list(tokens)
    p = natural(tokens)
    if upper.sum() < 1 - 1e-12:
        raise ValueError(f"caps sum to {upper.sum():.4g} < 1: no mixture satisfies them")
    chosen = dict.fromkeys(tuple(rounded(w)) for w in
                           (p, project(np.full(len(p), 1 / len(p)), upper)))  # ordered, distinct
    rng = np.random.default_rng(seed)
    alpha = concentration * len(p) * p
    tries = 0
    while len(chosen) < trials:
        tries += 1
        if tries > MAX_DRAWS_PER_TRIAL * trials:
            raise ValueError(f"only {len(chosen)} of {trials} draws met the caps after {tries - 1} "
                             "tries: raise max_repetition or concentration")
        w = rounded(rng.dirichlet(alpha))
        if within(w, upper):
            chosen.setdefault(tuple(w))
    return [{name: float(v) for name, v in zip(names, w)} for w in list(chosen)[:trials]]
