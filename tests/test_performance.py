"""Profiler traces in the run's TensorBoard directory, and the persistent compilation cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from research.analysis.board import serve
from research.launch import allocator, tcmalloc_env
from research.train import compile_cache
from research.train.loop import train

ROOT = Path(__file__).resolve().parents[1]


def test_profile_steps_write_a_trace_that_the_board_serves(tiny, tmp_path):
    train(tiny("train.steps=3", "train.eval_every=3", "logging.profile_steps=[2, 3]"), tmp_path)
    traces = list((tmp_path / "tb" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    with serve(tmp_path) as (url, _):
        with urllib.request.urlopen(url + "data/plugins_listing", timeout=30) as response:
            plugins = json.loads(response.read())
    assert plugins["profile"]["enabled"], plugins["profile"]


def test_compile_cache_location_follows_the_environment(tmp_path):
    home = Path.home() / ".cache" / "research" / "jax"
    assert compile_cache.cache_dir({}) == home
    assert compile_cache.cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "research/jax"
    assert compile_cache.cache_dir({"JAX_COMPILATION_CACHE_DIR": "/a"}) == Path("/a")
    assert compile_cache.cache_dir({"RESEARCH_COMPILE_CACHE": "/b",
                                    "JAX_COMPILATION_CACHE_DIR": "/a"}) == Path("/b")
    assert compile_cache.cache_dir({"RESEARCH_COMPILE_CACHE": "off"}) is None


def test_the_suite_compiles_into_a_cache_of_its_own():
    """tests/conftest.py points every command the tests run at a fresh folder of this run."""
    import tempfile

    used = compile_cache.cache_dir()
    assert used is not None and used.is_dir() and used != compile_cache.cache_dir({})
    assert used.parent == Path(tempfile.gettempdir()) and used.name.startswith("research-test-jax-")


def test_runs_share_compiled_steps_and_a_finished_rerun_compiles_nothing(tmp_path, tiny_overrides):
    def run(run_dir: Path, cache: Path) -> set[str]:
        result = subprocess.run(
            [sys.executable, "-m", "research", "train", "experiments/dense_tiny.yaml",
             "--run-dir", str(run_dir), *tiny_overrides, "train.steps=1", "train.eval_batches=1"],
            cwd=ROOT, capture_output=True, text=True,
            env={**os.environ, compile_cache.ENV: str(cache), "XLA_FLAGS": ""})
        assert result.returncode == 0, result.stderr
        return {p.name for p in cache.glob("*")}

    cold = run(tmp_path / "a", tmp_path / "cache")
    assert any(name.startswith("jit_train_step-") for name in cold)
    assert run(tmp_path / "b", tmp_path / "cache") == cold  # every executable was found
    rerun = run(tmp_path / "a", tmp_path / "empty")  # finished: restores, compiles no step
    assert not any(name.startswith("jit_train_step-") for name in rerun)


def test_a_train_command_imports_neither_plotting_nor_pytorch(tmp_path):
    """Start-up is part of every short trial: building the CLI must not import matplotlib or
    scipy (~2 s), and the TensorBoard writer must not import PyTorch (~1.6 s) even where it is
    installed (the test extras install it)."""
    code = ("import sys; import research.cli; from research.train.metrics import RunLog; "
            "from research.train.rundir import RunDir; "
            f"RunLog(RunDir({str(tmp_path)!r}), resume_step=0, tensorboard=True)"
            ".close(); print(sorted(m for m in ('matplotlib', 'scipy', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    assert list(tmp_path.glob("tb/events.out.tfevents.*"))  # the writer did write


def test_tcmalloc_is_preloaded_once_unless_turned_off(tmp_path):
    library = tmp_path / "libtcmalloc_minimal.so.4"
    library.write_bytes(b"")
    paths = (str(tmp_path / "missing.so"), str(library))
    env = tcmalloc_env({"LD_PRELOAD": "/x/other.so", "PATH": "/bin"}, paths)
    assert env == {"LD_PRELOAD": f"{library}:/x/other.so", "PATH": "/bin"}
    assert tcmalloc_env(env, paths) is None  # the re-executed process does not re-execute
    assert tcmalloc_env({"RESEARCH_MALLOC": "system"}, paths) is None
    assert tcmalloc_env({}, (str(tmp_path / "missing.so"),)) is None
    assert allocator(env) == "tcmalloc"  # what the benchmarks print in their headers
    assert allocator({"LD_PRELOAD": "/x/other.so"}) == allocator({}) == "system allocator"


@pytest.mark.skipif(tcmalloc_env({}) is None, reason="no tcmalloc on this machine "
                    "(apt-get install libtcmalloc-minimal4; .ci/run installs it)")
def test_a_command_reexecutes_itself_with_tcmalloc_loaded():
    code = ("import sys; from research.launch import preload_tcmalloc; preload_tcmalloc("
            "[sys.executable, '-c', 'print(open(\"/proc/self/maps\").read())'])")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "RESEARCH_MALLOC")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=True)
    assert "libtcmalloc" in out.stdout


@pytest.mark.parametrize("argv, message", [
    (["--bogus"], "error: unknown argument '--bogus' (allowed: --dry-run, --steps N, --repeats N)"),
    (["--steps", "x"], "error: --steps takes a positive integer, got 'x'"),
    (["--dry-run", "--repeats", "0"], "error: --repeats takes a positive integer, got '0'"),
    (["--steps"], "error: --steps takes a positive integer, got ''"),
    ([], "error: no GPU here (JAX backend cpu); bench/accelerator.sh --dry-run checks the script "
         "on CPU"),
])
def test_the_accelerator_script_refuses_bad_arguments_in_one_line(argv, message):
    """Exit 2 and one line, before any measuring (the suite runs with JAX_PLATFORMS=cpu)."""
    out = subprocess.run(["bash", str(ROOT / "bench" / "accelerator.sh"), *argv],
                         capture_output=True, text=True, timeout=120)
    assert (out.returncode, out.stderr.splitlines(), out.stdout) == (2, [message], "")
