"""A run owns its output directory: one run at a time, earlier results kept unless told otherwise.

* A lock (``flock`` on ``.selecsls-train.lock``, which names the holder: pid, host, start time)
  is held for the whole run; a second run into the same directory refuses, naming the holder.
  The kernel releases the lock when its process dies, so a killed run never blocks the next.
* A fresh run refuses a directory holding an earlier run's results; ``overwrite`` deletes them
  first (so the directory never mixes two runs), ``resume`` continues them.
* Cleanup removes only temporary files of this run's outputs whose writer process is gone
  (:func:`selecsls._io.stale_temp_files`): never another live process's file.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from selecsls._io import printable, stale_temp_files
from selecsls.train.config import SettingError, TrainConfig
from selecsls.train.distributed import Workers

__all__ = ["LOCK_NAME", "RUN_OUTPUTS", "owned_output"]

LOCK_NAME = ".selecsls-train.lock"
#: Every file a run writes into its output directory (tests/train/test_adversarial_training.py keeps it complete).
RUN_OUTPUTS = ("last.pt", "best.pt", "metrics.jsonl", "summary.json", "training_curve.png", "gamma_histograms.png")


@contextlib.contextmanager
def owned_output(config: TrainConfig, workers: Workers) -> Iterator[None]:
    """Hold ``config.output`` for the duration of the block (the main process takes the lock).

    Every process learns whether the main process got the directory, so all fail together
    rather than some waiting forever for the others.
    """
    output = Path(config.output)
    created, lock, error = not output.exists(), None, None
    if workers.is_main:
        try:
            lock = _claim(config)
        except SettingError as exc:
            error = exc
    if not workers.all_agree(error is None):
        raise error or SettingError("the main process could not take {output}; see its error")
    try:
        yield
    except BaseException:
        # A run that failed before writing anything (bad data, say) leaves no directory behind.
        if lock is not None and created and [p.name for p in output.iterdir()] == [LOCK_NAME]:
            (output / LOCK_NAME).unlink()
            output.rmdir()
        raise
    finally:
        if lock is not None:
            lock.close()  # closing the descriptor releases the lock


def _claim(config: TrainConfig) -> IO:
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    lock = _lock(output / LOCK_NAME)
    try:
        earlier = [name for name in RUN_OUTPUTS if (output / name).exists()]
        if earlier and not (config.resume or config.overwrite):
            raise SettingError(
                f"{printable(output)} holds an earlier run's results ({', '.join(earlier)}); pass {{resume}} to "
                "continue it, {overwrite} to delete them and start afresh, or choose another {output}"
            )
        doomed = [output / name for name in earlier] if config.overwrite else []
        for path in doomed + stale_temp_files(output, RUN_OUTPUTS):
            path.unlink(missing_ok=True)
    except BaseException:
        lock.close()
        raise
    return lock


def _lock(path: Path) -> IO:
    """The lock file, opened and locked, now naming this process; SettingError if another run holds it."""
    import fcntl  # POSIX only, like the rest of the run-directory handling

    handle = open(path, "a+")  # noqa: SIM115 (held open for the whole run: closing it releases the lock)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = printable(handle.read(500).strip()) or "holder unknown"
        handle.close()
        raise SettingError(
            f"another training run is using {printable(path.parent)} ({holder}); "
            "wait for it to finish or choose another {output}"
        ) from None
    handle.seek(0)
    handle.truncate()
    started = datetime.datetime.now().isoformat(timespec="seconds")
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}) + "\n")
    handle.flush()
    return handle
