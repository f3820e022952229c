"""The one timer: functions called round-robin, so drift of a shared machine hits them all alike.

Used by the benchmarks (``selecsls.bench.runner`` re-exports it) and by code that picks the faster
of two exact algorithms at run time (the ``tuned`` backend in ``selecsls.deploy.runtimes``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

__all__ = ["Clock", "fastest_seconds", "time_interleaved", "wall_clock"]

Clock = Callable[[Callable[[], object]], float]


def wall_clock(sync: Callable[[], None] | None = None) -> Clock:
    """A clock timing one call with ``time.perf_counter``; ``sync`` (if given) runs before and after
    so asynchronous work queued by the call is inside the measurement."""

    def measure(fn: Callable[[], object]) -> float:
        if sync is not None:
            sync()
        start = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        return time.perf_counter() - start

    return measure


def time_interleaved(
    fns: Mapping[str, Callable[[], object]],
    warmup: int,
    repeats: int,
    sync: Callable[[], None] | None = None,
    *,
    clock: Clock | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each function, ``repeats`` samples each, measured round-robin.

    Each round calls every function once; the starting function rotates from round to round
    so no function always runs right after the same neighbour. ``warmup`` untimed rounds
    come first (allocator, caches, cudnn autotuning, lazy compilation). ``sync`` waits for
    queued device work (e.g. ``torch.cuda.synchronize``); ``clock`` replaces the default
    wall clock, e.g. with CUDA events (:func:`selecsls.bench.runner.cuda_event_clock`).
    """
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if not fns:
        raise ValueError("time_interleaved needs at least one function to time")
    measure = clock or wall_clock(sync)
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    if sync is not None:
        sync()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(measure(fns[name]))
    return samples


def fastest_seconds(fns: Mapping[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """The fastest of ``repeats`` interleaved calls of each function, after one warm-up round: the
    least disturbed call, the right measure for choosing between algorithms on a shared machine."""
    return {name: min(samples) for name, samples in time_interleaved(fns, 1, repeats).items()}
