"""Downstream accuracy of an untrained model and the cost of one in-loop evaluation.

    python bench/downstream.py [EXPERIMENT.yaml] [key=value ...] [--repeats 3]

Builds the experiment (default dense_tiny) with its initial (untrained) params, scores
eval.tasks (default: builtin) once to compile, then `--repeats` more times; prints each task's
accuracy (the untrained baseline a trained run is compared with) and the median seconds per
evaluation of all tasks, as the training loop runs it (same scorer, same batch, same mesh).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import jax.numpy as jnp

from research import config
from research.evaluation.evaluator import Downstream
from research.train.loop import prepare
from research.train.state import init_state

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", nargs="?", default=str(ROOT / "experiments/dense_tiny.yaml"))
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = config.load(args.experiment, args.overrides)
    setup = prepare(cfg)
    tasks = cfg.eval.tasks or "builtin"
    downstream = Downstream.build(cfg, tasks, setup.model, setup.mesh,
                                  setup.spec.shardings["params"], setup.data.tokenizer)
    with setup.context():
        params = init_state(setup.model, setup.tx, jnp.zeros((1, cfg.train.seq_len), jnp.int32),
                            setup.spec, cfg.train.seed)["params"]
        start = time.perf_counter()
        scores = downstream.scores(params)
        first = time.perf_counter() - start
        seconds = []
        for _ in range(args.repeats):
            downstream.scores(params)
            seconds.append(downstream.seconds)
    rows = sum(len(t.rows) for t in downstream.tasks)
    print(f"{cfg.name} untrained, {len(downstream.tasks)} tasks, {rows} choices "
          f"(train.seq_len={cfg.train.seq_len}, batch {cfg.train.batch_size}):")
    for task, m in scores.items():
        print(f"  {task:<12} acc {m['acc']:.3f}  acc_norm {m['acc_norm']:.3f}  "
              f"gold_bpb {m['gold_bpb']:.3f}")
    print(f"  macro acc {sum(m['acc'] for m in scores.values()) / len(scores):.3f}")
    print(f"first evaluation (with compilation) {first:.1f}s; then {statistics.median(seconds):.1f}s "
          f"per evaluation (median of {args.repeats})")


if __name__ == "__main__":
    main()
