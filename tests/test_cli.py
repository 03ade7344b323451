"""Bad input of every kind is one line naming the file or flag, exit code 2, no traceback, and
nothing written: malformed files, wrong path types, broken links, unreadable files, bad URLs,
out-of-range flags (one error boundary in research.cli.main)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from research import cli

ROOT = Path(__file__).resolve().parents[1]


def run_cli(capsys, *argv: str) -> tuple[int, list[str]]:
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:  # argparse
        code = exc.code
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.fixture
def experiment(tmp_path, tiny_overrides) -> list[str]:
    """`research train` arguments for the tiny config, run directory inside tmp_path."""
    path = tmp_path / "experiment.yaml"
    path.write_text("{}\n")
    return [str(path), f"--run-dir={tmp_path / 'run'}", *tiny_overrides]


def test_bad_data_and_paths_are_one_line(tmp_path, experiment, capsys):
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(os.urandom(100))
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("some text " * 100)
    (folder / "b.txt").symlink_to(tmp_path / "gone.txt")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    duplicated = tmp_path / "duplicated.yaml"
    duplicated.write_text("train:\n  steps: 3\nmodel:\n  n_layers: 2\ntrain:\n  steps: 5\n")
    cases = {
        "garbage.parquet: not a readable parquet file": [f"data.source={garbage}"],
        "texts/b.txt: No such file or directory": [f"data.source={folder}"],
        "a_file/prekeys: Not a directory": [f"data.cache_dir={a_file}"],
        "a_file: is a file; a run directory is a folder": [f"--run-dir={a_file}"],
    }
    for expected, extra in cases.items():
        code, err = run_cli(capsys, "train", *experiment, *extra)
        assert code == 2 and len(err) == 1 and expected in err[0], (expected, err)
    code, err = run_cli(capsys, "train", str(duplicated), f"--run-dir={tmp_path / 'run'}")
    assert code == 2 and err == [f"error: {duplicated}: line 5 invalid YAML ('train' appears "
                                 "twice in one mapping)"]
    assert not (tmp_path / "run").exists()


def test_bad_sweep_paths_and_urls_are_one_line_and_create_nothing(tmp_path, capsys):
    sweep = str(ROOT / "sweeps" / "lr.yaml")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    code, err = run_cli(capsys, "sweep", sweep, f"--sweep-dir={a_file}")
    assert code == 2 and err == [f"error: --sweep-dir {a_file}: is a file; a sweep directory is "
                                 "a folder"]
    code, err = run_cli(capsys, "sweep", sweep, f"--sweep-dir={tmp_path / 'sweep'}",
                        "--storage", "not-a-url")
    assert code == 2 and len(err) == 1 and err[0].startswith("error: storage 'not-a-url': not a ")
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("argv, flag", [
    (["board", ".", "--port", "99999"], "--port: 99999 is out of range: expected an integer in "
                                        "[1, 65535]"),
    (["board", ".", "--port", "-5"], "--port: -5 is out of range"),
    (["eval", ".", "--batches", "0"], "--batches: 0 is out of range: expected an integer >= 1"),
    (["generate", ".", "--max-new-tokens", "100000"], "--max-new-tokens: 100000 is out of range"),
    (["train", "x.yaml", "--num-processes", "two"], "--num-processes: 'two' is not an integer"),
])
def test_out_of_range_flags_are_refused_while_parsing(capsys, argv, flag):
    code, err = run_cli(capsys, *argv)
    assert code == 2 and flag in err[-1] and not any("Traceback" in line for line in err)


# The suite runs as root, which reads anything: the child drops the capabilities that allow
# that (CAP_DAC_OVERRIDE = 1, CAP_DAC_READ_SEARCH = 2) from its bounding set and re-executes
# itself, so the CLI runs without them (no preexec_fn: forking a JAX process is unsafe).
WITHOUT_ROOT_FILE_ACCESS = """
import ctypes, os, sys
if os.geteuid() == 0:
    libc = ctypes.CDLL(None, use_errno=True)
    if any(libc.prctl(24, cap, 0, 0, 0) for cap in (1, 2)):  # PR_CAPBSET_DROP
        sys.exit(77)
os.execv(sys.executable, [sys.executable, "-c", sys.argv[1]])
"""
UNREADABLE = """
from research import cli
for argv in {cases!r}:
    print(cli.main(argv))
"""


def test_unreadable_files_are_one_line(tmp_path, experiment):
    """chmod 000 on the data file, a file in a data folder, the experiment YAML."""
    data = tmp_path / "data.txt"
    data.write_text("text " * 1000)
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("text " * 1000)
    (folder / "b.txt").write_text("text " * 1000)
    yaml_file = tmp_path / "locked.yaml"
    yaml_file.write_text("{}\n")
    for path in (data, folder / "b.txt", yaml_file):
        path.chmod(0)
    cases = [["train", *experiment, f"data.source={data}"],
             ["train", *experiment, f"data.source={folder}"],
             ["train", str(yaml_file), *experiment[1:]]]
    result = subprocess.run([sys.executable, "-c", WITHOUT_ROOT_FILE_ACCESS,
                             UNREADABLE.format(cases=cases)], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    if result.returncode == 77:
        pytest.skip("cannot drop CAP_DAC_OVERRIDE here, and root reads a chmod-000 file")
    codes = [line for line in result.stdout.splitlines() if line.isdigit()]  # beside progress lines
    assert codes == ["2", "2", "2"], result.stderr
    assert result.stderr.splitlines() == [f"error: {data}: Permission denied",
                                          f"error: {folder / 'b.txt'}: Permission denied",
                                          f"error: {yaml_file}: Permission denied"]
    assert not (tmp_path / "run").exists()
