"""Jet file formats: round trips, JetNet arrays, PyG graph lists, and one-line errors for bad inputs."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch_geometric.data import Data

from hvae_ray.data.io import detect_format, load_jets, read_parquet_metadata, save_parquet
from hvae_ray.data.jets import MAX_PARTICLES, JetSample, from_padded
from hvae_ray.errors import DataError


def make_sample(n: int = 12, seed: int = 0, kinematics: bool = True) -> JetSample:
    """Random jets with 1..30 real particles each (pT-ordered, zero-padded)."""
    rng = np.random.default_rng(seed)
    particles = np.zeros((n, MAX_PARTICLES, 3), dtype=np.float32)
    mask = np.zeros((n, MAX_PARTICLES), dtype=bool)
    for i in range(n):
        k = int(rng.integers(1, MAX_PARTICLES + 1))
        pt = np.sort(rng.dirichlet(np.ones(k)))[::-1]
        particles[i, :k, 0] = rng.normal(0, 0.2, k)
        particles[i, :k, 1] = rng.normal(0, 0.2, k)
        particles[i, :k, 2] = pt
        mask[i, :k] = True
    jets = None
    if kinematics:
        jets = np.stack([rng.uniform(800, 1600, n), rng.uniform(-2.5, 2.5, n), rng.uniform(5, 250, n),
                         np.zeros(n)], axis=1)
    return from_padded(particles, mask, jets, source="<test>")


def assert_same_particles(a: JetSample, b: JetSample) -> None:
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_array_equal(a.particles, b.particles)
    np.testing.assert_array_equal(a.jets[:, 3], b.jets[:, 3])


def assert_one_line_error(excinfo: pytest.ExceptionInfo, path: Path) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    assert str(path) in msg
    return msg


# ---------------------------------------------------------------------------------------------- Parquet


def test_parquet_round_trip_with_metadata(tmp_path):
    sample = make_sample(25)
    path = save_parquet(sample, tmp_path / "jets.parquet", metadata={"flavor": "q", "seed": 7})
    back = load_jets(path)
    assert_same_particles(sample, back)
    np.testing.assert_array_equal(sample.jets, back.jets)
    assert back.has_jet_kinematics and back.source == str(path)
    meta = read_parquet_metadata(path)
    assert meta["flavor"] == "q" and meta["seed"] == "7" and meta["hvae_ray.format_version"] == "1"


def test_parquet_schema_has_only_real_particles(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    sample = make_sample(6)
    path = save_parquet(sample, tmp_path / "jets.parquet")
    table = pq.read_table(path)
    schema = table.schema
    for name in ("pt", "eta", "mass"):
        assert schema.field(name).type == pa.float32()
    assert schema.field("num_particles").type == pa.int32()
    for name in ("etarel", "phirel", "ptrel"):
        assert schema.field(name).type == pa.list_(pa.float32())
    lengths = [len(v) for v in table.column("ptrel").to_pylist()]
    assert lengths == sample.mask.sum(axis=1).tolist() == table.column("num_particles").to_pylist()
    first = table.column("ptrel").to_pylist()[0]
    assert first == sorted(first, reverse=True)


def test_parquet_without_kinematics_round_trips_as_nan(tmp_path):
    sample = make_sample(5, kinematics=False)
    back = load_jets(save_parquet(sample, tmp_path / "j.parquet"))
    assert not back.has_jet_kinematics
    assert_same_particles(sample, back)


def test_save_refuses_overwrite_and_keeps_old_file(tmp_path):
    path = save_parquet(make_sample(4, seed=1), tmp_path / "jets.parquet")
    before = path.read_bytes()
    with pytest.raises(DataError) as excinfo:
        save_parquet(make_sample(9, seed=2), path)
    assert "exists" in assert_one_line_error(excinfo, path)
    assert path.read_bytes() == before
    save_parquet(make_sample(9, seed=2), path, overwrite=True)
    assert len(load_jets(path)) == 9
    assert [p.name for p in tmp_path.iterdir()] == ["jets.parquet"]  # no temp files left behind


# ------------------------------------------------------------------------------------------ JetNet arrays


def jetnet_arrays(sample: JetSample, mask_column: bool):
    pf = sample.particles
    if mask_column:
        pf = np.concatenate([pf, sample.mask[..., None].astype(np.float32)], axis=2)
    jf = sample.jets.copy()  # JetNet HDF5 layout: (pt, eta, mass, num_particles)
    return pf, jf


@pytest.mark.parametrize("mask_column", [True, False])
def test_npz_jetnet_layout(tmp_path, mask_column):
    sample = make_sample(10)
    pf, jf = jetnet_arrays(sample, mask_column)
    # Shuffle the particle order: the loader must re-sort by pT.
    perm = np.random.default_rng(3).permutation(MAX_PARTICLES)
    path = tmp_path / "jets.npz"
    np.savez(path, particle_features=pf[:, perm], jet_features=jf)
    back = load_jets(path)
    assert_same_particles(sample, back)
    np.testing.assert_allclose(back.jets[:, :3], sample.jets[:, :3])


def test_npz_separate_mask_and_no_jet_features(tmp_path):
    sample = make_sample(8)
    pf = sample.particles.copy()
    pf[~sample.mask] = 5.0  # garbage in padded slots is ignored when a mask is given
    path = tmp_path / "jets.npz"
    np.savez(path, particle_features=pf, mask=sample.mask)
    back = load_jets(path)
    assert_same_particles(sample, back)
    assert not back.has_jet_kinematics


@pytest.mark.parametrize("mask_column", [True, False])
@pytest.mark.parametrize("suffix", [".h5", ".hdf5"])
def test_hdf5_jetnet_layout(tmp_path, mask_column, suffix):
    sample = make_sample(10)
    pf, jf = jetnet_arrays(sample, mask_column)
    path = tmp_path / f"jets{suffix}"
    with h5py.File(path, "w") as f:
        f["particle_features"] = pf
        f["jet_features"] = jf
    back = load_jets(path)
    assert_same_particles(sample, back)
    np.testing.assert_allclose(back.jets[:, :3], sample.jets[:, :3])


# ---------------------------------------------------------------------------------------------- PyG .pt


def to_graphs(sample: JetSample, extra_columns: int = 0) -> list[Data]:
    graphs = []
    for i in range(len(sample)):
        k = int(sample.mask[i].sum())
        x = torch.from_numpy(sample.particles[i, :k][::-1].copy())  # reversed: loader sorts by pT
        if extra_columns:
            x = torch.cat([x, torch.randn(k, extra_columns)], dim=1)
        src, dst = torch.meshgrid(torch.arange(k), torch.arange(k), indexing="ij")
        keep = src != dst
        graphs.append(Data(x=x, edge_index=torch.stack([src[keep], dst[keep]]), y=torch.tensor([1])))
    return graphs


def test_pyg_list_round_trip(tmp_path):
    sample = make_sample(15)
    path = tmp_path / "graphs_pyg_particle__fully_connected_q.pt"
    torch.save(to_graphs(sample, extra_columns=2), path)
    back = load_jets(path)
    assert_same_particles(sample, back)
    assert not back.has_jet_kinematics


def test_pyg_dict_with_graphs_key(tmp_path):
    sample = make_sample(5)
    path = tmp_path / "g.pt"
    torch.save({"graphs": to_graphs(sample)}, path)
    assert_same_particles(sample, load_jets(path))


def test_pyg_keeps_30_hardest(tmp_path):
    rng = np.random.default_rng(0)
    x = torch.from_numpy(np.stack([rng.normal(0, 0.2, 45), rng.normal(0, 0.2, 45), rng.uniform(0.001, 0.05, 45)],
                                  axis=1).astype(np.float32))
    path = tmp_path / "big.pt"
    torch.save([Data(x=x)], path)
    back = load_jets(path)
    expected = np.sort(x[:, 2].numpy())[::-1][:MAX_PARTICLES]
    np.testing.assert_array_equal(back.particles[0, :, 2], expected)
    assert back.jets[0, 3] == MAX_PARTICLES


class Payload:
    """Unpickling an instance would create the marker file named in ``__setstate__``."""

    def __init__(self, marker: str):
        self.marker = marker

    def __setstate__(self, state):
        Path(state["marker"]).write_text("executed")


class SystemCall:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plain_pickle(obj, path):
    with open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=2)


@pytest.mark.parametrize("save", [torch.save, _plain_pickle], ids=["torch.save", "pickle.dump"])
@pytest.mark.parametrize("payload", [Payload, SystemCall])
def test_foreign_pickle_is_refused_and_not_executed(tmp_path, payload, save):
    marker = tmp_path / "side_effect"
    path = tmp_path / "evil.pt"
    graphs = to_graphs(make_sample(2))
    save([graphs[0], payload(str(marker)), graphs[1]], path)
    assert not marker.exists()
    with pytest.raises(DataError) as excinfo:
        load_jets(path)
    msg = assert_one_line_error(excinfo, path)
    assert "refused" in msg
    assert not marker.exists()


# ------------------------------------------------------------------------------------------- bad inputs


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def _npz_with(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def _pt_with(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


def _h5_with(path: Path, **arrays) -> Path:
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            f[k] = v
    return path


def _zip_not_npz(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("readme.txt", "hello")
    return path


def _truncated_parquet(path: Path) -> Path:
    save_parquet(make_sample(5), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _nan_particles() -> np.ndarray:
    pf = make_sample(4).particles.copy()
    pf[2, 0, 1] = np.nan
    return pf


def _empty_jet_particles() -> np.ndarray:
    pf = make_sample(4).particles.copy()
    pf[1] = 0.0
    return pf


def _empty_parquet(path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    lst = pa.list_(pa.float32())
    table = pa.table({"pt": pa.array([], pa.float32()), "eta": pa.array([], pa.float32()),
                      "mass": pa.array([], pa.float32()), "num_particles": pa.array([], pa.int32()),
                      "etarel": pa.array([], lst), "phirel": pa.array([], lst), "ptrel": pa.array([], lst)})
    pq.write_table(table, path)
    return path


def _foreign_parquet(path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"a": [1, 2, 3]}), path)
    return path


BAD_INPUTS = {
    "missing": (lambda d: d / "nope.parquet", "no such file"),
    "directory": (lambda d: (d / "dir.parquet").mkdir() or d / "dir.parquet", "directory"),
    "text as parquet": (lambda d: _write(d / "t.parquet", b"pt,eta\n1,2\n"), "not a Parquet file"),
    "empty file": (lambda d: _write(d / "e.npz", b""), "empty"),
    "unknown suffix": (lambda d: _write(d / "jets.csv", b"a,b\n"), "unknown file type"),
    "zip not npz": (lambda d: _zip_not_npz(d / "z.npz"), "not a NumPy .npz file"),
    "text as h5": (lambda d: _write(d / "t.h5", b"hello"), "not an HDF5 file"),
    "text as pt": (lambda d: _write(d / "t.pt", b"hello"), "not a PyTorch file"),
    "truncated parquet": (lambda d: _truncated_parquet(d / "cut.parquet"), "cannot read Parquet"),
    "foreign parquet": (lambda d: _foreign_parquet(d / "f.parquet"), "missing column"),
    "empty parquet": (lambda d: _empty_parquet(d / "e.parquet"), "empty"),
    "npz no particle_features": (lambda d: _npz_with(d / "k.npz", foo=np.zeros(3)), "particle_features"),
    "npz wrong shape": (lambda d: _npz_with(d / "s.npz", particle_features=np.zeros((4, 30))), "shape"),
    "npz empty": (lambda d: _npz_with(d / "e0.npz", particle_features=np.zeros((0, 30, 3))), "empty"),
    "npz NaN": (lambda d: _npz_with(d / "nan.npz", particle_features=_nan_particles()), "NaN"),
    "npz jet without particles": (lambda d: _npz_with(d / "ep.npz", particle_features=_empty_jet_particles()),
                                  "no particles"),
    "npz inf jet features": (lambda d: _npz_with(d / "inf.npz", particle_features=make_sample(3).particles,
                                                 jet_features=np.full((3, 4), np.inf)), "infinite"),
    "npz object array": (lambda d: _npz_with(d / "o.npz", particle_features=np.array([{}], dtype=object)),
                         "cannot read"),
    "h5 no particle_features": (lambda d: _h5_with(d / "k.h5", other=np.zeros(3)), "particle_features"),
    "pt not a list": (lambda d: _pt_with(d / "t.pt", torch.zeros(3, 3)), "expected a list"),
    "pt empty list": (lambda d: _pt_with(d / "e.pt", []), "empty"),
    "pt list of tensors": (lambda d: _pt_with(d / "lt.pt", [torch.zeros(3, 3)]),
                           "not a torch_geometric Data"),
    "pt Data without x": (lambda d: _pt_with(d / "nx.pt", [Data(pos=torch.zeros(3, 3))]), "no node features"),
    "pt x with 2 columns": (lambda d: _pt_with(d / "x2.pt", [Data(x=torch.ones(4, 2))]), "x must be"),
    "pt dict other keys": (lambda d: _pt_with(d / "dk.pt", {"foo": [Data(x=torch.ones(2, 3))]}), "dict"),
    "pt NaN": (lambda d: _pt_with(d / "nan.pt", [Data(x=torch.tensor([[0.1, 0.1, float("nan")]]))]), "NaN"),
    "pt graph without nodes": (lambda d: _pt_with(d / "z.pt", [Data(x=torch.full((2, 3), 0.3)),
                                                                Data(x=torch.zeros(0, 3))]),
                               "graph 1 has no particles"),
    "pt zero-padding nodes": (lambda d: _pt_with(d / "zp.pt", [Data(x=torch.full((2, 3), 0.3)),
                                                               Data(x=torch.zeros(3, 3))]),
                              "graph 1, node 0: (eta_rel, phi_rel, pt_rel) = (0, 0, 0)"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_line_data_error(tmp_path, case):
    make, expected = BAD_INPUTS[case]
    path = make(tmp_path)
    with pytest.raises(DataError) as excinfo:
        load_jets(path)
    msg = assert_one_line_error(excinfo, path)
    assert expected.lower() in msg.lower(), msg


def test_detect_format_by_suffix_and_content(tmp_path):
    path = save_parquet(make_sample(3), tmp_path / "a.parquet")
    assert detect_format(path) == "parquet"
    renamed = tmp_path / "a.data"
    path.rename(renamed)
    with pytest.raises(DataError, match=r"rename it to \.parquet"):
        detect_format(renamed)


# ------------------------------------------------------------------------------------------ safe writes


def test_save_replaces_a_link_at_the_target_never_its_victim(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    path = tmp_path / "jets.parquet"
    path.symlink_to(victim)
    with pytest.raises(DataError, match="exists"):
        save_parquet(make_sample(4), path)
    save_parquet(make_sample(4), path, overwrite=True)
    assert victim.read_text() == "precious"
    assert not path.is_symlink() and len(load_jets(path)) == 4


def test_full_disk_is_one_line_and_leaves_the_old_file(tmp_path):
    """A file-size limit stands in for a full disk: the write fails, the old file stays whole, and no
    temporary file is left."""
    path = save_parquet(make_sample(4, seed=1), tmp_path / "jets.parquet")
    before = path.read_bytes()
    script = f"""
import resource, signal
import numpy as np
from hvae_ray.data.io import save_parquet
from hvae_ray.data.jets import from_padded
from hvae_ray.errors import DataError
rng = np.random.default_rng(2)
particles = np.stack([rng.normal(0, 0.1, (400, 30)), rng.normal(0, 0.1, (400, 30)),
                      np.full((400, 30), 1 / 30)], axis=2)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    save_parquet(from_padded(particles), {str(path)!r}, overwrite=True)
except DataError as exc:
    print("DataError:", exc)
"""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(root)})
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith(f"DataError: {path}: cannot write: File too large")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["jets.parquet"]
