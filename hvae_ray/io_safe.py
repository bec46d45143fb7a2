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
