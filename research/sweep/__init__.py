"""Hyper-parameter sweeps over `research train` runs: spec, shared store, runner, status.

See docs/sweeps.md. The CLI entry point is `add_sweep_commands` (research/cli.py calls it).
"""

from research.sweep.cli import add_sweep_commands

__all__ = ["add_sweep_commands"]
