"""The output folder of a ``fit`` run: one run at a time, and what ``--overwrite`` clears.

A run holds an exclusive lock (``fcntl.flock``) on ``trainer.output_dir/.fit.lock`` from its
first check to its last write. A second run into the same folder fails at once, naming the
folder and the process holding it. The operating system releases the lock when the process
ends in any way (``kill -9`` included), so a crashed run never leaves a stale lock; the empty
file stays. Under DDP only the launching process (rank 0) takes it: the other ranks, which
Lightning or torchrun start for the same run, write nothing in the folder themselves.

``--overwrite`` removes every file a run writes (:data:`RUN_FILES`, the logs' files, the
checkpoints of :data:`CHECKPOINT_NAMES` and half-written temporaries) and nothing else: files
glassmetric did not write there (say a ``report/`` written by ``glassmetric report``) stay, and
are named in a message. The feature cache (:data:`FEATURE_CACHE_FILE`, ``trainer.cache_features``)
is the one file a run writes that ``--overwrite`` keeps: it is named by a fingerprint of
everything it depends on, so a new run reuses it when it fits and rebuilds it otherwise.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from glassmetric.errors import OutputError

__all__ = [
    "CHECKPOINT_NAMES",
    "FEATURE_CACHE_FILE",
    "LOCK_FILE",
    "RUN_FILES",
    "clear_previous_run",
    "is_launching_process",
    "run_folder_lock",
]

LOCK_FILE = ".fit.lock"
#: the files a run writes at the top of its folder
RUN_FILES = ("config.yaml", "metrics.json")
#: the cached features of ``trainer.cache_features``, kept by ``--overwrite``
FEATURE_CACHE_FILE = "feature_cache.pt"
#: the checkpoints a run writes in ``checkpoints/`` (besides ``.*.tmp`` temporaries)
CHECKPOINT_NAMES = ("last.ckpt", "last.prev.ckpt", "last.damaged.ckpt", "best.ckpt")
#: the files Lightning's CSV and TensorBoard loggers write in ``logs/version_N/``
_LOG_PATTERNS = ("metrics.csv", "hparams.yaml", "events.out.tfevents.*")


def is_launching_process() -> bool:
    """Whether this is the process that launched the run (global rank 0), as the environment
    says before any process group exists: torchrun's ``RANK``; Lightning's ``LOCAL_RANK`` (which
    it sets for the ranks it starts) with ``NODE_RANK``; SLURM's ``SLURM_PROCID``. True when
    none is set (one process)."""
    env = os.environ

    def number(key: str) -> int | None:
        value = env.get(key, "").strip()
        return int(value) if value.isdigit() else None

    if number("RANK") is not None:  # torchrun: the global rank
        return number("RANK") == 0
    rank = next((r for r in map(number, ("LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")) if r is not None), 0)
    node = next((r for r in map(number, ("NODE_RANK", "GROUP_RANK")) if r is not None), 0)
    return rank == 0 and node == 0


@contextmanager
def run_folder_lock(folder: str | Path) -> Iterator[None]:
    """Hold the run lock of ``folder`` (which must exist), or raise an OutputError at once
    naming the folder and the holder's process id and host."""
    folder = Path(folder)
    path = folder / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise OutputError(
            f"trainer.output_dir {folder}: cannot create the lock file {path.name} ({e.strerror or e})"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").split()
            who = f" (pid {holder[0]} on {holder[1]})" if len(holder) >= 2 else ""
            raise OutputError(
                f"trainer.output_dir {folder} is in use by another glassmetric fit{who}: wait for it to end, "
                f"or choose another trainer.output_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def clear_previous_run(folder: str | Path) -> list[str]:
    """Remove what an earlier run wrote in ``folder`` (``--overwrite``); return the names of the
    entries left because glassmetric did not write them."""
    folder = Path(folder)
    for name in RUN_FILES:
        (folder / name).unlink(missing_ok=True)
    for stale in folder.glob(f".{FEATURE_CACHE_FILE}.*.tmp"):  # a cache write cut short
        stale.unlink(missing_ok=True)
    ckpt = folder / "checkpoints"
    if ckpt.is_dir():
        for name in CHECKPOINT_NAMES:
            (ckpt / name).unlink(missing_ok=True)
        for stale in ckpt.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
    logs = folder / "logs"
    if logs.is_dir():
        for version in logs.glob("version_*"):
            if version.is_dir():
                for pattern in _LOG_PATTERNS:
                    for f in version.glob(pattern):
                        f.unlink(missing_ok=True)
                _remove_if_empty(version)
    for sub in (ckpt, logs):
        _remove_if_empty(sub)
    ours = (LOCK_FILE, FEATURE_CACHE_FILE)
    return sorted(p.name for p in folder.iterdir() if p.name not in ours) if folder.is_dir() else []


def _remove_if_empty(folder: Path) -> None:
    with suppress(OSError):  # missing, or holds files glassmetric did not write
        folder.rmdir()
