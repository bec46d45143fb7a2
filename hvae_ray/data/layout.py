"""Which columns of a file's per-particle features hold (η_rel, φ_rel, pT_rel), and how to undo their
normalisation.

A JetNet array (``particle_features`` of a ``.npz``/``.h5``) or a PyG graph's node features ``x`` is a
table with one row per particle. Without a declaration its first three columns are read as physical
(η_rel, φ_rel, pT_rel), as JetNet stores them (Kansal et al., arXiv:2106.11535), and for JetNet arrays a
4th column, if present, as the mask. Anything else is declared, in YAML or as a dict::

    columns: [pt_rel, eta_rel, phi_rel, e_rel]   # every column of x, in order
    normalisation:                               # optional: stored = (physical - mean) / std
      mean: {pt_rel: 0.031, eta_rel: 0.0, phi_rel: 0.0}
      std:  {pt_rel: 0.052, eta_rel: 0.11, phi_rel: 0.11}
    jet_radius: 0.8                              # optional: R of the jets (the range check's bound)

Column names: ``eta_rel``, ``phi_rel``, ``pt_rel`` or ``log_pt_rel`` (ln pT_rel), ``mask`` (1 for a
particle, 0 for padding); JetNet's spellings ``etarel``, ``phirel``, ``ptrel`` are accepted too. Other
names (``e_rel``, ``charge``, ...) are columns that are not used. ``mean`` and ``std`` are a mapping from
column name to value, or a list with one value per column; a column left out is not normalised. Min-max
scaling, stored = (physical - min) / (max - min), is ``mean: min``, ``std: max - min``. Instead of the
two, ``stats: FILE`` names a ``.npz`` (arrays ``mean`` and ``std``), ``.yaml``/``.json`` (the same two
keys) or ``.pt`` (a dict of two tensors, loaded with ``weights_only=True``) holding one value per
column, relative to the folder of the file that names it.

Where a layout is declared (see :func:`find_layout`): ``<data file>.layout.yaml`` beside the data file
(``jets.pt.layout.yaml``), or inside the file itself: a ``.pt`` saved as
``{"graphs": [...], "layout": {...}}``, a ``.npz`` member ``layout`` or an HDF5 attribute ``layout``
holding the mapping as a JSON string.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hvae_ray.data.jets import ANGLE_MARGIN, JET_RADIUS, PT_REL_TOLERANCE, PT_SUM_MAX, PT_SUM_MEDIAN_MIN
from hvae_ray.errors import DataError

#: The physical quantities a column can hold, and the mask.
KNOWN_COLUMNS = ("eta_rel", "phi_rel", "pt_rel", "log_pt_rel", "mask")
ALIASES = {"etarel": "eta_rel", "phirel": "phi_rel", "ptrel": "pt_rel", "log_ptrel": "log_pt_rel"}
SIDECAR_SUFFIX = ".layout.yaml"
_KEYS = ("columns", "normalisation", "normalization", "jet_radius")
_NORM_KEYS = ("mean", "std", "stats")
_MAX_COLUMNS = 4096
_MAX_LAYOUT_BYTES = 1 << 20


@dataclass(frozen=True)
class Layout:
    """The meaning of each stored column.

    columns: one name per stored column (see the module); mean/std: per stored column, physical =
    stored · std + mean (0 and 1 for a column that is not normalised); jet_radius: R of the jets;
    declared_in: where it was declared (None for the default).
    """

    columns: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    jet_radius: float = JET_RADIUS
    declared_in: str | None = None

    @property
    def pt_column(self) -> str:
        return "pt_rel" if "pt_rel" in self.columns else "log_pt_rel"

    def index(self, name: str) -> int | None:
        return self.columns.index(name) if name in self.columns else None

    @property
    def normalised(self) -> bool:
        return any(m != 0.0 for m in self.mean) or any(s != 1.0 for s in self.std)

    def physical(self, stored: np.ndarray) -> np.ndarray:
        """Stored rows (M, C) → physical (η_rel, φ_rel, pT_rel) (M, 3), float32."""
        out = np.empty((stored.shape[0], 3), dtype=np.float32)
        for k, name in enumerate(("eta_rel", "phi_rel", self.pt_column)):
            c = self.columns.index(name)
            col = stored[:, c].astype(np.float64) * self.std[c] + self.mean[c]
            if name == "log_pt_rel":
                with np.errstate(over="ignore"):
                    col = np.exp(col)
            out[:, k] = col
        return out

    def mask(self, stored: np.ndarray) -> np.ndarray | None:
        """The declared mask column as bool (M,), or None when the layout has none."""
        c = self.index("mask")
        return None if c is None else stored[:, c] > 0.5

    def describe(self, what: str) -> str:
        """E.g. ``x columns 1 (eta_rel), 2 (phi_rel), 0 (pt_rel, mean 0.031, std 0.052)``."""
        parts = []
        for name in ("eta_rel", "phi_rel", self.pt_column, "mask"):
            c = self.index(name)
            if c is None:
                continue
            norm = f", mean {self.mean[c]:.4g}, std {self.std[c]:.4g}" if (self.mean[c], self.std[c]) != (0, 1) else ""
            parts.append(f"{c} ({name}{norm})")
        unused = [f"{c} ({n})" for c, n in enumerate(self.columns) if n not in KNOWN_COLUMNS]
        text = f"{what} columns {', '.join(parts)}"
        if unused:
            text += f"; not used: {', '.join(unused)}"
        return text


def default_layout(n_columns: int, mask_column: bool = False) -> Layout:
    """The undeclared layout: (η_rel, φ_rel, pT_rel[, mask]) first, physical; other columns unused."""
    names = ["eta_rel", "phi_rel", "pt_rel"] + (["mask"] if mask_column else [])
    names += [f"column_{c}" for c in range(len(names), n_columns)]
    return Layout(tuple(names), (0.0,) * n_columns, (1.0,) * n_columns)


def _bad(where: str, problem: str) -> DataError:
    return DataError(f"{where}: {problem}")


def _number(where: str, key: str, value: object, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise _bad(where, f"{key} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0):
        raise _bad(where, f"{key} must be a finite{' positive' if positive else ''} number, got {value!r}")
    return value


def _per_column(where: str, key: str, value: object, columns: tuple[str, ...], fill: float,
                positive: bool) -> list[float]:
    """``mean``/``std`` as a mapping name → value or a list with one value per column."""
    out = [fill] * len(columns)
    if isinstance(value, Mapping):
        for name, v in value.items():
            name = ALIASES.get(name, name) if isinstance(name, str) else name
            if name not in columns:
                raise _bad(where, f"normalisation {key} names {name!r}, which is not among columns "
                                  f"{list(columns)}")
            out[columns.index(name)] = _number(where, f"{key}[{name}]", v, positive)
        return out
    if hasattr(value, "tolist"):  # numpy array or tensor from a stats file
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        if len(value) != len(columns):
            raise _bad(where, f"normalisation {key} has {len(value)} values for {len(columns)} columns "
                              f"{list(columns)}")
        return [_number(where, f"{key}[{columns[c]}]", v, positive) for c, v in enumerate(value)]
    raise _bad(where, f"normalisation {key} must be a mapping column -> value or a list, "
                      f"got {type(value).__name__}")


def parse_layout(raw: object, where: str, base_dir: Path | None = None) -> Layout:
    """A declared layout (a mapping as in the module's docstring) → :class:`Layout`; DataError naming
    ``where`` for anything wrong. ``base_dir``: the folder a ``stats`` file is relative to."""
    if isinstance(raw, Layout):
        return raw
    if not isinstance(raw, Mapping):
        raise _bad(where, f"a layout must be a mapping with 'columns', got {type(raw).__name__}")
    unknown = [str(k) for k in raw if k not in _KEYS]
    if unknown:
        raise _bad(where, f"unknown layout key {unknown[0]!r}; use {', '.join(_KEYS[:2])}, jet_radius")
    cols = raw.get("columns")
    if not isinstance(cols, (list, tuple)) or not cols or len(cols) > _MAX_COLUMNS:
        raise _bad(where, "layout 'columns' must be a list naming every column in order, "
                          "e.g. [eta_rel, phi_rel, pt_rel]")
    if not all(isinstance(c, str) and c for c in cols):
        raise _bad(where, "layout 'columns' must be names (strings)")
    columns = tuple(ALIASES.get(c, c) for c in cols)
    dupes = sorted({c for c in columns if columns.count(c) > 1})
    if dupes:
        raise _bad(where, f"layout 'columns' names {dupes[0]!r} twice")
    missing = [n for n in ("eta_rel", "phi_rel") if n not in columns]
    if "pt_rel" not in columns and "log_pt_rel" not in columns:
        missing.append("pt_rel (or log_pt_rel)")
    if missing:
        raise _bad(where, f"layout 'columns' {list(cols)} lacks {', '.join(missing)}")
    if "pt_rel" in columns and "log_pt_rel" in columns:
        raise _bad(where, "layout 'columns' has both pt_rel and log_pt_rel; name one of them")

    mean, std = [0.0] * len(columns), [1.0] * len(columns)
    norm = raw.get("normalisation", raw.get("normalization"))
    if "normalisation" in raw and "normalization" in raw:
        raise _bad(where, "layout has both 'normalisation' and 'normalization'")
    if norm is not None:
        if not isinstance(norm, Mapping):
            raise _bad(where, "layout 'normalisation' must be a mapping with mean and std (or stats)")
        unknown = [str(k) for k in norm if k not in _NORM_KEYS]
        if unknown:
            raise _bad(where, f"unknown normalisation key {unknown[0]!r}; use mean and std, or stats")
        if "stats" in norm:
            if "mean" in norm or "std" in norm:
                raise _bad(where, "normalisation gives both 'stats' and mean/std; give one")
            norm = _read_stats(where, norm["stats"], base_dir)
        mean = _per_column(where, "mean", norm.get("mean", [0.0] * len(columns)), columns, 0.0, False)
        std = _per_column(where, "std", norm.get("std", [1.0] * len(columns)), columns, 1.0, True)
        c = columns.index("mask") if "mask" in columns else None
        if c is not None and (mean[c], std[c]) != (0.0, 1.0):
            raise _bad(where, "the mask column cannot be normalised")
    radius = _number(where, "jet_radius", raw.get("jet_radius", JET_RADIUS), positive=True)
    return Layout(columns, tuple(mean), tuple(std), radius, where)


def _read_stats(where: str, name: object, base_dir: Path | None) -> dict:
    """mean/std from a stats file (.npz, .yaml/.yml/.json or .pt), never running code in it."""
    if not isinstance(name, str) or not name:
        raise _bad(where, "normalisation 'stats' must be a file name")
    path = Path(name).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if not path.is_file():
        raise _bad(where, f"normalisation stats file {path} not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                out = {k: npz[k] for k in ("mean", "std") if k in npz.files}
        elif suffix in (".yaml", ".yml", ".json"):
            out = _read_mapping(path)
        elif suffix == ".pt":
            import torch

            out = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise _bad(where, f"normalisation stats file {path}: use .npz, .yaml, .json or .pt")
    except DataError:
        raise
    except Exception as exc:  # any reader's error becomes one line naming the file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _bad(where, f"cannot read normalisation stats file {path}: {first}") from exc
    if not isinstance(out, Mapping) or "mean" not in out or "std" not in out:
        raise _bad(where, f"normalisation stats file {path} must hold 'mean' and 'std'")
    return {"mean": out["mean"], "std": out["std"]}


def _read_mapping(path: Path) -> object:
    import yaml

    if path.stat().st_size > _MAX_LAYOUT_BYTES:
        raise _bad(str(path), f"larger than {_MAX_LAYOUT_BYTES >> 20} MiB; a layout is a few lines")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        return json.loads(text)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        raise _bad(str(path), f"not valid YAML{line}") from exc


def sidecar_path(data_path: str | os.PathLike) -> Path:
    """``jets.pt`` → ``jets.pt.layout.yaml`` (same folder)."""
    data_path = Path(data_path)
    return data_path.with_name(data_path.name + SIDECAR_SUFFIX)


def find_layout(data_path: Path, in_file: object | None, given: object | None = None) -> Layout | None:
    """The layout declared for ``data_path``: ``given`` (from the caller's config) first, else the one
    stored in the file (``in_file``, a mapping or a JSON string) or its sidecar YAML; both of these at
    once is refused as ambiguous. None when nothing is declared."""
    if given is not None:
        return parse_layout(given, f"{data_path}: the data layout", data_path.parent)
    side = sidecar_path(data_path)
    has_side = side.is_file()
    if in_file is not None and has_side:
        raise _bad(str(data_path), f"its layout is declared twice, in the file and in {side.name}; "
                                   "keep one")
    if in_file is not None:
        if isinstance(in_file, (str, bytes)):
            try:
                in_file = json.loads(in_file)
            except ValueError as exc:
                raise _bad(str(data_path), "its 'layout' is not a JSON mapping") from exc
        return parse_layout(in_file, f"{data_path} (its layout)", data_path.parent)
    if has_side:
        try:
            raw = _read_mapping(side)
        except OSError as exc:
            raise _bad(str(side), f"cannot read: {exc.strerror or type(exc).__name__}") from exc
        return parse_layout(raw if raw is not None else {}, str(side), side.parent)
    return None


def check_columns(layout: Layout, n_columns: int, where: str, what: str) -> None:
    """The layout names every stored column (so their order is stated, not guessed)."""
    if len(layout.columns) != n_columns:
        raise _bad(where, f"the layout ({layout.declared_in}) names {len(layout.columns)} columns "
                          f"{list(layout.columns)}, but {what} has {n_columns}; name every column in order")


def _column_stats(values: np.ndarray, jet: np.ndarray, n_jets: int) -> dict[str, float]:
    v = values.astype(np.float64)
    has = np.bincount(jet, minlength=n_jets) > 0
    with np.errstate(over="ignore", invalid="ignore"):
        sums = np.bincount(jet, weights=v, minlength=n_jets)[has]
        exp_sums = np.bincount(jet, weights=np.exp(np.minimum(v, 50.0)), minlength=n_jets)[has]
    return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "max": float(v.max()),
            "sum": float(np.median(sums)) if len(sums) else 0.0,
            "exp_sum": float(np.median(exp_sums)) if len(exp_sums) else 0.0}


def _pt_like(st: dict[str, float]) -> bool:
    return (st["min"] >= 0 and st["max"] <= 1 + PT_REL_TOLERANCE
            and PT_SUM_MEDIAN_MIN <= st["sum"] <= PT_SUM_MAX)


def _log_pt_like(st: dict[str, float]) -> bool:
    return (st["max"] <= PT_REL_TOLERANCE and st["min"] > -40 and st["std"] > 0
            and PT_SUM_MEDIAN_MIN <= st["exp_sum"] <= PT_SUM_MAX)


def _standardised(st: dict[str, float]) -> bool:
    return st["min"] < 0 and abs(st["mean"]) < 0.15 and 0.7 < st["std"] < 1.4


def _angle_like(st: dict[str, float], radius: float) -> bool:
    return st["min"] < 0 < st["max"] and max(-st["min"], st["max"]) <= radius + ANGLE_MARGIN


def diagnose_columns(stored: np.ndarray, jet: np.ndarray, n_jets: int, layout: Layout, label) -> str:
    """What the stored columns look like, when the layout reads them as unphysical values: which look
    standardised, which column looks like pT_rel (or ln pT_rel) if not the one read as it, and the
    ``columns:`` line that would read them in that order. ``stored`` (M, C) are the real particles'
    rows, ``jet`` (M,) their jets; ``label(c)`` names column c (``x column 2``). Empty if nothing
    stands out."""
    finite = np.isfinite(stored).all(axis=1)
    stored, jet = stored[finite], jet[finite]
    if not len(stored):
        return ""
    n_cols = stored.shape[1]
    stats = [_column_stats(stored[:, c], jet, n_jets) for c in range(n_cols)]
    hints = []
    std_cols = [c for c in range(n_cols) if layout.columns[c] in KNOWN_COLUMNS and layout.columns[c] != "mask"
                and (layout.mean[c], layout.std[c]) == (0.0, 1.0) and _standardised(stats[c])]
    if std_cols:
        one = len(std_cols) == 1
        hints.append(f"{', '.join(label(c) for c in std_cols)} look{'s' if one else ''} standardised "
                     f"(mean ≈ 0, std ≈ 1), so {'its' if one else 'their'} mean and std belong in the layout")
    p = layout.columns.index(layout.pt_column)
    read_ok = _pt_like(stats[p]) if layout.pt_column == "pt_rel" else _log_pt_like(stats[p])
    if not read_ok or layout.normalised:
        pt_cols = [c for c in range(n_cols) if c != p and layout.columns[c] != "mask" and _pt_like(stats[c])]
        log_cols = [c for c in range(n_cols) if c != p and layout.columns[c] != "mask" and _log_pt_like(stats[c])]
        if layout.pt_column == "pt_rel" and _log_pt_like(stats[p]):
            hints.append(f"{label(p)} looks like ln pT_rel (all <= 0): declare it as log_pt_rel")
        elif pt_cols or log_cols:
            c = (pt_cols or log_cols)[0]
            name = "pt_rel" if pt_cols else "log_pt_rel"
            what = (f"values in [0, 1] summing to {stats[c]['sum']:.2f} per jet" if pt_cols
                    else "ln pT_rel, all <= 0")
            names = _suggest(layout, stats, c, name)
            hints.append(f"{label(c)} (read as {layout.columns[c]}) looks like {name} ({what}): the columns "
                         f"may be in another order, e.g. columns: [{', '.join(names)}]")
    return "; ".join(hints)


def _suggest(layout: Layout, stats: list[dict[str, float]], pt_col: int, pt_name: str) -> list[str]:
    """A ``columns`` list with ``pt_name`` at ``pt_col`` and η_rel, φ_rel at the first two columns
    that look like angles (else the first two others), keeping every other name."""
    names = [n if n not in ("eta_rel", "phi_rel", "pt_rel", "log_pt_rel") else f"column_{c}"
             for c, n in enumerate(layout.columns)]
    names[pt_col] = pt_name
    free = [c for c in range(len(names)) if c != pt_col and names[c] != "mask"]
    angles = [c for c in free if _angle_like(stats[c], layout.jet_radius)]
    picks = (angles + [c for c in free if c not in angles])[:2]
    for c, name in zip(sorted(picks), ("eta_rel", "phi_rel")):
        names[c] = name
    return names


__all__ = ["ALIASES", "KNOWN_COLUMNS", "SIDECAR_SUFFIX", "Layout", "check_columns", "default_layout",
           "diagnose_columns", "find_layout", "parse_layout", "sidecar_path"]
