"""Reading and writing jet samples.

Formats read by :func:`load_jets` (chosen by suffix, checked against the file's content):

* ``.parquet`` -- this package's layout (see :func:`save_parquet`).
* ``.npz``, ``.h5``/``.hdf5`` -- JetNet arrays (Kansal et al., arXiv:2106.11535): ``particle_features``
  [N, P, >=3] with (eta_rel, phi_rel, pT_rel[, mask]) first, optional ``jet_features`` and optional
  ``mask`` [N, P].
* ``.pt`` -- a ``torch.save``-d list of ``torch_geometric.data.Data`` whose node features ``x`` start with
  (eta_rel, phi_rel, pT_rel), one node per particle. Loaded with ``torch.load(weights_only=True)`` and
  only PyG's ``Data`` classes allow-listed, so a file whose pickle names any other global is refused
  without running it. Edge and hyperedge attributes in the file are not used (the model computes its
  own from the particles); a logged warning says so.

Columns in another order, ln pT_rel, or normalised values are read through a declared layout
(:mod:`hvae_ray.data.layout`: a ``<file>.layout.yaml`` beside the file, or a ``layout`` inside it).

Every file's particles are checked against the physical ranges of (eta_rel, phi_rel, pT_rel)
(:func:`hvae_ray.data.jets.range_problem`). Every problem with an input file raises
:class:`hvae_ray.errors.DataError` with a single line that starts with the file's path; a range problem
names the jet (graph), the particle (node), the column and the value, what the columns look like, and
how to declare the layout.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from hvae_ray.data.jets import (
    JET_FEATURES,
    PARTICLE_FEATURES,
    JetSample,
    from_particles,
    range_problem,
)
from hvae_ray.data.layout import (
    Layout,
    check_columns,
    default_layout,
    diagnose_columns,
    find_layout,
    sidecar_path,
)
from hvae_ray.errors import DataError

log = logging.getLogger("hvae_ray.data")

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

    Refuses to replace an existing file (DataError) unless ``overwrite``. Written through
    :func:`hvae_ray.io_safe.atomic_write`: a fresh temporary file beside ``path``, renamed into place, so
    readers never see a partial file, a link at either name is never written through, and a failed
    write (a full disk) leaves no file behind and the old one untouched.
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

    from hvae_ray.io_safe import atomic_write

    try:
        atomic_write(path, lambda f: pq.write_table(table, f))
    except OSError as exc:
        raise _fail(path, f"cannot write: {exc.strerror or _one_line(exc)}; nothing was written") from exc
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


def load_jets(path: str | os.PathLike, layout: Mapping | Layout | None = None, *,
              check_ranges: bool = True) -> JetSample:
    """Read a jet sample from ``path`` (.parquet, .npz, .h5/.hdf5 or .pt); DataError on any bad input.

    ``layout``: the columns of a .npz/.h5/.pt file's particle features and their normalisation (a
    mapping as in :mod:`hvae_ray.data.layout`); None reads the layout declared beside or inside the
    file, else the default (eta_rel, phi_rel, pT_rel first, physical). ``check_ranges``: refuse
    particles outside the physical ranges (:func:`hvae_ray.data.jets.range_problem`); pass False only
    for a model's generated jets, whose departures from physics are what a metric measures.
    """
    path = Path(path)
    fmt = detect_format(path)
    reader = {"parquet": _read_parquet, "npz": _read_npz, "hdf5": _read_hdf5, "torch": _read_torch}[fmt]
    try:
        return reader(path, layout, check_ranges)
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


_PARQUET_LAYOUT = Layout(("eta_rel", "phi_rel", "pt_rel"), (0.0,) * 3, (1.0,) * 3)
_FORMAT_HOW = {
    "parquet": "this package's Parquet holds physical values: write it with save_parquet from physical "
               "(eta_rel, phi_rel, pT_rel), or bring the arrays as .npz with a declared layout",
}


def _how_to_declare(path: Path, what: str) -> str:
    return (f"if its columns are in another order or normalised, declare the layout of {what} in "
            f"{sidecar_path(path).name} beside the file "
            "(columns: [...] naming every column in order; normalisation: mean and std per column; "
            "see the README's \"Your own jets\")")


def _finish(path: Path, kind: str, stored: np.ndarray, jet: np.ndarray, index: np.ndarray, n_jets: int,
            layout: Layout, jets: np.ndarray | None, check: bool) -> JetSample:
    """Physical particles from the real particles' stored rows, checked, as a JetSample.

    stored: (M, C) the rows as in the file; jet, index: (M,) each row's jet (graph) and its position in
    it (slot, node, list entry); kind: parquet, arrays or graphs (for the wording of errors).
    """
    empty = np.bincount(jet, minlength=n_jets) == 0
    if empty.any():
        raise _fail(path, f"{_where(kind, int(np.argmax(empty)))} has no particles ({int(empty.sum())} such "
                          f"{'graphs' if kind == 'graphs' else 'jets'})")
    feats = layout.physical(stored)
    tiny = (feats[:, 2] < 0) & (feats[:, 2] >= -1e-6)  # rounding of an inverted normalisation
    feats[tiny, 2] = 0.0
    if check:
        problem = range_problem(feats, jet, n_jets, layout.jet_radius)
        if problem is not None:
            raise _fail(path, _range_message(path, kind, problem, stored, jet, index, n_jets, layout))
    else:
        bad = ~np.isfinite(feats).all(axis=1) | (feats[:, 2] < 0)
        if bad.any():
            k = int(np.argmax(bad))
            raise _fail(path, f"{_where(kind, int(jet[k]), int(index[k]))}: particle features "
                              f"{tuple(float(v) for v in feats[k])} are NaN/inf or have a negative pT_rel")
    return from_particles(feats, jet, n_jets, jets, source=str(path))


def _where(kind: str, jet: int, index: int | None = None) -> str:
    if kind == "graphs":
        return f"graph {jet}" + (f", node {index}" if index is not None else "")
    return f"jet {jet}" + (f", particle {index}" if index is not None else "")


def _column_label(kind: str, layout: Layout) -> Callable[[int], str]:
    if kind == "parquet":
        return lambda c: f"column {PARTICLE_FEATURES[c]!r}"
    if kind == "graphs":
        return lambda c: f"x column {c}"
    return lambda c: f"particle_features column {c}"


def _range_message(path: Path, kind: str, problem, stored: np.ndarray, jet: np.ndarray, index: np.ndarray,
                   n_jets: int, layout: Layout) -> str:
    label = _column_label(kind, layout)
    declared = layout.declared_in is not None
    if problem.row is not None and not np.isfinite(problem.value):
        k = problem.row
        c = layout.columns.index(problem.feature if problem.feature != "pt_rel" else layout.pt_column)
        part = "node" if kind == "graphs" else "particle"
        return (f"{_where(kind, int(jet[k]))} has NaN/inf particle features: {part} {int(index[k])} has "
                f"{problem.feature} = {problem.value} ({label(c)}; {problem.count} such value"
                f"{'s' if problem.count != 1 else ''})")
    if problem.feature == "sum_pt_rel":
        col = label(layout.columns.index(layout.pt_column))
        where = (f"the median over jets of the sum of pt_rel ({col}) is {problem.value:.4g}"
                 if problem.jet is None else
                 f"{_where(kind, problem.jet)}: the sum of pt_rel over its particles ({col}) is "
                 f"{problem.value:.4g} ({problem.count} such {'graph' if kind == 'graphs' else 'jet'}"
                 f"{'s' if problem.count != 1 else ''})")
        text = f"{where}, expected {problem.rule}"
    else:
        k = problem.row
        name = problem.feature if problem.feature != "pt_rel" else layout.pt_column
        c = layout.columns.index(name)
        raw = f"stored {float(stored[k, c]):.4g}, " if declared and layout.normalised else ""
        unit = ("particle" if kind != "graphs" else "node") + ("s" if problem.count != 1 else "")
        text = (f"{_where(kind, int(jet[k]), int(index[k]))}: {problem.feature} = {problem.value:.4g} "
                f"({raw}{label(c)}) is not physical: expected {problem.rule} ({problem.count} such {unit})")
    if declared:
        text += f"; read through the layout declared in {layout.declared_in}: check its columns and mean/std"
    hint = diagnose_columns(stored, jet, n_jets, layout, label)
    if hint:
        text += f"; {hint}"
    how = _FORMAT_HOW.get(kind) or _how_to_declare(path, "x" if kind == "graphs" else "particle_features")
    if not declared:
        text += f"; {how}"
    return text


def _read_parquet(path: Path, layout: Mapping | Layout | None, check: bool) -> JetSample:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if layout is not None or sidecar_path(path).is_file():
        raise _fail(path, "a layout applies to .npz, .h5 and .pt files; this package's Parquet names its "
                          "columns (etarel, phirel, ptrel) and holds physical values")
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
    jet = np.repeat(np.arange(n), counts)
    index = np.arange(int(offsets[-1])) - np.repeat(offsets[:-1], counts)
    return _finish(path, "parquet", np.stack(feats, axis=1), jet, index, n, _PARQUET_LAYOUT, jets, check)


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


def _from_jetnet_arrays(path: Path, arrays: Mapping[str, object], given: Mapping | Layout | None,
                        check: bool) -> JetSample:
    if arrays.get("particle_features") is None:
        raise _fail(path, f"no 'particle_features' array (found: {', '.join(arrays['_keys']) or 'none'})")
    pf = _numeric(path, "particle_features", arrays["particle_features"])
    if pf.ndim != 3 or pf.shape[2] < 3:
        raise _fail(path, f"'particle_features' must have shape (N, P, >=3), got {pf.shape}")
    n, _, n_cols = pf.shape
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
    layout = find_layout(path, arrays.get("layout"), given)
    if layout is None:
        # JetNet: a 4th column is the mask unless a separate mask is given; else zero rows are padding
        layout = default_layout(n_cols, mask_column=mask is None and n_cols >= 4)
        real = mask if mask is not None else (pf[:, :, 3] > 0.5 if n_cols >= 4 else (pf[:, :, :3] != 0).any(axis=2))
    else:
        check_columns(layout, n_cols, str(path), "particle_features")
        c = layout.index("mask")
        real = pf[:, :, c] > 0.5 if c is not None else mask if mask is not None else (pf != 0).any(axis=2)
    jet, index = np.nonzero(real)
    jets = _jetnet_jet_features(path, arrays.get("jet_features"), n)
    sample = _finish(path, "arrays", pf[jet, index], jet, index, n, layout, jets, check)
    if layout.declared_in is not None:
        log.warning("%s: particles read from %s (declared in %s)", path,
                    layout.describe("particle_features"), layout.declared_in)
    return sample


def _layout_text(value: object) -> str | None:
    """An in-file layout stored as a JSON string (a 0-d unicode array, bytes or str), else None."""
    if value is None:
        return None
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "US" or value.size != 1:
            raise DataError("'layout' must hold a JSON string")
        value = value.reshape(()).item()
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _read_npz(path: Path, layout: Mapping | Layout | None, check: bool) -> JetSample:
    with np.load(path, allow_pickle=False) as npz:
        keys = list(npz.files)
        arrays = {k: (npz[k] if k in keys else None) for k in ("particle_features", "jet_features", "mask")}
        try:
            arrays["layout"] = _layout_text(npz["layout"] if "layout" in keys else None)
        except DataError as exc:
            raise _fail(path, str(exc)) from exc
    arrays["_keys"] = keys
    return _from_jetnet_arrays(path, arrays, layout, check)


def _read_hdf5(path: Path, layout: Mapping | Layout | None, check: bool) -> JetSample:
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
        attrs = [f.attrs.get("layout")]
        if isinstance(f.get("particle_features"), h5py.Dataset):
            attrs.append(f["particle_features"].attrs.get("layout"))
        found = [a for a in attrs if a is not None]
        if len(found) > 1:
            raise _fail(path, "its layout is declared twice (file and particle_features attributes); keep one")
        try:
            arrays["layout"] = _layout_text(found[0]) if found else None
        except DataError as exc:
            raise _fail(path, str(exc)) from exc
    return _from_jetnet_arrays(path, arrays, layout, check)


def pyg_safe_globals() -> list:
    """The classes a pickled list of PyG ``Data`` needs beyond torch's own weights-only allowlist."""
    from torch_geometric.data import Data
    from torch_geometric.data.data import DataEdgeAttr, DataTensorAttr
    from torch_geometric.data.storage import GlobalStorage

    return [Data, DataEdgeAttr, DataTensorAttr, GlobalStorage]


def _read_torch(path: Path, layout: Mapping | Layout | None, check: bool) -> JetSample:
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
    return _graphs_to_sample(path, obj, layout, check)


#: Graph attributes the model builds itself from the particles.
_OWN_FEATURES = ("edge_index", "edge_attr", "hyperedge_index", "hyperedge_attr")
_OWN_TEXT = ("hvae-ray computes its own from the particles: edges between all particle pairs with "
             "ln Δ, ln kT, ln z, ln m², and kNN hyperedges in η-φ with ln m², ln Σ z_a z_b Δ_ab, ln Σ z")


def _graph_keys(graph) -> list[str]:
    keys = graph.keys() if callable(getattr(graph, "keys", None)) else graph.keys
    return [str(k) for k in keys]


def _graphs_to_sample(path: Path, obj: object, given: Mapping | Layout | None = None,
                      check: bool = True) -> JetSample:
    from torch_geometric.data import Data

    in_file = None
    if isinstance(obj, dict):
        lists = [k for k in _GRAPH_LIST_KEYS if isinstance(obj.get(k), (list, tuple))]
        if not lists:
            keys = ", ".join(map(str, list(obj)[:8]))
            raise _fail(path, f"holds a dict (keys: {keys}); expected a list of torch_geometric Data, "
                              f"or a dict with it under {' or '.join(map(repr, _GRAPH_LIST_KEYS))}")
        in_file = obj.get("layout")
        obj = obj[lists[0]]
    elif isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], Data) and isinstance(obj[1], dict):
        raise _fail(path, "holds a collated (data, slices) InMemoryDataset pair; save a list of Data instead")
    if not isinstance(obj, (list, tuple)):
        raise _fail(path, f"holds a {type(obj).__name__}; expected a list of torch_geometric Data")
    if len(obj) == 0:
        raise _fail(path, "the dataset is empty (0 graphs)")


    layout = find_layout(path, in_file, given)
    xs, unused, n_cols = _node_features(path, obj)
    counts = np.array([len(x) for x in xs])
    stored = np.concatenate(xs) if counts.sum() else np.zeros((0, n_cols), np.float32)
    jet = np.repeat(np.arange(len(xs)), counts)
    index = np.arange(len(stored)) - np.repeat(np.cumsum(counts) - counts, counts)
    if layout is None:
        layout = default_layout(n_cols)
    else:
        check_columns(layout, n_cols, str(path), "x")
    real = layout.mask(stored)
    if real is None:
        # One node per particle: the graph's own nodes are its particles, whatever their values. A node
        # at exactly (0, 0, 0) carries no pT: padding the graph should not hold (or declare a mask).
        real = np.ones(len(stored), dtype=bool)
        if check and len(stored):
            zero = (layout.physical(stored) == 0).all(axis=1)
            if zero.any():
                k = int(np.argmax(zero))
                raise _fail(path, f"graph {int(jet[k])}, node {int(index[k])}: (eta_rel, phi_rel, pt_rel) = "
                                  f"(0, 0, 0), a particle without pT ({int(zero.sum())} such nodes); a graph "
                                  "holds one node per particle: drop padding nodes, or name a mask column "
                                  f"in its layout ({sidecar_path(path).name})")
    sample = _finish(path, "graphs", stored[real], jet[real], index[real], len(xs), layout, None, check)
    _report_graph_layout(path, layout, sorted(unused))  # after the checks: a refused file gets one line
    return sample


def _node_features(path: Path, graphs) -> tuple[list[np.ndarray], set[str], int]:
    """Each graph's node features ``x`` (float32 arrays, checked: a real (nodes, >=3) tensor with as many
    rows as the graph's nodes and as many columns as graph 0's), the attributes the graphs carry besides,
    and the column count."""
    import torch
    from torch_geometric.data import Data

    xs, unused = [], set()
    n_cols = None
    for i, graph in enumerate(graphs):
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
        if n_cols is None:
            n_cols = int(x.shape[1])
        elif x.shape[1] != n_cols:
            raise _fail(path, f"graph {i}: x has {x.shape[1]} columns, graph 0 has {n_cols}")
        stated = graph._store.get("num_nodes") if hasattr(graph, "_store") else None
        if stated is not None and int(stated) != x.shape[0]:
            raise _fail(path, f"graph {i}: num_nodes = {int(stated)} but x has {x.shape[0]} rows")
        xs.append(x.detach().to(torch.float32).numpy())
        unused.update(k for k in _graph_keys(graph) if k not in ("x", "num_nodes"))

    return xs, unused, n_cols


def _report_graph_layout(path: Path, layout: Layout, unused: list[str]) -> None:
    """One line: which columns of x were read, and which of the file's attributes are not used."""
    text = f"{path}: particles read from {layout.describe('x')}"
    if layout.declared_in is not None:
        text += f" (declared in {layout.declared_in})"
    own = [k for k in unused if k in _OWN_FEATURES]
    other = [k for k in unused if k not in _OWN_FEATURES]
    if own:
        text += f"; its {', '.join(own)} {'is' if len(own) == 1 else 'are'} not used: {_OWN_TEXT}"
    if other:
        text += f"; also not used: {', '.join(other[:8])}{' ...' if len(other) > 8 else ''}"
    log.log(logging.WARNING if own or layout.declared_in is not None else logging.INFO, text)


__all__ = ["FORMAT_VERSION", "SUFFIXES", "detect_format", "load_jets", "pyg_safe_globals",
           "read_parquet_metadata", "save_parquet"]
