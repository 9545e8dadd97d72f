"""Run test code in a fresh Python whose memory is capped, for tests of memory blow-ups."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

_PRELUDE = (
    "import resource, re\n"
    "def cap():\n"
    "    vm = int(re.search(r'VmSize:\\s+(\\d+) kB', open('/proc/self/status').read())[1]) * 1024\n"
    "    resource.setrlimit(resource.RLIMIT_AS, (vm + {extra}, resource.RLIM_INFINITY))\n"
)


def run_capped(code: str, extra_bytes: int, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh Python (this checkout's ``src`` first on its path, one thread);
    when the code calls ``cap()``, its address space may grow by ``extra_bytes`` beyond what
    it holds at that moment (imports done)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(
        [sys.executable, "-c", _PRELUDE.format(extra=extra_bytes) + code],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
