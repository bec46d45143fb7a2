"""The link-safe writer and the one-run-per-folder lock, with real files and real processes."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from hvae_ray import io_safe
from hvae_ray.errors import FolderInUse


def test_a_link_at_the_target_is_replaced_not_written_through(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    target = tmp_path / "out.txt"
    target.symlink_to(victim)
    io_safe.atomic_write_text(target, "new")
    assert victim.read_text() == "keep me"
    assert not target.is_symlink() and target.read_text() == "new"


def test_a_failed_write_leaves_the_target_and_no_temporary_file(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def fail(f):
        f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        io_safe.atomic_write(target, fail)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_secret_files_are_private(tmp_path):
    path = io_safe.atomic_write_bytes(tmp_path / "key", b"s", mode=0o600)
    assert path.stat().st_mode & 0o777 == 0o600


def _holder(folder, env=None) -> subprocess.Popen:
    code = textwrap.dedent(f"""
        import sys, time
        from hvae_ray.io_safe import acquire
        acquire({str(folder)!r}, "save folder")
        print("held", flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_folder_held_by_another_process_is_refused_naming_it(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(FolderInUse) as e:
            io_safe.acquire(tmp_path, "save folder")
        msg = str(e.value)
        assert f"pid {proc.pid} on {os.uname().nodename}" in msg and "\n" not in msg, msg
    finally:
        proc.kill()
        proc.wait()
    # its holder died (kill -9): the kernel let go of the lock, and the folder is free again
    io_safe.acquire(tmp_path, "save folder")
    try:
        with pytest.raises(FolderInUse):  # not twice in one process either
            io_safe.acquire(tmp_path, "save folder")
    finally:
        io_safe.release(tmp_path)
    with io_safe.hold(tmp_path):
        pass


def test_without_file_locks_a_dead_holders_record_is_taken_over(tmp_path, monkeypatch):
    """On a file system that offers no locks, the record decides: a live process on this host holds the
    folder, a dead one's record is stale."""
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    lock = tmp_path / io_safe.LOCK_FILE
    lock.write_text(f'{{"host": "{os.uname().nodename}", "pid": {dead}, "started": "then"}}')
    with io_safe.hold(tmp_path):
        assert f'"pid": {os.getpid()}' in lock.read_text()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(f'{{"host": "{os.uname().nodename}", "pid": {live.pid}, "started": "now"}}')
        with pytest.raises(FolderInUse, match=f"pid {live.pid}"):
            io_safe.acquire(tmp_path)
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait()
