"""Reading and writing jet samples.

Formats read by :func:`load_jets` (chosen by suffix, checked against the file's content):

* ``.parquet`` -- this package's layout (see :func:`save_parquet`).
* ``.npz``, ``.h5``/``.hdf5`` -- JetNet arrays (Kansal et al., arXiv:2106.11535): ``particle_features``
  [N, P, >=3] with (eta_rel, phi_rel, pT_rel[, mask]) first, optional ``jet_features`` and optional
  ``mask`` [N, P].
* ``.pt`` -- a ``torch.save``-d list of ``torch_geometric.data.Data`` whose node features ``x`` start with
  (eta_rel, phi_rel, pT_rel). Loaded with ``torch.load(weights_only=True)`` and only PyG's ``Data`` classes
  allow-listed, so a file whose pickle names any other global is refused without running it.

Every problem with an input file raises :class:`hvae_ray.errors.DataError` with a single line that starts
with the file's path.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from hvae_ray.data.jets import JET_FEATURES, MAX_PARTICLES, PARTICLE_FEATURES, JetSample, from_padded
from hvae_ray.errors import DataError

FORMAT_VERSION = "1"
_FORMAT_KEY = "hvae_ray.format_version"

SUFFIXES = {
    ".parquet": "parquet",
    ".npz": "npz",
    ".h5": "hdf5",
    ".hdf5": "hdf5",
    ".pt": "torch",
}
_FORMAT_NAMES = {"parquet": "Parquet", "npz": "NumPy .npz", "hdf5": "HDF5", "torch": "PyTorch"}
_ARTICLE = {"parquet": "a", "npz": "a", "hdf5": "an", "torch": "a"}
_GRAPH_LIST_KEYS = ("graphs", "data")


def _one_line(text: object) -> str:
    """``text`` squeezed onto one line (first non-empty line of an exception message, say)."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return " ".join(lines[:1]) if lines else ""


def _fail(path: Path | str, problem: str) -> DataError:
    """A DataError whose message is ``"<path>: <problem>"`` on a single line."""
    text = f"{path}: {problem}"
    return DataError(" ".join(ln.strip() for ln in text.splitlines() if ln.strip()))


# --------------------------------------------------------------------------------------------------------
# Writing


def save_parquet(sample: JetSample, path: str | os.PathLike, metadata: Mapping[str, object] | None = None,
                 overwrite: bool = False) -> Path:
    """Write ``sample`` to ``path`` as Parquet, one row per jet; returns the path.

    Columns: ``pt``, ``eta``, ``mass`` (float32; NaN where the source had no jet kinematics),
    ``num_particles`` (int32) and ``etarel``, ``phirel``, ``ptrel`` (list<float32>, the real particles
    only, in decreasing pT). ``metadata`` goes into the schema's key/value metadata, values as strings
    (``str(value)``), next to ``hvae_ray.format_version``.

    Refuses to replace an existing file (DataError) unless ``overwrite``. The file is written to a
    temporary name in the same directory and renamed into place, so readers never see a partial file.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if path.is_dir():
        raise _fail(path, "is a directory")
    if path.exists() and not overwrite:
        raise _fail(path, "file exists; pass overwrite=True to replace it")
    sample.validate()

    mask = np.asarray(sample.mask, dtype=bool)
    counts = mask.sum(axis=1).astype(np.int64)
    # Real particles come first in every row, so boolean indexing keeps each jet's pT order.
    real = np.asarray(sample.particles, dtype=np.float32)[mask]
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32), type=pa.int32())
    jets = np.asarray(sample.jets, dtype=np.float32)
    columns = {
        "pt": pa.array(jets[:, 0], type=pa.float32()),
        "eta": pa.array(jets[:, 1], type=pa.float32()),
        "mass": pa.array(jets[:, 2], type=pa.float32()),
        "num_particles": pa.array(counts.astype(np.int32), type=pa.int32()),
    }
    for i, name in enumerate(PARTICLE_FEATURES):
        values = pa.array(np.ascontiguousarray(real[:, i]), type=pa.float32())
        columns[name] = pa.ListArray.from_arrays(offsets, values)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta[_FORMAT_KEY] = FORMAT_VERSION
    table = pa.table(columns).replace_schema_metadata({k.encode(): v.encode() for k, v in meta.items()})

    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, tmp)
        if not overwrite and path.exists():
            raise _fail(path, "file exists; pass overwrite=True to replace it")
        os.replace(tmp, path)
    except DataError:
        raise
    except OSError as exc:
        raise _fail(path, f"cannot write: {exc.strerror or _one_line(exc)}") from exc
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


# --------------------------------------------------------------------------------------------------------
# Format detection


def _sniff(path: Path) -> str:
    """What the file's bytes look like: parquet, hdf5, npz, torch, pickle, zip, text, empty or binary."""
    with open(path, "rb") as fh:
        head = fh.read(512)
        if not head:
            return "empty"
        if head[:4] == b"PAR1":
            return "parquet"
        if head[:8] == b"\x89HDF\r\n\x1a\n":
            return "hdf5"
        if head[:2] == b"PK":
            import zipfile

            try:
                with zipfile.ZipFile(path) as zf:
                    names = zf.namelist()
            except (zipfile.BadZipFile, OSError, ValueError):
                return "binary"
            if any(n.endswith("data.pkl") for n in names):
                return "torch"
            if names and all(n.endswith(".npy") for n in names):
                return "npz"
            return "zip"
        if head[:1] == b"\x80" and len(head) > 1 and head[1] <= 5:
            return "pickle"  # also torch's legacy (non-zip) format
    try:
        head.decode("utf-8")
        return "text"
    except UnicodeDecodeError:
        return "binary"


_LOOKS_LIKE = {
    "parquet": "a Parquet file", "hdf5": "an HDF5 file", "npz": "a NumPy .npz archive",
    "torch": "a PyTorch file", "pickle": "a Python pickle", "zip": "a zip archive without .npy members",
    "text": "text", "binary": "unrecognised binary data", "empty": "nothing (0 bytes)",
}
_ACCEPTS = {"parquet": {"parquet"}, "npz": {"npz"}, "hdf5": {"hdf5"}, "torch": {"torch", "pickle"}}


def detect_format(path: str | os.PathLike) -> str:
    """The format of ``path`` ('parquet', 'npz', 'hdf5' or 'torch'); DataError if missing or foreign."""
    path = Path(path)
    if not path.exists():
        raise _fail(path, "no such file")
    if path.is_dir():
        raise _fail(path, "is a directory, not a jet file")
    suffix = path.suffix.lower()
    try:
        content = _sniff(path)
    except OSError as exc:
        raise _fail(path, f"cannot read: {exc.strerror or _one_line(exc)}") from exc
    fmt = SUFFIXES.get(suffix)
    if fmt is None:
        hint = next((f"; it looks like {_LOOKS_LIKE[c]}, rename it to {s}"
                     for s, c in SUFFIXES.items() if c == content), "")
        raise _fail(path, f"unknown file type {suffix or '(no suffix)'!r}; expected one of "
                          f"{', '.join(SUFFIXES)}{hint}")
    if content == "empty":
        raise _fail(path, "the file is empty (0 bytes)")
    if content not in _ACCEPTS[fmt]:
        raise _fail(path, f"not {_ARTICLE[fmt]} {_FORMAT_NAMES[fmt]} file "
                          f"(its content looks like {_LOOKS_LIKE[content]})")
    return fmt


# --------------------------------------------------------------------------------------------------------
# Reading


def load_jets(path: str | os.PathLike) -> JetSample:
    """Read a jet sample from ``path`` (.parquet, .npz, .h5/.hdf5 or .pt); DataError on any bad input."""
    path = Path(path)
    fmt = detect_format(path)
    reader = {"parquet": _read_parquet, "npz": _read_npz, "hdf5": _read_hdf5, "torch": _read_torch}[fmt]
    try:
        return reader(path)
    except DataError:
        raise
    except MemoryError as exc:
        raise _fail(path, "not enough memory to read it") from exc
    except Exception as exc:  # any library error becomes one line naming the file
        raise _fail(path, f"cannot read {_FORMAT_NAMES[fmt]} file: {type(exc).__name__}: "
                          f"{_one_line(exc) or 'no details'}") from exc


def read_parquet_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The key/value metadata of a Parquet file written by :func:`save_parquet` (strings)."""
    import pyarrow.parquet as pq

    path = Path(path)
    if detect_format(path) != "parquet":
        raise _fail(path, "not a Parquet file")
    try:
        raw = pq.read_schema(path).metadata or {}
    except Exception as exc:
        raise _fail(path, f"cannot read Parquet schema: {type(exc).__name__}: {_one_line(exc)}") from exc
    return {k.decode("utf-8", "replace"): v.decode("utf-8", "replace") for k, v in raw.items()
            if not k.startswith(b"ARROW:")}


def _check_jet_features(path: Path, jets: np.ndarray) -> None:
    """Jet kinematics are all finite, or all NaN (absent); anything else is a corrupt file."""
    kin = jets[:, :3]
    if np.isinf(kin).any():
        bad = int(np.argmax(np.isinf(kin).any(axis=1)))
        raise _fail(path, f"jet {bad} has infinite jet features (pt, eta, mass)")
    nan = np.isnan(kin)
    if nan.any() and not nan.all():
        bad = int(np.argmax(nan.any(axis=1)))
        raise _fail(path, f"jet {bad} has NaN jet features (pt, eta, mass) while other jets have them")


def _read_parquet(path: Path) -> JetSample:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    needed = ("pt", "eta", "mass", "num_particles", *PARTICLE_FEATURES)
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise _fail(path, f"not a jet Parquet file: missing column(s) {', '.join(missing)}")
    n = table.num_rows
    if n == 0:
        raise _fail(path, "the dataset is empty (0 jets)")

    offsets = None
    feats = []
    for name in PARTICLE_FEATURES:
        col = table.column(name).combine_chunks()
        if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)):
            raise _fail(path, f"column {name!r} must be a list of floats, got {col.type}")
        if col.null_count:
            raise _fail(path, f"column {name!r} has missing (null) rows")
        values = col.flatten()
        if values.null_count:
            raise _fail(path, f"column {name!r} has null particle values")
        off = np.asarray(col.offsets, dtype=np.int64)
        off = off - off[0]
        if offsets is None:
            offsets = off
        elif not np.array_equal(offsets, off):
            raise _fail(path, f"column {name!r} has different particle counts than {PARTICLE_FEATURES[0]!r}")
        feats.append(np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float32))

    counts = np.diff(offsets)
    num = table.column("num_particles").to_numpy(zero_copy_only=False)
    if np.any(num != counts):
        bad = int(np.argmax(num != counts))
        raise _fail(path, f"jet {bad}: num_particles = {num[bad]} but it lists {counts[bad]} particles")
    jets = np.stack([np.asarray(table.column(c).to_numpy(zero_copy_only=False), dtype=np.float32)
                     for c in ("pt", "eta", "mass")] + [counts.astype(np.float32)], axis=1)
    _check_jet_features(path, jets)

    width = max(MAX_PARTICLES, int(counts.max()))
    particles = np.zeros((n, width, 3), dtype=np.float32)
    mask = np.zeros((n, width), dtype=bool)
    rows = np.repeat(np.arange(n), counts)
    cols = np.arange(int(offsets[-1])) - np.repeat(offsets[:-1], counts)
    particles[rows, cols] = np.stack(feats, axis=1)
    mask[rows, cols] = True
    return from_padded(particles, mask, jets, source=str(path))


def _jetnet_jet_features(path: Path, jet_features: np.ndarray | None, n: int) -> np.ndarray | None:
    """JetNet ``jet_features`` -> (N, 4) float32 (pt, eta, mass, multiplicity); None when absent.

    Accepted column layouts: (pt, eta, mass), (pt, eta, mass, num_particles) as in the JetNet HDF5 files,
    and (type, pt, eta, mass, num_particles) as returned by the ``jetnet`` library.
    """
    if jet_features is None:
        return None
    jf = _numeric(path, "jet_features", jet_features)
    if jf.ndim != 2 or jf.shape[0] != n or jf.shape[1] not in (3, 4, 5):
        raise _fail(path, f"jet_features must have shape ({n}, 3|4|5), got {jf.shape}")
    kin = jf[:, 1:4] if jf.shape[1] == 5 else jf[:, :3]
    out = np.zeros((n, len(JET_FEATURES)), dtype=np.float32)
    out[:, :3] = kin
    _check_jet_features(path, out)
    return out


def _numeric(path: Path, name: str, arr: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr)
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise _fail(path, f"{name!r} holds {arr.dtype} values, not numbers")
    return arr.astype(np.float32) if arr.dtype != bool else arr


def _from_jetnet_arrays(path: Path, arrays: Mapping[str, np.ndarray | None]) -> JetSample:
    if arrays.get("particle_features") is None:
        raise _fail(path, f"no 'particle_features' array (found: {', '.join(arrays['_keys']) or 'none'})")
    pf = _numeric(path, "particle_features", arrays["particle_features"])
    if pf.ndim != 3 or pf.shape[2] < 3:
        raise _fail(path, f"'particle_features' must have shape (N, P, >=3), got {pf.shape}")
    n = pf.shape[0]
    if n == 0:
        raise _fail(path, "the dataset is empty (0 jets)")
    mask = arrays.get("mask")
    if mask is not None:
        mask = np.asarray(_numeric(path, "mask", mask))
        if mask.ndim == 3 and mask.shape[2] == 1:
            mask = mask[:, :, 0]
        if mask.shape != pf.shape[:2]:
            raise _fail(path, f"'mask' shape {mask.shape} does not match particle_features {pf.shape[:2]}")
        mask = mask > 0.5 if mask.dtype != bool else mask
    jets = _jetnet_jet_features(path, arrays.get("jet_features"), n)
    return from_padded(pf, mask, jets, source=str(path))


def _read_npz(path: Path) -> JetSample:
    with np.load(path, allow_pickle=False) as npz:
        keys = list(npz.files)
        arrays = {k: (npz[k] if k in keys else None) for k in ("particle_features", "jet_features", "mask")}
    arrays["_keys"] = keys
    return _from_jetnet_arrays(path, arrays)


def _read_hdf5(path: Path) -> JetSample:
    import h5py

    with h5py.File(path, "r") as f:
        keys = list(f.keys())
        arrays: dict = {"_keys": keys}
        for k in ("particle_features", "jet_features", "mask"):
            if k not in f:
                arrays[k] = None
                continue
            obj = f[k]
            if not isinstance(obj, h5py.Dataset):
                raise _fail(path, f"{k!r} is an HDF5 group, not a dataset")
            arrays[k] = obj[()]
    return _from_jetnet_arrays(path, arrays)


def pyg_safe_globals() -> list:
    """The classes a pickled list of PyG ``Data`` needs beyond torch's own weights-only allowlist."""
    from torch_geometric.data import Data
    from torch_geometric.data.data import DataEdgeAttr, DataTensorAttr
    from torch_geometric.data.storage import GlobalStorage

    return [Data, DataEdgeAttr, DataTensorAttr, GlobalStorage]


def _read_torch(path: Path) -> JetSample:
    import pickle

    import torch

    try:
        safe = pyg_safe_globals()
    except ImportError as exc:
        raise _fail(path, f"reading .pt graph files needs torch_geometric ({_one_line(exc)})") from exc
    try:
        with torch.serialization.safe_globals(safe):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f"the global {found.group(1)}" if found else "a non-allowlisted object"
        raise _fail(path, f"refused to unpickle: it references {what}, not a tensor or a "
                          f"torch_geometric Data object (the file was not executed)") from exc
    return _graphs_to_sample(path, obj)


def _graphs_to_sample(path: Path, obj: object) -> JetSample:
    from torch_geometric.data import Data

    if isinstance(obj, dict):
        lists = [k for k in _GRAPH_LIST_KEYS if isinstance(obj.get(k), (list, tuple))]
        if not lists:
            keys = ", ".join(map(str, list(obj)[:8]))
            raise _fail(path, f"holds a dict (keys: {keys}); expected a list of torch_geometric Data, "
                              f"or a dict with it under {' or '.join(map(repr, _GRAPH_LIST_KEYS))}")
        obj = obj[lists[0]]
    elif isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], Data) and isinstance(obj[1], dict):
        raise _fail(path, "holds a collated (data, slices) InMemoryDataset pair; save a list of Data instead")
    if not isinstance(obj, (list, tuple)):
        raise _fail(path, f"holds a {type(obj).__name__}; expected a list of torch_geometric Data")
    if len(obj) == 0:
        raise _fail(path, "the dataset is empty (0 graphs)")

    import torch

    n = len(obj)
    particles = np.zeros((n, MAX_PARTICLES, 3), dtype=np.float32)
    mask = np.zeros((n, MAX_PARTICLES), dtype=bool)
    for i, graph in enumerate(obj):
        if not isinstance(graph, Data):
            raise _fail(path, f"item {i} is a {type(graph).__name__}, not a torch_geometric Data")
        x = graph.x if "x" in graph else None
        if x is None:
            raise _fail(path, f"graph {i} has no node features 'x'")
        if not torch.is_tensor(x) or x.dim() != 2 or x.shape[1] < 3:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise _fail(path, f"graph {i}: x must be a (nodes, >=3) tensor of "
                              f"(eta_rel, phi_rel, pt_rel, ...), got {shape}")
        if x.is_complex() or not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64)):
            raise _fail(path, f"graph {i}: x has dtype {x.dtype}, not real numbers")
        feats = x[:, :3].detach().to(torch.float32).numpy()
        real = (feats != 0).any(axis=1)  # all-zero rows are padding nodes
        feats = feats[real]
        order = np.argsort(-np.nan_to_num(feats[:, 2], nan=np.inf), kind="stable")[:MAX_PARTICLES]
        k = len(order)
        particles[i, :k] = feats[order]
        mask[i, :k] = True
    return from_padded(particles, mask, None, source=str(path))


__all__ = ["FORMAT_VERSION", "SUFFIXES", "detect_format", "load_jets", "pyg_safe_globals",
           "read_parquet_metadata", "save_parquet"]
