"""Generate JetNet-like jets with Pythia 8 and FastJet.

The recipe follows JetNet (Kansal et al., "Particle Cloud Generation with Message Passing Generative
Adversarial Networks", NeurIPS 2021, arXiv:2106.11535) as closely as a Pythia-only set-up allows:

* pp collisions at sqrt(s) = 13 TeV, hard process with 950 < pT-hat < 1050 GeV, Pythia's default
  (Monash 2013) tune for shower and hadronisation. JetNet used MadGraph for the hard process; here Pythia's
  own 2 -> 2 matrix elements are used instead (per flavour, see ``PROCESSES``).
* Final-state visible particles (``isFinal() and isVisible()``, i.e. no neutrinos) are clustered with
  anti-kT (Cacciari, Salam, Soyez, JHEP 04 (2008) 063, arXiv:0802.1189), R = 0.8, using FastJet
  (Cacciari, Salam, Soyez, EPJC 72 (2012) 1896, arXiv:1111.6097).
* Jets with 0.8 < pT < 1.6 TeV and |eta| < 2.5 are kept if they lie within Delta R < 0.8 (in eta-phi) of an
  outgoing hard-process parton or boson of the requested species (each hard object labels at most one jet).
* Per particle (eta_rel, phi_rel, pT_rel) relative to the full jet, phi_rel wrapped into (-pi, pi]; then the
  30 hardest constituents are kept, ordered by decreasing pT and zero-padded.
* Per jet (pT [GeV], eta, mass [GeV], multiplicity). The multiplicity is the number of *kept* constituents
  (at most 30), as in JetNet30's ``num_particles`` and as :func:`hvae_ray.data.jets.from_padded` recomputes
  it for every other format.

Parallelism and determinism: the requested jets are cut into fixed-size chunks (``CHUNK_SIZE`` jets),
handed out one at a time (the task list is never built in memory). Workers are separate processes
started as ``python -m hvae_ray.data.pythia_worker`` (:mod:`hvae_ray.data.pythia_worker`), which never
import the caller's ``__main__``: a script without an ``if __name__ == "__main__":`` guard generates jets
like any other. Each worker process initialises Pythia once per (flavour, seed) with an initialisation seed derived from
``seed`` alone, so every worker holds the same initialised generator (phase-space maxima included, and
``PhaseSpace:increaseMaximum = off`` keeps them fixed). Before each chunk the random-number engine is
re-seeded with a seed derived from (seed, chunk index). A chunk's jets therefore depend only on
(flavour, seed, chunk index), never on which worker ran it or what it ran before; chunks are concatenated in
chunk order and truncated to ``n_jets``. As a consequence a smaller sample is a prefix of a larger one with
the same seed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import selectors
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from hvae_ray.data.jets import JET_FEATURES, MAX_PARTICLES, JetSample, from_padded
from hvae_ray.errors import ConfigError, DataError

FLAVORS = ("q", "g", "t", "w", "z")
CHUNK_SIZE = 100
RECIPE_VERSION = "pythia8-jetnet-v1"

ECM_GEV = 13000.0
PTHAT_MIN_GEV = 950.0
PTHAT_MAX_GEV = 1050.0
JET_R = 0.8
JET_PT_MIN_GEV = 800.0
JET_PT_MAX_GEV = 1600.0
JET_ETA_MAX = 2.5
MATCH_DR = 0.8

# Pythia's seeds must lie in 1..900_000_000.
_SEED_MAX = 900_000_000
# Give up on a chunk after this many events per requested jet (a broken set-up, not bad luck).
_MAX_EVENTS_PER_JET = 50
_MAX_FAILED_EVENTS = 100

#: Peak memory per generated jet: its arrays (406 B), the copies made while ordering them and while
#: writing Parquet. An estimate, used to refuse sizes that cannot fit before any jet is made.
MEMORY_BYTES_PER_JET = 2048
#: Parquet bytes per jet: measured 537 B (q) and 540 B (t) at 30 particles, plus a margin.
DISK_BYTES_PER_JET = 640

_COMMON_SETTINGS = (
    "Print:quiet = on",
    "Init:showProcesses = off",
    "Init:showMultipartonInteractions = off",
    "Init:showChangedSettings = off",
    "Init:showChangedParticleData = off",
    "Next:numberCount = 0",
    "Next:numberShowInfo = 0",
    "Next:numberShowProcess = 0",
    "Next:numberShowEvent = 0",
    "Beams:idA = 2212",
    "Beams:idB = 2212",
    f"Beams:eCM = {ECM_GEV}",
    f"PhaseSpace:pTHatMin = {PTHAT_MIN_GEV}",
    f"PhaseSpace:pTHatMax = {PTHAT_MAX_GEV}",
    "PhaseSpace:increaseMaximum = off",
    "Random:setSeed = on",
)

_W_HADRONIC = ("24:onMode = off", "24:onIfAny = 1 2 3 4 5")

PROCESSES: dict[str, tuple[str, ...]] = {
    # Light-quark jets: u, d, s, c (gg -> q qbar limited to those four flavours).
    "q": ("HardQCD:qq2qq = on", "HardQCD:qqbar2qqbarNew = on", "HardQCD:gg2qqbar = on",
          "HardQCD:nQuarkNew = 4"),
    "g": ("HardQCD:gg2gg = on", "HardQCD:qqbar2gg = on"),
    "t": ("Top:gg2ttbar = on", "Top:qqbar2ttbar = on", *_W_HADRONIC),
    "w": ("WeakBosonAndParton:qqbar2Wg = on", "WeakBosonAndParton:qg2Wq = on", *_W_HADRONIC),
    "z": ("WeakBosonAndParton:qqbar2gmZg = on", "WeakBosonAndParton:qg2gmZq = on", "WeakZ0:gmZmode = 2",
          "23:onMode = off", "23:onIfAny = 1 2 3 4 5"),
}

# |PDG id| of the hard-process objects a jet of each flavour is matched to. In Pythia's hard-process record
# outgoing partons have status 23 and decayed resonances (t, W, Z) status -22.
_MATCH_IDS: dict[str, frozenset[int]] = {
    "q": frozenset({1, 2, 3, 4}),
    "g": frozenset({21}),
    "t": frozenset({6}),
    "w": frozenset({24}),
    "z": frozenset({23}),
}


# --------------------------------------------------------------------------------------------------------
# Argument checks and seeds


def _check_args(flavor: object, n_jets: object, seed: object) -> str:
    if not isinstance(flavor, str) or flavor.lower() not in FLAVORS:
        raise ConfigError(f"unknown jet flavor {flavor!r}; choose one of {', '.join(FLAVORS)}")
    if isinstance(n_jets, bool) or not isinstance(n_jets, (int, np.integer)) or n_jets < 1:
        raise ConfigError(f"n_jets must be a positive integer, got {n_jets!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    return flavor.lower()


def _check_workers(workers: object) -> int:
    if workers is None:
        return max(1, os.cpu_count() or 1)
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        raise ConfigError(f"workers must be a positive integer or None, got {workers!r}")
    return int(workers)


def _pythia_seed(*key: int) -> int:
    """A Pythia seed in 1..900_000_000 derived from the integers ``key`` (stable across platforms)."""
    state = np.random.SeedSequence([int(k) for k in key]).generate_state(1, dtype=np.uint64)[0]
    return int(state % _SEED_MAX) + 1


def init_seed(seed: int) -> int:
    """The seed Pythia is initialised with (the same in every worker)."""
    return _pythia_seed(seed, 0x1A17)


def chunk_seed(seed: int, chunk: int) -> int:
    """The seed the random-number engine gets before chunk number ``chunk``."""
    return _pythia_seed(seed, 0xC4A2, chunk)


# --------------------------------------------------------------------------------------------------------
# Worker side (runs in the worker processes of pythia_worker, or in-process for a single worker)


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """Send file descriptor 1 to /dev/null (C++ banners bypass Python's sys.stdout)."""
    try:
        sys.stdout.flush()
    except (AttributeError, ValueError):
        pass
    try:
        saved = os.dup(1)
    except OSError:  # no fd 1 at all: nothing to silence
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        _flush_c_stdout()
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _flush_c_stdout() -> None:
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass


_PYTHIAS: dict[tuple[str, int], object] = {}
_JET_DEF: object | None = None


def _jet_definition():
    """anti-kT R=0.8; the first call prints FastJet's banner, which is swallowed here."""
    global _JET_DEF
    if _JET_DEF is None:
        import fastjet

        jet_def = fastjet.JetDefinition(fastjet.antikt_algorithm, JET_R)
        with _quiet_stdout():
            fastjet.ClusterSequence([fastjet.PseudoJet(1.0, 0.0, 0.0, 1.0)], jet_def)
        _JET_DEF = jet_def
    return _JET_DEF


def _pythia(flavor: str, seed: int):
    """The initialised Pythia instance for (flavor, seed) in this process."""
    key = (flavor, seed)
    if key not in _PYTHIAS:
        import pythia8mc

        _PYTHIAS.clear()  # keep one initialised generator per process

        with _quiet_stdout():
            pythia = pythia8mc.Pythia("", False)
            for line in (*_COMMON_SETTINGS, f"Random:seed = {init_seed(seed)}", *PROCESSES[flavor]):
                if not pythia.readString(line):
                    raise RuntimeError(f"Pythia rejected the setting {line!r}")
            ok = pythia.init()
        if not ok:
            raise RuntimeError(f"Pythia failed to initialise for {flavor} jets")
        _PYTHIAS[key] = pythia
    return _PYTHIAS[key]


def _wrap_phi(dphi: np.ndarray) -> np.ndarray:
    """Map angles into (-pi, pi]."""
    return np.pi - np.mod(np.pi - dphi, 2.0 * np.pi)


def _hard_objects(pythia, ids: frozenset[int]) -> list[tuple[float, float]]:
    """(eta, phi) of outgoing hard-process partons / decayed resonances with |id| in ``ids``."""
    found = []
    for p in pythia.process:
        if p.idAbs() in ids and p.statusAbs() in (22, 23) and p.pT() > 0.0:
            found.append((p.eta(), p.phi()))
    return found


def _event_jets(pythia, jet_def, ids: frozenset[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Selected jets of the current event: list of (particle rows (k, 3), jet row (4,))."""
    import fastjet

    mom = [(p.px(), p.py(), p.pz(), p.e()) for p in pythia.event if p.isFinal() and p.isVisible()]
    if not mom:
        return []
    targets = _hard_objects(pythia, ids)
    if not targets:
        return []
    mom_arr = np.asarray(mom, dtype=np.float64)
    pseudojets = []
    for i, (px, py, pz, e) in enumerate(mom):
        pj = fastjet.PseudoJet(px, py, pz, e)
        pj.set_user_index(i)
        pseudojets.append(pj)
    cs = fastjet.ClusterSequence(pseudojets, jet_def)
    jets = fastjet.sorted_by_pt(cs.inclusive_jets(JET_PT_MIN_GEV))

    out = []
    used: set[int] = set()
    for jet in jets:
        pt, eta = jet.pt(), jet.eta()
        if not (JET_PT_MIN_GEV < pt < JET_PT_MAX_GEV and abs(eta) < JET_ETA_MAX):
            continue
        phi = jet.phi()
        best, best_dr = -1, MATCH_DR
        for k, (t_eta, t_phi) in enumerate(targets):
            if k in used:
                continue
            dr = math.hypot(eta - t_eta, float(_wrap_phi(np.float64(phi - t_phi))))
            if dr < best_dr:
                best, best_dr = k, dr
        if best < 0:
            continue
        used.add(best)

        idx = np.fromiter((c.user_index() for c in jet.constituents()), dtype=np.int64)
        px, py, pz = mom_arr[idx, 0], mom_arr[idx, 1], mom_arr[idx, 2]
        c_pt = np.hypot(px, py)
        c_eta = np.arcsinh(pz / c_pt)
        c_phi = np.arctan2(py, px)
        rows = np.stack([c_eta - eta, _wrap_phi(c_phi - phi), c_pt / pt], axis=1)
        order = np.argsort(-rows[:, 2], kind="stable")[:MAX_PARTICLES]
        rows = rows[order]
        mass = max(jet.m(), 0.0)
        out.append((rows, np.array([pt, eta, mass, len(rows)], dtype=np.float64)))
    return out


def _generate_chunk(task: tuple[str, int, int, int]) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """Generate ``n`` jets for chunk ``chunk``; returns (chunk, particles, mask, jets)."""
    flavor, seed, chunk, n = task
    pythia = _pythia(flavor, seed)
    jet_def = _jet_definition()
    ids = _MATCH_IDS[flavor]
    pythia.rndm.init(chunk_seed(seed, chunk))

    particles = np.zeros((n, MAX_PARTICLES, 3), dtype=np.float32)
    mask = np.zeros((n, MAX_PARTICLES), dtype=bool)
    jets = np.zeros((n, len(JET_FEATURES)), dtype=np.float32)
    got = events = failed = 0
    while got < n:
        events += 1
        if events > _MAX_EVENTS_PER_JET * n + 1000:
            raise RuntimeError(f"{flavor} jets: only {got} of {n} jets after {events - 1} events")
        if not pythia.next():
            failed += 1
            if failed > _MAX_FAILED_EVENTS:
                raise RuntimeError(f"{flavor} jets: Pythia failed {failed} events in one chunk")
            continue
        for rows, jet_row in _event_jets(pythia, jet_def, ids):
            if got == n:
                break
            k = len(rows)
            particles[got, :k] = rows
            mask[got, :k] = True
            jets[got] = jet_row
            got += 1
    return chunk, particles, mask, jets


# --------------------------------------------------------------------------------------------------------
# Driver


def generate_jets(flavor: str, n_jets: int, seed: int, workers: int | None = None,
                  progress: bool = True) -> JetSample:
    """Generate ``n_jets`` jets of ``flavor`` (one of q, g, t, w, z) with Pythia 8 + FastJet.

    Same (flavor, n_jets, seed) gives identical arrays for any ``workers`` (None: all cores). A tqdm bar
    (in jets) goes to stderr when ``progress`` is true. Raises ConfigError for bad arguments and for a
    sample too large for this machine's memory (checked before any jet is made).
    """
    return _generate(flavor, n_jets, seed, workers=workers, progress=progress, chunk_size=CHUNK_SIZE)


def _format_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} PB"


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux MemAvailable), None when unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_generation_size(n_jets: int, out_dir: str | os.PathLike | None = None) -> None:
    """Refuse, in one line, ``n_jets`` jets that would not fit in memory or (with ``out_dir``, the folder
    the Parquet file goes to) on its disk: ConfigError for memory, DataError for the disk."""
    need = int(n_jets) * MEMORY_BYTES_PER_JET
    have = available_memory()
    if have is not None and need > have:
        raise ConfigError(f"n_jets = {int(n_jets)}: generating them needs about {_format_bytes(need)} of "
                          f"memory ({MEMORY_BYTES_PER_JET} B per jet), {_format_bytes(have)} is available; "
                          f"generate at most {have // MEMORY_BYTES_PER_JET} jets per file (different seeds)")
    if out_dir is not None:
        folder = Path(out_dir)
        while not folder.exists() and folder != folder.parent:  # the folder may not exist yet
            folder = folder.parent
        free = shutil.disk_usage(folder).free
        need = int(n_jets) * DISK_BYTES_PER_JET + (1 << 20)
        if need > free:
            raise DataError(f"{out_dir}: {int(n_jets)} jets need about {_format_bytes(need)} on disk "
                            f"({DISK_BYTES_PER_JET} B per jet), {_format_bytes(free)} is free")


def _tasks(flavor: str, seed: int, n_jets: int, chunk_size: int) -> Iterator[tuple[str, int, int, int]]:
    """(flavor, seed, chunk, jets in it) for every chunk, made as they are handed out."""
    for c in range(-(-n_jets // chunk_size)):
        yield flavor, seed, c, min(chunk_size, n_jets - c * chunk_size)


def _generate(flavor: str, n_jets: int, seed: int, workers: int | None = None, progress: bool = True,
              chunk_size: int = CHUNK_SIZE) -> JetSample:
    flavor = _check_args(flavor, n_jets, seed)
    n_workers = _check_workers(workers)
    n_jets, seed = int(n_jets), int(seed)
    check_generation_size(n_jets)
    n_chunks = -(-n_jets // chunk_size)
    n_workers = min(n_workers, n_chunks)

    from tqdm import tqdm

    particles = np.zeros((n_jets, MAX_PARTICLES, 3), dtype=np.float32)
    mask = np.zeros((n_jets, MAX_PARTICLES), dtype=bool)
    jets = np.zeros((n_jets, len(JET_FEATURES)), dtype=np.float32)
    with tqdm(total=n_jets, unit="jet", desc=f"{flavor} jets", file=sys.stderr, disable=not progress,
              dynamic_ncols=True) as bar:

        def store(chunk: int, p: np.ndarray, m: np.ndarray, j: np.ndarray) -> None:
            start = chunk * chunk_size
            particles[start:start + len(p)], mask[start:start + len(p)], jets[start:start + len(p)] = p, m, j
            bar.update(len(p))

        tasks = _tasks(flavor, seed, n_jets, chunk_size)
        if n_workers == 1:
            for task in tasks:
                store(*_generate_chunk(task))
        else:
            _run_workers(tasks, n_workers, store)
    return from_padded(particles, mask, jets, source=f"<pythia8 {flavor} jets, seed {seed}>")


def _worker_env() -> dict[str, str]:
    """The environment of a worker: this package importable as in the parent, one thread each."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _start_worker() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hvae_ray.data.pythia_worker"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=_worker_env(), close_fds=True)


def _read_exact(stream, n: int) -> bytes:
    data = stream.read(n)
    if data is None or len(data) != n:
        raise EOFError
    return data


def _read_result(proc: subprocess.Popen) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """One chunk's answer from ``proc`` (see :mod:`hvae_ray.data.pythia_worker`)."""
    try:
        header = proc.stdout.readline()
        if not header:
            raise EOFError
        head = json.loads(header)
        if "error" in head:
            raise RuntimeError(f"generating chunk {head['chunk']}: {head['error']}")
        chunk, n = int(head["chunk"]), int(head["n"])
        p = np.frombuffer(_read_exact(proc.stdout, n * MAX_PARTICLES * 3 * 4), np.float32)
        m = np.frombuffer(_read_exact(proc.stdout, n * MAX_PARTICLES), np.bool_)
        j = np.frombuffer(_read_exact(proc.stdout, n * len(JET_FEATURES) * 4), np.float32)
    except (EOFError, ValueError, KeyError) as exc:
        code = proc.poll()
        raise RuntimeError(f"a jet-generation worker (pid {proc.pid}) stopped without its answer "
                           f"(exit code {code})") from exc
    return chunk, p.reshape(n, MAX_PARTICLES, 3), m.reshape(n, MAX_PARTICLES), j.reshape(n, len(JET_FEATURES))


def _run_workers(tasks: Iterator[tuple[str, int, int, int]], n_workers: int,
                 store: Callable[..., None]) -> None:
    """Hand ``tasks`` one at a time to ``n_workers`` worker processes; ``store`` each answer. The
    workers are ended on return, on an error and on Ctrl+C."""
    procs = [_start_worker() for _ in range(n_workers)]
    sel = selectors.DefaultSelector()
    busy = 0

    def hand_out(proc: subprocess.Popen) -> bool:
        task = next(tasks, None)
        if task is None:
            proc.stdin.close()
            return False
        proc.stdin.write(json.dumps(list(task)).encode() + b"\n")
        proc.stdin.flush()
        return True

    done = False
    try:
        for proc in procs:
            sel.register(proc.stdout, selectors.EVENT_READ, proc)
            busy += hand_out(proc)
        while busy:
            for key, _ in sel.select():
                proc = key.data
                store(*_read_result(proc))
                busy -= 1
                if hand_out(proc):
                    busy += 1
                else:
                    sel.unregister(proc.stdout)
        done = True
    finally:
        sel.close()
        for proc in procs:
            with contextlib.suppress(OSError):
                proc.stdin.close()
            if not done and proc.poll() is None:
                proc.terminate()  # an error or Ctrl+C: their chunks are not wanted any more
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stdout.close()


# --------------------------------------------------------------------------------------------------------
# Cached default samples


def cache_dir() -> Path:
    """``$HVAE_RAY_CACHE``, else ``$XDG_CACHE_HOME/hvae-ray``, else ``~/.cache/hvae-ray``."""
    env = os.environ.get("HVAE_RAY_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "hvae-ray"


def default_sample_path(flavor: str = "q", n_jets: int = 1000, seed: int = 0) -> Path:
    """Where :func:`default_sample` keeps the Parquet file for (flavor, n_jets, seed)."""
    flavor = _check_args(flavor, n_jets, seed)
    return cache_dir() / f"jets-{flavor}-n{int(n_jets)}-seed{int(seed)}-{RECIPE_VERSION}.parquet"


def default_sample(flavor: str = "q", n_jets: int = 1000, seed: int = 0, progress: bool = True) -> Path:
    """Generate the sample once into the cache (atomically, safe under concurrency) and return its path."""
    path = default_sample_path(flavor, n_jets, seed)
    if path.is_file():
        return path
    from hvae_ray.data.io import save_parquet

    check_generation_size(n_jets, path.parent)
    sample = generate_jets(flavor, n_jets, seed, progress=progress)
    # save_parquet writes through io_safe.atomic_write (a fresh temporary file renamed into place), so
    # a concurrent reader sees either no file or a complete one; two concurrent writers produce the
    # same bytes, and the last rename wins.
    save_parquet(sample, path, metadata=sample_metadata(flavor, n_jets, seed), overwrite=True)
    return path


def sample_metadata(flavor: str, n_jets: int, seed: int) -> dict[str, str]:
    """Key/values describing a generated sample (stored in the Parquet schema)."""
    try:
        from importlib.metadata import version

        gen = f"pythia8mc {version('pythia8mc')} + fastjet {version('fastjet')}"
    except Exception:  # metadata of installed distributions unavailable
        gen = "pythia8mc + fastjet"
    return {
        "flavor": flavor.lower(),
        "n_jets": str(int(n_jets)),
        "seed": str(int(seed)),
        "generator": gen,
        "recipe": RECIPE_VERSION,
        "chunk_size": str(CHUNK_SIZE),
        "cuts": (f"anti-kT R={JET_R}; {JET_PT_MIN_GEV:g}<pT<{JET_PT_MAX_GEV:g} GeV; |eta|<{JET_ETA_MAX:g}; "
                 f"matched dR<{MATCH_DR:g}; pTHat {PTHAT_MIN_GEV:g}-{PTHAT_MAX_GEV:g} GeV"),
    }


__all__ = ["CHUNK_SIZE", "FLAVORS", "available_memory", "cache_dir", "check_generation_size", "default_sample",
           "default_sample_path", "generate_jets", "sample_metadata"]
