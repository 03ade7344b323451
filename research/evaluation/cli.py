"""`research make-tasks`, `research eval RUN --tasks ...` and `research harness RUN --tasks ...`.

Every check (task files, task names, the harness being installed, the run and its checkpoints)
runs before anything is computed or written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from research import flags
from research.config import ConfigError

HARNESS_EXTRA = "lm-evaluation-harness is not installed: pip install -e '.[eval]'"


def make_tasks(args: argparse.Namespace) -> int:
    from research.evaluation.tasks import BUILTIN, derive_tasks, harness_yaml

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out: {out} is a file; expected a folder")
    for name, (path, heldout) in derive_tasks(out).items():
        (out / f"{name}.yaml").write_text(harness_yaml(f"research_{name}", path))
        items = sum(1 for line in path.open(encoding="utf-8") if line.strip())
        task = BUILTIN[name]
        print(f"{path}: {items} items ({heldout} from held-out documents), chance {task.chance}: "
              f"{task.about}")
    print(f"harness task YAMLs: {out}/*.yaml (research harness RUN --tasks research_next_line "
          f"--include-path {out})")
    return 0


def eval_tasks(args: argparse.Namespace) -> int:
    """Downstream accuracy of one checkpoint (default latest), or of every kept one."""
    from research.evaluation.evaluator import Downstream
    from research.train.loop import prepare
    from research.train.rundir import RunDir

    if args.batches is not None:
        raise ConfigError("--batches is for held-out loss; it does not go with --tasks")
    if args.all_steps and args.step is not None:
        raise ConfigError("--step and --all-steps: give one")
    run = RunDir(args.run_dir)
    cfg = run.config()
    steps = run.steps() if args.all_steps else [run.check_step(args.step)]
    if not steps:
        raise ConfigError(f"--all-steps: {run.path} has no checkpoints")
    setup = prepare(cfg)
    downstream = Downstream.build(cfg, args.tasks, setup.model, setup.mesh,
                                  setup.spec.shardings["params"], setup.data.tokenizer, "--tasks")
    for line in downstream.describe():
        print(line, file=sys.stderr)
    results: dict[int, dict[str, dict[str, float]]] = {}
    for step in steps:
        with setup.context():
            params = run.restore_params(setup.spec.abstract["params"], step)
            results[step] = downstream.scores(params)
        if not args.json:
            _print_scores(f"{run.path} step {step}", results[step], downstream.seconds)
    if args.json:
        out = {str(s): r for s, r in results.items()} if args.all_steps else results[steps[0]]
        print(json.dumps(out))
    return 0


def _print_scores(title: str, scores: dict[str, dict[str, float]], seconds: float) -> None:
    width = max(map(len, scores))
    print(f"{title} ({seconds:.1f}s):")
    for task, m in scores.items():
        print(f"  {task:<{width}}  acc {m['acc']:.3f}  acc_norm {m['acc_norm']:.3f}  "
              f"gold_bpb {m['gold_bpb']:.3f}")
    print(f"  {'macro':<{width}}  acc {sum(m['acc'] for m in scores.values()) / len(scores):.3f}")


def harness(args: argparse.Namespace) -> int:
    """lm-evaluation-harness tasks on a run's checkpoint; results to RUN/harness/ and tb/."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ConfigError(HARNESS_EXTRA) from None
    import jax
    from lm_eval.tasks import TaskManager

    from research.evaluation.harness import ResearchLM, evaluate
    from research.evaluation.scoring import Scorer
    from research.generate import load
    from research.train.metrics import _summary_writer
    from research.train.rundir import RunDir, write_json

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local task files need no network
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run = RunDir(args.run_dir)
    run.config()  # a run directory?
    run.check_step(args.step)
    if args.include_path is not None and not Path(args.include_path).is_dir():
        raise ConfigError(f"--include-path: {args.include_path} is not a folder")
    names = [n.strip() for n in args.tasks.split(",") if n.strip()]
    # the harness's own task index takes seconds to build: only when local YAMLs do not suffice
    manager = TaskManager(include_path=args.include_path, include_defaults=False) \
        if args.include_path is not None else None
    if manager is None or any(n not in manager.all_tasks for n in names):
        manager = TaskManager(include_path=args.include_path)
    unknown = [n for n in names if n not in manager.all_tasks]
    if not names or unknown:
        where = f" (nor in {args.include_path})" if args.include_path else ""
        raise ConfigError(f"--tasks: unknown harness task {(unknown or [args.tasks])[0]!r}{where}; "
                          "`lm-eval ls tasks` lists them, --include-path adds a folder of YAMLs")
    setup, params, step = load(run.path, args.step)
    cfg = setup.cfg
    scorer = Scorer(setup.model, setup.mesh, setup.spec.shardings["params"], cfg.train.batch_size,
                    cfg.train.seq_len, setup.data.tokenizer.eos_id)
    with setup.context():
        results = evaluate(ResearchLM(setup.model, params, setup.data.tokenizer, scorer), names,
                           manager)
    saved = run.harness / f"step_{step}.json"
    if jax.process_index() == 0:
        run.harness.mkdir(exist_ok=True)
        write_json(saved, {"step": step, "results": results})
        if cfg.logging.tensorboard:
            with _summary_writer()(str(run.tensorboard)) as writer:
                for task, metrics in results.items():
                    for metric, value in metrics.items():
                        writer.add_scalar(f"harness/{task}/{metric}", value, step)
    if args.json:
        print(json.dumps(results))
    else:
        for task, metrics in results.items():
            print(f"{task} (step {step}): " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        print(f"wrote {saved}")
    return 0


def add_task_arguments(evaluate: argparse.ArgumentParser) -> None:
    """The downstream options of `research eval`."""
    evaluate.add_argument("--tasks", metavar="builtin|DIR|FILES",
                          help="downstream accuracy on ranked-choice tasks instead of held-out "
                               "loss: builtin, built-in task names, folders, .jsonl files "
                               "(comma-separated; docs/evaluation.md)")
    evaluate.add_argument("--all-steps", action="store_true",
                          help="with --tasks: every kept checkpoint (accuracy over training)")
    evaluate.add_argument("--json", action="store_true",
                          help="with --tasks: print only {task: {acc, acc_norm, gold_bpb}} "
                               "({step: ...} with --all-steps)")


def add_evaluation_commands(subparsers: Any) -> None:
    """`research make-tasks` and `research harness` (`eval --tasks` is `add_task_arguments`)."""
    make = subparsers.add_parser("make-tasks", help="write the built-in ranked-choice tasks "
                                 "(derived from the standard library) and harness YAMLs for them")
    make.add_argument("--out", required=True, help="folder for <task>.jsonl and <task>.yaml")
    make.set_defaults(func=make_tasks)

    run = subparsers.add_parser(
        "harness", help="lm-evaluation-harness tasks on a run's checkpoint (extra: .[eval])",
        description="Run lm-evaluation-harness TASKS on a checkpoint through an adapter over the "
                    "model (no export). Results go to RUN/harness/step_N.json and RUN/tb/. "
                    "Offline: local task YAMLs with --include-path. See docs/evaluation.md.")
    run.add_argument("run_dir")
    run.add_argument("--tasks", required=True, help="comma-separated harness task names")
    run.add_argument("--include-path", metavar="DIR", help="a folder of extra task YAMLs")
    run.add_argument("--step", type=flags.non_negative, help="checkpoint step (default: latest)")
    run.add_argument("--json", action="store_true", help="print only {task: {metric: value}}")
    run.set_defaults(func=harness)
