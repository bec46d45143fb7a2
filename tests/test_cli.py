"""The command line: train → sample → evaluate round trip, and one-line errors (exit code 2) for bad inputs
that never overwrite existing outputs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml

from hvae_ray.cli import main
from hvae_ray.data.io import save_parquet
from hvae_ray.data.jets import MAX_PARTICLES, from_padded
from hvae_ray.engine import CHECKPOINT_FILE, load_checkpoint

# A model that trains for two epochs in about a second on one CPU core.
TINY = ["epochs=2", "batch_size=16", "gradient_accumulation_steps=1", "model.hidden_dim=8",
        "model.latent_dim=4", "model.num_layers=1", "device=cpu"]


def sets(*pairs: str) -> list[str]:
    return [arg for p in pairs for arg in ("--set", p)]


def random_particles(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    particles = np.zeros((n, MAX_PARTICLES, 3), dtype=np.float32)
    mask = np.zeros((n, MAX_PARTICLES), dtype=bool)
    for i in range(n):
        k = int(rng.integers(5, MAX_PARTICLES + 1))
        particles[i, :k, 0] = rng.normal(0, 0.1, k)
        particles[i, :k, 1] = rng.normal(0, 0.1, k)
        particles[i, :k, 2] = np.sort(rng.dirichlet(np.ones(k)))[::-1]
        mask[i, :k] = True
    return particles, mask


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "jets.parquet"
    particles, mask = random_particles(40)
    save_parquet(from_padded(particles, mask, source="<test>"), path)
    return path


@pytest.fixture(scope="module")
def trained(data_file, tmp_path_factory):
    """A run trained through the CLI (shared by the round-trip tests)."""
    save_dir = tmp_path_factory.mktemp("runs") / "run"
    rc = main(["train", "--data-path", str(data_file), "--save-dir", str(save_dir), "--quiet",
               "--save-test-indices", *sets(*TINY)])
    assert rc == 0
    return save_dir


def one_line_error(capsys, rc: int) -> str:
    """Assert a clean user error: exit code 2 and exactly one stderr line; return that line."""
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("hvae-ray: error: ")
    assert "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------------------------------------------------
# train → sample → evaluate


def test_train_writes_checkpoints_and_reports(trained, data_file):
    for sub in ("last", "best"):
        state = load_checkpoint(trained / sub)
        assert state["config"]["epochs"] == 2 and state["config"]["model"]["hidden_dim"] == 8
    assert load_checkpoint(trained / "last")["epoch"] == 1
    assert (trained / "config.yaml").is_file()
    assert len(np.load(trained / "test_indices.npy")) == 6            # 15 % of 40 jets
    assert list((trained / "tb").glob("events.out.tfevents.*"))        # TensorBoard next to the run


def test_train_prints_a_summary(data_file, tmp_path, capsys):
    rc = main(["train", "--data-path", str(data_file), "--save-dir", str(tmp_path / "r"), "--quiet",
               "--log-dir", str(tmp_path / "tb"), *sets(*TINY, "epochs=1")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "epochs_run=1" in out and "val_objective=" in out
    assert str(tmp_path / "tb") in out
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_train_leaves_one_line_per_epoch(data_file, tmp_path, capsys):
    rc = main(["train", "--data-path", str(data_file), "--save-dir", str(tmp_path / "r"), *sets(*TINY)])
    out = capsys.readouterr().out
    assert rc == 0
    lines = [ln for ln in out.splitlines() if ln.startswith("epoch ")]
    assert [ln.split()[1] for ln in lines] == ["1", "2"]  # 1-based, like epochs_run
    for ln in lines:
        assert all(f" {k} " in ln for k in ("train", "val", "kl", "β", "val_w1m")), ln
    assert "best" in lines[0]  # the first epoch is always the best so far
    assert "epochs_run=2" in out and "(1-based, as epochs_run)" in out


# subsample sizes below jetnet's defaults, to keep the tests quick
QUICK = ["--w1-samples", "2000", "--fpd-min-samples", "1000", "--fpd-max-samples", "3000",
         "--kpd-batch-size", "500"]


def test_sample_then_evaluate(trained, data_file, tmp_path, capsys):
    gen = tmp_path / "gen.npz"
    rc = main(["sample", "--checkpoint", str(trained / "best"), "--n-jets", "50", "--out", str(gen),
               "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    with np.load(gen) as npz:
        feats = npz["particle_features"]
    assert feats.shape == (50, 30, 4) and feats.dtype == np.float32
    mask = feats[..., 3]
    assert set(np.unique(mask)) <= {0.0, 1.0}
    assert (mask.sum(axis=1) >= 1).all()                    # every jet has a particle
    assert (feats[mask == 0][:, :3] == 0).all()               # zeros where masked
    real = feats[mask == 1]
    assert np.isfinite(real).all() and (real[:, 2] > 0).all()
    assert (np.abs(real[:, 1]) <= math.pi).all()              # φ_rel wrapped
    capsys.readouterr()

    rc = main(["evaluate", "--real", str(data_file), "--generated", str(gen), "--json", *QUICK])
    out = capsys.readouterr().out
    assert rc == 0
    result = json.loads(out)
    assert result["convention"] == "jetnet-0.2.5" and result["w1_eval_samples"] == 2000
    for key in ("w1m", "w1m_floor", "w1p_mean", "fpd", "kpd"):
        assert key in result
        assert math.isfinite(result[key]), key
    assert result["w1m"] >= 0 and result["w1m_floor"] >= 0
    assert result["n_gen"] == 50 and result["n_real"] == 40


def test_evaluate_measures_unphysical_generated_jets_and_checks_the_real_ones(data_file, tmp_path, capsys):
    """Generated jets outside the physical ranges (here |φ_rel| of 2) are evaluated, not refused: how far
    they stray is what the metrics measure. The same jets as the real sample are refused."""
    particles, mask = random_particles(40, seed=1)
    particles[:, 0, 1] = 2.0
    gen = tmp_path / "unphysical.npz"
    _write_npz(gen, particles, mask)
    rc = main(["evaluate", "--real", str(data_file), "--generated", str(gen), "--json", *QUICK])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert json.loads(out)["n_gen"] == 40
    line = one_line_error(capsys, main(["evaluate", "--real", str(gen), "--generated", str(data_file), *QUICK]))
    assert str(gen) in line and "phi_rel" in line, line


def test_sample_is_seeded(trained, tmp_path):
    args = ["sample", "--checkpoint", str(trained / "last"), "--n-jets", "10", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "a.npz"), "--seed", "5"]) == 0
    assert main([*args, "--out", str(tmp_path / "b.npz"), "--seed", "5"]) == 0
    assert main([*args, "--out", str(tmp_path / "c.npz"), "--seed", "6"]) == 0
    a, b, c = (np.load(tmp_path / f"{x}.npz")["particle_features"] for x in "abc")
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_sample_draws_from_a_fitted_prior_beside_the_checkpoint_by_default(trained, data_file, tmp_path, capsys):
    """Without --prior: N(0, 1) while the checkpoint folder holds no fitted prior, that prior once
    `prior fit` stored one; --prior standard still draws N(0, 1). One line says which."""
    import shutil

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copy(trained / "best" / CHECKPOINT_FILE, ckpt)
    base = ["sample", "--checkpoint", str(ckpt), "--n-jets", "30", "--device", "cpu", "--quiet"]

    def run(name: str, *extra: str) -> tuple[np.ndarray, str]:
        assert main([*base, *extra, "--out", str(tmp_path / f"{name}.npz")]) == 0
        out = capsys.readouterr().out
        with np.load(tmp_path / f"{name}.npz") as npz:
            return npz["particle_features"], out

    before, out = run("default-before")
    assert "codes: N(0, 1), the standard prior (no fitted prior beside the checkpoint)" in out, out
    standard, out = run("standard-before", "--prior", "standard")
    np.testing.assert_array_equal(before, standard)
    assert main(["prior", "fit", "--checkpoint", str(ckpt), "--data-path", str(data_file), "--components", "3",
                 "--device", "cpu"]) == 0
    capsys.readouterr()

    default, out = run("default")
    assert f"codes: the fitted prior {ckpt / 'prior.pt'} (stored beside the checkpoint; --prior standard " \
           "for N(0, 1))" in out, out
    fitted, out = run("fitted", "--prior", "fitted")
    assert f"codes: the fitted prior {ckpt / 'prior.pt'}\n" in out, out
    np.testing.assert_array_equal(default, fitted)
    standard_after, out = run("standard", "--prior", "standard")
    assert "codes: N(0, 1), the standard prior\n" in out, out
    np.testing.assert_array_equal(standard_after, standard)
    assert not np.array_equal(default, standard_after)


def test_data_generate_of_more_jets_than_the_machine_holds_is_one_line(tmp_path, capsys):
    """--n-jets in float notation reaches the size check: one line naming the size, before any jet."""
    out = tmp_path / "q.parquet"
    t0 = time.monotonic()
    rc = main(["data", "generate", "--flavor", "q", "--n-jets", "1e10", "--out", str(out), "--quiet"])
    elapsed = time.monotonic() - t0
    line = one_line_error(capsys, rc)
    assert "10000000000" in line, line
    assert elapsed < 10
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["2.5", "1e400", "ten"])
def test_data_generate_n_jets_must_be_a_whole_number(value, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["data", "generate", "--flavor", "q", "--n-jets", value, "--out", str(tmp_path / "q.parquet")])
    assert exc.value.code == 2
    assert "--n-jets" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_evaluate_table_output(data_file, tmp_path, capsys):
    particles, mask = random_particles(30, seed=9)
    gen = tmp_path / "gen.npz"
    np.savez(gen, particle_features=np.concatenate([particles, mask[..., None]], axis=-1))
    rc = main(["evaluate", "--real", str(data_file), "--generated", str(gen), *QUICK])
    out = capsys.readouterr().out
    assert rc == 0
    lines = out.splitlines()
    assert "real-vs-real floor" in lines[0] and lines[0].endswith("ratio")
    rows = {line.split()[0]: line.split() for line in lines[1:] if "±" in line}
    assert {"w1m", "w1p_mean", "w1efp_mean", "fpd", "kpd"} <= set(rows)
    for row in rows.values():  # value ± err, floor ± err, ratio = value / floor as printed
        assert float(row[-1]) == pytest.approx(float(row[1]) / float(row[4]), rel=1e-2)
    assert any(line.startswith("convention: jetnet-0.2.5") for line in lines)
    assert ("jets: 20 generated against 20 real; floor: those real jets against 20 others (papers compare "
            "50,000 per side; files hold 40 real, 30 generated)") in lines
    assert ("subsamples with replacement: W1 5 × 2000 jets; FPD 10 sizes 1000–3000 × 20; "
            "KPD 10 × 500") in lines
    assert lines[-1].startswith("note: fewer jets than the largest subsample")

    rc = main(["evaluate", "--real", str(data_file), "--generated", str(gen), "--per-side", "all", *QUICK])
    lines = capsys.readouterr().out.splitlines()
    assert rc == 0 and "ratio" not in lines[0]
    assert ("jets: real 40 (floor: two halves of 20), generated 30; no ratios: the value and the floor are "
            "at different N") in lines


@pytest.mark.parametrize("per_side, expected", [
    ("21", "21 jets per side needs 42 real jets (the value's and the floor's) and 21 generated jets; "
           "the files hold 40 and 30"),
    ("1", "jets per side must be 'auto', 'all' or an integer ≥ 2, got 1"),
])
def test_evaluate_refuses_more_jets_per_side_than_the_files_hold(per_side, expected, data_file, tmp_path,
                                                                 capsys):
    particles, mask = random_particles(30, seed=9)
    gen = tmp_path / "gen.npz"
    np.savez(gen, particle_features=np.concatenate([particles, mask[..., None]], axis=-1))
    plots = tmp_path / "plots"
    line = one_line_error(capsys, main(["evaluate", "--real", str(data_file), "--generated", str(gen),
                                        "--per-side", per_side, "--plots", str(plots), *QUICK]))
    assert expected in line, line
    assert not plots.exists()


@pytest.mark.parametrize("flags, problem", [
    (["--w1-samples", "0"], "--w1-samples must be an integer ≥ 1, got 0"),
    (["--kpd-batch-size", "1"], "--kpd-batch-size must be an integer ≥ 2, got 1"),
    (["--fpd-min-samples", "5000", "--fpd-max-samples", "100"], "--fpd-min-samples (5000) exceeds"),
])
def test_evaluate_bad_sizes_one_line_before_reading(flags, problem, tmp_path, capsys):
    missing = tmp_path / "nope.npz"  # never read: the sizes are checked first
    rc = main(["evaluate", "--real", str(missing), "--generated", str(missing), *flags])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and problem in err, err


# ---------------------------------------------------------------------------------------------------------
# Existing outputs are never overwritten


def test_sample_refuses_to_overwrite(trained, tmp_path, capsys):
    gen = tmp_path / "gen.npz"
    gen.write_bytes(b"previous result")
    rc = main(["sample", "--checkpoint", str(trained / "best"), "--n-jets", "5", "--out", str(gen)])
    line = one_line_error(capsys, rc)
    assert str(gen) in line and "already exists" in line
    assert gen.read_bytes() == b"previous result"


def test_train_refuses_to_start_over_a_previous_run(trained, data_file, capsys):
    ckpt = trained / "last" / CHECKPOINT_FILE
    before = ckpt.read_bytes()
    rc = main(["train", "--data-path", str(data_file), "--save-dir", str(trained), "--quiet", *sets(*TINY)])
    line = one_line_error(capsys, rc)
    assert str(trained) in line and "--resume" in line
    assert ckpt.read_bytes() == before


def test_train_resume_continues_a_previous_run(data_file, tmp_path, capsys):
    save_dir = tmp_path / "run"
    base = ["train", "--data-path", str(data_file), "--save-dir", str(save_dir), "--quiet"]
    assert main([*base, *sets(*TINY)]) == 0
    assert main([*base, "--resume", *sets(*TINY, "epochs=3")]) == 0
    assert "epochs_run=1" in capsys.readouterr().out.splitlines()[-2]
    assert load_checkpoint(save_dir / "last")["epoch"] == 2


def test_train_resume_with_a_different_model_is_refused(trained, data_file, capsys):
    ckpt = trained / "last" / CHECKPOINT_FILE
    before = ckpt.read_bytes()
    rc = main(["train", "--data-path", str(data_file), "--save-dir", str(trained), "--quiet", "--resume",
               *sets(*TINY, "model.hidden_dim=16", "epochs=3")])
    line = one_line_error(capsys, rc)
    assert str(trained / "last") in line and "'model.hidden_dim'" in line
    assert ckpt.read_bytes() == before


# ---------------------------------------------------------------------------------------------------------
# Bad inputs: exit code 2, one line naming the file or key


def _write_npz(path, particles, mask):
    np.savez(path, particle_features=np.concatenate([particles, mask[..., None].astype(np.float32)], axis=-1))


def bad_data(kind: str, tmp_path):
    """A bad data file of the given kind and the text its error line must contain."""
    particles, mask = random_particles(6, seed=2)
    if kind == "missing":
        return tmp_path / "missing.parquet", "no such file"
    if kind == "foreign":
        path = tmp_path / "notes.parquet"
        path.write_text("eta,phi,pt\n0.1,0.2,0.3\n")
        return path, "not a Parquet file"
    if kind == "pt_without_graphs":
        path = tmp_path / "tensors.pt"
        torch.save({"weights": torch.zeros(3)}, path)
        return path, "expected a list of torch_geometric Data"
    if kind == "empty":
        path = tmp_path / "empty.npz"
        np.savez(path, particle_features=np.zeros((0, 30, 4), dtype=np.float32))
        return path, "empty"
    if kind == "nan":
        particles[3, 1, 0] = np.nan
        path = tmp_path / "nan.npz"
        _write_npz(path, particles, mask)
        return path, "jet 3 has NaN"
    if kind == "no_particles":
        mask[4] = False
        particles[4] = 0
        path = tmp_path / "hollow.npz"
        _write_npz(path, particles, mask)
        return path, "jet 4 has no particles"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing", "foreign", "pt_without_graphs", "empty", "nan", "no_particles"])
def test_train_on_bad_data(kind, tmp_path, capsys):
    path, expected = bad_data(kind, tmp_path)
    save_dir = tmp_path / "run"
    rc = main(["train", "--data-path", str(path), "--save-dir", str(save_dir), "--quiet", *sets(*TINY)])
    line = one_line_error(capsys, rc)
    assert str(path) in line and expected in line
    assert not (save_dir / "last").exists()


@pytest.mark.parametrize("kind", ["foreign", "nan", "no_particles"])
def test_evaluate_bad_generated_file(kind, data_file, tmp_path, capsys):
    path, expected = bad_data(kind, tmp_path)
    if kind == "nan":  # generated jets skip the physical-range check, not the check for NaN
        expected = "jet 3, particle 1: particle features (nan, "
    rc = main(["evaluate", "--real", str(data_file), "--generated", str(path), "--json"])
    line = one_line_error(capsys, rc)
    assert str(path) in line and expected in line
    assert capsys.readouterr().out == ""


def test_sample_from_a_pt_that_is_not_a_checkpoint(tmp_path, capsys):
    path = tmp_path / "model.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "epoch": 3}, path)
    rc = main(["sample", "--checkpoint", str(path), "--n-jets", "5", "--out", str(tmp_path / "gen.npz")])
    line = one_line_error(capsys, rc)
    assert str(path) in line and "not an hvae-ray checkpoint" in line
    assert not (tmp_path / "gen.npz").exists()


def test_sample_from_a_checkpoint_whose_weights_do_not_match_its_config(trained, tmp_path, capsys):
    state = load_checkpoint(trained / "best")
    state["config"]["model"]["hidden_dim"] = 12
    path = tmp_path / "edited.pt"
    torch.save(state, path)
    rc = main(["sample", "--checkpoint", str(path), "--n-jets", "5", "--out", str(tmp_path / "gen.npz")])
    line = one_line_error(capsys, rc)
    assert str(path) in line and "do not match" in line
    assert not (tmp_path / "gen.npz").exists()


def test_sample_from_a_missing_checkpoint(tmp_path, capsys):
    rc = main(["sample", "--checkpoint", str(tmp_path / "nope"), "--n-jets", "5",
               "--out", str(tmp_path / "gen.npz")])
    assert "checkpoint not found" in one_line_error(capsys, rc)


@pytest.mark.parametrize("args, expected", [
    (["--n-jets", "0", "--out", "gen.npz"], "--n-jets"),
    (["--n-jets", "5", "--out", "gen.csv"], "gen.csv"),
])
def test_sample_bad_arguments(trained, tmp_path, capsys, args, expected):
    args = [a if not a.startswith("gen.") else str(tmp_path / a) for a in args]
    rc = main(["sample", "--checkpoint", str(trained / "best"), *args])
    assert expected in one_line_error(capsys, rc)


@pytest.mark.parametrize("yaml_text, key", [
    ("model:\n  hiden_dim: 32\n", "model.hiden_dim"),
    ("loss_weights:\n  topology: -0.1\n", "loss_weights.topology"),
    ("epochs: ten\n", "epochs"),
    ("kl_max_weight: 1.0e-6\n", "kl_max_weight"),
])
def test_train_with_a_bad_config_file(yaml_text, key, data_file, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text)
    rc = main(["train", "--config", str(config), "--data-path", str(data_file),
               "--save-dir", str(tmp_path / "run"), "--quiet"])
    line = one_line_error(capsys, rc)
    assert str(config) in line and f"'{key}'" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, key", [
    ("model.hiden_dim=32", "model.hiden_dim"),
    ("loss_weights.edge_features=-1", "loss_weights.edge_features"),
    ("kl_schedule=cosine", "kl_schedule"),
])
def test_train_with_a_bad_override(override, key, data_file, tmp_path, capsys):
    rc = main(["train", "--data-path", str(data_file), "--save-dir", str(tmp_path / "run"), "--quiet",
               "--set", override])
    assert f"'{key}'" in one_line_error(capsys, rc)


def test_train_with_a_missing_config_file(data_file, tmp_path, capsys):
    config = tmp_path / "nope.yaml"
    rc = main(["train", "--config", str(config), "--data-path", str(data_file), "--quiet"])
    line = one_line_error(capsys, rc)
    assert str(config) in line and "not found" in line


def test_errors_through_the_real_entry_point(tmp_path):
    """The installed command: exit status 2, one stderr line, no traceback."""
    missing = tmp_path / "missing.parquet"
    proc = subprocess.run([sys.executable, "-m", "hvae_ray.cli", "train", "--data-path", str(missing),
                           "--save-dir", str(tmp_path / "run"), "--quiet"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"hvae-ray: error: {missing}: no such file"]
    assert proc.stdout == ""


# ---------------------------------------------------------------------------------------------------------
# Output paths are checked before the work


def test_outputs_that_cannot_be_written_are_one_line_before_the_work(trained, data_file, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cases = [
        (["train", "--data-path", str(data_file), "--save-dir", "/proc/nope", "--quiet"], "/proc/nope"),
        (["sample", "--checkpoint", str(trained / "best"), "--n-jets", "5", "--out", "/proc/nope/g.npz"],
         "/proc/nope"),
        (["sample", "--checkpoint", str(trained / "best"), "--n-jets", "5",
          "--out", str(blocker / "g.npz")], str(blocker)),
        (["evaluate", "--real", str(data_file), "--generated", str(data_file), "--plots", "/proc/nope/p"],
         "/proc/nope"),
        (["data", "generate", "--flavor", "q", "--n-jets", "5", "--out", "/proc/nope/q.parquet"],
         "/proc/nope"),
    ]
    for argv, where in cases:
        rc = main(argv)
        line = one_line_error(capsys, rc)
        assert where in line and "cannot" in line, line
    assert blocker.read_text() == "not a folder"


def test_sample_refuses_what_the_disk_cannot_hold(trained, tmp_path, capsys):
    out = tmp_path / "huge.npz"
    rc = main(["sample", "--checkpoint", str(trained / "best"), "--n-jets", str(10**12), "--out", str(out)])
    line = one_line_error(capsys, rc)
    assert "needs up to" in line and "TB" in line and "free" in line, line
    assert not out.exists() and not list(tmp_path.iterdir())


def test_sample_streams_chunks_seeded(trained, tmp_path, monkeypatch):
    import hvae_ray.api as api

    args = ["sample", "--checkpoint", str(trained / "best"), "--n-jets", "70", "--device", "cpu", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "one.npz")]) == 0
    monkeypatch.setattr(api, "SAMPLE_CHUNK", 32)  # 70 jets in chunks of 32, 32 and 6
    assert main([*args, "--out", str(tmp_path / "a.npz")]) == 0
    assert main([*args, "--out", str(tmp_path / "b.npz")]) == 0
    one, a, b = (np.load(tmp_path / f"{x}.npz")["particle_features"] for x in ("one", "a", "b"))
    assert a.shape == (70, 30, 4) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[:32], one[:32])  # the first chunk uses the seed itself
    assert not np.array_equal(a[32:64], one[32:64])  # later chunks draw from their own seeds
    assert (a[..., 3].sum(axis=1) >= 1).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "b.npz", "one.npz"]  # no temp files left


def test_evaluate_plots_are_not_replaced_unless_forced(data_file, tmp_path, capsys):
    plots = tmp_path / "plots"
    args = ["evaluate", "--real", str(data_file), "--generated", str(data_file), "--plots", str(plots), *QUICK]
    assert main(args) == 0
    assert f"plots: 7 real-vs-generated figures in {plots}" in capsys.readouterr().err.splitlines()
    before = {p.name: p.read_bytes() for p in plots.iterdir()}
    assert set(before) == {"mass.png", "ptrel.png", "etarel.png", "phirel.png", "multiplicity.png", "efp.png",
                           "ptrel_sum.png"}
    rc = main(args)
    line = one_line_error(capsys, rc)
    assert "already exists" in line and "--force" in line
    assert {p.name: p.read_bytes() for p in plots.iterdir()} == before
    assert main([*args, "--force", "--json"]) == 0
    assert "fpd" in json.loads(capsys.readouterr().out)


# ---------------------------------------------------------------------------------------------------------
# Safety: links, full disks, sizes, one run per save folder


def test_sample_never_writes_through_a_planted_link(trained, tmp_path, capsys):
    """Links at the old temporary names and at the output itself: the output is written, the files they
    point to are untouched."""
    victims = []
    out = tmp_path / "g.npz"
    for name in (f".{out.name}.particle_features.npy", out.name + ".tmp.npz", out.name + ".tmp", out.name):
        victim = tmp_path / f"victim-{len(victims)}.txt"
        victim.write_text("keep me")
        (tmp_path / name).symlink_to(victim)
        victims.append(victim)
    rc = main(["sample", "--checkpoint", str(trained / "best"), "--n-jets", "20", "--out", str(out),
               "--device", "cpu", "--quiet", "--force"])
    assert rc == 0, capsys.readouterr().err
    assert all(v.read_text() == "keep me" for v in victims)
    assert not out.is_symlink() and np.load(out)["particle_features"].shape == (20, MAX_PARTICLES, 4)


def _limited_file_size(limit: int):
    def apply():
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_sample_on_a_full_disk_is_one_line_and_leaves_nothing(trained, tmp_path):
    """A file-size limit stands in for a full disk: the write fails midway; one line names the output,
    exit 2, and no temporary file is left."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "g.npz"
    proc = subprocess.run([sys.executable, "-m", "hvae_ray.cli", "sample", "--checkpoint", str(trained / "best"),
                           "--n-jets", "4000", "--out", str(out), "--device", "cpu", "--quiet"],
                          capture_output=True, text=True, timeout=300, preexec_fn=_limited_file_size(20_000))
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"hvae-ray: error: {out}: could not write it"), proc.stderr
    assert list(out_dir.iterdir()) == []


def test_a_save_folder_in_use_by_another_run_is_refused(data_file, tmp_path, capsys):
    """A second train on a save folder another live process holds: one line naming it; once that
    process is gone (killed), the folder trains."""
    save_dir = tmp_path / "run"
    save_dir.mkdir()
    code = ("import time; from hvae_ray.io_safe import acquire; "
            f"acquire({str(save_dir)!r}, 'save folder'); print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for extra in ([], ["--resume"]):
            rc = main(["train", "--data-path", str(data_file), "--save-dir", str(save_dir), "--quiet", *extra,
                       *sets(*TINY)])
            line = one_line_error(capsys, rc)
            assert f"{save_dir}: this save folder is in use by pid {holder.pid}" in line, line
        assert not (save_dir / "last").exists()
    finally:
        holder.kill()
        holder.wait()
    assert main(["train", "--data-path", str(data_file), "--save-dir", str(save_dir), "--quiet", *sets(*TINY)]) == 0
    assert (save_dir / "last" / CHECKPOINT_FILE).is_file()


@pytest.mark.parametrize("flag", ["--w1-samples", "--fpd-max-samples", "--kpd-batch-size"])
def test_evaluate_sizes_beyond_memory_are_refused_with_the_estimate(flag, data_file, tmp_path, capsys):
    argv = ["evaluate", "--real", str(data_file), "--generated", str(data_file), flag, str(10**12)]
    if flag == "--fpd-max-samples":
        argv += ["--fpd-min-samples", "2"]
    line = one_line_error(capsys, main(argv))
    assert flag in line and "16 TB of memory" in line, line


def test_train_reads_the_configs_data_path_when_no_data_path_is_given(tmp_path, capsys):
    """`data.path` in a config (as `trials --best` writes it) is the file `train` reads, not the default
    sample: a missing one is named in one line, exit 2, before anything trains."""
    cfg = tmp_path / "best.yaml"
    missing = tmp_path / "sweep_jets.parquet"
    cfg.write_text(yaml.safe_dump({"epochs": 1, "device": "cpu", "data": {"path": str(missing)}}))
    line = one_line_error(capsys, main(["train", "--config", str(cfg), "--save-dir", str(tmp_path / "run")]))
    assert str(missing) in line, line
    assert not (tmp_path / "run" / "last").exists()
