"""Numbers as people read them, the same in every table, legend and message."""

from __future__ import annotations


def si(value: float) -> str:
    """3 significant digits with an SI prefix: 836736 -> 837k, 2.5e15 -> 2.5P."""
    for scale, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{prefix}"
    return f"{value:.3g}"
