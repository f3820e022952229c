"""Whether a benchmark's timings can be trusted, row by row.

On a busy machine every model is slowed, but not alike (a 1,239 ms ResNet-50 at load 3-4 on 2
cores, 58 ms on a quiet one), so the speed-ups flatter or wrong the models at random. Two signs
are measured, not guessed: the 1-minute load average, read before the run and after every cell,
above the number of cores (more runnable threads than cores: the bench waits for the CPU); and
a row's spread, its inter-quartile range above :data:`MAX_RELATIVE_SPREAD` of its median. The
report marks such rows and says what to do (:func:`advice`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

__all__ = ["MAX_RELATIVE_SPREAD", "ROW_FIELDS", "advice", "assess", "load_average", "row_key"]

#: A row whose inter-quartile range exceeds this fraction of its median is unreliable. Measured here:
#: 5-25% on a quiet machine, 15-40% beside other sessions (docs/benchmarks.md), above 100% at load 3-4
#: on 2 cores.
MAX_RELATIVE_SPREAD = 0.5


def load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages (None where the platform has none)."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


ROW_FIELDS = ("model", "backend", "batch", "height", "width")


def row_key(record: Mapping) -> tuple:
    """(model, backend, batch, height, width): one latency row of one cell."""
    return tuple(record[name] for name in ROW_FIELDS)


def _problems(record: Mapping, loads: Sequence[float | None], cores: int | None) -> list[str]:
    """Why one timed row is unreliable (empty: it is not)."""
    problems = []
    busy = [load for load in loads if load is not None and cores and load > cores]
    if busy:
        problems.append(f"load {max(busy):.1f} above {cores} cores")
    summary = record["summary"]
    if summary["median"] > 0 and summary["iqr"] > MAX_RELATIVE_SPREAD * summary["median"]:
        problems.append(f"IQR {summary['iqr'] / summary['median']:.0%} of the median")
    return problems


def assess(result: Mapping) -> dict:
    """Load readings, whether the machine was busy, and each unreliable row with its problems.

    A cell's rows are bracketed by two load readings: the one before the cell (the previous cell's, or
    the start's for the first) and its own, read right after it.
    """
    machine = result["machine"]
    cores = machine.get("cpu_count")
    start, end = machine.get("load_average"), machine.get("load_average_end")
    previous = start[0] if start else None
    readings = [previous] if start else []
    brackets: dict[tuple, tuple[float | None, float | None]] = {}  # cell -> (load before, load after)
    for record in result["latency"]:
        cell = row_key(record)[2:]
        if cell not in brackets:
            after = record["load_average"][0] if record.get("load_average") else None
            brackets[cell] = (previous, after)
            if after is not None:
                readings.append(after)
                previous = after
    if end:
        readings.append(end[0])
    unreliable = []
    for record in result["latency"]:
        problems = _problems(record, brackets[row_key(record)[2:]], cores) if record["status"] == "ok" else []
        if problems:
            unreliable.append({**dict(zip(ROW_FIELDS, row_key(record))), "problems": problems})
    return dict(
        cores=cores,
        load_readings=readings,
        busy=any(cores and load > cores for load in readings),
        max_relative_spread=MAX_RELATIVE_SPREAD,
        unreliable=unreliable,
    )


def advice(assessment: Mapping, label: Callable[[Mapping], str]) -> str:
    """The closing note: how trustworthy the timings are, which rows are not, and what to do.

    ``label(record)`` names a row as the report does (e.g. 'resnet50 eager b1 224px').
    """
    cores, readings = assessment["cores"], assessment["load_readings"]
    loads = ", ".join(f"{load:.1f}" for load in readings) or "not readable here"
    rows = assessment["unreliable"]
    if not rows and not assessment["busy"]:
        return (
            f"Timings look reliable: load average {loads} (before, during, after) within {cores} cores, every "
            f"row's IQR within {assessment['max_relative_spread']:.0%} of its median."
        )
    lines = [
        f"UNRELIABLE TIMINGS ({len(rows)} row(s) marked !): "
        + (
            f"the machine was busy (load average {loads} before, during and after the run; {cores} cores)"
            if assessment["busy"]
            else f"the spread of some rows is above {assessment['max_relative_spread']:.0%} of their median"
        )
        + ". Other programs slow each model differently, so these latencies and speed-ups are not the machine's.",
        *(f"  {label(row)}: {'; '.join(row['problems'])}" for row in rows),
        "What to do: rerun when the load average (`uptime`) stays below the number of cores (stop other jobs, "
        "close other programs), or with more --repeats; compare only rows without !.",
    ]
    return "\n".join(lines)
