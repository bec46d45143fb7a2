"""Checks on output paths, made before any work starts: one DataError line instead of a traceback at
the end of a long job, and never a file replaced without being asked."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from hvae_ray.errors import DataError

__all__ = ["check_output_file", "check_output_dir", "check_free_space", "format_bytes"]


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _make_dir(path: Path, what: str) -> None:
    if path.exists() and not path.is_dir():
        raise DataError(f"{path}: cannot create the {what}: a file of that name exists")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{path}: cannot create the {what}: {_reason(exc)}") from exc


def _probe(folder: Path, what: str) -> None:
    """Create and remove a temporary file in ``folder``: the only reliable test (root ignores modes)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".hvae-ray-probe-", dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise DataError(f"{folder}: cannot write the {what} here: {_reason(exc)}") from exc


def check_output_file(path: str | os.PathLike, *, overwrite: bool = False, suffix: str | None = None) -> Path:
    """An output file that can be written: right suffix, not existing (unless ``overwrite``), its
    folder created and writable. Raises DataError (one line) otherwise."""
    path = Path(path)
    if suffix is not None and path.suffix != suffix:
        raise DataError(f"{path}: output must be a {suffix} file")
    if path.is_dir():
        raise DataError(f"{path}: is a folder; name an output file")
    if path.exists() and not overwrite:
        raise DataError(f"{path}: already exists; not overwriting it (use `overwrite=True`)")
    _make_dir(path.parent, "output folder")
    _probe(path.parent, "output file")
    return path


def check_output_dir(path: str | os.PathLike, what: str = "output folder", *,
                     files: Iterable[str] = (), overwrite: bool = False) -> Path:
    """An output folder that exists (created if needed) and is writable, where none of ``files``
    exists yet unless ``overwrite``. Raises DataError (one line) otherwise."""
    path = Path(path)
    clash = [name for name in files if (path / name).exists()]
    if clash and not overwrite:
        raise DataError(f"{path / clash[0]}: already exists ({len(clash)} such files); not overwriting "
                        "them (use `overwrite=True`)")
    _make_dir(path, what)
    _probe(path, what)
    return path


def format_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} PB"


def check_free_space(folder: str | os.PathLike, needed: int, what: str) -> None:
    """DataError when ``folder``'s file system has less than ``needed`` bytes free."""
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise DataError(f"{folder}: {what} needs up to {format_bytes(needed)} on disk, "
                        f"{format_bytes(free)} is free")
