"""Safe output: the one rule every file writer follows, and terminal-safe messages.

* A file either appears complete or not at all: it is written to a temporary file beside the
  target and renamed onto it only on success; on any failure (a full disk included) the
  temporary file is removed and the previous file is kept.
* An output is checked before any work (:func:`check_output`): it may not be, or resolve to,
  an input, and its directory must be writable, so a long job never fails at its very end.
* Files are created with the mode any other tool would give them (0o666 minus the umask),
  not the 0o600 of :func:`tempfile.mkstemp`.
* Files that only work together (an OpenVINO ``.xml`` and its ``.bin``) land together or not at
  all (:func:`atomic_paths`).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
import unicodedata
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

__all__ = [
    "OutputError",
    "PathLike",
    "atomic_path",
    "atomic_paths",
    "atomic_write",
    "check_output",
    "one_line",
    "printable",
    "process_alive",
    "remove_stale_temp_files",
    "stale_temp_files",
]

#: Anything naming a file: ``str`` or ``os.PathLike``.
PathLike = str | os.PathLike
#: Suffix of every temporary file this package writes: ``.<target name>.<writer pid>.<random>.tmp``.
TEMP_SUFFIX = ".tmp"


class OutputError(OSError):
    """An output that cannot be written, or that would overwrite an input. Its message is one line."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else super().__str__()


#: Bidirectional embeddings, overrides and isolates: they reorder the rest of a terminal line.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
#: Unicode categories a terminal acts on instead of showing: C0/C1 controls (escape codes, newlines), line and
#: paragraph separators; and surrogates (undecodable bytes of a file name), which cannot be printed at all.
_CONTROL_CATEGORIES = frozenset({"Cc", "Zl", "Zp", "Cs"})


def printable(text: object) -> str:
    """``text`` with control characters replaced by ``?``: safe to print.

    Only what a terminal would act on is replaced; every other character, a non-breaking space or a
    zero-width non-joiner included, is kept, so names print exactly.
    Stored names are never escaped: this is for printing only.
    """
    return "".join(
        "?" if char in _BIDI_CONTROLS or unicodedata.category(char) in _CONTROL_CATEGORIES else char
        for char in str(text)
    )


def one_line(message: object, limit: int = 300) -> str:
    """A message (or exception) as one printable line of bounded length: library errors are paragraphs."""
    text = " ".join(str(message).split()) or type(message).__name__
    return printable(text if len(text) <= limit else text[: limit - 3] + "...")


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output(path: PathLike, inputs: Iterable[PathLike | None] = (), *, directory: bool = False) -> Path:
    """Refuse, before any work, an output that would overwrite an input or cannot be written.

    ``directory=True`` checks an output directory (created later if missing). Nothing is
    created: writability is probed with a temporary file in the nearest existing folder.
    """
    path = Path(path)
    for source in inputs:
        if source is not None and _same_file(path, Path(source)):
            raise OutputError(
                f"output {printable(os.fspath(path))} is the input {printable(os.fspath(source))}: "
                "choose another output; selecsls never overwrites its input"
            )
    if directory and path.exists() and not path.is_dir():
        raise OutputError(f"output directory {printable(os.fspath(path))} is an existing file; choose a directory")
    if not directory and path.is_dir():
        raise OutputError(f"output {printable(os.fspath(path))} is a directory; give a file name")
    folder = path if directory and path.is_dir() else _nearest_existing(path.parent if not directory else path)
    if not folder.is_dir():
        raise OutputError(f"cannot create {printable(os.fspath(path))}: {printable(os.fspath(folder))} is a file")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".selecsls-write-check.", suffix=TEMP_SUFFIX)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(
            f"cannot write {printable(os.fspath(path))}: {printable(os.fspath(folder))} is not writable "
            f"({exc.strerror or exc})"
        ) from None
    return path


def _creation_mode(path: Path) -> int:
    """The mode the file would have if created with ``open``: kept from an existing file, else 0o666 & ~umask."""
    with contextlib.suppress(OSError):
        return os.stat(path).st_mode & 0o7777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    For libraries that write to a file name themselves (safetensors, onnx, matplotlib).
    On any error the temporary file is removed and ``path`` is left untouched; an OS error
    (full disk, read-only folder, ...) becomes one :class:`OutputError` naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=TEMP_SUFFIX)
        os.close(fd)
    except OSError as exc:
        raise _output_error(path, exc) from None
    try:
        yield Path(tmp)
        os.chmod(tmp, _creation_mode(path))
        os.replace(tmp, path)
    except OutputError:
        raise
    except OSError as exc:
        raise _output_error(path, exc) from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def stale_temp_files(folder: PathLike, targets: Iterable[str]) -> list[Path]:
    """Temporary files (or :func:`atomic_paths` folders) in ``folder`` that a killed writer left behind for one of
    ``targets`` (file names).

    Only files of this package's naming scheme whose writer process no longer exists on this machine:
    a live writer's temporary file, or anyone else's file, is never touched.
    """
    stale = []
    for name in targets:
        for candidate in Path(folder).glob(f".{glob.escape(name)}.*{TEMP_SUFFIX}"):
            pid = candidate.name[len(name) + 2 :].split(".", 1)[0]
            if pid.isdigit() and not process_alive(int(pid)):
                stale.append(candidate)
    return stale


def remove_stale_temp_files(folder: PathLike, targets: Iterable[str]) -> None:
    """Remove what :func:`stale_temp_files` finds: temporary files and :func:`atomic_paths` folders alike."""
    for stale in stale_temp_files(folder, targets):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _output_error(path: Path, exc: OSError) -> OutputError:
    return OutputError(f"cannot write {printable(os.fspath(path))}: {exc.strerror or exc} (nothing was written)")


class _RecordingFile:
    """A file that remembers the OS error of a failed write: ``torch.save`` swallows it and raises an unrelated
    ``RuntimeError`` instead ("[enforce fail at inline_container.cc] unexpected pos"), hiding a full disk."""

    def __init__(self, file: IO) -> None:
        self._file, self.error = file, None

    def write(self, data):
        try:
            return self._file.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def __getattr__(self, name: str):
        return getattr(self._file, name)


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file for writing; it replaces ``path`` only once fully written and synced.

    A write that fails for want of space (or any OS reason) is reported as that reason, whatever
    the writer made of it: one :class:`OutputError` such as "No space left on device".
    """
    with atomic_path(path) as tmp, open(tmp, mode) as file:
        handle = _RecordingFile(file)
        try:
            yield handle
        except Exception:
            if handle.error is not None:
                raise handle.error from None
            raise
        file.flush()
        os.fsync(file.fileno())


@contextlib.contextmanager
def atomic_paths(*paths: str | os.PathLike) -> Iterator[list[Path]]:
    """:func:`atomic_path` for files that only work together (an OpenVINO ``.xml`` and its ``.bin``).

    Yields temporary paths with the same file names in a fresh folder beside them (libraries that
    derive one name from another, as OpenVINO derives ``.bin`` from ``.xml``, keep working). On
    success they are renamed into place in the order given; if a rename fails, the files already
    moved are removed, so the set appears whole or not at all. All paths must share one folder.
    """
    targets = [Path(path) for path in paths]
    folder = targets[0].parent
    if any(target.parent != folder for target in targets) or len({t.name for t in targets}) != len(targets):
        raise ValueError(f"atomic_paths needs distinct file names in one folder, got {[str(t) for t in targets]}")
    folder.mkdir(parents=True, exist_ok=True)
    # Named like every temporary file (writer pid included), so :func:`stale_temp_files` finds a killed writer's.
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=f".{targets[0].name}.{os.getpid()}.", suffix=TEMP_SUFFIX))
    try:
        temporaries = [staging / target.name for target in targets]
        yield temporaries
        moved: list[Path] = []
        try:
            for temporary, target in zip(temporaries, targets):
                os.replace(temporary, target)
                moved.append(target)
        except BaseException:
            for target in moved:
                with contextlib.suppress(FileNotFoundError):
                    target.unlink()
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
