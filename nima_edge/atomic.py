"""Atomic file and directory writes: readers see the old version or the new one, never half of one.

Temporary names are `.NAME.nima-XXXXXXXX.tmp` beside the target; a killed run leaves them behind and
the next write of the same target removes them. Renames are followed by an fsync of the directory so
a power cut cannot undo them. A full disk or a read-only folder is a NimaError, not a traceback.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from nima_edge.errors import NimaError

_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: str | os.PathLike) -> None:
    """Make renames/creations inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_prefix(target: Path) -> str:
    return f".{target.name}.nima-"


def clean_leftovers(target: str | os.PathLike) -> None:
    """Remove temporary files/folders of `target` left by a killed earlier write."""
    target = Path(target)
    if not target.parent.is_dir():
        return
    for stale in target.parent.glob(_temp_prefix(target) + "????????.tmp"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def write_error(target: Path, e: OSError) -> NimaError:
    """A clear error for the write failures a user can fix (disk full, read-only or forbidden folder)."""
    if e.errno in _DISK_FULL:
        return NimaError(f"no space left to write {target} ({e.strerror})",
                         "free disk space (or raise the file-size limit) and run again; the previous output is intact")
    return NimaError(f"cannot write {target}: {e.strerror}",
                     "choose an --out in a folder you can write to, or fix its permissions")


@contextlib.contextmanager
def _write_errors(target: Path) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        if e.errno in _DISK_FULL | _NOT_WRITABLE:
            raise write_error(target, e) from e
        raise


@contextlib.contextmanager
def temp_file(target: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `target`, removed afterwards unless the block renamed it away."""
    target = Path(target)
    with _write_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(target)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(target), suffix=".tmp", dir=target.parent)
        os.close(fd)
        tmp = Path(tmp)
        tmp.chmod(0o666 & ~_umask())  # mkstemp makes 0600; the result should be an ordinary file
        try:
            yield tmp
        finally:
            tmp.unlink(missing_ok=True)


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def replace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """os.replace, then fsync the directory so the rename survives a power cut."""
    os.replace(src, dst)
    fsync_dir(Path(dst).parent)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it over `target` only if the block succeeds."""
    target = Path(target)
    with temp_file(target) as tmp:
        yield tmp
        with _write_errors(target):
            fsync_file(tmp)
            replace(tmp, target)


def write_text(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(target: str | os.PathLike, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fsync_file(Path(dirpath) / name)
        fsync_dir(dirpath)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Build a directory under a temporary name, then swap it in place of `target`.

    On Linux the new directory and the old one are exchanged in one atomic rename (renameat2
    RENAME_EXCHANGE), so `target` always holds a complete copy. Elsewhere the old directory is renamed
    to `.NAME.old` first and the new one renamed into place: a kill between the two leaves the complete
    old copy under `.NAME.old`, which the next write moves back before doing anything else. An old
    copy is deleted only after it has been renamed to a temporary name, so a kill during the deletion
    never leaves half a copy under a name anyone reads.
    """
    target = Path(target)
    old = target.with_name(f".{target.name}.old")
    with _write_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        if old.exists() and not target.exists():
            replace(old, target)  # a kill between the swap's renames: the old copy is the good one
        _discard(old, target)
        clean_leftovers(target)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), suffix=".tmp", dir=target.parent))
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700
        try:
            yield tmp
            _fsync_tree(tmp)
            if target.exists() and _exchange(tmp, target):  # one atomic step: `target` is never missing
                fsync_dir(target.parent)
                _discard(tmp, target)  # now the old copy
            else:
                if target.exists():
                    replace(target, old)
                replace(tmp, target)
                _discard(old, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 with RENAME_EXCHANGE); False where unsupported."""
    libc = _libc()
    if libc is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # this filesystem or kernel cannot
        return False
    raise OSError(err, os.strerror(err), str(b))


@functools.cache
def _libc():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    return libc if hasattr(libc, "renameat2") else None


def discard(path: str | os.PathLike) -> None:
    """Delete a folder so that a kill never leaves half of it under its own name."""
    path = Path(path)
    _discard(path, path)


def _discard(path: Path, target: Path) -> None:
    """Delete a directory by first renaming it to one of `target`'s temporary names."""
    if not path.exists():
        return
    trash = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), suffix=".tmp", dir=target.parent))
    os.replace(path, trash / "x")  # atomic: `path` is whole until here, gone after
    shutil.rmtree(trash, ignore_errors=True)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
