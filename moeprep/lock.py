"""One lock per output directory, taken by every command that writes into it.

A flock, which the kernel drops when its process dies, so a killed run never leaves it behind.
The holder's pid and command are written into the lock file so the refusal can name them.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from moeprep.errors import MoeprepError

LOCK = ".moeprep.lock"


class Busy(MoeprepError):
    pass


@contextmanager
def locked(out: Path, what: str = "moeprep") -> Iterator[None]:
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        # O_NOFOLLOW: a link planted under the lock's name would make the holder's pid line overwrite its target;
        # O_NONBLOCK: a FIFO there must not hang the command
        fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise MoeprepError(f"{out / LOCK} is a symbolic link, which moeprep did not make and will not write "
                               "through", f"remove it, or write into another directory than {out}") from None
        if e.errno == errno.EISDIR:
            raise MoeprepError(f"{out / LOCK} is a directory, where moeprep keeps its lock file",
                               f"remove it, or write into another directory than {out}") from None
        raise MoeprepError(f"cannot write into {out} ({e.strerror})", "choose another output directory") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        what = "not a regular file" if not stat.S_ISREG(info.st_mode) else "a hard link to another file"
        raise MoeprepError(f"{out / LOCK} is {what}, which moeprep did not make and will not write into",
                           f"remove it, or write into another directory than {out}")
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "pid ?"
            raise Busy(f"another moeprep command is writing into {out}: {holder} holds {out / LOCK}",
                       "wait for it to finish; the lock goes away when that process ends") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} ({what})".encode(), 0)
        yield
    finally:
        os.close(fd)
