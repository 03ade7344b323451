"""The `research analyze` and `research board` subcommands (research/cli.py adds them)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_analysis_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `research analyze DIR` and `research board DIR [--port P]`."""
    analyze = subparsers.add_parser(
        "analyze", help="table, plots, scaling-law fits and a report for a folder of runs",
        description="Read every run below DIR (a sweep dir, or any folder of run directories) and "
                    "write DIR/analysis/: table.csv/.md, PNG figures, fits.json, report.md and a "
                    "self-contained report.html, and the figures as TensorBoard images. "
                    "See docs/analysis.md.")
    analyze.add_argument("dir", metavar="DIR", help="sweep directory or folder of run directories")
    analyze.set_defaults(func=analyze_command)

    board = subparsers.add_parser(
        "board", help="serve TensorBoard on 127.0.0.1 for a folder of runs (Ctrl-C stops it)",
        description="Start TensorBoard for DIR on 127.0.0.1, print its address once it answers, "
                    "and keep it running until Ctrl-C.")
    board.add_argument("dir", metavar="DIR", help="a run, a sweep directory, or any folder of runs")
    board.add_argument("--port", type=int, help="port to serve on (default: a free one)")
    board.set_defaults(func=board_command)


def analyze_command(args: argparse.Namespace) -> int:
    """Returns the exit code; a ConfigError is left to the caller (one line, exit 2)."""
    from research.analysis.report import analyze

    out, answer = analyze(Path(args.dir))
    print(answer)
    print(f"wrote {out}/: report.html, report.md, table.csv, fits.json, figures (also in {out / 'tb'})")
    return 0


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM (`kill`, a job manager) stops TensorBoard too, as Ctrl-C does, not orphaning it."""
    raise KeyboardInterrupt


def board_command(args: argparse.Namespace) -> int:
    import signal
    import time

    from research.analysis.board import serve

    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with serve(Path(args.dir), args.port) as (url, process):
            print(f"TensorBoard for {args.dir} at {url}  (Ctrl-C to stop)", flush=True)
            while process.poll() is None:
                time.sleep(1)
    except KeyboardInterrupt:
        return 0
    raise RuntimeError(f"tensorboard exited with code {process.returncode}")
