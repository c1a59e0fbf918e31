"""Child processes (the converter, llama.cpp's programs) that never outlive moeprep.

A child gets its own process group and, on Linux, PR_SET_PDEATHSIG: if moeprep is killed, even
with SIGKILL, the kernel kills the child too. On Ctrl-C or SIGTERM moeprep kills it before it
reports the interruption, so no orphan goes on writing a `.partial` that a rerun also writes.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == 1:  # the parent died between fork and prctl
            os._exit(1)


def run(cmd: list[str], *, log, env: dict[str, str], tick: Callable[[], None] = lambda: None,
        interval: float = 0.5) -> int:
    """Run `cmd` with its output to `log`, calling `tick` while it runs; returns its exit code."""
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                            preexec_fn=_die_with_parent)
    try:
        while proc.poll() is None:
            time.sleep(interval)
            tick()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode
