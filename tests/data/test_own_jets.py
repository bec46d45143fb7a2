"""Your own jets, read right: declared layouts (column order, ln pT, mean/std) for PyG .pt and JetNet
arrays, and the physical-range checks that refuse what is not (η_rel, φ_rel, pT_rel), in one line."""

from __future__ import annotations

import json
import logging

import h5py
import numpy as np
import pytest
import torch
import yaml
from torch_geometric.data import Data

from hvae_ray.cli import main
from hvae_ray.data.io import load_jets, save_parquet
from hvae_ray.data.jets import MAX_PARTICLES, JetSample, from_padded, range_problem
from hvae_ray.errors import DataError


def physical_jets(n: int = 40, seed: int = 0) -> JetSample:
    """Jets with 8..30 particles each, in JetNet's ranges: |η|, |φ| ~ 0.1, pT_rel summing to 1."""
    rng = np.random.default_rng(seed)
    particles = np.zeros((n, MAX_PARTICLES, 3), dtype=np.float32)
    mask = np.zeros((n, MAX_PARTICLES), dtype=bool)
    for i in range(n):
        k = int(rng.integers(8, MAX_PARTICLES + 1))
        particles[i, :k, 0] = rng.normal(0, 0.1, k)
        particles[i, :k, 1] = rng.normal(0, 0.1, k)
        particles[i, :k, 2] = np.sort(rng.dirichlet(np.ones(k)))[::-1]
        mask[i, :k] = True
    return from_padded(particles, mask, source="<test>")


def real_rows(sample: JetSample) -> np.ndarray:
    """(M, 3) physical features of all real particles."""
    return sample.particles[sample.mask].astype(np.float64)


def standardise(sample: JetSample, order=(0, 1, 2), log_pt: bool = False, extra: int = 0):
    """Per-jet stored rows (columns in ``order`` of (η, φ, pT), pT as ln pT if ``log_pt``, then ``extra``
    junk columns), standardised over all particles; returns (rows per jet, mean, std) per stored column."""
    rows = real_rows(sample).copy()
    if log_pt:
        rows[:, 2] = np.log(rows[:, 2])
    rows = rows[:, list(order)]
    rng = np.random.default_rng(1)
    if extra:
        rows = np.concatenate([rows, rng.uniform(0, 1, (len(rows), extra))], axis=1)
    mean, std = rows.mean(axis=0), rows.std(axis=0)
    stored = ((rows - mean) / std).astype(np.float32)
    counts = sample.mask.sum(axis=1)
    per_jet = np.split(stored, np.cumsum(counts)[:-1])
    return per_jet, mean, std


def graphs_from(per_jet, edge_attr: bool = False, reverse: bool = True) -> list[Data]:
    graphs = []
    for x in per_jet:
        x = torch.from_numpy(x[::-1].copy() if reverse else x.copy())  # node order is not pT order
        g = Data(x=x)
        if edge_attr:
            k = len(x)
            src, dst = torch.meshgrid(torch.arange(k), torch.arange(k), indexing="ij")
            keep = src != dst
            g.edge_index = torch.stack([src[keep], dst[keep]])
            g.edge_attr = torch.randn(int(keep.sum()), 4)
            g.hyperedge_attr = torch.randn(k, 2)
        graphs.append(g)
    return graphs


def assert_same_jets(a: JetSample, b: JetSample, atol: float = 1e-5) -> None:
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_allclose(a.particles, b.particles, atol=atol)


def one_line(excinfo, path) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


@pytest.fixture(scope="module")
def jets() -> JetSample:
    return physical_jets()


# ---------------------------------------------------------------------------------- undeclared → refused


def test_standardised_pyg_undeclared_is_refused_naming_graph_node_column_value(tmp_path, jets):
    per_jet, _, _ = standardise(jets)
    path = tmp_path / "seed_like.pt"
    torch.save(graphs_from(per_jet), path)
    with pytest.raises(DataError) as excinfo:
        load_jets(path)
    msg = one_line(excinfo, path)
    # the first negative pT of graph 0, as the file holds it (nodes reversed)
    x0 = per_jet[0][::-1]
    node = int(np.argmax(x0[:, 2] < 0))
    assert f"graph 0, node {node}: pt_rel = {x0[node, 2]:.4g} (x column 2)" in msg
    assert "x column 0, x column 1, x column 2 look standardised (mean ≈ 0, std ≈ 1)" in msg
    assert "seed_like.pt.layout.yaml" in msg and "normalisation" in msg


def test_standardised_pyg_undeclared_is_one_cli_line_exit_2(tmp_path, jets, capsys):
    per_jet, _, _ = standardise(jets)
    path = tmp_path / "mine.pt"
    torch.save(graphs_from(per_jet, edge_attr=True), path)
    rc = main(["train", "--data-path", str(path), "--save-dir", str(tmp_path / "run"), "--quiet",
               "--set", "epochs=1"])
    err = capsys.readouterr().err
    assert rc == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("hvae-ray: error: ") and "mine.pt.layout.yaml" in lines[0]
    assert not (tmp_path / "run" / "last").exists()


def test_reordered_undeclared_is_refused_with_the_order_that_reads_it(tmp_path, jets):
    # physical values, columns (pT, η, φ): "pT" read from the η column is negative
    rows = real_rows(jets)[:, [2, 0, 1]].astype(np.float32)
    per_jet = np.split(rows, np.cumsum(jets.mask.sum(axis=1))[:-1])
    path = tmp_path / "reordered.pt"
    torch.save(graphs_from(per_jet), path)
    with pytest.raises(DataError) as excinfo:
        load_jets(path)
    msg = one_line(excinfo, path)
    assert "pt_rel = " in msg and "(x column 2)" in msg
    assert "x column 0 (read as eta_rel) looks like pt_rel" in msg
    assert "columns: [pt_rel, eta_rel, phi_rel]" in msg
    # following the hint reads the jets right
    (tmp_path / "reordered.pt.layout.yaml").write_text("columns: [pt_rel, eta_rel, phi_rel]\n")
    assert_same_jets(load_jets(path), jets)


# -------------------------------------------------------------------------------------- declared → read


def test_sidecar_layout_reorders_and_inverts_standardisation(tmp_path, jets, caplog):
    per_jet, mean, std = standardise(jets, order=(2, 0, 1), extra=1)
    path = tmp_path / "jets.pt"
    torch.save(graphs_from(per_jet, edge_attr=True), path)
    cols = ["pt_rel", "eta_rel", "phi_rel", "e_rel"]
    (tmp_path / "jets.pt.layout.yaml").write_text(yaml.safe_dump({
        "columns": cols,
        "normalisation": {"mean": dict(zip(cols, map(float, mean))), "std": dict(zip(cols, map(float, std)))},
    }))
    with caplog.at_level(logging.INFO, logger="hvae_ray.data"):
        back = load_jets(path)
    assert_same_jets(back, jets)
    lines = [r for r in caplog.records if r.name == "hvae_ray.data"]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    text = lines[0].getMessage()
    assert "x columns 1 (eta_rel" in text and "0 (pt_rel, mean" in text and "not used: 3 (e_rel)" in text
    assert "edge_attr" in text and "hyperedge_attr" in text and "not used" in text and "ln kT" in text


def test_layout_inside_the_pt_file_with_log_pt_and_list_stats(tmp_path, jets):
    per_jet, mean, std = standardise(jets, log_pt=True)
    path = tmp_path / "inside.pt"
    layout = {"columns": ["eta_rel", "phi_rel", "log_pt_rel"],
              "normalisation": {"mean": mean.tolist(), "std": std.tolist()}}
    torch.save({"graphs": graphs_from(per_jet), "layout": layout}, path)
    assert_same_jets(load_jets(path), jets)


@pytest.mark.parametrize("suffix", [".npz", ".yaml", ".pt"])
def test_layout_with_a_stats_file(tmp_path, jets, suffix):
    per_jet, mean, std = standardise(jets)
    path = tmp_path / "jets.pt"
    torch.save(graphs_from(per_jet), path)
    stats = tmp_path / "stats" / f"norm{suffix}"
    stats.parent.mkdir()
    if suffix == ".npz":
        np.savez(stats, mean=mean, std=std)
    elif suffix == ".yaml":
        stats.write_text(yaml.safe_dump({"mean": mean.tolist(), "std": std.tolist()}))
    else:
        torch.save({"mean": torch.tensor(mean), "std": torch.tensor(std)}, stats)
    (tmp_path / "jets.pt.layout.yaml").write_text(yaml.safe_dump({
        "columns": ["eta_rel", "phi_rel", "pt_rel"], "normalisation": {"stats": f"stats/norm{suffix}"}}))
    assert_same_jets(load_jets(path), jets)


def test_layout_given_by_the_caller_wins(tmp_path, jets):
    per_jet, mean, std = standardise(jets, order=(1, 2, 0))
    path = tmp_path / "jets.pt"
    torch.save(graphs_from(per_jet), path)
    layout = {"columns": ["phi_rel", "pt_rel", "eta_rel"],
              "normalisation": {"mean": mean.tolist(), "std": std.tolist()}}
    assert_same_jets(load_jets(path, layout=layout), jets)


def test_a_node_at_the_stored_origin_is_a_particle(tmp_path, jets):
    """Standardised features put a particle at the means at (0, 0, 0): the graph's node count, not
    zero rows, decides what is a particle."""
    per_jet, mean, std = standardise(jets)
    per_jet[0][3] = 0.0  # a particle exactly at the means
    path = tmp_path / "jets.pt"
    torch.save(graphs_from(per_jet), path)
    layout = {"columns": ["eta_rel", "phi_rel", "pt_rel"],
              "normalisation": {"mean": mean.tolist(), "std": std.tolist()}}
    back = load_jets(path, layout=layout)
    assert back.mask[0].sum() == len(per_jet[0])
    at_means = np.isclose(back.particles[0], mean.astype(np.float32), atol=1e-6).all(axis=1)
    assert at_means.sum() == 1


def test_declared_mask_column_drops_padding_nodes(tmp_path, jets):
    rows = real_rows(jets).astype(np.float32)
    per_jet = np.split(rows, np.cumsum(jets.mask.sum(axis=1))[:-1])
    padded = [np.concatenate([np.c_[x, np.ones(len(x))], np.zeros((MAX_PARTICLES + 5 - len(x), 4))])
              .astype(np.float32) for x in per_jet]
    path = tmp_path / "padded.pt"
    torch.save(graphs_from(padded, reverse=False), path)
    with pytest.raises(DataError, match=r"\(0, 0, 0\), a particle without pT"):
        load_jets(path)
    assert_same_jets(load_jets(path, layout={"columns": ["eta_rel", "phi_rel", "pt_rel", "mask"]}), jets)


def test_jetnet_npz_declared_inside_and_h5_attribute(tmp_path, jets):
    per_jet, mean, std = standardise(jets)
    pf = np.zeros((len(jets), MAX_PARTICLES, 3), np.float32)
    for i, x in enumerate(per_jet):
        pf[i, :len(x)] = x
    layout = json.dumps({"columns": ["eta_rel", "phi_rel", "pt_rel"],
                         "normalisation": {"mean": mean.tolist(), "std": std.tolist()}})
    npz = tmp_path / "jets.npz"
    np.savez(npz, particle_features=pf, mask=jets.mask)
    with pytest.raises(DataError) as excinfo:
        load_jets(npz)
    msg = one_line(excinfo, npz)
    assert "jet 0, particle " in msg and "(particle_features column 2)" in msg and "jets.npz.layout.yaml" in msg
    np.savez(npz, particle_features=pf, mask=jets.mask, layout=np.array(layout))
    assert_same_jets(load_jets(npz), jets)
    h5 = tmp_path / "jets.h5"
    with h5py.File(h5, "w") as f:
        f["particle_features"] = pf
        f["mask"] = jets.mask
        f["particle_features"].attrs["layout"] = layout
    assert_same_jets(load_jets(h5), jets)


# ------------------------------------------------------------------------------------ bad declarations


BAD_LAYOUTS = {
    "unknown key": ({"columns": ["eta_rel", "phi_rel", "pt_rel"], "scale": 2}, "unknown layout key 'scale'"),
    "no pt": ({"columns": ["eta_rel", "phi_rel", "e_rel"]}, "lacks pt_rel"),
    "column count": ({"columns": ["eta_rel", "phi_rel", "pt_rel", "e_rel"]}, "names 4 columns"),
    "zero std": ({"columns": ["eta_rel", "phi_rel", "pt_rel"], "normalisation": {"std": {"pt_rel": 0}}},
                 "positive"),
    "std of another column": ({"columns": ["eta_rel", "phi_rel", "pt_rel"],
                               "normalisation": {"std": {"e_rel": 1.0}}}, "not among columns"),
    "missing stats file": ({"columns": ["eta_rel", "phi_rel", "pt_rel"],
                            "normalisation": {"stats": "nope.npz"}}, "not found"),
    "columns not a list": ({"columns": "eta_rel phi_rel pt_rel"}, "must be a list"),
}


@pytest.mark.parametrize("case", list(BAD_LAYOUTS))
def test_bad_layout_is_one_line(tmp_path, jets, case):
    raw, expected = BAD_LAYOUTS[case]
    path = tmp_path / "jets.pt"
    torch.save(graphs_from(standardise(jets)[0]), path)
    (tmp_path / "jets.pt.layout.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(DataError) as excinfo:
        load_jets(path)
    assert expected in one_line(excinfo, path)


def test_layout_declared_twice_is_refused(tmp_path, jets):
    path = tmp_path / "jets.pt"
    torch.save({"graphs": graphs_from(standardise(jets)[0]), "layout": {"columns": ["eta_rel", "phi_rel", "pt_rel"]}},
               path)
    (tmp_path / "jets.pt.layout.yaml").write_text("columns: [eta_rel, phi_rel, pt_rel]\n")
    with pytest.raises(DataError, match="declared twice"):
        load_jets(path)


def test_wrong_declared_normalisation_is_refused_naming_the_layout(tmp_path, jets):
    per_jet, mean, std = standardise(jets)
    path = tmp_path / "jets.pt"
    torch.save(graphs_from(per_jet), path)
    side = tmp_path / "jets.pt.layout.yaml"
    side.write_text(yaml.safe_dump({"columns": ["eta_rel", "phi_rel", "pt_rel"],
                                    "normalisation": {"mean": mean.tolist(), "std": (10 * std).tolist()}}))
    with pytest.raises(DataError) as excinfo:
        load_jets(path)
    msg = one_line(excinfo, path)
    assert "pt_rel = " in msg and "stored " in msg and str(side) in msg


# ----------------------------------------------------------------------------- physical-range checks


def _npz(tmp_path, sample: JetSample, name: str = "jets.npz"):
    path = tmp_path / name
    np.savez(path, particle_features=sample.particles, mask=sample.mask)
    return path


def _with(sample: JetSample, jet: int, slot: int, feature: int, value: float) -> JetSample:
    particles = sample.particles.copy()
    particles[jet, slot, feature] = value
    return JetSample(particles, sample.mask, sample.jets, sample.source)


@pytest.mark.parametrize("feature, value, expected", [
    (2, 5.0, "pt_rel = 5 "),
    (2, -0.3, "pt_rel = -0.3 "),
    (0, 1e30, "eta_rel = 1e+30 "),
    (1, 2.0, "phi_rel = 2 "),
    (0, 1.5, "eta_rel = 1.5 "),
])
@pytest.mark.parametrize("fmt", ["npz", "parquet", "pt"])
def test_unphysical_value_is_refused_with_file_jet_and_value(tmp_path, jets, fmt, feature, value, expected):
    bad = _with(jets, 7, 0, feature, value)
    if fmt == "npz":
        path = _npz(tmp_path, bad)
        where = "jet 7, particle 0"
    elif fmt == "parquet":
        path = tmp_path / "jets.parquet"
        save_parquet(bad, path)
        where = "jet 7, particle 0"
    else:
        path = tmp_path / "jets.pt"
        torch.save([Data(x=torch.from_numpy(bad.particles[i][bad.mask[i]])) for i in range(len(bad))], path)
        where = "graph 7, node 0"
    with pytest.raises(DataError) as excinfo:
        load_jets(path)
    msg = one_line(excinfo, path)
    assert f"{where}: {expected}" in msg and "not physical" in msg


def test_soft_particles_far_in_eta_are_physical(tmp_path, jets):
    """Pythia's soft massive hadrons reach |η_rel| ~ 4 (clustering is in rapidity); only a particle
    carrying at least 1 % of the jet pT must lie within the jet radius + margin."""
    soft = _with(_with(jets, 3, int(jets.mask[3].sum()) - 1, 0, 3.9), 3, int(jets.mask[3].sum()) - 1, 2, 1e-4)
    assert len(load_jets(_npz(tmp_path, soft))) == len(jets)
    hard = _with(jets, 3, 0, 0, 1.3)
    with pytest.raises(DataError, match="jet 3, particle 0: eta_rel = 1.3 "):
        load_jets(_npz(tmp_path, hard, "hard.npz"))


def test_pt_rescaled_per_jet_is_refused_by_its_sum(tmp_path, jets):
    """pT divided by the leading particle's (a common normalisation): every value in [0, 1], but the
    jet's particles then carry several times its pT."""
    p = jets.particles.copy()
    p[..., 2] /= p[:, :1, 2]
    path = _npz(tmp_path, JetSample(p, jets.mask, jets.jets, "<test>"))
    with pytest.raises(DataError) as excinfo:
        load_jets(path)
    msg = one_line(excinfo, path)
    assert "jet 0: the sum of pt_rel over its particles" in msg and "expected at most 1.5" in msg


def test_pt_scaled_down_is_refused_by_the_median_sum(tmp_path, jets):
    p = jets.particles.copy()
    p[..., 2] *= 0.1
    with pytest.raises(DataError, match="the median over jets of the sum of pt_rel"):
        load_jets(_npz(tmp_path, JetSample(p, jets.mask, jets.jets, "<test>")))


def test_generated_jets_may_skip_the_range_check_but_not_finiteness(tmp_path, jets):
    out_of_range = _npz(tmp_path, _with(jets, 1, 0, 2, 3.0), "gen.npz")
    assert len(load_jets(out_of_range, check_ranges=False)) == len(jets)
    nan = _npz(tmp_path, _with(jets, 1, 0, 0, np.nan), "nan.npz")
    with pytest.raises(DataError, match="NaN"):
        load_jets(nan, check_ranges=False)


@pytest.mark.slow
def test_pythia_jets_are_in_range():
    from hvae_ray.data.generate import _generate

    for flavor in ("q", "w"):
        sample = _generate(flavor, 200, seed=2, workers=1, progress=False)
        real = sample.mask
        jet = np.nonzero(real)[0]
        assert range_problem(sample.particles[real], jet, len(sample)) is None


# ------------------------------------------------------------------------------ declared files train


TINY = {"epochs": 2, "batch_size": 16, "gradient_accumulation_steps": 1, "model.hidden_dim": 8,
        "model.latent_dim": 4, "model.num_layers": 1, "device": "cpu"}


@pytest.mark.slow
def test_declared_files_train_like_the_same_jets_in_parquet(tmp_path):
    """A standardised .pt and a reordered one, each declared, train to the val_w1m of the same jets
    written as Parquet (within 20 %)."""
    from hvae_ray.api import train

    sample = physical_jets(120, seed=4)
    parquet = save_parquet(sample, tmp_path / "jets.parquet")
    per_jet, mean, std = standardise(sample)
    standardised = tmp_path / "standardised.pt"
    torch.save({"graphs": graphs_from(per_jet, edge_attr=True),
                "layout": {"columns": ["eta_rel", "phi_rel", "pt_rel"],
                           "normalisation": {"mean": mean.tolist(), "std": std.tolist()}}}, standardised)
    rows = real_rows(sample)[:, [2, 0, 1]].astype(np.float32)
    reordered = tmp_path / "reordered.pt"
    torch.save(graphs_from(np.split(rows, np.cumsum(sample.mask.sum(axis=1))[:-1])), reordered)
    (tmp_path / "reordered.pt.layout.yaml").write_text("columns: [pt_rel, eta_rel, phi_rel]\n")

    w1m = {}
    for path in (parquet, standardised, reordered):
        result = train(None, path, save_dir=tmp_path / f"run_{path.stem}", overrides=TINY, progress=False)
        w1m[path.stem] = result["val_w1m"]
    base = w1m["jets"]
    assert np.isfinite(base) and base > 0
    for name in ("standardised", "reordered"):
        assert abs(w1m[name] - base) <= 0.2 * base, w1m
