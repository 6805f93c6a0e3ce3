"""How DIOE writes numbers and tables for people: times in ms, byte counts, aligned text tables. The one place
every report (plans, the CLI, the bench, traces) takes them from.

    >>> show_ms(0.01114), show_ms(12.345)
    ('0.0111', '12.35')
    >>> fmt_bytes(3 * 2 ** 20)
    '3.0 MiB'
"""

from __future__ import annotations

import math
import re

from .errors import DIOEError


def round_ms(ms: float) -> float:
    """A time as plans and benchmark results keep it: five significant digits. A fixed step was too coarse for
    the smallest models: 0.1 us (four decimals of a ms) is 3% of a 3 us model, as wide as the split margin the
    optimizer decides on."""
    return float(f"{ms:.5g}")


def show_ms(ms: float) -> str:
    """A time in ms as a person reads it: two decimals from 1 ms up, three significant digits below it (tiny-mlp's
    0.0111 ms, where two decimals read 0.01 for every engine), never in exponent form."""
    r = float(f"{ms:.3g}") if ms == ms else ms  # rounded first, so that 0.9996 reads 1.00, not 1.000
    if not 0 < r < 1:
        return f"{ms:.2f}"
    return f"{r:.{2 - math.floor(math.log10(r))}f}"


def fmt_bytes(n: int | float | None) -> str:
    """A byte count in powers of 1024: '512 B', '3.0 MiB'; '-' for None."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def table(rows: list[list[str]], header: list[str]) -> str:
    """Plain aligned text table: readable in a terminal and in CI logs."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r):
        return "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


_UNITS = {"": 1, "B": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def parse_size(text: str) -> int:
    """Bytes in a size such as "20G", "1.5GiB", "500M" or "4096" (powers of 1024).

    >>> parse_size("1.5K")
    1536
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise DIOEError(f"cache size {text!r} is not a size; expected a number with an optional unit K, M, G or T "
                        "(powers of 1024), such as 20G or 500M")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])
