"""The one way files are written: atomically, never through a link, nothing left behind on failure.

:func:`atomic_write` creates a fresh temporary file beside the target with ``O_CREAT | O_EXCL``
(:func:`tempfile.mkstemp`: a link planted at any temporary name is never opened), writes and ``fsync``s
it, then renames it over the target with :func:`os.replace`. A rename replaces a link at the target
itself rather than writing into what it points to, and a reader sees the old file or the new one, never
a truncated one. On any failure (a full disk, a read-only folder, Ctrl+C) the temporary file is removed
and the target is untouched.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from hvae_ray.errors import DataError, FolderInUse


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object], mode: int = 0o644) -> Path:
    """Write ``path`` through ``write(f)`` on a binary file object, atomically and link-safe (see the module).

    ``mode`` is the new file's permission before the process umask (0o600 for secrets). Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def write_failed(path: str | Path, exc: OSError) -> DataError:
    """The one line for an output that could not be written (a full disk, a read-only folder, a file-size
    limit): :func:`atomic_write` has removed its temporary file and left ``path`` as it was."""
    import errno

    reason = exc.strerror or type(exc).__name__
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        reason += " (free some space, or write elsewhere)"
    return DataError(f"{path}: could not write it: {reason}; nothing was written there")


def atomic_write_bytes(path: str | Path, data: bytes, mode: int = 0o644) -> Path:
    return atomic_write(path, lambda f: f.write(data), mode)


def atomic_write_text(path: str | Path, text: str, mode: int = 0o644) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), mode)


def atomic_copy(src: str | Path, dst: str | Path) -> Path:
    """Copy the regular file ``src`` to ``dst`` through :func:`atomic_write` (``src`` must not be a link)."""
    src = Path(src)
    fd = os.open(src, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        return atomic_write(dst, lambda out: _copy_stream(f, out))


def _copy_stream(src: BinaryIO, dst: BinaryIO, chunk: int = 1 << 20) -> None:
    while block := src.read(chunk):
        dst.write(block)


# ---------------------------------------------------------------------------------------------------------
# One run per folder

#: The lock file a running command keeps in the folder it writes (a save folder, an experiment).
LOCK_FILE = ".hvae-ray.lock"

_held: dict[str, int] = {}  # folders this process holds: resolved path -> the lock file's descriptor


def _holder_text() -> str:
    import json
    import socket
    import time

    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                       "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}) + "\n"


def _describe_holder(raw: bytes) -> str:
    """``pid N on HOST since TIME`` from a lock file's record (its fields cut short: the file is not ours)."""
    import json

    try:
        info = json.loads(raw[:4096].decode("utf-8"))
        host, pid, started = (str(info.get(k, "?"))[:80] for k in ("host", "pid", "started"))
    except (ValueError, UnicodeDecodeError, AttributeError):
        return "another process (its lock record is unreadable)"
    return f"pid {pid} on {host} since {started}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(raw: bytes) -> bool:
    """A record of a process on this host that no longer runs (for file systems without locks)."""
    import json
    import socket

    try:
        info = json.loads(raw[:4096].decode("utf-8"))
        return info["host"] == socket.gethostname() and not _pid_alive(int(info["pid"]))
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        return False


def acquire(folder: str | Path, what: str = "folder") -> Path:
    """Hold ``folder`` for this process: an advisory ``flock`` on ``folder/.hvae-ray.lock`` (released by
    the kernel when the process ends, however it ends; Linux maps it onto NFS's byte-range locks), the
    file recording host, PID and start time for whoever is refused. Raises :class:`FolderInUse` (one line
    naming the holder) when another run holds it. Where the file system offers no locks, a record of a
    live process on this host holds the folder and a dead one's record is taken over. Returns the lock
    file; :func:`release` lets go (the process's end does too)."""
    import errno
    import fcntl

    folder = Path(folder)
    key = str(folder.resolve())
    if key in _held:
        raise FolderInUse(f"{folder}: this {what} is already in use by this process")
    path = folder / LOCK_FILE
    for _ in range(10):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0),
                     0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise FolderInUse(f"{folder}: this {what} is in use by {_describe_holder(_read_fd(fd))}; "
                                     "wait for that run to end (or stop it)") from None
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                locked = False  # no locks here: the record alone decides
            if not locked:
                raw = _read_fd(fd)
                if raw.strip() and not _stale(raw):
                    raise FolderInUse(f"{folder}: this {what} is in use by {_describe_holder(raw)}; wait for "
                                     f"that run to end, or remove {path} if it has")
            # The file may have been removed (and another made) between open and lock: hold it only if
            # the path still names the file this descriptor locked.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, _holder_text().encode(), 0)
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
        _held[key] = fd
        return path
    raise FolderInUse(f"{folder}: could not take this {what}'s lock ({path} keeps changing)")


def _read_fd(fd: int) -> bytes:
    return os.pread(fd, 4096, 0)


def release(folder: str | Path) -> None:
    """Let go of a folder :func:`acquire` took (the record is emptied, the file stays: removing it would
    let a waiting process lock a file no longer in the folder)."""
    fd = _held.pop(str(Path(folder).resolve()), None)
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
    os.close(fd)


@contextlib.contextmanager
def hold(folder: str | Path, what: str = "folder"):
    """:func:`acquire` for the ``with`` block."""
    acquire(folder, what)
    try:
        yield
    finally:
        release(folder)
