"""Where a train step's time goes, as a table: jax.profiler's trace joined to the compiled HLO.

    PYTHONPATH=. python bench/op_profile.py EXPERIMENT.yaml [--steps 3] [--top 20] [key=value ...]

Compiles the experiment's real train step, runs two warm-up steps, traces `--steps` more and
prints, per step: the op time by sublayer (the model's module path in each op's metadata:
mlp, attention/q, norm, ...) and kind (dot or other fusion), the `--top` single ops with their HLO
shapes, and how long 0, 1, 2, ... ops ran at once (how well the cores are used). This is the
table behind docs/performance.md. TensorBoard's profile tab (`logging.profile_steps`) shows the
same trace as a timeline; its HLO op statistics stay empty on CPU.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import jax
from xprof.convert import raw_to_tool_data

from bench.sidebyside import initial_state
from research import config
from research.train.loop import compile_train_step

# Trace events that wrap ops rather than being ops.
CONTAINERS = ("ThreadpoolListener::Region", "ThunkExecutor::Execute", "SlinkyThreadPool::Await",
              "H2D Dispatch")
# Module paths that name a sublayer, most specific first.
SUBLAYERS = ("attention/q/", "attention/k/", "attention/v/", "attention/o/", "attention/",
             "mlp/", "moe/", "mamba/", "norm", "embed", "lm_head")


def trace_events(trace_dir: Path) -> list[dict]:
    """The op events (name, ts, dur in µs) of the XLA worker threads in a jax.profiler trace."""
    files = [str(p) for p in trace_dir.glob("**/*.xplane.pb")]
    data, _ = raw_to_tool_data.xspace_to_tool_data(files, "trace_viewer@", {})
    events = json.loads(data)["traceEvents"]
    threads = {e["tid"]: e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    return [e for e in events if e.get("ph") == "X" and "python" not in threads.get(e["tid"], "python")
            and not e["name"].startswith(CONTAINERS) and not e["name"].startswith("while")]


def hlo_ops(hlo_text: str) -> dict[str, tuple[str, str]]:
    """HLO instruction name -> (its result shape and operation, the op_name of its metadata)."""
    ops = {}
    for line in hlo_text.splitlines():
        match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+ \w+)", line)
        if match:
            op_name = re.search(r'op_name="([^"]*)"', line)
            ops.setdefault(match.group(1), (match.group(2), op_name.group(1) if op_name else ""))
    return ops


def category(name: str, op_name: str) -> str:
    """"<sublayer> <kind>": kind "dot" is a dot or a YNNPACK library fusion (XLA:CPU's matmuls,
    and some of its reductions), "fusion" every other op (elementwise, copies, reductions)."""
    kind = "dot" if name.startswith(("ynn_fusion", "dot")) else "fusion"
    sublayer = next((s.rstrip("/") for s in SUBLAYERS if s in op_name), "rest")
    return f"{sublayer} {kind}"


def concurrency(events: list[dict]) -> dict[int, float]:
    """µs of wall time during which k ops were running, for each k."""
    edges = sorted([(e["ts"], 1) for e in events] + [(e["ts"] + e["dur"], -1) for e in events])
    out: dict[int, float] = collections.Counter()
    running, last = 0, edges[0][0] if edges else 0
    for when, change in edges:
        out[running] += when - last
        running, last = running + change, when
    return dict(sorted(out.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("experiment", type=Path)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args()
    cfg = config.load(args.experiment, args.overrides)
    setup, state, data = initial_state(cfg)
    with setup.context():
        step_fn, knobs = compile_train_step(setup)
        batches = [{"tokens": setup.global_array(next(data)["tokens"])}
                   for _ in range(args.steps + 2)]
        for batch in batches[:2]:
            state, out = step_fn(state, batch, knobs)
        jax.block_until_ready(out)
        with tempfile.TemporaryDirectory() as trace_dir:
            jax.profiler.start_trace(trace_dir)
            started = time.perf_counter()
            for batch in batches[2:]:
                state, out = step_fn(state, batch, knobs)
            jax.block_until_ready(out)
            wall = (time.perf_counter() - started) / args.steps
            jax.profiler.stop_trace()
            events = trace_events(Path(trace_dir))
    ops = hlo_ops(step_fn.as_text())
    per_step = lambda us: us / args.steps / 1e3  # noqa: E731  µs over all steps -> ms per step
    total = sum(e["dur"] for e in events)
    print(f"{args.experiment.stem}: {wall * 1e3:.1f} ms per traced step, "
          f"{per_step(total):.1f} ms of op time per step\n")
    by_category: dict[str, float] = collections.Counter()
    by_op: dict[str, float] = collections.Counter()
    for e in events:
        by_category[category(e["name"], ops.get(e["name"], ("", ""))[1])] += e["dur"]
        by_op[e["name"]] += e["dur"]
    print("| sublayer and kind | ms per step | share of op time |\n|---|---:|---:|")
    for name, us in sorted(by_category.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {per_step(us):.2f} | {us / total:.1%} |")
    print("\n| op | ms per step | result and operation | module path |\n|---|---:|---|---|")
    for name, us in sorted(by_op.items(), key=lambda kv: -kv[1])[:args.top]:
        shape, op_name = ops.get(name, ("?", ""))
        print(f"| {name} | {per_step(us):.2f} | `{shape}` | {op_name[-70:]} |")
    print("\n| ops running at once | ms per step |\n|---:|---:|")
    for running, us in concurrency(events).items():
        print(f"| {running} | {per_step(us):.1f} |")


if __name__ == "__main__":
    sys.exit(main())
