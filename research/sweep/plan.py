"""`research sweep plan SWEEP.yaml`: the trials a sweep would run, with their size, tokens, steps,
FLOPs and an estimated time, without running any.

The time estimate measures each distinct shape (model, batch, sequence length) on this machine:
compile, one warm-up step, then the mean of three steps, times the trial's steps. Compilation and
evals are not included; small models are dominated by per-step overhead, which is why each shape
is measured rather than one shape scaled by FLOPs.
"""

from __future__ import annotations

from typing import Any

from research import config as config_lib
from research.format import si
from research.sweep.spec import STEPS, Sweep, model_numbers, short_name


def _shape(cfg: config_lib.ExperimentConfig) -> str:
    """What decides a step's time: everything but the run's length and bookkeeping."""
    return "|".join([cfg.model.model_dump_json(), cfg.mesh.model_dump_json(),
                     str((cfg.train.batch_size, cfg.train.seq_len, cfg.train.grad_accum))])


def plan(sweep: Sweep, measure: bool = True) -> list[dict[str, Any]]:
    """One row per planned trial; `seconds` is None when not measured."""
    from research.train.loop import step_seconds

    timings: dict[str, float] = {}
    rows = []
    for trial in sweep.planned_trials():
        cfg = config_lib.load(sweep.base, trial.overrides)
        numbers = model_numbers(cfg)
        tokens = cfg.train.steps * numbers["tokens_per_step"]
        seconds = None
        if measure:
            shape = _shape(cfg)
            if shape not in timings:
                timings[shape] = step_seconds(cfg)
            seconds = timings[shape] * cfg.train.steps
        rows.append({"trial": trial.name, **{short_name(k): v for k, v in trial.params.items()},
                     "params": numbers["params"], "params_active": numbers["params_active"],
                     "tokens": tokens, "steps": cfg.train.steps,
                     "flops": tokens * numbers["flops_per_token"], "budget": trial.budget,
                     "seconds": seconds})
    return rows


def print_plan(sweep: Sweep, measure: bool = True) -> None:
    if sweep.spec.search.method == "tpe":
        print(f"{sweep.path}: a tpe sweep chooses its {sweep.spec.trials} trials as it runs; "
              "nothing to plan")
        return
    rows = plan(sweep, measure)
    swept = [short_name(k) for k in sweep.swept]
    header = ["trial", *swept, "params", "tokens", STEPS, "FLOPs", "vs budget", "est. time"]
    table = [[r["trial"], *(str(r[k]) for k in swept), si(r["params"]), si(r["tokens"]),
              str(r["steps"]), f"{r['flops']:.3g}",
              f"{r['flops'] / r['budget'] - 1:+.2%}" if r["budget"] else "–",
              f"{r['seconds'] / 60:.1f} min" if r["seconds"] is not None else "–"] for r in rows]
    widths = [max(len(line[i]) for line in [header, *table]) for i in range(len(header))]
    for line in [header, *table]:
        print("  ".join(cell.rjust(w) if i else cell.ljust(w)
                        for i, (cell, w) in enumerate(zip(line, widths))))
    if measure:
        total = sum(r["seconds"] for r in rows)
        print(f"{len(rows)} trials, about {total / 60:.0f} min of training at parallel 1 on this "
              f"machine (each shape's step measured here; compilation and evals not included; "
              f"a loaded machine measures slow)")
