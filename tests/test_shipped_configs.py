"""Every experiment and sweep the project ships loads and validates (they are user-facing)."""

from __future__ import annotations

from pathlib import Path

import pytest

from research import config
from research.sweep import spec

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_experiment_validates(path):
    cfg = config.load(path)
    assert cfg.name == path.stem and cfg.train.steps > 0


@pytest.mark.parametrize("path", sorted((ROOT / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_sweep_validates_every_trial_config(path):
    sweep = spec.load(path)  # checks each trial's resolved experiment config up front
    assert sweep.base.is_file()
