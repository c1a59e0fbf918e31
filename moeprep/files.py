"""Hashing and crash-safe file writes.

Everything moeprep writes goes to `<name>.partial` first and is renamed when complete, so a
killed run never leaves a file that looks finished.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .errors import MoeprepError

CHUNK = 8 * 1024 * 1024  # large reads keep hashlib near its ~1.4 GB/s on this hardware

Progress = Callable[[int], None]  # called with a byte count as work advances


def sha256_file(path: Path, progress: Progress | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            digest.update(view[:n])
            if progress:
                progress(n)
    return digest.hexdigest()


def git_blob_sha1(path: Path) -> str:
    """The git object id the Hub reports for a small (non-LFS) file."""
    data = Path(path).read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


@contextmanager
def write_aside(path: Path, expected: int | None = None,
                before_rename: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it into place only if the block succeeds.

    A `.partial` left by a killed run is never reused: nothing proves it complete, so it is written
    again. `before_rename(tmp)` runs on the complete file before it takes its name (to record it in
    the manifest), and any older file of that name goes first: a kill at any moment leaves no file under
    its final name that the manifest does not list with its sha256. When the block fails on a disk that
    is full (or too full for `expected` bytes), the error says so, naming the path, the bytes needed and
    the bytes free.
    """
    tmp = partial_path(path)
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
    except BaseException as e:
        written = tmp.stat().st_size if tmp.exists() else 0
        tmp.unlink(missing_ok=True)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        full = isinstance(e, OSError) and e.errno == errno.ENOSPC
        free = shutil.disk_usage(path.parent).free if path.parent.exists() else 0
        if full or (expected and free + written < expected):
            raise MoeprepError(
                f"the disk filled up while writing {path}: about {human_bytes(expected or written)} needed, "
                f"{human_bytes(free)} free", "free some space, then run the same command again") from e
        raise
    if before_rename is not None:
        path.unlink(missing_ok=True)
        before_rename(tmp)
    os.replace(tmp, path)


def write_json(path: Path, data: object) -> None:
    with write_aside(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())


def check_free_space(directory: Path, needed: int, what: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise MoeprepError(
            f"not enough free disk in {directory} for {what}: "
            f"{human_bytes(needed)} needed, {human_bytes(free)} free",
            "free some space or choose another directory with --out",
        )


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
