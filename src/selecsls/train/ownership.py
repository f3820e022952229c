"""A run owns its output directory: one run at a time, and an earlier run's results are never lost.

This module is the one place that deletes anything in an output directory.

* A lock (``flock`` on ``.selecsls-train.lock``, which names the holder: pid, host, start time)
  is held for the whole run; a second run into the same directory refuses, naming the holder.
  The kernel releases the lock when its process dies, so a killed run never blocks the next.
  A run that ends deletes the lock file while it still holds the lock, so a finished run folder
  holds only results; a run that locked a file deleted meanwhile locks the new one instead.
* A fresh run refuses a directory holding an earlier run's results; ``resume`` continues them.
  ``overwrite`` moves them aside (into ``.selecsls-replaced/``), and only once the run has checked
  and read everything it needs (:meth:`OutputDirectory.replace_earlier`: data, model, ``init``
  weights), so a typo never costs them. When the run ends they are deleted if it saved its own
  ``last.pt`` (it replaced them), and moved back if it stopped before (an error, Ctrl-C, a full
  disk); after a kill, the next run into the directory settles them the same way first.
* Cleanup removes only temporary files of this run's outputs whose writer process is gone
  (:func:`selecsls._io.remove_stale_temp_files`): never another live process's file.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from selecsls._io import printable, remove_stale_temp_files
from selecsls.train.config import SettingError, TrainConfig
from selecsls.train.distributed import Workers

__all__ = ["LOCK_NAME", "REPLACED_NAME", "RUN_OUTPUTS", "OutputDirectory", "owned_output"]

LOCK_NAME = ".selecsls-train.lock"
#: Where ``overwrite`` keeps the earlier run's results until the new run has replaced them.
REPLACED_NAME = ".selecsls-replaced"
#: Every file a run writes into its output directory (tests/train/test_adversarial_training.py keeps it complete).
RUN_OUTPUTS = ("last.pt", "best.pt", "metrics.jsonl", "summary.json", "training_curve.png", "gamma_histograms.png")


class OutputDirectory:
    """A run's output directory, as the main process holds it (in the other processes it changes nothing)."""

    def __init__(self, config: TrainConfig, is_main: bool) -> None:
        self.path, self.config, self.is_main = Path(config.output), config, is_main
        #: The earlier run's results were moved back when the run stopped: this run saved nothing.
        self.restored = False

    def earlier(self) -> list[str]:
        """The run outputs the directory holds."""
        return [name for name in RUN_OUTPUTS if (self.path / name).exists()]

    def replace_earlier(self, log: Callable[[str], None]) -> None:
        """With ``overwrite``, move the earlier run's results aside; call it once everything the run needs
        has been checked and read, right before training."""
        earlier = self.earlier()
        if not (self.is_main and self.config.overwrite and earlier):
            return
        aside = self.path / REPLACED_NAME
        aside.mkdir()
        for name in earlier:
            os.replace(self.path / name, aside / name)
        log(
            f"moved the earlier run's results ({', '.join(earlier)}) aside to {printable(aside)}: deleted once this "
            "run saves its last.pt, moved back if it stops before"
        )

    def settle(self) -> bool:
        """Results set aside are deleted if a run saved its ``last.pt`` since (it replaced them), else moved back
        (with whatever that run wrote before stopping, which would mix two runs). True if moved back."""
        aside = self.path / REPLACED_NAME
        if not aside.is_dir():
            return False
        if (self.path / "last.pt").exists():
            shutil.rmtree(aside)
            return False
        for name in RUN_OUTPUTS:
            (self.path / name).unlink(missing_ok=True)
        for item in aside.iterdir():
            os.replace(item, self.path / item.name)
        aside.rmdir()
        return True

    def kept(self) -> str:
        """What the directory holds after a run that stopped early (once :func:`owned_output` has settled it)."""
        if self.restored:
            return f"nothing of this run was saved; {printable(self.path)} holds the earlier run's results as before"
        saved = [name for name in ("last.pt", "best.pt") if (self.path / name).exists()]
        if not saved:
            return "nothing was saved"
        return f"{' and '.join(saved)} in {printable(self.path)} keep the run's last save, made before it stopped"

    def interrupted(self) -> str:
        """What an interrupted run leaves, and how to go on."""
        last = self.path / "last.pt"
        if self.restored:
            return self.kept()
        if last.exists():
            return f"continue from the last save, {printable(last)}, with the same command and --resume"
        return "nothing was saved yet; run the command again to start"

    def claim(self) -> IO:
        """Create and lock the directory; settle a killed run's results set aside; refuse earlier results
        unless told what to do with them; remove stale temporary files. Returns the held lock."""
        self.path.mkdir(parents=True, exist_ok=True)
        lock = _lock(self.path / LOCK_NAME)
        try:
            self.settle()
            earlier = self.earlier()
            if earlier and not (self.config.resume or self.config.overwrite):
                raise SettingError(
                    f"{printable(self.path)} holds an earlier run's results ({', '.join(earlier)}); pass {{resume}} "
                    "to continue it, {overwrite} to replace them with a new run, or choose another {output}"
                )
            remove_stale_temp_files(self.path, RUN_OUTPUTS)
        except BaseException:
            lock.close()
            raise
        return lock


@contextlib.contextmanager
def owned_output(config: TrainConfig, workers: Workers) -> Iterator[OutputDirectory]:
    """Hold ``config.output`` for the duration of the block (the main process takes the lock).

    Every process learns whether the main process got the directory, so all fail together
    rather than some waiting forever for the others.
    """
    output = OutputDirectory(config, workers.is_main)
    created, lock, error = not output.path.exists(), None, None
    if workers.is_main:
        try:
            lock = output.claim()
        except SettingError as exc:
            error = exc
    if not workers.all_agree(error is None):
        raise error or SettingError("the main process could not take {output}; see its error")
    try:
        yield output
    except BaseException:
        if lock is not None:
            output.restored = output.settle()
            # A run that failed before writing anything (bad data, say) leaves no directory behind.
            if created and [p.name for p in output.path.iterdir()] == [LOCK_NAME]:
                (output.path / LOCK_NAME).unlink()
                output.path.rmdir()
                lock.close()
                lock = None
        raise
    else:
        if lock is not None:
            output.settle()
    finally:
        if lock is not None:
            (output.path / LOCK_NAME).unlink(missing_ok=True)  # still held: no other run can be using it
            lock.close()  # closing the descriptor releases the lock


def _lock(path: Path) -> IO:
    """The lock file, opened and locked, now naming this process; SettingError if another run holds it."""
    import fcntl  # POSIX only, like the rest of the run-directory handling

    while True:
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
        if _still_at(handle, path):
            break
        handle.close()  # the run that held it ended and deleted it: lock the file now at the path
    handle.seek(0)
    handle.truncate()
    started = datetime.datetime.now().isoformat(timespec="seconds")
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}) + "\n")
    handle.flush()
    return handle


def _still_at(handle: IO, path: Path) -> bool:
    """Whether ``handle`` is still the file at ``path`` (not one deleted since it was opened)."""
    try:
        return os.path.samestat(path.stat(), os.fstat(handle.fileno()))
    except FileNotFoundError:
        return False
