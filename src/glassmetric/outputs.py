"""Output files and folders: checked before any work, written atomically with the umask's mode.

Every command checks the paths it will write before it loads or computes anything
(:func:`writable_folder`, :func:`writable_file`, :func:`figure_file`): a path it cannot write
ends in one :class:`~glassmetric.errors.OutputError` line naming it, never a traceback after
minutes of work. Missing folders on the way are allowed (the writer creates them); the check
writes a nameless temporary file into the nearest folder that exists and removes it.

:func:`atomic_write` writes to a temporary file in the target's folder, fsyncs it, renames it
over the target and fsyncs the folder: a crash leaves the old file or the new one, never a
truncated one. ``tempfile.mkstemp`` creates its files with mode 0600 whatever the umask;
:func:`follow_umask` gives them the mode a plain ``open`` would (``0666 & ~umask``), so atomic
writes (checkpoints, gallery caches, metrics) get the same permissions as every other file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from glassmetric.errors import OutputError

__all__ = [
    "FIGURE_SUFFIXES",
    "atomic_write",
    "atomic_write_text",
    "atomic_write_with",
    "figure_file",
    "follow_umask",
    "umask",
    "writable_file",
    "writable_folder",
]

#: the figure formats the commands write (Matplotlib's Agg, PDF, SVG and PS backends, and Pillow)
FIGURE_SUFFIXES = (".png", ".pdf", ".svg", ".svgz", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".eps", ".ps")


def umask() -> int:
    """The process's umask, read without changing it where Linux shows it (``/proc``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    current = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but brief)
    os.umask(current)
    return current


def follow_umask(fd: int, mode: int = 0o666) -> None:
    """Give the open file ``fd`` (made by ``tempfile.mkstemp``: 0600) the mode ``open`` would."""
    os.fchmod(fd, mode & ~umask())


def atomic_write(
    path: str | Path, data: bytes | bytearray | memoryview, *, before_replace: Callable[[], None] | None = None
) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_write_with`)."""
    return atomic_write_with(path, lambda f: f.write(data), before_replace=before_replace)


def atomic_write_with(
    path: str | Path, write: Callable[[BinaryIO], object], *, before_replace: Callable[[], None] | None = None
) -> Path:
    """Let ``write`` fill a temporary file beside ``path`` (streamed, no copy in memory), then
    fsync, rename over ``path`` and fsync the folder; the file gets the umask's mode;
    ``before_replace`` runs just before the rename. Creates missing folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        follow_umask(fd)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """:func:`atomic_write` of ``text`` in UTF-8."""
    return atomic_write(path, text.encode("utf-8"))


def _nearest_existing(path: Path) -> Path:
    for folder in (path, *path.parents):
        if folder.exists():
            return folder
    return Path(".")


def _probe(folder: Path, what: str, path: Path) -> None:
    """OutputError unless a file can be created in ``folder`` (which exists)."""
    if not folder.is_dir():
        raise OutputError(f"{what} {path}: {folder} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise OutputError(f"{what} {path}: cannot write into {folder} ({e.strerror or e})") from None


def writable_folder(path: str | Path, what: str, *, create: bool = False) -> Path:
    """``path`` as a folder files can be written into (made with ``create``), else an
    OutputError naming ``what`` (the option or key) and the path."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path} is a file: expected a folder")
    _probe(_nearest_existing(path), what, path)
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"{what} {path}: cannot create the folder ({e.strerror or e})") from None
    return path


def writable_file(path: str | Path, what: str) -> Path:
    """``path`` as a file that can be written (its missing folders are made when it is), else an
    OutputError naming ``what`` and the path: a folder, a read-only file, an unwritable folder."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{what} {path} is a folder: expected a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"{what} {path}: the file is not writable")
    _probe(_nearest_existing(path.parent), what, path)
    return path


def figure_file(path: str | Path, what: str) -> Path:
    """:func:`writable_file` whose suffix names a figure format in :data:`FIGURE_SUFFIXES`."""
    path = Path(path)
    if path.suffix.lower() not in FIGURE_SUFFIXES and not path.is_dir():
        got = f"'{path.suffix}'" if path.suffix else "no suffix"
        raise OutputError(f"{what} {path}: expected a figure file ending in {', '.join(FIGURE_SUFFIXES)} (got {got})")
    return writable_file(path, what)
