r"""Structural similarities of many small OT problems, with one problem per SIMD lane (native).

The same problem, iterations and per-problem stopping as the constant-plan solver
(:func:`glassmetric.similarity.sinkhorn._plan_from_similarity` followed by
:math:`SS = \sum_{ij} T_{ij} S_{ij}`, DIML eq. 5), computed by a small C kernel
(``lane_sinkhorn.c``) that keeps 16 problems side by side in vector registers: every product of
an iteration is then a vector multiply-add over 16 problems, with no temporary, no transposed
copy of the kernel and no per-op dispatch, and the plan is never written out. For the 16-49
cell grids of re-ranking that is several times faster than batched torch ops, whose cost at
these sizes is memory traffic and dispatch, not arithmetic (``bench/structural.py``).

The kernel is compiled at first use with the system C compiler (``$CC``, else ``cc``; GCC or
clang, ``-O3 -march=native``) into ``$GLASSMETRIC_CACHE/native`` (default
``~/.cache/glassmetric/native``), under a name that hashes the source, the compiler, the flags
and the CPU, and written atomically (a temporary ``tmp-<host>-<pid>-*.so`` renamed into place). A
temporary whose writer is dead or that is older than ten minutes is removed at the next load; a
cached library that is damaged (empty, not a whole shared object, or failing to load) is removed
and rebuilt once. Without a compiler, or with ``GLASSMETRIC_NATIVE=0``, :func:`available` is
False and callers use the torch solver (same results to float rounding). The blocks of a call
are split over ``torch.get_num_threads()`` threads (the call releases the GIL).
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import logging
import math
import os
import platform
import re
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from glassmetric.outputs import follow_umask
from glassmetric.similarity.sinkhorn import KERNEL_RANGE_LIMIT

__all__ = ["LANES", "applies", "available", "disabled", "lane_structural_similarity", "library_path"]

log = logging.getLogger(__name__)

#: Problems per block (the vector width of the kernel, in float32 lanes).
LANES = 16
_SOURCE = Path(__file__).with_name("lane_sinkhorn.c")
_FLAGS = ("-O3", "-march=native", "-std=gnu11", "-fPIC", "-shared", "-Werror=implicit-function-declaration")
_LOG2E = 1.0 / math.log(2.0)
#: Block ranges per thread of a multi-threaded call (dynamic balance: blocks stop at
#: different iterations).
_PARTS_PER_THREAD = 4

#: age after which a build's temporary is stale whoever wrote it (a build takes < 120 s)
_STALE_SECONDS = 600
_TEMPORARY = re.compile(r"tmp-(?P<host>.+)-(?P<pid>\d+)-[^-]+\.so")

_lock = threading.Lock()
_state: dict = {}


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the machine and the CPU's feature flags."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return f"{platform.machine()}|{platform.processor()}|{flags}"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def library_path() -> Path:
    """Where the compiled kernel for this source, compiler, flags and CPU lives."""
    root = Path(os.environ.get("GLASSMETRIC_CACHE", Path.home() / ".cache" / "glassmetric"))
    key = hashlib.sha256(
        _SOURCE.read_bytes() + f"{_compiler()}|{' '.join(_FLAGS)}|{_cpu_signature()}".encode()
    ).hexdigest()[:16]
    return root / "native" / f"lane_sinkhorn-{key}.so"


def _build(target: Path) -> None:
    cc = _compiler()
    if not cc:
        raise RuntimeError("no C compiler found (set CC)")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"tmp-{socket.gethostname()}-{os.getpid()}-", suffix=".so", dir=target.parent)
    follow_umask(fd)  # the linker adds the execute bits to the mode the umask gives
    os.close(fd)
    try:
        proc = subprocess.run([cc, *_FLAGS, str(_SOURCE), "-o", tmp], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed on {_SOURCE}: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)  # atomic: a concurrent loader sees the old file or the new one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _writer_alive(name: str) -> bool:
    """Whether the process that writes the temporary ``name`` may still run: another host's, or
    a live process of this host (a name of no known form counts as alive)."""
    m = _TEMPORARY.fullmatch(name)
    if m is None or m["host"] != socket.gethostname():
        return True
    try:
        os.kill(int(m["pid"]), 0)
    except ProcessLookupError:
        return False
    except OSError:  # alive, another user's
        return True
    return True


def _remove_stale_temporaries(folder: Path) -> None:
    """Remove the build temporaries (``tmp*.so``) of killed builds: written by a process of
    this host that is gone, or older than _STALE_SECONDS."""
    if not folder.is_dir():
        return
    now = time.time()
    for path in folder.glob("tmp*.so"):
        try:
            if not _writer_alive(path.name) or now - path.stat().st_mtime > _STALE_SECONDS:
                path.unlink()
                log.info("removed the stale native build temporary %s", path)
        except OSError:
            pass  # removed by another process meanwhile


def _damage(path: Path) -> str | None:
    """Why the cached library ``path`` is not a whole shared object, or None. On ELF systems the
    header's section table must end within the file (a copy cut short does not)."""
    with open(path, "rb") as f:
        data = f.read(64)
    size = path.stat().st_size
    if size == 0:
        return "it is empty"
    if platform.system() != "Linux":
        return None
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] not in (1, 2) or data[5] not in (1, 2):
        return "it is not an ELF shared object"
    order = "<" if data[5] == 1 else ">"
    if data[4] == 2:
        (shoff,), (entsize, count) = (
            struct.unpack_from(order + "Q", data, 0x28),
            struct.unpack_from(order + "HH", data, 0x3A),
        )
    else:
        (shoff,), (entsize, count) = (
            struct.unpack_from(order + "I", data, 0x20),
            struct.unpack_from(order + "HH", data, 0x2E),
        )
    if shoff + entsize * count > size:
        return f"it is cut short ({size} bytes; its header says at least {shoff + entsize * count})"
    return None


def _open_library():
    """The kernel's ctypes function from the cached library, built when missing; a damaged
    cached library is removed and rebuilt once."""
    path = library_path()
    _remove_stale_temporaries(path.parent)
    built = False
    if path.exists() and (problem := _damage(path)):
        log.warning("the cached native kernel %s is damaged (%s): rebuilding it", path, problem)
        path.unlink(missing_ok=True)
    if not path.exists():
        _build(path)
        built = True
    try:
        return ctypes.CDLL(str(path)).glassmetric_lane_sinkhorn
    except (OSError, AttributeError) as err:
        if built:
            raise OSError(f"cannot load the freshly built {path}: {err}") from err
        log.warning("the cached native kernel %s does not load (%s): rebuilding it", path, err)
        path.unlink(missing_ok=True)
        _build(path)
        try:
            return ctypes.CDLL(str(path)).glassmetric_lane_sinkhorn
        except AttributeError as again:  # the loader may hand back the library it loaded before
            raise OSError(f"rebuilt {path}, usable from the next process on: {again}") from again


def _load() -> Callable[..., int] | None:
    """The kernel's ctypes function, building it if needed; None when unavailable."""
    with _lock:
        if "fn" in _state:
            return _state["fn"]
        fn = None
        if os.environ.get("GLASSMETRIC_NATIVE", "1") != "0":
            try:
                fn = _open_library()
                p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
                f32 = ctypes.c_float
                fn.argtypes = [
                    p,
                    i64,
                    i64,
                    i64,
                    i64,
                    p,
                    i64,
                    i64,
                    i64,
                    p,
                    i64,
                    i64,
                    i64,
                    i64,
                    i32,
                    i32,
                    f32,
                    i32,
                    i32,
                    f32,
                    i64,
                    i64,
                    p,
                    p,
                    p,
                ]
                fn.restype = ctypes.c_int
            except (OSError, RuntimeError, subprocess.SubprocessError) as err:
                log.info("native lane Sinkhorn unavailable, using the torch solver: %s", err)
                _state["error"] = str(err)
                fn = None
        _state["fn"] = fn
        return fn


def available() -> bool:
    """Whether the native kernel could be built and loaded (False: use the torch solver)."""
    return not _state.get("disabled") and _load() is not None


def applies(dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether callers with tensors of ``dtype`` on ``device`` should use the kernel: float32
    on the CPU, and :func:`available`."""
    return dtype == torch.float32 and torch.device(device).type == "cpu" and available()


@contextmanager
def disabled():
    """Within the block :func:`available` is False, so callers take the torch solver (A/B runs,
    tests). Not thread-safe: it switches the kernel off for the whole process."""
    before = _state.get("disabled", False)
    _state["disabled"] = True
    try:
        yield
    finally:
        _state["disabled"] = before


def _pool(workers: int) -> ThreadPoolExecutor:
    """A pool of ``workers`` threads, made anew after a fork (a child has none of its threads)."""
    key = (os.getpid(), workers)
    if _state.get("pool_key") != key:
        _state["pool"] = ThreadPoolExecutor(workers, thread_name_prefix="glassmetric-lanes")
        _state["pool_key"] = key
    return _state["pool"]


def lane_structural_similarity(
    S: Tensor,
    mu: Tensor,
    nu: Tensor,
    *,
    epsilon: float,
    iters: int,
    tol: float | None,
    check_every: int = 5,
    return_iterations: bool = False,
    plan_out: Tensor | None = None,
):
    r"""``SS (G, K)`` of the constant plans for the cost ``1 - clamp(S)``, on the native kernel.

    ``S (G, K, n, m)`` (any strides; the lanes run along ``K``), marginals ``mu (G, K, n)``,
    ``nu (G, K, m)``, float32 on the CPU, ``2 / epsilon <= 50``. Same semantics as
    :func:`glassmetric.similarity.sinkhorn._plan_from_similarity` with ``compact=True``:
    ``tol`` None runs exactly ``iters`` iterations; otherwise each problem keeps the
    scalings of the first check (every ``check_every`` iterations) where its L1 row error is
    ``<= tol``. A problem whose ``mu`` or ``nu`` has no mass gets ``SS = 0``. With
    ``return_iterations`` also returns the ``(G, K)`` iteration at which each problem stopped.
    ``plan_out``, a contiguous float32 ``(G, K, n, m)`` tensor, receives the plans ``T`` (zeros
    for a problem without mass): ``dSS/dS`` with the plan held constant, for training losses.
    Raises RuntimeError when :func:`available` is False.
    """
    fn = _load()
    if fn is None:
        raise RuntimeError(f"the native lane Sinkhorn is unavailable: {_state.get('error')}")
    if S.ndim != 4 or mu.shape != S.shape[:3] or nu.shape != S.shape[:2] + S.shape[3:]:
        raise ValueError(
            f"expected S (G, K, n, m), mu (G, K, n), nu (G, K, m); got {tuple(S.shape)}, "
            f"{tuple(mu.shape)}, {tuple(nu.shape)}"
        )
    if S.device.type != "cpu" or any(t.dtype != torch.float32 for t in (S, mu, nu)):
        raise ValueError("the native lane Sinkhorn takes float32 CPU tensors")
    if not (epsilon > 0 and 2.0 / epsilon <= KERNEL_RANGE_LIMIT[torch.float32]):
        raise ValueError(
            f"epsilon must be >= {2.0 / KERNEL_RANGE_LIMIT[torch.float32]} for the plain kernel "
            f"(costs in [0, 2]), got {epsilon}"
        )
    if iters < 1 or check_every < 1:
        raise ValueError(f"iters and check_every must be >= 1, got {iters}, {check_every}")
    g, k, n, m = S.shape
    if plan_out is not None and (
        plan_out.shape != S.shape
        or plan_out.dtype != torch.float32
        or plan_out.device.type != "cpu"
        or not plan_out.is_contiguous()
    ):
        raise ValueError(f"plan_out must be a contiguous float32 CPU tensor of shape {tuple(S.shape)}")
    with torch.no_grad():
        dead = (mu.sum(-1) <= 0) | (nu.sum(-1) <= 0)  # solved with uniform marginals, SS = 0
        mu = torch.where(dead[..., None], 1.0 / n, mu)
        nu = torch.where(dead[..., None], 1.0 / m, nu)
        blocks = g * -(-k // LANES)
        ss = torch.empty(g, k, dtype=torch.float32)
        stops = torch.empty(g, k, dtype=torch.int32)
        args = (
            S.data_ptr(),
            *S.stride(),
            mu.data_ptr(),
            *mu.stride(),
            nu.data_ptr(),
            *nu.stride(),
            k,
            n,
            m,
            _LOG2E / epsilon,
            iters,
            check_every,
            -1.0 if tol is None else float(tol),
        )
        out_ptrs = (ss.data_ptr(), stops.data_ptr(), None if plan_out is None else plan_out.data_ptr())
        workers = max(1, min(torch.get_num_threads(), blocks))
        if workers == 1:
            codes = [fn(*args, 0, blocks, *out_ptrs)]
        else:  # several ranges a thread, taken as threads free up: blocks differ in iterations
            parts = min(blocks, _PARTS_PER_THREAD * workers)
            bounds = [blocks * p // parts for p in range(parts + 1)]
            futures = [_pool(workers).submit(fn, *args, lo, hi, *out_ptrs) for lo, hi in itertools.pairwise(bounds)]
            codes = [f.result() for f in futures]
        if any(c != 0 for c in codes):
            raise MemoryError("the native lane Sinkhorn could not allocate its buffers")
        ss.masked_fill_(dead, 0.0)
        if plan_out is not None:
            plan_out.masked_fill_(dead[..., None, None], 0.0)
        return (ss, stops) if return_iterations else ss
