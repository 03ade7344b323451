"""`research board DIR`: TensorBoard on loopback for a run, a sweep, or any folder of runs.

TensorBoard runs as its own process (`python -m tensorboard.main`, the `tensorboard` command of this
interpreter); we wait until it answers before handing out its address, and stop it on exit.
Before it starts, DIR/analysis/layout gets a custom-scalars layout of the tags the runs logged
(layout.py), so the Custom Scalars tab groups related metrics.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

from research.analysis import layout
from research.analysis.runs import ANALYSIS
from research.config import ConfigError

LAYOUT_DIR = "layout"  # DIR/analysis/layout: the custom-scalars layout (layout.py) TensorBoard shows
HOST = "127.0.0.1"  # loopback only: reach it from elsewhere through `ssh -L PORT:127.0.0.1:PORT`


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _check_port(port: int) -> None:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            raise ConfigError(f"--port {port}: already in use on {HOST}; pick another or leave "
                              "--port out for a free one") from None


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def serve(logdir: Path, port: int | None = None,
          timeout: float = 120.0) -> Iterator[tuple[str, subprocess.Popen]]:
    """TensorBoard for `logdir`; yields its URL and process once it answers, stops it after."""
    logdir = Path(logdir)
    if not logdir.is_dir():
        raise ConfigError(f"{logdir}: no such directory")
    if next(logdir.rglob("events.out.tfevents.*"), None) is None:
        raise ConfigError(f"{logdir}: no TensorBoard event files below it (runs write them to tb/)")
    if port is None:
        port = free_port()
    else:
        _check_port(port)
    charts = logdir / ANALYSIS / LAYOUT_DIR  # rewritten each time: the tags logged by now
    shutil.rmtree(charts, ignore_errors=True)
    layout.write(charts, layout.logged_tags(logdir))
    url = f"http://{HOST}:{port}/"
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", "--host", HOST, "--port", str(port),
             "--logdir", str(logdir.resolve())],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + timeout
            while not _answers(url):
                if process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    lines = log.read().decode(errors="replace").strip().splitlines() or ["no output"]
                    why = "exited" if process.poll() is not None else f"did not answer in {timeout:.0f}s"
                    raise RuntimeError(f"tensorboard {why}: {lines[-1]}")
                time.sleep(0.2)
            yield url, process
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
