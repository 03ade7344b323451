"""The `research analyze` and `research board` subcommands (research/cli.py adds them)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from research import flags
from research.config import ConfigError

# The commands import their modules when they run: matplotlib and scipy take about 2 s to
# import, which every `research train` (this parser is built for every command) would pay.
HOLDOUT_CHOICES = ("largest",)


def add_analysis_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `research analyze DIR`, `research analyze --points FILE.csv --out DIR`,
    `research predict DIR --flops C` and `research board DIR [--port P]`."""
    analyze = subparsers.add_parser(
        "analyze", help="table, plots, scaling-law fits and a report for a folder of runs",
        description="Read every run below DIR (a sweep dir, or any folder of run directories) and "
                    "write DIR/analysis/: table.csv/.md, PNG figures, fits.json, report.md and a "
                    "self-contained report.html, and the figures as TensorBoard images. "
                    "See docs/analysis.md.")
    analyze.add_argument("dir", metavar="DIR", nargs="?",
                         help="sweep directory or folder of run directories")
    analyze.add_argument("--points", metavar="FILE.csv",
                         help="fit a table of points instead (columns params, tokens or flops, loss)")
    analyze.add_argument("--out", metavar="DIR", help="with --points: where to write the report")
    analyze.add_argument("--columns", metavar="FIELD=COLUMN,...",
                         help="with --points: CSV column names, e.g. 'params=Model Size,flops=Training FLOP'")
    analyze.add_argument("--drop-highest", type=int, default=0, metavar="K",
                         help="with --points: leave out the K highest losses (outliers)")
    analyze.add_argument("--holdout", choices=HOLDOUT_CHOICES,
                         help="fit L(N, D) (and downstream accuracy) without the largest compute "
                              "budget and check the predictions")
    analyze.add_argument("--mixture-points", metavar="FILE.csv",
                         help="fit mixture laws to a table instead (a weight column per source, "
                              "metric columns); needs --sources, --metric and --out")
    analyze.add_argument("--sources", metavar="A,B,...",
                         help="with --mixture-points: the weight columns, one per source")
    analyze.add_argument("--metric", metavar="M1[,M2,...]",
                         help="mixture laws: the metric(s) to fit; the objective is their mean, or "
                              "a weighted sum given as M1=0.7,M2=0.3 (default for DIR: the "
                              "per-domain metrics in the sweep objective's unit)")
    analyze.add_argument("--kl", type=float, default=0.0, metavar="LAMBDA",
                         help="mixture proposal: add LAMBDA x KL(mix || natural mix) (default 0)")
    analyze.add_argument("--natural", metavar="A=W,...",
                         help="with --mixture-points: the natural mix (the proposal is compared "
                              "with it, and --kl pulls towards it)")
    analyze.add_argument("--max-weight", metavar="A=W,...",
                         help="with --mixture-points: caps on each source's weight (repetition)")
    analyze.set_defaults(func=analyze_command)

    predict = subparsers.add_parser(
        "predict", help="compute-optimal size, tokens and loss at a budget, from a fitted L(N, D)",
        description="Read the Approach 3 fit that `research analyze` wrote (DIR/analysis/fits.json, "
                    "or DIR/fits.json for --points) and print N_opt, D_opt and the loss at each "
                    "budget C with 95% intervals, and each downstream task's predicted accuracy "
                    "where the runs had downstream metrics. See docs/analysis.md and "
                    "docs/evaluation.md.")
    predict.add_argument("dir", metavar="DIR", help="an analysed folder, or an analyze --out folder")
    predict.add_argument("--flops", type=float, nargs="+", required=True, metavar="C",
                         help="training compute budgets in FLOPs, e.g. 1e18")
    predict.set_defaults(func=predict_command)

    coord = subparsers.add_parser(
        "coordcheck", help="mean |activation| per sublayer against width/depth over a few steps",
        description="Train each size of EXPERIMENT a few steps under each parameterization and "
                    "write, to --out: one PNG per parameterization and axis (a panel per step) "
                    "and slopes.md/.csv with each row's log-log slope against size and a verdict. "
                    "See docs/transfer.md.")
    coord.add_argument("experiment", help="experiments/NAME.yaml")
    coord.add_argument("--widths", default="", help="d_model values, e.g. 64,128,256,512")
    coord.add_argument("--depths", default="", help="n_layers values, e.g. 2,4,8,16")
    coord.add_argument("--steps", type=int, default=10, help="training steps (default 10)")
    coord.add_argument("--parameterizations", default="standard,completep",
                       help="comma-separated (default standard,completep)")
    coord.add_argument("--threshold", type=float, default=0.25,
                       help="a row is flat when |log-log slope| <= this (default 0.25)")
    coord.add_argument("--out", help="output folder (default runs/coordcheck_<experiment>)")
    coord.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    coord.set_defaults(func=coordcheck_command)

    board = subparsers.add_parser(
        "board", help="serve TensorBoard on 127.0.0.1 for a folder of runs (Ctrl-C stops it)",
        description="Start TensorBoard for DIR on 127.0.0.1, print its address once it answers, "
                    "and keep it running until Ctrl-C.")
    board.add_argument("dir", metavar="DIR", help="a run, a sweep directory, or any folder of runs")
    board.add_argument("--port", type=flags.port, help="port to serve on (default: a free one)")
    board.set_defaults(func=board_command)


def analyze_command(args: argparse.Namespace) -> int:
    """Returns the exit code; a ConfigError is left to the caller (one line, exit 2)."""
    from research.analysis import points
    from research.analysis.report import analyze, analyze_points

    if not (args.kl >= 0 and args.kl < float("inf")):
        raise ConfigError(f"--kl: must be a number >= 0, got {args.kl}")
    if args.mixture_points is None:
        for flag, value in (("--sources", args.sources), ("--natural", args.natural),
                            ("--max-weight", args.max_weight)):
            if value:
                raise ConfigError(f"{flag} goes with --mixture-points FILE.csv")
    if args.mixture_points is not None:
        if args.points is not None or args.dir is not None or args.out is None:
            raise ConfigError("--mixture-points FILE.csv takes --out DIR (where the report goes), "
                              "not DIR or --points")
        if not args.sources or not args.metric:
            raise ConfigError("--mixture-points FILE.csv needs --sources A,B,... (its weight "
                              "columns) and --metric M1[,M2,...] (its metric columns)")
        out, answer = _mixture_points(args)
    elif args.points is None:
        for flag, value in (("--out", args.out), ("--columns", args.columns),
                            ("--drop-highest", args.drop_highest)):
            if value:
                raise ConfigError(f"{flag} goes with --points FILE.csv")
        if args.dir is None:
            raise ConfigError("analyze needs DIR, or --points FILE.csv --out DIR")
        out, answer = analyze(Path(args.dir), args.holdout, args.metric, args.kl)
    else:
        if args.metric or args.kl:
            raise ConfigError("--metric and --kl go with DIR or --mixture-points FILE.csv")
        if args.dir is not None or args.out is None:
            raise ConfigError("--points FILE.csv takes --out DIR (where the report goes), not DIR")
        if args.drop_highest < 0:
            raise ConfigError(f"--drop-highest: must be 0 or more, got {args.drop_highest}")
        table = points.read_csv(Path(args.points), points.parse_columns(args.columns),
                                args.drop_highest)
        out, answer = analyze_points(table, Path(args.points), Path(args.out), args.holdout)
    print(answer)
    _print_proposal(out / "fits.json")
    table = "" if args.points or args.mixture_points else " table.csv,"
    print(f"wrote {out}/: report.html, report.md,{table} fits.json, figures (also in {out / 'tb'})")
    return 0


def _mixture_points(args: argparse.Namespace) -> tuple[Path, str]:
    from research.analysis import mixture
    from research.analysis.report import analyze_mixture_points

    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    coefficients = mixture.parse_metrics(args.metric)
    natural = mixture.parse_assignments("--natural", args.natural, sources)
    caps = mixture.parse_assignments("--max-weight", args.max_weight, sources)
    if caps is not None and caps.sum() < 1:
        raise ConfigError(f"--max-weight: the caps sum to {caps.sum():.4g} < 1; no mix meets them")
    if args.kl > 0 and natural is None:
        raise ConfigError("--kl: a pull towards the natural mix needs --natural A=W,...")
    if natural is not None and abs(natural.sum() - 1) > mixture.SUM_TOLERANCE:
        raise ConfigError(f"--natural: the weights must sum to 1, got {natural.sum():.6g}")
    table = mixture.read_points(Path(args.mixture_points), sources, list(coefficients))
    return analyze_mixture_points(table, coefficients, caps, natural, args.kl,
                                  Path(args.mixture_points), Path(args.out))


def _print_proposal(fits_json: Path) -> None:
    """What to paste into an experiment: the best setting of a grid or lr sweep, the proposed
    mix of a mixture swarm (a data.sources block), each also as overrides."""
    import json

    from research.analysis import mixture

    record = json.loads(fits_json.read_text()) if fits_json.is_file() else {}
    if best := record.get("best_setting"):
        print(f"best setting (eval loss {best['loss']}), ready to paste into the experiment:\n"
              f"{best['block']}\nas overrides: {best['overrides']}")
    entry = record.get("mixture")
    if entry and "weights" in entry:
        low, high = entry["interval"]
        print(f"proposed mix ({entry['regressor']} law; predicted {entry['objective']} "
              f"{entry['predicted']:.4f}, 95% bootstrap {mixture.interval(low, high)}):\n"
              f"{entry['block']}\nas overrides: {mixture.overrides(entry['weights'])}")


def predict_command(args: argparse.Namespace) -> int:
    import json
    import math

    from research.analysis.approach3 import JointLaw
    from research.analysis.downstream import TwoStep
    from research.analysis.runs import ANALYSIS
    from research.format import si

    where = Path(args.dir)
    path = next((p for p in (where / ANALYSIS / "fits.json", where / "fits.json") if p.is_file()),
                None)
    if path is None:
        raise ConfigError(f"{where}: no fits.json (in DIR/{ANALYSIS}/ or DIR/); run `research "
                          "analyze` first")
    try:
        record = json.loads(path.read_text())
        tasks = {task: TwoStep.from_record(fit) for task, fit in
                 (record.get("downstream") or {}).items() if "error" not in fit}
        record = record.get("approach3")
    except (OSError, ValueError, AttributeError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: unreadable fits.json ({exc})") from None
    if (not record or "error" in record) and not tasks:
        raise ConfigError(f"{path}: no L(N, D) fit" + (f" ({record['error']})" if record else ""))
    bad = [c for c in args.flops if not (math.isfinite(c) and c > 0)]
    if bad:
        raise ConfigError(f"--flops: budgets must be positive FLOPs, got {bad[0]}")
    if record and "error" not in record:
        _predict_loss(JointLaw.from_record(record), record, args.flops)
    for task, law in tasks.items():
        for c in args.flops:
            p = law.predict(c)
            loss, acc = p["loss"], p["accuracy"]
            note = (f"  extrapolating {c / law.flops_range[1]:.3g}x past the largest fitted C"
                    if c > law.flops_range[1] else "")
            print(f"C = {si(c)}: {task} accuracy {acc[0]:.3f} [{acc[1]:.3f}, {acc[2]:.3f}], task "
                  f"loss {loss[0]:.4f} [{loss[1]:.4f}, {loss[2]:.4f}] bits/byte{note}")
    return 0


def _predict_loss(law: Any, record: dict[str, Any], budgets: list[float]) -> None:
    """N_opt, D_opt and the loss at each budget from the L(N, D) fit."""
    from research.format import si

    largest = record["flops_range"][1]
    print(f"{law.formula()}  (fitted to {law.n_points} points up to C = {si(largest)}; C = "
          f"{law.k:.3g}·N·D; 95% intervals)")
    for c in budgets:
        opt = law.optimal(c)
        n, d, loss = opt["n_opt"], opt["d_opt"], opt["loss"]
        note = f"  extrapolating {c / largest:.3g}x past the largest fitted C" if c > largest else ""
        print(f"C = {si(c)}: N_opt {si(n[0])} [{si(n[1])}, {si(n[2])}], D_opt {si(d[0])} "
              f"[{si(d[1])}, {si(d[2])}], D/N {d[0] / n[0]:.3g}, loss {loss[0]:.4f} "
              f"[{loss[1]:.4f}, {loss[2]:.4f}]{note}")


def _sizes(flag: str, text: str) -> list[int]:
    from research.config import ConfigError

    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        sizes = [0]
    if any(size <= 0 for size in sizes) or len(set(sizes)) != len(sizes):
        raise ConfigError(f"{flag}={text!r}: expected distinct positive integers, e.g. 64,128,256")
    return sorted(sizes)


def coordcheck_command(args: argparse.Namespace) -> int:
    from research.analysis import coordcheck
    from research.config import ConfigError

    names = [p.strip() for p in args.parameterizations.split(",") if p.strip()]
    allowed = ("standard", "mup", "depth_mup", "completep")
    if not names or any(p not in allowed for p in names):
        raise ConfigError(f"--parameterizations={args.parameterizations!r}: allowed "
                          f"{', '.join(allowed)} (comma-separated)")
    if args.steps < 1 or args.threshold <= 0:
        raise ConfigError("--steps must be >= 1 and --threshold > 0")
    checks = coordcheck.run(args.experiment, args.overrides, names,
                            _sizes("--widths", args.widths), _sizes("--depths", args.depths),
                            args.steps)
    out = Path(args.out or f"runs/coordcheck_{Path(args.experiment).stem}")
    for row in coordcheck.write(checks, out, args.threshold):
        print(f"{row['parameterization']:>10} {row['axis']:>5} {row['activation']:>10}: "
              f"slope {row['slope']:+.2f} ({row['verdict']})")
    print(f"wrote {out}/: slopes.md, slopes.csv, coordcheck_*.png")
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
