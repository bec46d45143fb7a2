"""Signed resume: every file Ray Tune unpickles when it resumes a sweep carries an HMAC of its owner's key.

Resuming with Ray Tune unpickles files of the experiment folder (``tuner.pkl``, the experiment state,
whose JSON embeds pickles, the search-algorithm and callback states, a failed trial's ``error.pkl``).
On a shared folder anyone who can write there could plant one that runs code as whoever resumes. So
the driver that writes them signs them: an HMAC-SHA256 of each file's name and bytes, with a key kept
in the user's config folder (``~/.config/hvae-ray/resume.key``, mode 0600, made on first use), recorded
in ``<experiment>/.hvae-ray-signatures.json``. ``sweep resume`` checks every such file before Ray reads
any of them and refuses, in one line, when one is missing from the record or does not match it; Ray then
reads the bytes that were checked, from memory (:class:`VerifiedFiles`), not the files a second time.

The driver signs Tune's state in Tune's staging folder as Tune saves it, before Tune copies it into
the experiment (a callback's state is asked for at that moment), so a driver killed at any point leaves
signed files; it signs the experiment folder after each step of Tune's loop and when the sweep ends,
however it ends. The newest few signatures of each file are kept: a file caught mid-copy verifies in
its old version or its new one. Tune replaces and removes its state files, and Ray Train its checkpoints,
while the driver signs: a file or folder gone by the time it is read or listed is left out (nothing of it
is there to unpickle), and ``sweep resume`` refuses it if it comes back unsigned. Trials' Ray Train runs
(``_train/``) keep their state as JSON and are neither listed nor signed.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import hmac
import json
import os
import stat
from pathlib import Path

import pyarrow
import pyarrow.fs

from hvae_ray.errors import ResumeRefused

SIGNATURES = ".hvae-ray-signatures.json"
KEY_FILE = "resume.key"
#: Files at the experiment's top that Ray Tune loads with (cloud)pickle on resume, by name pattern;
#: besides these, every ``*.pkl`` outside ``_train/`` (a trial's ``error.pkl``, ``params.pkl``).
TOP_PATTERNS = ("tuner.pkl", "experiment_state-*.json", "basic-variant-state-*.json", "search_gen_state-*.json",
                "searcher-state-*.pkl", "callback-states-*.pkl")
_DOMAIN = b"hvae-ray resume v1\0"


def config_dir() -> Path:
    """The user's own config folder: ``$XDG_CONFIG_HOME/hvae-ray`` (default ``~/.config/hvae-ray``)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "hvae-ray"


def key() -> bytes:
    """The user's signing key, made (32 random bytes, mode 0600) on first use."""
    from hvae_ray.io_safe import atomic_write_bytes

    path = config_dir() / KEY_FILE
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write_bytes(path, os.urandom(32).hex().encode(), mode=0o600)
        return key()
    except OSError as e:
        raise ResumeRefused(f"{path}: cannot read the resume key: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if st.st_mode & 0o077:
            raise ResumeRefused(f"{path}: the resume key is readable by others (mode "
                                f"{st.st_mode & 0o777:o}); make it 0600 (chmod 600 {path})")
        raw = f.read(200).strip()
    try:
        secret = bytes.fromhex(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        secret = b""
    if len(secret) < 16:
        raise ResumeRefused(f"{path}: not a resume key (remove it: a new one is made, and sweeps signed with the "
                            "old one can no longer be resumed)")
    return secret


def _mac(secret: bytes, rel: str, data: bytes) -> str:
    return hmac.new(secret, _DOMAIN + rel.encode("utf-8") + b"\0" + data, hashlib.sha256).hexdigest()


def _entries(folder: Path, strict: bool) -> list[os.DirEntry]:
    """The entries of ``folder``; none when it was removed meanwhile (Tune and Ray Train rotate, move and
    delete their files and folders while a sweep runs). Any other failure to list it is a refusal when
    ``strict`` (verifying), else the folder is skipped (signing)."""
    try:
        with os.scandir(folder) as it:
            return list(it)
    except FileNotFoundError:
        return []
    except OSError as e:
        if strict:
            raise ResumeRefused(f"{folder}: cannot list it: {e.strerror}; not resuming, since Ray may unpickle "
                                "files in it") from None
        return []


def loaded_files(experiment_dir: str | Path, *, strict: bool = False) -> list[Path]:
    """The files of an experiment that Ray Tune may unpickle on resume (see the module). Files and folders
    removed while they are listed are left out; with ``strict`` a folder that cannot be listed otherwise
    is a ResumeRefused."""
    exp = Path(experiment_dir)
    found: list[Path] = []
    folders = [exp]
    while folders:
        folder = folders.pop()
        top = folder == exp
        for entry in _entries(folder, strict):
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:  # removed meanwhile
                continue
            if is_dir:
                if not (top and entry.name == "_train"):
                    folders.append(Path(entry.path))
            elif entry.name.endswith(".pkl") or (top and any(fnmatch.fnmatchcase(entry.name, pattern)
                                                             for pattern in TOP_PATTERNS)):
                found.append(Path(entry.path))
    return sorted(found)


def _read_regular(path: Path) -> bytes:
    """The bytes of ``path``, a regular file (not a link, FIFO or device): OSError otherwise, and
    FileNotFoundError when it no longer exists."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        return f.read()


#: Signatures kept per file: its newest versions, so that a file Tune is copying into the experiment
#: (its new version signed before the copy starts) verifies in its old version as in its new one.
KEEP = 4


def _read_record(exp: Path) -> dict[str, list[str]]:
    f = exp / SIGNATURES
    try:
        data = json.loads(f.read_bytes()[: 64 * 1024 * 1024])
        files = data["files"]
        if not isinstance(files, dict):
            return {}
        return {str(k): [str(m) for m in (v if isinstance(v, list) else [v])][:KEEP] for k, v in files.items()}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def session_artifacts_dir() -> Path:
    """Where Ray Tune and Ray Train stage a driver's files: ``<session folder>/artifacts`` of the Ray
    instance this process is connected to, from Ray's public runtime context (Ray's own function for it,
    ``ray.train.constants._get_ray_train_session_dir``, is private; a test holds the two equal)."""
    import ray

    if not ray.is_initialized():
        raise RuntimeError("Ray is not initialised")
    ctx = ray.get_runtime_context()
    return Path(ctx.get_temp_dir(), ctx.get_session_name(), "artifacts")


def staging_dirs(experiment_name: str) -> list[Path]:
    """Where Tune's driver writes its state before copying it into the experiment folder
    (``<Ray session>/artifacts/<timestamp>/<experiment>/driver_artifacts``), newest first."""
    try:
        root = session_artifacts_dir()
    except Exception:  # noqa: BLE001 - no Ray session: nothing staged
        return []

    def saved_at(folder: Path) -> float:
        times = []
        for entry in _entries(folder, strict=False):
            if fnmatch.fnmatchcase(entry.name, "experiment_state-*.json"):
                with contextlib.suppress(OSError):  # replaced or removed meanwhile
                    times.append(entry.stat(follow_symlinks=False).st_mtime)
        return max(times, default=0.0)

    found = [p for p in (Path(e.path) / experiment_name / "driver_artifacts" for e in _entries(root, strict=False))
             if p.is_dir()]
    return sorted(found, key=saved_at, reverse=True)


class Signer:
    """Signs an experiment's pickled state as the driver writes it; kept picklable (Tune stores its
    callbacks), the key read when first needed."""

    def __init__(self, experiment_dir: str | Path):
        self.experiment_dir = str(experiment_dir)
        self._seen: dict[str, tuple[int, int]] = {}

    def __getstate__(self):
        return {"experiment_dir": self.experiment_dir, "_seen": {}}

    def sign(self, staged: bool = False) -> None:
        """Sign every file Ray may unpickle that changed since the last call: in the experiment folder, or
        with ``staged`` in Tune's driver staging folder (its newest state, before Tune copies it in)."""
        from hvae_ray.io_safe import atomic_write_text

        exp = Path(self.experiment_dir)
        sources = staging_dirs(exp.name)[:1] if staged else [exp]
        record = _read_record(exp)
        secret = key()
        changed = False
        for root in sources:
            for p in loaded_files(root):
                rel = p.relative_to(root).as_posix()
                try:
                    st = os.stat(p, follow_symlinks=False)
                    if not stat.S_ISREG(st.st_mode):
                        continue
                    stamp = (str(root), st.st_mtime_ns, st.st_size)
                    if self._seen.get(rel) == stamp and rel in record:
                        continue
                    data = _read_regular(p)
                except OSError:  # removed or replaced since it was listed (a rotated or temporary file)
                    continue
                mac = _mac(secret, rel, data)
                self._seen[rel] = stamp
                macs = record.get(rel, [])
                if mac not in macs:
                    record[rel], changed = [mac, *macs][:KEEP], True
        if changed:
            atomic_write_text(exp / SIGNATURES, json.dumps({"version": 1, "files": record}, indent=0), mode=0o644)


def verify(experiment_dir: str | Path) -> dict[str, bytes]:
    """ResumeRefused (one line) unless every file Ray may unpickle on resume is a regular file whose bytes
    match the record signed with this user's key. Returns the bytes verified, by absolute path: Ray is to
    read these, not the files again (:class:`VerifiedFiles`)."""
    exp = Path(experiment_dir)
    files = loaded_files(exp, strict=True)
    verified: dict[str, bytes] = {}
    if not files:
        return verified
    record = _read_record(exp)
    secret = key()
    for p in files:
        rel = p.relative_to(exp).as_posix()
        why = None
        try:
            data = _read_regular(p)
        except FileNotFoundError:
            continue  # gone: nothing of it can be unpickled
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.EINVAL) or p.is_symlink():
                why = "is not a regular file"
            else:
                raise ResumeRefused(f"{p}: cannot read it: {e.strerror}") from None
        else:
            if rel not in record:
                why = "is not signed with your key (your sweeps sign what they write)"
            elif not any(hmac.compare_digest(_mac(secret, rel, data), m) for m in record[rel]):
                why = "changed since your sweep signed it"
        if why:
            raise ResumeRefused(f"{p}: {why}; not resuming, since Ray would unpickle it (run code from it). "
                                f"If you trust it, sign it with: hvae-ray sweep sign {exp}")
        verified[os.path.normpath(os.path.abspath(p))] = data
    return verified


def is_loaded(experiment_dir: str | Path, path: str | Path) -> bool:
    """Whether ``path`` is a file of the experiment that Ray may unpickle on resume (:func:`loaded_files`'s
    rule, for one path)."""
    try:
        rel = Path(os.path.normpath(os.path.abspath(path))).relative_to(os.path.normpath(os.path.abspath(
            experiment_dir)))
    except ValueError:
        return False
    parts = rel.parts
    if not parts or parts[0] == "_train" and len(parts) > 1:
        return False
    return parts[-1].endswith(".pkl") or (len(parts) == 1 and any(fnmatch.fnmatchcase(parts[0], pattern)
                                                                  for pattern in TOP_PATTERNS))


class VerifiedFiles(pyarrow.fs.FileSystemHandler):
    """Ray Tune's storage file system for a resume (``Tuner.restore(storage_filesystem=...)``, through
    :meth:`filesystem`): the local file system, except that a file of the experiment that Ray may unpickle
    reads as the bytes :func:`verify` checked, held in memory, however the file on disk has changed since;
    one that was not verified is absent (not listed, not readable); one that Tune writes during the run is
    written atomically and reads back as the bytes it wrote. So Ray unpickles exactly what was verified,
    and a file swapped in between the check and Ray's read is never loaded. In a trial's process (Tune
    sends the file system to its trials, where nothing is unpickled from the experiment) it is the plain
    local file system."""

    def __init__(self, experiment_dir: str | Path, verified: dict[str, bytes] | None):
        self.experiment_dir = os.path.normpath(os.path.abspath(experiment_dir))
        self.verified = verified  # None: the plain local file system
        self.local = pyarrow.fs.LocalFileSystem()

    def __reduce__(self):
        return VerifiedFiles, (self.experiment_dir, None)

    def filesystem(self) -> pyarrow.fs.PyFileSystem:
        return pyarrow.fs.PyFileSystem(self)

    def _guarded(self, path: str) -> bool:
        return self.verified is not None and is_loaded(self.experiment_dir, path)

    def _bytes(self, path: str) -> bytes:
        data = self.verified.get(os.path.normpath(os.path.abspath(path)))
        if data is None:
            raise FileNotFoundError(errno.ENOENT, "not among the files verified for this resume", path)
        return data

    def _info(self, info: pyarrow.fs.FileInfo) -> pyarrow.fs.FileInfo:
        if info.type != pyarrow.fs.FileType.File or not self._guarded(info.path):
            return info
        data = self.verified.get(os.path.normpath(os.path.abspath(info.path)))
        if data is None:
            return pyarrow.fs.FileInfo(info.path, pyarrow.fs.FileType.NotFound)
        return pyarrow.fs.FileInfo(info.path, pyarrow.fs.FileType.File, size=len(data), mtime=info.mtime)

    # reads
    def get_type_name(self) -> str:
        return "hvae-ray-verified"

    def normalize_path(self, path):
        return self.local.normalize_path(path)

    def get_file_info(self, paths):
        return [self._info(info) for info in self.local.get_file_info(paths)]

    def get_file_info_selector(self, selector):
        infos = [self._info(info) for info in self.local.get_file_info(selector)]
        return [info for info in infos if info.type != pyarrow.fs.FileType.NotFound]

    def open_input_stream(self, path):
        return pyarrow.BufferReader(self._bytes(path)) if self._guarded(path) else self.local.open_input_stream(path)

    def open_input_file(self, path):
        return pyarrow.BufferReader(self._bytes(path)) if self._guarded(path) else self.local.open_input_file(path)

    # writes
    def open_output_stream(self, path, metadata):
        if not self._guarded(path):
            return self.local.open_output_stream(path, metadata=metadata)
        return pyarrow.PythonFile(_Written(self, path), mode="w")

    def open_append_stream(self, path, metadata):
        if self._guarded(path):
            raise PermissionError(errno.EPERM, "appending to a file Ray unpickles", path)
        return self.local.open_append_stream(path, metadata=metadata)

    def create_dir(self, path, recursive):
        self.local.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.local.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.local.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise PermissionError(errno.EPERM, "deleting the root folder's contents")

    def delete_file(self, path):
        self.local.delete_file(path)
        if self.verified is not None:
            self.verified.pop(os.path.normpath(os.path.abspath(path)), None)

    def move(self, src, dest):
        self.local.move(src, dest)
        if self._guarded(src) or self._guarded(dest):
            data = self.verified.pop(os.path.normpath(os.path.abspath(src)), None)
            if data is not None and self._guarded(dest):
                self.verified[os.path.normpath(os.path.abspath(dest))] = data

    def copy_file(self, src, dest):
        if self._guarded(dest):
            with self.open_input_stream(src) as f:
                data = f.read()
            with self.open_output_stream(dest, None) as out:
                out.write(data)
        else:
            self.local.copy_file(src, dest)


class _Written:
    """A file Ray unpickles, as Tune writes it during a resumed run: its bytes kept, written atomically on
    close, then read back from memory."""

    def __init__(self, files: VerifiedFiles, path: str):
        self.files, self.path, self.buffer, self.closed = files, path, bytearray(), False

    def write(self, data) -> int:
        self.buffer += data
        return len(data)

    def tell(self) -> int:
        return len(self.buffer)

    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self.closed:
            return
        from hvae_ray.io_safe import atomic_write_bytes

        self.closed = True
        atomic_write_bytes(self.path, bytes(self.buffer))
        self.files.verified[os.path.normpath(os.path.abspath(self.path))] = bytes(self.buffer)
