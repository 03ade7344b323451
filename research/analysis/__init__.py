"""Analysis of finished runs and sweeps: tables, plots, scaling-law fits, reports, TensorBoard.

See docs/analysis.md. The CLI entry point is `add_analysis_commands` (research/cli.py calls it).
"""

from research.analysis.cli import add_analysis_commands

__all__ = ["add_analysis_commands"]
