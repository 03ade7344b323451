"""A TensorBoard custom-scalars layout: related metrics on one chart, the question's curves first.

TensorBoard's Scalars tab lists every tag on its own; the Custom Scalars tab draws the charts of a
layout, each a set of tag regexes drawn together (all runs, one line per run and tag). The
layout is built from the tags the runs logged, so only families that exist get a chart:

| category         | charts                                                              |
|------------------|---------------------------------------------------------------------|
| loss             | train and eval loss together; eval bits per byte                    |
| eval by domain   | one chart per metric, every domain's `eval/<domain>/<metric>`       |
| downstream       | one chart per metric of the `downstream/` tasks                     |
| moe, mamba       | one chart per layer metric, every layer's `.../layer<i>/<metric>`   |
| speed            | tokens/s, MFU, step time                                            |
| training         | the other `train/` scalars (lr, gradient norm, ...)                 |
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

from research.analysis.events import scalars_from_metrics
from research.analysis.runs import find_run_dirs
from research.train.rundir import RunDir

Layout = dict[str, dict[str, list]]  # category -> chart title -> ["Multiline", [regex, ...]]
SPEED = ("tokens_per_sec", "mfu", "step_time")
LAYER = re.compile(r"^(?:train|eval)/(moe|mamba)/layer\d+/([^/]+)")
DOMAIN = re.compile(r"^eval/([^/]+)/([^/]+)$")
DOWNSTREAM = re.compile(r"(?:^|/)downstream/(?:.*/)?([^/]+)$")


def _chart(*patterns: str) -> list:
    return ["Multiline", list(patterns)]


def layout(tags: Iterable[str]) -> Layout:
    """The charts for these scalar tags, in the order a reader wants them."""
    tags = sorted(set(tags))
    out: Layout = {}

    def add(category: str, title: str, *patterns: str) -> None:
        out.setdefault(category, {}).setdefault(title, _chart(*patterns))

    losses = [t for t in ("train/loss", "eval/loss") if t in tags]
    if losses:
        add("loss", "loss (train and eval)", *(f"^{re.escape(t)}$" for t in losses))
    if "eval/bpb" in tags:
        add("loss", "eval bits per byte", r"^eval/bpb$")
    claimed = set(losses) | {"eval/bpb"}
    for tag in tags:
        if (m := LAYER.match(tag)) is not None:
            family, metric = m.groups()
            prefix = tag.split("/")[0]
            add(family, f"{metric} by layer", rf"^{prefix}/{family}/layer\d+/{re.escape(metric)}(/.*)?$")
        elif (m := DOWNSTREAM.search(tag)) is not None:
            add("downstream", f"{m[1]} by task", rf"downstream/(.*/)?{re.escape(m[1])}$")
        elif (m := DOMAIN.match(tag)) is not None:
            add("eval by domain", f"{m[2]} by domain", rf"^eval/[^/]+/{re.escape(m[2])}$")
        elif tag.startswith("train/") and tag.split("/", 1)[1] in SPEED:
            add("speed", tag.split("/", 1)[1], f"^{re.escape(tag)}$")
        elif tag.startswith("train/") and tag not in claimed and tag != "train/tokens":
            add("training", tag.split("/", 1)[1], f"^{re.escape(tag)}$")
    order = ("loss", "eval by domain", "downstream", "moe", "mamba", "speed", "training")
    return {category: out[category] for category in order if category in out}


def logged_tags(root: Path) -> set[str]:
    """The scalar tags of every run below `root`, from their metrics.jsonl (the same names the
    runs' TensorBoard events use; read in milliseconds, unlike the event files)."""
    return {tag for path in find_run_dirs(Path(root))
            for tag in scalars_from_metrics(RunDir(path).metrics())}


def write(logdir: Path, tags: Iterable[str]) -> bool:
    """Write the layout for `tags` as an event file in `logdir`; False when there is nothing to lay
    out. TensorBoard merges layouts of all runs, so one folder of a logdir should hold it."""
    charts = layout(tags)
    if not charts:
        return False
    from tensorboardX import SummaryWriter

    with SummaryWriter(str(logdir)) as writer:
        writer.add_custom_scalars(charts)
    return True
