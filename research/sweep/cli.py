"""The `research sweep` subcommand (the top-level parser in research/cli.py adds it)."""

from __future__ import annotations

import argparse
from pathlib import Path

from research.config import ConfigError


def add_sweep_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `research sweep SWEEP.yaml [--sweep-dir DIR] [--worker] [--storage URL] [key=value ...]`,
    `research sweep status DIR` and `research sweep plan SWEEP.yaml [--no-time]`."""
    parser = subparsers.add_parser(
        "sweep", help="run a hyper-parameter sweep (or join one as a worker), or show its status",
        description="Run the trials of a sweep file, each a `research train` process in its own "
                    "run directory; `research sweep status DIR` prints a sweep's table; "
                    "`research sweep plan SWEEP.yaml` prints the trials it would run (size, "
                    "tokens, steps, FLOPs, a measured time estimate) and runs nothing. "
                    "See docs/sweeps.md.")
    parser.add_argument("sweep", metavar="SWEEP.yaml",
                        help="sweep file (or the word `status` or `plan`)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="overrides for every trial, e.g. train.steps=50 (after `status`: DIR)")
    parser.add_argument("--sweep-dir", help="where trials run (default: sweeps_out/<sweep name>)")
    parser.add_argument("--worker", action="store_true",
                        help="join the sweep's shared store and leave when nothing is left to start")
    parser.add_argument("--storage", help="database URL of the shared store, e.g. postgresql://... "
                        "(default: the sweep file's storage, else SQLite in the sweep dir)")
    parser.add_argument("--no-time", action="store_true",
                        help="plan: skip measuring a step of each shape (no time estimate)")
    parser.set_defaults(func=sweep_command)


def sweep_command(args: argparse.Namespace) -> int:
    """Returns the exit code; a ConfigError is left to the caller (one line, exit 2)."""
    from research.sweep import spec
    from research.sweep.runner import Runner, default_storage, default_sweep_dir
    from research.sweep.status import print_status
    from research.sweep.store import check_reachable

    if args.sweep == "status":
        if len(args.overrides) != 1:
            raise ConfigError("usage: research sweep status SWEEP_DIR [--storage URL]")
        print_status(Path(args.overrides[0]), args.storage)
        return 0
    if args.sweep == "plan":
        from research.sweep.plan import print_plan

        if not args.overrides:
            raise ConfigError("usage: research sweep plan SWEEP.yaml [key=value ...]")
        print_plan(spec.load(args.overrides[0], args.overrides[1:]), measure=not args.no_time)
        return 0
    sweep = spec.load(args.sweep, args.overrides)
    sweep_dir = Path(args.sweep_dir) if args.sweep_dir else default_sweep_dir(sweep.spec.name)
    storage = args.storage or sweep.spec.storage or default_storage(sweep_dir)
    check_reachable(storage)  # before the sweep dir or store is created
    if sweep_dir.exists() and not sweep_dir.is_dir():
        raise ConfigError(f"--sweep-dir {sweep_dir}: is a file; a sweep directory is a folder")
    runner = Runner(sweep, sweep_dir, storage, worker=args.worker, live=None)
    code = runner.run()
    if not args.worker:
        print_status(sweep_dir, storage)
    print(f"next:  research sweep status {sweep_dir}   (the table again; also while it runs)\n"
          f"       research analyze {sweep_dir}        (table, figures, fits, report.html)\n"
          f"       research board {sweep_dir}          (TensorBoard: curves, HParams)")
    return code
