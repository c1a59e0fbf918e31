"""Hashing, and the one boundary through which moeprep writes.

Everything moeprep writes goes to `<name>.partial` first and is renamed when complete, so a killed run never
leaves a file that looks finished. Every write is checked against the directory it belongs to (`root`): the
destination must be inside it, no component of the path there may be a symbolic link (moeprep never makes
one, so one it meets was planted, and following it would write elsewhere), and the file moeprep writes aside
is created by moeprep itself (O_EXCL, O_NOFOLLOW).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from moeprep.errors import MoeprepError

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


def matches(path: Path, size: int, sha256: str, mtime_ns: int | None = None, progress: Progress | None = None) -> bool:
    """Whether the file at `path` holds the bytes a record names: the same size and modification time as recorded
    (no file of the same size and time was rewritten in between, short of a deliberate forgery), else hashed."""
    path = Path(path)
    try:
        info = path.stat()
    except OSError:
        return False
    if not path.is_file() or info.st_size != size:
        return False
    if mtime_ns is not None and info.st_mtime_ns == mtime_ns:
        return True
    return sha256_file(path, progress) == sha256


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def inside(root: Path, path: Path) -> Path:
    """`path`, checked to lie inside `root` with no symbolic link between them (the root itself, the user's choice
    of directory, may be one). One error line names the path and what is wrong; nothing is written."""
    root, path = Path(root), Path(path)
    try:
        rel = path.relative_to(root)
    except ValueError:
        raise MoeprepError(f"{path} is outside {root}, the directory moeprep is writing into",
                           "name a file inside it") from None
    if not rel.parts or any(part in ("", ".", "..") for part in rel.parts):
        raise MoeprepError(f"{path} is not a file inside {root}", "name a file inside it")
    current = root
    for part in rel.parts:
        current = current / part
        if current.is_symlink():
            raise MoeprepError(f"{current} is a symbolic link, which moeprep did not make and will not write "
                               "through", f"remove it, or write into another directory than {root}")
    return path


def _own_file(path: Path) -> None:
    """Create `path` as a new, empty regular file of moeprep's, removing a leftover of that name first. The name is
    unlinked, never followed or written: a symbolic link goes, not its target; a hard link goes, and the other name
    keeps its bytes. A directory there is not moeprep's leftover (moeprep never makes one of that name): refused."""
    _unlink_leftover(path)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644))


def _unlink_leftover(path: Path) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        raise MoeprepError(f"{path} is a directory, where moeprep keeps a file of its own",
                           "move it away, or write into another directory")
    if os.path.lexists(path):
        os.unlink(path)


@contextmanager
def write_aside(path: Path, expected: int | None = None, before_rename: Callable[[Path], None] | None = None, *,
                root: Path | None = None, protected: Collection[str] = ()) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it into place only if the block succeeds.

    `root` is the directory being written into (default: the one `path` is in); see `inside`. `protected` are the
    paths under `root` that this write must not replace (the files a manifest lists, the manifest): writing one of
    them is an error unless replacing it is the operation's purpose, and then the caller does not name it.

    A `.partial` left by a killed run is never reused: nothing proves it complete, so it is written again.
    `before_rename(tmp)` runs on the complete file before it takes its name (to record it in the manifest), and
    any older file of that name goes first: a kill at any moment leaves no file under its final name that the
    manifest does not list with its sha256. When the block fails on a disk that is full (or too full for
    `expected` bytes), the error says so, naming the path, the bytes needed and the bytes free.
    """
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    inside(root, path)
    if str(path.relative_to(root)) in protected:
        raise MoeprepError(f"{path} is a file the manifest lists, and this would replace it",
                           "write to another name; moeprep replaces a listed file only when making it again")
    if path.is_dir():
        raise MoeprepError(f"{path} is a directory", "name a file")
    tmp = partial_path(path)
    _own_file(tmp)
    try:
        yield tmp
        if not stat.S_ISREG(os.lstat(tmp).st_mode):
            raise MoeprepError(f"{tmp} was replaced while moeprep wrote it", "run the same command again")
    except BaseException as e:
        written = tmp.stat().st_size if tmp.is_file() and not tmp.is_symlink() else 0
        if os.path.lexists(tmp):
            os.unlink(tmp)
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
        if os.path.lexists(path):
            os.unlink(path)
        before_rename(tmp)
    os.replace(tmp, path)


def write_bytes(path: Path, data: bytes, *, root: Path | None = None, protected: Collection[str] = ()) -> None:
    with write_aside(path, root=root, protected=protected) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_text(path: Path, text: str, *, root: Path | None = None, protected: Collection[str] = ()) -> None:
    write_bytes(path, text.encode("utf-8"), root=root, protected=protected)


def write_json(path: Path, data: object, *, root: Path | None = None) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n", root=root)


def open_log(path: Path, *, root: Path) -> IO[str]:
    """A log file inside `root` for a child process to write into, never through a planted link."""
    inside(root, path)
    make_dirs(root, path.parent)
    _unlink_leftover(path)  # a new file each run: an old one may be a FIFO, or linked to a file elsewhere
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    return os.fdopen(fd, "w", encoding="utf-8")


def make_dirs(root: Path, folder: Path) -> Path:
    """`folder` and its parents inside `root`, made where missing, none of them a symbolic link."""
    root, folder = Path(root), Path(folder)
    if folder == root:
        return folder
    inside(root, folder)
    current = root
    for part in folder.relative_to(root).parts:
        current = current / part
        if not current.is_dir():
            try:
                current.mkdir()
            except FileExistsError:
                raise MoeprepError(f"{current} is a file, where moeprep needs a directory",
                                   "move it away, or write into another directory") from None
    return folder


def remove(root: Path, path: Path) -> None:
    """Delete a file or folder inside `root`; a symbolic link is removed itself, never what it points to."""
    path = Path(path)
    if path.parent != Path(root):
        inside(root, path.parent)
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


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
