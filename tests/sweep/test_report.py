"""The sweep report (``trials EXP --report``) of a hand-made experiment directory (no Ray): one trial's
checkpoint trained by the engine, the others' epochs written as Tune writes them."""

from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path

import pytest

from hvae_ray.cli import main as cli_main
from hvae_ray.sweep import report, trials
from hvae_ray.sweep.layout import SWEEP_FILE, read_sweep_state
from hvae_ray.sweep.spec import from_raw
from hvae_ray.sweep.tune import _prepare

MAX_T = 3
RAW = {  # conftest's tiny model and data
    "name": "rep",
    "config": {"model.hidden_dim": 16, "model.latent_dim": 4, "batch_size": 16, "gradient_accumulation_steps": 1,
               "kl_warmup_epochs": 1, "epochs": MAX_T},
    "search_space": {"kl_max_weight": {"loguniform": [1.0e-5, 1.0e-2]},
                     "loss_weights.topology": {"uniform": [0.05, 1.0]},
                     "batch_size": {"choice": [8, 16]}},
    "scheduler": {"metric": "val_objective", "mode": "min", "max_t": MAX_T, "grace_period": 1},
    "data": {"flavor": "q", "n_jets": 60, "seed": 0},
}
# trial id → (params, val_objective per epoch, Tune's status); ab_00003 has the best value and the checkpoint
T = "loss_weights.topology"
TRIALS = {
    "ab_00000": ({"kl_max_weight": 1e-4, T: 0.2, "batch_size": 16}, [4.0, 3.6, 3.4], "TERMINATED"),
    "ab_00001": ({"kl_max_weight": 3e-3, T: 0.9, "batch_size": 8}, [5.0], "TERMINATED"),
    "ab_00002": ({"kl_max_weight": 2e-5, T: 0.5, "batch_size": 16}, [4.4, 3.9, 3.7], "TERMINATED"),
    "ab_00003": ({"kl_max_weight": 6e-4, T: 0.3, "batch_size": 8}, [3.8, 3.1, 3.2], "TERMINATED"),
    "ab_00004": ({"kl_max_weight": 8e-3, T: 0.7, "batch_size": 16}, [4.9], "TERMINATED"),
    "ab_00005": ({"kl_max_weight": 5e-5, T: 0.1, "batch_size": 8}, None, "PENDING"),
}
BEST = "ab_00003"
PLOTS = ("best-so-far", "parallel-coordinates", "importance", "learning-curves", "distributions")


def _row(epoch: int, objective: float) -> dict:
    return {"epoch": float(epoch), "epochs_done": epoch + 1, "diverged": 0.0, "val_objective": objective,
            "val_recon": objective - 0.01, "val_kl": 0.5 + epoch, "val_w1m": 0.1, "val_total": objective / 2,
            "train_total": objective / 2 + 0.1, "train_kl": 0.4, "time_total_s": 10.0 + epoch,
            "training_iteration": epoch + 1, "node_id": "node-a"}


@pytest.fixture(scope="module")
def exp(tmp_path_factory) -> Path:
    from hvae_ray.data.io import load_jets
    from hvae_ray.engine import fit

    exp = tmp_path_factory.mktemp("report") / "runs" / "rep"
    exp.mkdir(parents=True)
    (exp / SWEEP_FILE).write_text(json.dumps(_prepare(from_raw(RAW, "rep.yaml"), exp.name, str(exp.parent)).to_dict(),
                                             indent=2, default=str))
    state = read_sweep_state(exp)
    for tid, (params, values, _) in TRIALS.items():
        d = exp / f"trial_{tid}"
        d.mkdir()
        (d / "params.json").write_text(json.dumps(params))
        if values is not None:
            (d / "result.json").write_text("".join(json.dumps(_row(e, v)) + "\n" for e, v in enumerate(values)))
    # the best trial's engine folder: a real checkpoint (best/) of its config
    cfg = state.spec.trial_config(TRIALS[BEST][0]).with_overrides({"epochs": 2})
    fit(cfg, load_jets(state.data_path), save_dir=exp / f"trial_{BEST}" / "engine", progress=False)
    return exp


@pytest.fixture(autouse=True)
def tune_state(monkeypatch):
    """The statuses Ray Tune's experiment state would hold."""
    monkeypatch.setattr(trials, "_tune_statuses", lambda exp: {t: s for t, (_, _, s) in TRIALS.items()})


@pytest.fixture(scope="module")
def page(exp, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("page") / "report.html"
    with pytest.MonkeyPatch.context() as mp:  # module-scoped: the statuses of ``tune_state`` set here too
        mp.setattr(trials, "_tune_statuses", lambda exp: {t: s for t, (_, _, s) in TRIALS.items()})
        assert report.write_report(exp, out) == out
    return out.read_text()


def test_every_plot_is_an_inline_png(page):
    for name in PLOTS:
        assert f'<section id="{name}">' in page
        m = re.search(rf'<img class="plot" id="plot-{name}" alt="{name}" src="data:image/png;base64,([^"]+)">', page)
        assert m, name
        assert base64.b64decode(m.group(1)).startswith(b"\x89PNG\r\n\x1a\n")


def test_self_contained(page):
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page and "<link" not in page
    assert all(src.startswith("data:") for src in re.findall(r'src="([^"]*)"', page))
    assert "No jets to compare" not in page and "Not computed" not in page


def test_numbers_are_the_tables(exp, page):
    table = trials.sort_trials(trials.load_trials(exp), exp)
    best = table.slice(0, 1).to_pylist()[0]
    assert best["trial_id"] == BEST and best["status"] == "completed"
    m = re.search(r'<div class="best" id="best-trial">.*?data-trial-id="([^"]+)".*?data-value="([^"]+)"', page)
    assert m.group(1) == best["trial_id"]
    assert float(m.group(2)) == best["best_val_objective"] == 3.1
    # the top-trials table: the table's ids in its order, with its best values
    top = re.search(r'<table id="top-trials">(.*?)</table>', page).group(1)
    ids = re.findall(r'<td class="id">([^<]+)</td>', top)
    assert ids == [r["trial_id"] for r in table.to_pylist() if r["best_val_objective"] is not None]
    values = [float(v) for v in re.findall(r'data-value="([^"]+)"', top)]
    assert values == [r["best_val_objective"] for r in table.to_pylist() if r["best_val_objective"] is not None]
    statuses = {r["trial_id"]: r["status"] for r in table.to_pylist()}
    assert statuses["ab_00001"] == "early_stopped" and statuses["ab_00005"] == "pending"


def test_importance_lists_every_searched_key(page):
    section = re.search(r'<table id="importance-table">(.*?)</table>', page).group(1)
    keys = re.findall(r'<td class="id">([^<]+)</td>', section)
    assert sorted(keys) == sorted(RAW["search_space"])
    shares = [float(v) for v in re.findall(r'data-value="([^"]+)"', section)]
    assert len(shares) == 3 and all(0 <= s <= 1 for s in shares) and math.isclose(sum(shares), 1.0, abs_tol=1e-6)


def test_w1_of_each_distribution(page):
    section = re.search(r'<table id="w1-table">(.*?)</table>', page).group(1)
    names = re.findall(r'<td class="text">([^<]+)</td>', section)
    assert names == ["Particle η_rel", "Particle φ_rel", "Particle pT_rel", "Jet mass"]
    assert all(math.isfinite(float(v)) and float(v) >= 0 for v in re.findall(r'data-value="([^"]+)"', section))


def test_asha_stops_are_marked(exp):
    rows = trials.sort_trials(trials.load_trials(exp), exp).to_pylist()
    ranked = [r for r in rows if r["best_val_objective"] is not None]
    fig = report._curves_figure(exp, ranked, "val_objective", "min")
    marks = [(line.get_xdata()[0], line.get_ydata()[0]) for line in fig.axes[0].lines if line.get_marker() == "X"]
    assert sorted(marks) == [(1, 4.9), (1, 5.0)]  # the two trials ASHA stopped after their first epoch


def test_log_axis_for_loguniform_keys():
    pos, ticks, labels, log = report._axis_of("k", {"loguniform": [1e-5, 1e-2]}, [1e-4, 1e-2, None])
    assert log and pos[0] == pytest.approx(1 / 3) and pos[1] == pytest.approx(1.0) and math.isnan(pos[2])
    assert labels == ["1e-05", "0.0001", "0.001", "0.01"]
    pos, _, _, log = report._axis_of("k", {"uniform": [0.0, 2.0]}, [0.5])
    assert not log and pos == [0.25]


def test_cli(exp, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert cli_main(["trials", str(exp), "--report", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote the report of {len(TRIALS)} trials to {out}"
    assert out.read_text().startswith("<!DOCTYPE html>")


def test_cli_errors(exp, tmp_path, capsys):
    assert cli_main(["trials", str(tmp_path), "--report", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "not an hvae-ray experiment directory" in err
    # an experiment whose trials have not reported yet
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / SWEEP_FILE).write_text((exp / SWEEP_FILE).read_text())
    (empty / "trial_ab_00005").mkdir()
    (empty / "trial_ab_00005" / "params.json").write_text(json.dumps(TRIALS["ab_00005"][0]))
    assert cli_main(["trials", str(empty), "--report", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "no trial has reported val_objective yet" in err
    assert cli_main(["trials", str(exp), "--report", str(tmp_path / "r.txt")]) == 2
    assert "name it .html" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()
