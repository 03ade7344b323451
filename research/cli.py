"""The `research` command: argument parsing only; each subcommand hands a validated config on."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from research import flags
from research.analysis import add_analysis_commands
from research.config import ConfigError
from research.evaluation.cli import add_evaluation_commands, add_task_arguments
from research.generate import add_generate_command
from research.interop.cli import add_interop_commands
from research.sweep import add_sweep_commands

DESCRIPTION = """\
Language-model scaling experiments in JAX: train dense, MoE, Mamba-2 and hybrid decoders from a
YAML experiment config, sweep their settings over seeds, and turn the runs into tables, plots,
scaling-law fits and a report."""

EPILOG = """\
a first session:
  research train experiments/dense_tiny.yaml            train a small model (runs/dense_tiny/)
  research sweep sweeps/layers.yaml                     a sweep over depth
  research analyze sweeps_out/layers                    its report: sweeps_out/layers/analysis/
  research board sweeps_out/layers                      TensorBoard for it

Any config field can be set with a dotted key=value after the command, e.g. train.steps=200
model.n_layers=8. A bad config, flag or file stops before any compute with one line naming it
(exit code 2). Documentation: README.md and docs/. `research COMMAND --help` for each command."""


def _train(args: argparse.Namespace) -> int:
    from research import config
    from research.parallel import distributed
    from research.train import compile_cache
    from research.train.loop import train

    overrides = list(args.overrides)
    if args.branch_from is not None:
        from research.train import branch

        parent, step = branch.parse_branch_from(args.branch_from)
        overrides += branch.overrides(branch.read_parent(parent, "--branch-from"), parent, step,
                                      args.cooldown_steps, args.cooldown_fraction)
    elif args.cooldown_steps is not None or args.cooldown_fraction is not None:
        raise ConfigError("--cooldown-steps/--cooldown-fraction: only with --branch-from RUN@STEP")
    cfg = config.load(args.experiment, overrides)
    compile_cache.enable()
    distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                           args.heartbeat_timeout)
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / cfg.name
    summary = train(cfg, run_dir)
    final = summary["final"]
    print(f"{run_dir}: step {summary['step']}, loss {final.get('loss', float('nan')):.4f}, "
          f"eval loss {final.get('eval_loss', float('nan')):.4f}, "
          f"{final.get('eval_bpb', float('nan')):.4f} bits/byte")
    return 0


def _eval(args: argparse.Namespace) -> int:
    if args.tasks is not None:
        from research.evaluation.cli import eval_tasks

        return eval_tasks(args)
    if args.all_steps or args.json:
        raise ConfigError("--all-steps and --json go with --tasks")
    import jax

    from research.data import mixture
    from research.train import compile_cache
    from research.train.loop import evaluate, load_run
    from research.train.rundir import RunDir

    run_dir = Path(args.run_dir)
    compile_cache.enable()
    setup, state, meta = load_run(RunDir(run_dir), args.step)
    cfg = setup.cfg
    sets = mixture.eval_sets(setup.data, seq_len=cfg.train.seq_len,
                             global_batch=cfg.train.batch_size,
                             n_batches=args.batches or cfg.train.eval_batches,
                             process_index=jax.process_index(), process_count=jax.process_count())
    scores = evaluate(setup, state["params"], sets)
    tokens = sum(len(batches) for batches in sets.values()) * cfg.train.batch_size * cfg.train.seq_len
    print(f"{run_dir} step {meta['step']}: held-out loss {scores['eval_loss']:.4f} nats/token, "
          f"{scores['eval_bpb']:.4f} bits/byte over {tokens:,} tokens")
    print(mixture.eval_table(setup.data, scores, {n: len(b) for n, b in sets.items()},
                             cfg.train.batch_size * cfg.train.seq_len))
    return 0


def _make_examples(args: argparse.Namespace) -> int:
    from research.data.examples import derive_examples

    for name, path in derive_examples(Path(args.out)).items():
        lines = sum(1 for _ in path.open(encoding="utf-8"))
        print(f"{path}: {lines:,} {name} examples")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="research", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train", help="train (or resume) a run from an experiment config",
        description="Train the experiment in EXPERIMENT.yaml (with key=value overrides) into its run "
                    "directory, or resume it there from the latest checkpoint. The directory gets "
                    "the resolved config.yaml, metrics.jsonl, summary.json, tb/ and checkpoints/. "
                    "See docs/training.md.")
    train.add_argument("experiment", help="experiments/NAME.yaml")
    train.add_argument("--run-dir", help="run directory (default: runs/<experiment name>)")
    train.add_argument("overrides", nargs="*", metavar="key=value",
                       help="dotted config overrides, e.g. train.steps=200 model.n_layers=8")
    branching = train.add_argument_group("cooldown branches (docs/training.md)")
    branching.add_argument("--branch-from", metavar="RUN@STEP", help="continue RUN's full state "
                           "(params, optimizer, data position) from its checkpoint STEP")
    cooldown = branching.add_mutually_exclusive_group()
    cooldown.add_argument("--cooldown-steps", type=flags.positive, metavar="K",
                          help="decay the lr to optim.min_lr_ratio over K steps after STEP "
                          "(default: keep the parent's schedule to its end)")
    cooldown.add_argument("--cooldown-fraction", type=flags.fraction, metavar="F",
                          help="a cooldown that is F of the branch's steps: K = STEP*F/(1-F)")
    hosts = train.add_argument_group("multi-host (SLURM and Cloud TPU pods need none of these)")
    hosts.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0")
    hosts.add_argument("--num-processes", type=flags.positive, help="processes in the run")
    hosts.add_argument("--process-id", type=flags.non_negative, help="this process, 0..N-1")
    hosts.add_argument("--heartbeat-timeout", type=flags.positive, default=60, metavar="SECONDS",
                       help="survivors fail this long after a process dies (default 60)")
    train.set_defaults(func=_train)

    evaluate = commands.add_parser("eval", help="held-out loss and bits per byte of a checkpoint, "
                                   "per data source, or its downstream accuracy (--tasks)")
    evaluate.add_argument("run_dir")
    evaluate.add_argument("--step", type=flags.non_negative, help="checkpoint step (default: latest)")
    evaluate.add_argument("--batches", type=flags.positive,
                          help="held-out batches (default: train.eval_batches)")
    add_task_arguments(evaluate)
    evaluate.set_defaults(func=_eval)

    examples = commands.add_parser("make-examples", help="write the built-in sft and dpo example "
                                   "files (derived from the standard library)")
    examples.add_argument("--out", required=True, help="folder for sft.jsonl and dpo.jsonl")
    examples.set_defaults(func=_make_examples)

    add_evaluation_commands(commands)
    add_generate_command(commands)
    add_interop_commands(commands)
    add_sweep_commands(commands)
    add_analysis_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may come before or after options: collect the stragglers here.
    args, extra = parser.parse_known_args(argv)
    if extra and (not hasattr(args, "overrides") or any("=" not in item or item.startswith("-")
                                                        for item in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    # The one place that turns bad input into one line: a ConfigError (config, data file,
    # checkpoint) or an OSError (a missing, unreadable or wrong-type path) -> exit code 2.
    try:
        return args.func(args)
    except (ConfigError, OSError) as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        notes = getattr(exc, "__notes__", None) or ["run the same command again to resume"]
        print(f"interrupted: {'; '.join(notes)}", file=sys.stderr)
        return 130


def _one_line(exc: BaseException) -> str:
    """The message (an OSError: the path and the reason) and any notes the loop added (e.g.
    whether the latest step was checkpointed)."""
    if isinstance(exc, OSError) and exc.filename is not None:
        paths = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
        text = f"{paths}: {exc.strerror or exc}"
    else:
        text = str(exc)
    return "; ".join([text, *getattr(exc, "__notes__", [])]).replace("\n", " ")

if __name__ == "__main__":
    sys.exit(main())
