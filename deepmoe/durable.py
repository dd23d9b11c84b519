"""Durable, atomic file-system writes: what every checkpoint and model writer goes through.

A rename is atomic (a reader sees the old file or the new one), but only a crash of the *process* is
covered by that alone: after a power loss the kernel may have persisted the rename and not the data it
points at, or neither. So:
  - a file is written under a hidden temp name, fsynced, then renamed over its final name, and the
    directory is fsynced right after (the rename itself lives in the directory's data);
  - a directory is replaced by exchanging it with the fully written, fsynced new one in one system call
    (Linux `renameat2(RENAME_EXCHANGE)`), so the path always names a complete directory, the old or the
    new. Where the kernel or file system cannot exchange, the old directory is first renamed to a side
    name (`.NAME.old`); a crash between the two renames leaves the old copy there, and `resolve_dir`
    (the loader) and `recover_dir` (the next writer, resume) find it.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path



def _umask() -> int:
    try:  # Linux reports it without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)  # elsewhere the only way to read it is to set it: put it straight back
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The mode `open()` / `mkdir()` would give under the process umask: mkstemp and mkdtemp make 0600 and
    0700, which would hide a trained model from the other users of a shared machine."""
    return (0o777 if directory else 0o666) & ~_umask()


def mkdtemp(prefix: str, dir: str | os.PathLike) -> Path:
    """A fresh hidden directory to fill before `replace_dir` moves it into place, with the umask's mode."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=dir))
    os.chmod(path, default_mode(directory=True))
    return path


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Persist a directory's entries (the names created, renamed or removed in it)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):  # a file system that has no directory sync
            raise
    finally:
        os.close(fd)


def mkdir(path: str | os.PathLike) -> Path:
    """`mkdir -p`, with each directory it creates recorded durably in its parent."""
    path = Path(path)
    if path.is_dir():
        return path
    mkdir(path.parent)
    try:
        path.mkdir()
    except FileExistsError:
        if not path.is_dir():
            raise
        return path  # made concurrently: its maker persists it
    fsync_dir(path.parent)
    return path


def rename(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """os.replace, persisted: the destination's directory is fsynced before this returns."""
    os.replace(src, dst)
    fsync_dir(Path(dst).parent)


def write_temp(directory: str | os.PathLike, name: str, write: Callable[[str], object], suffix: str = ".tmp"
               ) -> Path:
    """A hidden file `.{name}.XXXX{suffix}` in `directory`, filled by write(its path) and fsynced; the caller
    renames it into place (or deletes it)."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        fsync_file(tmp)
        os.chmod(tmp, default_mode())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Produce `path` by calling write(temp path) on a hidden file beside it, then fsync and rename: after
    a crash at any moment, `path` is the complete old file or the complete new one."""
    path = Path(path)
    tmp = write_temp(path.parent, path.name, write)
    try:
        rename(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8", newline=""))  # bytes as given


# ---- directories ---------------------------------------------------------------------------------
def side_name(path: Path) -> Path:
    """Where the old copy of a directory waits while `replace_dir` renames without an exchange."""
    return path.with_name(f".{path.name}.old")


def resolve_dir(path: Path) -> Path:
    """`path`, or the complete old copy a `replace_dir` interrupted between its two renames left beside it."""
    side = side_name(path)
    return side if not path.exists() and side.is_dir() else path


def recover_dir(path: Path) -> None:
    """Finish what an interrupted `replace_dir` left: restore the old copy if `path` is missing, else drop
    the side copy (the new directory made it into place)."""
    side = side_name(path)
    if not side.is_dir():
        return
    if path.exists():
        shutil.rmtree(side)
    else:
        rename(side, path)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the fully written directory `tmp` onto `final`, replacing any older one, such that after a
    crash at any moment `final` is the old complete directory or the new one (see the module docstring
    for file systems that cannot exchange)."""
    tmp, final = Path(tmp), Path(final)
    recover_dir(final)
    fsync_dir(tmp)  # its entries (files, subdirectories) before the name that makes them visible
    if not final.exists():
        rename(tmp, final)
        return
    if _exchange(tmp, final):
        fsync_dir(final.parent)
        shutil.rmtree(tmp)  # now the old directory
        return
    side = side_name(final)
    rename(final, side)
    rename(tmp, final)
    shutil.rmtree(side)


def remove_dir(path: Path) -> None:
    """Delete a directory, first renaming it to a hidden name: a crash midway leaves no half-deleted
    directory under a name readers trust."""
    doomed = path.with_name(f".{path.name}.deleting")
    shutil.rmtree(doomed, ignore_errors=True)
    rename(path, doomed)
    shutil.rmtree(doomed)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where the kernel or file system cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2  # <fcntl.h>, <linux/fs.h>
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


@functools.cache
def _renameat2():
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)  # glibc ≥ 2.28
    except OSError:
        return None
