"""lm-evaluation-harness over this framework's models (the optional extra `.[eval]`).

`ResearchLM` implements the harness's `LM` interface on a run's model and params, with no export
to Hugging Face: `loglikelihood` scores (context, continuation) requests with the same rows and
the same jitted scorer as the in-loop evaluator (research/evaluation/scoring.py), so both give
the same numbers for the same strings; `loglikelihood_rolling` scores a whole text in disjoint
windows of train.seq_len tokens (the harness's own windowing); `generate_until` decodes greedily
(or samples) with the decode cache (attention's KV buffers, Mamba's state; research/generate.py)
until a stop string or max_gen_toks.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from lm_eval.api.model import LM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from research.data.tokenizer import Tokenizer
from research.evaluation.scoring import Row, Scorer, encode
from research.generate import stream

MAX_GEN_TOKS = 256  # the harness's default for generate_until


class ResearchLM(LM):
    """A run's model as a harness `LM`; call its methods inside the run's mesh context."""

    def __init__(self, model: Any, params: Any, tokenizer: Tokenizer, scorer: Scorer):
        super().__init__()
        self.model, self.params, self.tokenizer, self.scorer = model, params, tokenizer, scorer

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False
                      ) -> list[tuple[float, bool]]:
        rows = [encode(self.tokenizer, context, continuation, self.scorer.seq_len)
                for context, continuation in (r.args for r in requests)]
        sums, greedy = self.scorer(self.params, rows)
        return [(float(s), bool(g)) for s, g in zip(sums, greedy)]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False
                              ) -> list[float]:
        rows, owner = [], []
        for i, (text,) in enumerate(r.args for r in requests):
            windows = get_rolling_token_windows(
                token_list=self.tokenizer.encode(text).tolist(), prefix_token=self.tokenizer.eos_id,
                max_seq_len=self.scorer.seq_len, context_len=1)
            for context, target in map(make_disjoint_window, windows):
                rows.append(Row(np.asarray([*context, *target], np.int32), len(target)))
                owner.append(i)
        sums, _ = self.scorer(self.params, rows)
        totals = np.zeros(len(requests))
        np.add.at(totals, owner, sums)
        return totals.tolist()

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        out = []
        for context, kwargs in (r.args for r in requests):
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            limit = int(kwargs.get("max_gen_toks", MAX_GEN_TOKS))
            prompt = [self.tokenizer.eos_id, *self.tokenizer.encode(context).tolist()]
            prompt = prompt[-max(1, self.scorer.seq_len - limit):]
            new: list[int] = []
            text = ""
            for token in stream(self.model, self.params, prompt, limit, temperature=temperature,
                                eos_id=self.tokenizer.eos_id,
                                vocab_limit=self.tokenizer.vocab_size):
                new.append(token)
                text = self.tokenizer.decode(np.asarray(new))
                if any(stop in text for stop in until):
                    break
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out


def flat_results(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """simple_evaluate's results -> {task: {metric: value}} (numbers only; the harness's
    ",none" filter suffix dropped)."""
    flat = {}
    for task, metrics in results["results"].items():
        flat[task] = {name.removesuffix(",none"): float(value) for name, value in metrics.items()
                      if isinstance(value, (int, float)) and not isinstance(value, bool)
                      and name != "sample_len"}
    return flat


def evaluate(lm: ResearchLM, tasks: list[str], task_manager: Any) -> dict[str, dict[str, float]]:
    """Run harness `tasks` on `lm` (results as `flat_results`)."""
    from lm_eval import simple_evaluate

    results = simple_evaluate(model=lm, tasks=tasks, task_manager=task_manager, log_samples=False,
                              bootstrap_iters=0, verbosity="ERROR")
    return flat_results(results)
