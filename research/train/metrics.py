"""Where a run's numbers go: metrics.jsonl, TensorBoard (tensorboardX), summary.json, a progress bar.

Also the device peak FLOP/s behind MFU: a table for known accelerators, and for CPUs a figure
measured once on this machine and cached.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from research.train.rundir import RunDir, parse_metrics, write_json

# Dense peak FLOP/s per device, (bfloat16, float32), from vendors' published figures.
# float32 on NVIDIA counts TF32 tensor cores, which XLA uses for f32 matmuls by default.
KNOWN_PEAKS: dict[str, tuple[float, float]] = {
    "h200": (989e12, 494e12),
    "h100": (989e12, 494e12),
    "a100": (312e12, 156e12),
    "l4": (121e12, 60e12),
    "tpu v6": (918e12, 918e12),
    "tpu v5p": (459e12, 459e12),
    "tpu v5 lite": (197e12, 197e12),
    "tpu v5e": (197e12, 197e12),
    "tpu v4": (275e12, 275e12),
}

def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_cpu_peak(dtype: str, size: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of a square matmul in the run's compute dtype (accumulating in float32)."""
    a = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda x: jnp.matmul(x, x, preferred_element_type=jnp.float32))
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops(dtype: str, override: float | None = None,
               cache_file: Path = Path("~/.cache/research/peak_flops.json")) -> float:
    """Peak FLOP/s of all devices of this process together (MFU's denominator)."""
    devices = jax.local_devices()
    if override is not None:
        return override * len(devices)
    kind = devices[0].device_kind.lower()
    for name, (bf16, f32) in KNOWN_PEAKS.items():
        if name in kind:
            return (bf16 if dtype == "bfloat16" else f32) * len(devices)
    if devices[0].platform != "cpu":
        raise ValueError(f"unknown accelerator {kind!r}: set logging.peak_flops")
    # Virtual CPU devices share the host's cores: the host's peak is the whole budget.
    cache_file = cache_file.expanduser()
    key = f"{_cpu_name()}|{os.cpu_count()}|{dtype}|jax {jax.__version__}"
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    if key not in cache:
        cache[key] = measure_cpu_peak(dtype)
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        write_json(cache_file, cache)
    return cache[key]


def tensorboard_tag(key: str, prefix: str) -> str:
    """A metrics.jsonl key's TensorBoard tag: a key with a slash as it is (eval/code/bpb,
    data/code/tokens), else under `prefix/` (loss -> train/loss, eval_loss -> eval/loss)."""
    return key if "/" in key else f"{prefix}/{key.removeprefix(prefix + '_')}"


def _summary_writer() -> type:
    """tensorboardX's SummaryWriter, imported without PyTorch: tensorboardX imports torch when
    it is installed, only to accept torch tensors (we log floats), and that import took 1.6 s of
    every run's start-up here."""
    hidden = "torch" not in sys.modules
    if hidden:
        sys.modules["torch"] = None  # type: ignore[assignment]  # makes `import torch` fail
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hidden:
            del sys.modules["torch"]
    return SummaryWriter


class RunLog:
    """metrics.jsonl + TensorBoard scalars for one run directory; resumable without duplicates."""

    def __init__(self, run: RunDir, *, resume_step: int, tensorboard: bool, enabled: bool = True):
        self.path = run.metrics_path
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        self._truncate_after(resume_step)
        if tensorboard:
            SummaryWriter = _summary_writer()
            # purge_step makes TensorBoard drop what an interrupted run logged past the checkpoint.
            self.tb = SummaryWriter(str(run.tensorboard),
                                    purge_step=resume_step + 1 if resume_step else None)

    def _truncate_after(self, step: int) -> None:
        """Drop what an interrupted run logged past the checkpoint it resumes from."""
        if not self.path.exists():
            return
        kept = [e for e in parse_metrics(self.path.read_text()) if e.get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(e) + "\n" for e in kept))
        os.replace(tmp, self.path)

    def rewind(self, step: int) -> None:
        """Forget what was logged after `step` (a rollback restored it): metrics.jsonl lines, and
        TensorBoard's events from the next write on (purge_step)."""
        if not self.enabled:
            return
        self._truncate_after(step)
        if self.tb is not None:
            logdir = self.tb.logdir
            self.tb.close()
            self.tb = _summary_writer()(logdir, purge_step=step + 1)

    def text(self, tag: str, text: str) -> None:
        if self.tb is not None:
            self.tb.add_text(tag, f"```\n{text}\n```", 0)

    def write(self, step: int, values: dict[str, float], prefix: str) -> None:
        """One JSON line (keys as given) and TensorBoard scalars (`tensorboard_tag`)."""
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(tensorboard_tag(key, prefix), value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class Progress:
    """The run's progress: a tqdm bar on a terminal; elsewhere (a sweep's trial.log, a batch job's
    log file) one plain line per logged step, since a bar's carriage returns make a log unreadable.
    """

    def __init__(self, name: str, total: int, initial: int, enabled: bool):
        self.name, self.total, self.step, self.enabled = name, total, initial, enabled
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, desc=name)

    def update(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.step)
        self.step = step

    def metrics(self, **values: str) -> None:
        """The latest train metrics: the bar's postfix, or a line `name: step 40/300 loss=...`."""
        if self.bar is not None:
            self.bar.set_postfix(values)
        elif self.enabled:
            fields = " ".join(f"{k}={v}" for k, v in values.items())
            print(f"{self.name}: step {self.step}/{self.total} {fields}", flush=True)

    def write(self, text: str) -> None:
        """A line that stays (an eval result), printed above the bar."""
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(f"{self.name}: {text}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class StepProfiler:
    """A jax.profiler trace of steps [first, last] (logging.profile_steps) into `log_dir`, where
    TensorBoard's profile plugin finds it (plugins/profile/<time>/<host>.xplane.pb)."""

    def __init__(self, log_dir: Path, steps: tuple[int, int] | None):
        self.log_dir, self.steps, self.tracing = log_dir, steps, False

    def before(self, step: int) -> None:
        if self.steps is not None and step == self.steps[0]:
            jax.profiler.start_trace(str(self.log_dir))
            self.tracing = True

    def after(self, step: int, outputs: Any) -> None:
        """After step `step` was dispatched: the trace ends once its `outputs` are computed."""
        if self.tracing and step == self.steps[1]:
            jax.block_until_ready(outputs)
            self.stop()

    def stop(self) -> None:
        if self.tracing:
            self.tracing = False
            jax.profiler.stop_trace()
