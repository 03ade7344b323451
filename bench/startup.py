"""Time to first step of `research train`, with a cold and a warm persistent compilation cache.

    python bench/startup.py [--repeats 3] [EXPERIMENT.yaml] [key=value ...]

Each repeat runs a 1-step run of the experiment (default dense_tiny) twice as a fresh process:
first with an empty compilation cache (cold), then in a new run directory with the cache the
first run filled (warm). Reported: seconds from starting the command to the first step's
metrics line, and to the command's exit (medians; the pairs alternate, so load hits both).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def timed_run(experiment: Path, overrides: list[str], run_dir: Path, cache: Path) -> tuple[float, float]:
    """(seconds to the first metrics line, seconds to exit) of one `research train`."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "research", "train", str(experiment), "--run-dir", str(run_dir),
         "train.steps=1", "train.eval_batches=1", "logging.progress=false", *overrides],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "RESEARCH_COMPILE_CACHE": str(cache)})
    first = None
    metrics = run_dir / "metrics.jsonl"
    while proc.poll() is None:
        if first is None and metrics.is_file() and metrics.stat().st_size:
            first = time.perf_counter() - start
        time.sleep(0.02)
    total = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"research train failed: {proc.stderr.read()[-2000:]}")
    return first if first is not None else total, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("args", nargs="*", help="an experiment YAML and key=value overrides")
    args = parser.parse_args()
    experiment = next((Path(a) for a in args.args if a.endswith(".yaml")),
                      ROOT / "experiments/dense_tiny.yaml")
    overrides = [a for a in args.args if "=" in a]
    rows: dict[str, list[tuple[float, float]]] = {"cold cache": [], "warm cache": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            cache = Path(tmp) / f"cache{i}"
            rows["cold cache"].append(timed_run(experiment, overrides, Path(tmp) / f"cold{i}", cache))
            rows["warm cache"].append(timed_run(experiment, overrides, Path(tmp) / f"warm{i}", cache))
    print(f"| {experiment.stem}, 1 step | to first step, s | to exit, s |\n|---|---:|---:|")
    for name, times in rows.items():
        first, total = np.median(np.array(times), axis=0)
        print(f"| {name} (median of {args.repeats}) | {first:.1f} | {total:.1f} |")


if __name__ == "__main__":
    sys.exit(main())
