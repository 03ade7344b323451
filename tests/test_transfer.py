"""Learning-rate transfer analysis: a size x lr grid on disk -> optima, drift, figure, report."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_analysis import write_run

from research.analysis.report import analyze
from research.analysis.transfer import optimum


def test_optimum_is_the_parabola_vertex_in_log2_lr_when_interior():
    lrs = 2.0 ** np.arange(-8, -3)
    losses = (np.log2(lrs) + 5.3) ** 2  # true optimum 2^-5.3, between grid points
    best, loss = optimum(lrs, losses)
    assert math.log2(best) == pytest.approx(-5.3, abs=1e-9) and loss == pytest.approx(0, abs=1e-9)
    assert optimum(lrs, -np.log2(lrs))[0] == lrs[-1]  # at the edge: the edge itself


def test_analyze_measures_the_optimum_drift_per_parameterization(tmp_path):
    """Synthetic losses whose best lr halves per width doubling under standard and stays put
    under completep: drift -2 octaves over 32 -> 128, and 0."""
    i = 0
    for p in ("standard", "completep"):
        for width in (32, 64, 128):
            best = 1e-2 * (32 / width if p == "standard" else 1.0)
            for k in range(-3, 3):
                lr = 1e-2 * 2.0 ** k
                loss = 3.0 - 0.1 * math.log2(width) + 0.05 * math.log2(lr / best) ** 2
                params = {"model.parameterization": p, "model.d_model": width, "optim.lr": lr}
                write_run(tmp_path / f"t{i:03d}", params=width * 1000, tokens_per_step=1024,
                          steps=10, eval_loss=loss, trial={"trial": i, "name": f"t{i:03d}",
                          "params": params, "state": "done", "objective": None, "error": None})
                i += 1
    out, answer = analyze(tmp_path)
    assert answer.startswith("Under standard, the best lr goes from 0.01 at d_model=32 to 0.0025 "
                             "at d_model=128: -2.00 octaves, it moves")
    assert "Under completep, the best lr goes from 0.01 at d_model=32 to 0.01 at d_model=128: " \
           "+0.00 octaves, it transfers." in answer
    report = (out / "report.md").read_text()
    assert "## Does the best learning rate move with size?" in report
    assert "| model.d_model | standard | 128 | 0.0025 |" in report
    assert (out / "transfer.png").stat().st_size > 10_000
