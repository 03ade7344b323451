"""Numbers as people read them, the same in every table, legend and message."""

from __future__ import annotations

SI_PREFIXES = ((1e24, "Y"), (1e21, "Z"), (1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"),
               (1e6, "M"), (1e3, "k"), (1.0, ""))


def si(value: float) -> str:
    """FLOPs, parameters and tokens for people, the same in legends, tables and text: 3
    significant digits and an SI prefix, at least one decimal below 10 (1e12 -> 1.0T,
    836736 -> 837k, 2.5e15 -> 2.5P); below 1 or past 1e27, plain 3 significant digits."""
    for scale, prefix in SI_PREFIXES:
        mantissa = float(f"{abs(value) / scale:.3g}")  # rounded first: 999.96k is 1.0M
        if 1 <= mantissa < 1000:
            text = f"{mantissa:.3g}"
            if mantissa < 10 and "." not in text:
                text += ".0"
            return ("-" if value < 0 else "") + text + prefix
    return f"{value:.3g}"
