"""The local Ray instance a sweep starts for itself: private to its user, authenticated, and gone with its
driver.

- **Private.** Ray makes its temporary folders (sessions, sockets, logs, runtime environments) mode 0777
  under ``/tmp/ray``, which every user of the host shares. A local instance gets a temporary root of its
  user's own instead: ``<tmp>/hvae-ray-<uid>/ray`` (``<tmp>`` as Ray picks it: ``$RAY_TMPDIR``,
  ``$TMPDIR``, ``/tmp``), inside a folder of mode 0700 that must be the user's and not a link, so no
  other user can read, replace or plant anything of the instance's (Ray's own chmods below it reach no
  one).
- **Authenticated.** Ray 2.60 turns token authentication on for a new local instance unless
  ``RAY_AUTH_MODE`` turns it off. A local sweep requires it: ``RAY_AUTH_MODE`` other than ``token`` is
  refused in one line, and the token Ray uses (``$RAY_AUTH_TOKEN``, else the file at
  ``$RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``) is made here, mode 0600 in a 0700 folder, when it
  does not exist yet (Ray would write it readable by everyone), and an existing file of the user's that
  others can read is set to 0600.
- **Gone with its driver.** :mod:`hvae_ray.sweep.reaper`, started before ``ray.init``, stops whatever
  the instance left running once the driver ends, however it ends.

Joining a cluster (``address``) uses none of this: the cluster's own settings apply.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import subprocess
import sys
from pathlib import Path

from hvae_ray.errors import RayUnavailable

AUTH_MODE = "RAY_AUTH_MODE"
MARKER = "HVAE_RAY_INSTANCE"


def temp_root() -> Path:
    """The private temporary root for a local instance (``_temp_dir`` of ``ray.init``), made if missing.
    RayUnavailable when it cannot be made or is not the user's own private folder."""
    base = os.environ.get("RAY_TMPDIR") or (os.environ.get("TMPDIR") if sys.platform.startswith("linux") else None)
    folder = Path(base or "/tmp") / f"hvae-ray-{os.getuid()}"
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(folder, 0o700)
        st = os.lstat(folder)
    except OSError as e:
        raise RayUnavailable(f"{folder}: cannot make the local Ray instance's temporary folder: {e.strerror} "
                             "(set RAY_TMPDIR to a writable folder)") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise RayUnavailable(f"{folder}: is not a folder of yours (a link or another user's); remove it or set "
                             "RAY_TMPDIR to another folder")
    if st.st_mode & 0o077:
        os.chmod(folder, 0o700)
    return folder / "ray"


def started() -> None:
    """After the instance started: a warning when Ray started it without token authentication (a Ray
    version without it)."""
    if os.environ.get(AUTH_MODE, "").lower() != "token":  # Ray sets it when it turns authentication on
        print("hvae-ray: warning: this Ray version started the local instance without token authentication; "
              "other users of this host may be able to reach it", file=sys.stderr)


def require_token_auth() -> None:
    """Token authentication on for a local instance, with its token private (see the module)."""
    mode = os.environ.get(AUTH_MODE)
    if mode is not None and mode.strip().lower() != "token":
        raise RayUnavailable(f"{AUTH_MODE}={mode[:40]!r} would start the local Ray instance without token "
                             "authentication (anyone on this host could run code as you through it); unset "
                             f"{AUTH_MODE} or set it to 'token'")
    if os.environ.get("RAY_AUTH_TOKEN"):
        return
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        from hvae_ray.io_safe import atomic_write_text

        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            atomic_write_text(path, secrets.token_hex(32), mode=0o600)
        except OSError as e:
            raise RayUnavailable(f"{path}: cannot write Ray's authentication token: {e.strerror}") from None
        return
    except OSError as e:
        raise RayUnavailable(f"{path}: cannot read Ray's authentication token: {e.strerror}") from None
    if st.st_mode & 0o077 and st.st_uid == os.getuid():
        os.chmod(path, 0o600)


class Reaper:
    """The reaper process of one local instance (:mod:`hvae_ray.sweep.reaper`) and the pipe that keeps it
    waiting; :meth:`marked` sets the instance's marker while Ray starts it."""

    #: The reaper of the instance this process started last: closed when another is started.
    current: Reaper | None = None
    closed: list[subprocess.Popen] = []

    def __init__(self):
        if Reaper.current is not None:
            Reaper.current.close()  # that instance is shut down (Ray is started only when none is running)
        self.token = secrets.token_hex(16)
        read, self._write = os.pipe()  # neither end inherited by the processes Ray starts
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-S", str(Path(__file__).with_name("reaper.py")), str(os.getpid()),
                 self.token], stdin=read, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                close_fds=True, start_new_session=True)
        except OSError as e:
            os.close(self._write)
            raise RayUnavailable(f"cannot start the local Ray instance's reaper: {e.strerror}") from None
        finally:
            os.close(read)
        Reaper.current = self

    @contextlib.contextmanager
    def marked(self):
        """For the ``with`` block (``ray.init``): the processes started get the instance's marker."""
        saved = os.environ.get(MARKER)
        os.environ[MARKER] = self.token
        try:
            yield
        finally:
            if saved is None:
                os.environ.pop(MARKER, None)
            else:
                os.environ[MARKER] = saved

    def close(self) -> None:
        """Let the reaper stop what is left of the instance (it is shut down, or failed to start) and end."""
        if self._write < 0:
            return
        with contextlib.suppress(OSError):
            os.close(self._write)
        self._write = -1
        if Reaper.current is self:
            Reaper.current = None
        Reaper.closed.append(self.proc)  # still running while it reaps: kept, not collected as abandoned
