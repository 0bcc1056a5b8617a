"""Helpers shared by the benchmarks: medians, a child process's CPU time and RSS, a table.

Figures of a contender are taken from a process of its own, so the sandbox's CPU (moto, the
brokers) and the orchestrating process are never counted. Linux only: CPU time and RSS come
from ``/proc/<pid>``.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = [
    "cpu_seconds",
    "format_table",
    "median",
    "rss_bytes",
]

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def median(values: Iterable[float]) -> float:
    """The median of ``values``.

    Raises:
        ValueError: ``values`` is empty.
    """
    data = list(values)
    if not data:
        raise ValueError("median of no values")
    return float(statistics.median(data))


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds a live process has used so far (all its threads).

    Args:
        pid: the process (not yet reaped).

    Returns:
        CPU seconds, at the kernel's clock-tick resolution (usually 10 ms).

    Raises:
        OSError: the process does not exist.
    """
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may hold spaces or parentheses: split after its last ")".
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / _CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    """The resident set size of a live process, in bytes.

    Raises:
        OSError: the process does not exist.
        ValueError: its status has no ``VmRSS`` line (a zombie).
    """
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"process {pid} reports no VmRSS")


def format_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Render rows under headers as a plain-text table, numbers right-aligned.

    Args:
        headers: the column titles.
        rows: one sequence per row, as long as ``headers``; ``None`` prints as ``-``.

    Returns:
        The table, lines joined with newlines (no trailing newline).
    """
    cells = [[("-" if value is None else str(value)) for value in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for column, text in enumerate(row):
            widths[column] = max(widths[column], len(text))

    def line(values: Sequence[str], *, numeric: Sequence[bool]) -> str:
        parts = [
            value.rjust(width) if right else value.ljust(width)
            for value, width, right in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    numeric_columns = [
        bool(cells) and all(_is_number(row[column]) for row in cells)
        for column in range(len(headers))
    ]
    out = [line(list(headers), numeric=numeric_columns)]
    out.append("  ".join("-" * width for width in widths))
    out += [line(row, numeric=numeric_columns) for row in cells]
    return "\n".join(out)


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", "").rstrip("x%"))
    except ValueError:
        return text == "-"
    return True
