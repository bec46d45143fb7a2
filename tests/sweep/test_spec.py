"""Sweep files: the shipped ones validate and build their search spaces; bad ones fail in one line
before anything starts (no Ray, no data, nothing written)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hvae_ray.errors import ConfigError
from hvae_ray.sweep.spec import DISTRIBUTIONS, load_sweep

REPO = Path(__file__).resolve().parents[2]
SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))


def test_the_repository_ships_sweep_files():
    assert {p.name for p in SWEEPS} >= {"quickstart.yaml", "kl_caps.yaml", "loss_weights.yaml",
                                        "seed_250_jets.yaml"}


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_shipped_sweep_validates_and_builds_its_search_space(path):
    from ray.tune.search.sample import Domain

    from hvae_ray.sweep.tune import search_space

    spec = load_sweep(path)
    raw = yaml.safe_load(path.read_text())
    assert spec.name == raw["name"]
    assert spec.search_space, "a sweep without a search space"
    space = search_space(spec)
    assert set(space) == set(raw["search_space"])
    for key, dist in raw["search_space"].items():
        (kind, _), = dist.items()
        assert kind in DISTRIBUTIONS
        if kind == "grid":
            assert set(space[key]) == {"grid_search"}
        else:
            assert isinstance(space[key], Domain)
    # trials train at least max_t epochs, and the plain-data form is JSON (stored with the experiment)
    assert spec.base.epochs >= spec.scheduler.max_t
    assert json.loads(json.dumps(spec.to_dict()))["search_space"] == raw["search_space"]
    # a trial config from sampled values validates
    sample = {k: (v.sample() if isinstance(v, Domain) else v["grid_search"][0]) for k, v in space.items()}
    sample = {k: (v.item() if hasattr(v, "item") else v) for k, v in sample.items()}
    cfg = spec.trial_config(sample)
    for key, value in sample.items():
        assert cfg.flat()[key] == pytest.approx(value)


def test_sweep_overrides_apply_to_the_sweep_file():
    spec = load_sweep(REPO / "sweeps" / "quickstart.yaml",
                      {"num_samples": 2, "scheduler.max_t": 3, "config.model.hidden_dim": 16,
                       "resources.gpu_fraction": 0.5})
    assert spec.num_samples == 2 and spec.scheduler.max_t == 3
    assert spec.base.model.hidden_dim == 16 and spec.resources.gpu_fraction == 0.5
    with pytest.raises(ConfigError, match="override: unknown key 'num_sample'"):
        load_sweep(REPO / "sweeps" / "quickstart.yaml", {"num_sample": 2})


def test_asha_stops_a_sweeps_trials_so_their_patience_is_off_unless_the_sweep_sets_it(tmp_path, sweep_file):
    from hvae_ray.config import Config

    assert Config().patience == 20  # `train` alone stops at its patience
    assert load_sweep(sweep_file(tmp_path / "a.yaml")).base.patience == 0
    assert load_sweep(sweep_file(tmp_path / "b.yaml", config={"patience": 7})).base.patience == 7
    assert load_sweep(REPO / "sweeps" / "seed_250_jets.yaml").base.patience == 20  # set in the file


def test_a_sweep_file_may_use_the_old_name_of_the_kl_floor(tmp_path, sweep_file):
    path = sweep_file(tmp_path / "old.yaml", config={"kl_divergence": 2.0e-6},
                      search_space={"kl_divergence": {"loguniform": [1.0e-7, 1.0e-5]}})
    with pytest.warns(FutureWarning, match="'kl_divergence' is now called 'kl_min_weight'"):
        spec = load_sweep(path)
    assert list(spec.search_space) == ["kl_min_weight"] and spec.base.kl_min_weight == 2.0e-6
    # trials, resume and the trial table rebuild the spec from its raw form: that has the new name
    assert list(spec.raw["search_space"]) == ["kl_min_weight"] and "kl_divergence" not in spec.raw["config"]


def test_the_spec_module_imports_no_ray():
    code = "import sys, hvae_ray.sweep.spec; print(sorted(m for m in sys.modules if m.split('.')[0] == 'ray'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def test_standby_trials_queue_ahead_of_gpu_shares_only():
    """auto: as many standby trials as concurrent ones on GPU shares, none on CPUs; Tune runs both."""
    qs = REPO / "sweeps" / "quickstart.yaml"
    cpu = load_sweep(qs)
    assert cpu.standby() == 0 and cpu.tune_concurrency() == cpu.max_concurrent_trials == 4
    gpu = load_sweep(qs, {"resources.gpu_fraction": None, "resources.gpu_memory_gb": 4})
    assert gpu.standby() == 4 and gpu.tune_concurrency() == 8
    assert load_sweep(qs, {"resources.gpu_fraction": 0.25, "standby_trials": 0}).tune_concurrency() == 4
    assert load_sweep(qs, {"standby_trials": 2}).tune_concurrency() == 6
    assert load_sweep(qs, {"max_concurrent_trials": None, "standby_trials": 2}).tune_concurrency() is None
    with pytest.raises(ConfigError, match=r"'max_concurrent_trials' must be an integer >= 1 \(null or leaving "
                                          r"it out means no limit\), got 0"):
        load_sweep(qs, {"max_concurrent_trials": 0})


def test_gpu_shares_are_sized_for_the_largest_searched_model():
    spec = load_sweep(REPO / "sweeps" / "quickstart.yaml",
                      {"search_space": {"model.hidden_dim": {"choice": [16, 64, 32]},
                                        "batch_size": {"randint": [4, 17]},
                                        "kl_max_weight": {"loguniform": [1.0e-4, 1.0e-2]}}})
    big = spec.largest_trial_config()
    assert big.model.hidden_dim == 64 and big.batch_size == 16
    assert big.kl_max_weight == spec.base.kl_max_weight  # not a memory key: left at the base value
    assert load_sweep(REPO / "sweeps" / "kl_caps.yaml").largest_trial_config() == \
        load_sweep(REPO / "sweeps" / "kl_caps.yaml").base


GOOD = {
    "name": "bad",
    "config": {"epochs": 3, "model.hidden_dim": 16},
    "search_space": {"kl_max_weight": {"loguniform": [1.0e-5, 1.0e-2]}},
    "scheduler": {"metric": "val_objective", "mode": "min", "max_t": 3, "grace_period": 1},
    "resources": {"cpus_per_worker": 0.5, "gpu_fraction": 0},
}


def _with(**changes):
    raw = json.loads(json.dumps(GOOD))
    for dotted, value in changes.items():
        node = raw
        *parents, last = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return yaml.safe_dump(raw, sort_keys=False)


BAD = {
    "unknown top-level key": (
        _with(searchspace={}), "unknown key 'searchspace'"),
    "unknown config key in search_space": (
        _with(search_space={"model.hiden_dim": {"choice": [16, 32]}}),
        "search_space: unknown config key 'model.hiden_dim'"),
    "unknown distribution": (
        _with(search_space={"kl_max_weight": {"lognormal": [1.0e-5, 1.0e-2]}}),
        "unknown distribution 'lognormal'"),
    "loguniform with low <= 0": (
        _with(search_space={"learning_rate": {"loguniform": [0, 1.0e-2]}}),
        "loguniform needs low > 0"),
    "low >= high": (
        _with(search_space={"learning_rate": {"uniform": [1.0e-2, 1.0e-3]}}),
        "need low < high"),
    "bad scheduler metric": (
        _with(scheduler__metric="val_totl"), "'scheduler.metric' must be one of"),
    "val_total while searching loss weights": (
        _with(scheduler__metric="val_total",
              search_space={"loss_weights.topology": {"uniform": [0.05, 1.0]}}),
        "val_total is not comparable"),
    "a metric other than the objective's": (
        _with(scheduler__metric="val_w1m"),
        "'scheduler.metric' is val_w1m but trials keep their best epoch by val_objective"),
    "val_objective with objective: generation": (
        _with(config={"epochs": 3, "objective": "generation"}),
        "'scheduler.metric' is val_objective but trials keep their best epoch by val_generation"),
    "a searched objective": (
        _with(search_space={"objective": {"choice": ["reconstruction", "generation"]}}),
        "'objective' cannot be searched"),
    "grace_period > max_t": (
        _with(scheduler__grace_period=5), "grace_period <= max_t"),
    "gpu_fraction and gpu_memory_gb": (
        _with(resources__gpu_fraction=0.25, resources__gpu_memory_gb=16),
        "gpu_fraction or gpu_memory_gb, not both"),
    "gpu_fraction > 1": (
        _with(resources__gpu_fraction=1.5), "'resources.gpu_fraction' must be in [0, 1]"),
    # each range alone fits the base config (kl_min_weight 1e-5, kl_max_weight 1e-4), but the low end
    # of kl_max_weight with the high end of kl_min_weight does not
    "search-space combination making an invalid config": (
        _with(search_space={"kl_max_weight": {"loguniform": [5.0e-5, 1.0e-3]},
                            "kl_min_weight": {"loguniform": [1.0e-6, 8.0e-5]}}),
        "'kl_max_weight' (5e-05) must be >= 'kl_min_weight' (8e-05)"),
    "bad YAML": (
        "name: bad\nsearch_space: {kl_max_weight: {loguniform: [1.0e-5, 1.0e-2]\n", "not valid YAML"),
    "unknown distribution argument shape": (
        _with(search_space={"learning_rate": {"uniform": [1.0e-3]}}), "uniform needs [low, high]"),
    "empty choice": (
        _with(search_space={"batch_size": {"choice": []}}), "choice needs a non-empty list"),
    "search value invalid for the config": (
        _with(search_space={"model.hidden_dim": {"choice": [16, 18]}}), "must be a multiple of 4"),
    "unknown scheduler key": (
        _with(scheduler__grace=1), "unknown key 'scheduler.grace'"),
    "num_samples not a positive integer": (
        _with(num_samples=0), "'num_samples' must be an integer >= 1"),
    "standby_trials neither a count nor auto": (
        _with(standby_trials="many"), "'standby_trials' must be an integer >= 0 or auto"),
    "a section that is not a mapping": (
        _with(resources=[1]), "'resources' must be a mapping, got [1]"),
    "a fractional count": (
        _with(scheduler__max_t=2.5), "'scheduler.max_t' must be int, got float 2.5"),
    "population neither a count, auto nor off": (
        _with(resources__population="many"), "'resources.population' must be int, auto or off, got str 'many'"),
    "population a fraction": (
        _with(resources__population=4.5), "'resources.population' must be int, auto or off, got float 4.5"),
    "population out of range": (
        _with(resources__population=2000), "'resources.population' must be auto, off or an integer in [1, 1024]"),
    "trial memory neither a number nor auto": (
        _with(resources__trial_memory_mb="lots"), "'resources.trial_memory_mb' must be float or auto, got str 'lots'"),
    "gpu_memory_gb not a number": (
        _with(resources__gpu_memory_gb=True), "'resources.gpu_memory_gb' must be float or null, got bool True"),
    "data path not a string": (
        _with(data={"path": 3}), "'data.path' must be str or null, got int 3"),
    "unknown data key": (
        _with(data={"flavour": "g"}), "unknown key 'data.flavour'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_sweep_file_is_one_line_config_error(tmp_path, case):
    text, message = BAD[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_sweep(path)
    msg = str(err.value)
    assert message in msg
    assert "\n" not in msg
    assert msg.startswith(str(path))


def test_the_good_base_of_the_bad_cases_is_good(tmp_path):
    path = tmp_path / "good.yaml"
    path.write_text(_with())
    assert load_sweep(path).name == "bad"


def test_sweep_sections_are_coerced_as_the_training_config_is(tmp_path):
    """Integral floats read as ints, "1e3" (a string in YAML 1.1) as a float, null as None, and the words
    of auto|off|int and auto|float keys as themselves."""
    path = tmp_path / "good.yaml"
    path.write_text(_with(scheduler__max_t=3.0, scheduler__reduction_factor=3,
                          resources__population=8.0, resources__trial_memory_mb="1e3",
                          resources__gpu_fraction=None, resources__gpu_memory_gb=16,
                          data={"path": None, "n_jets": 2.0e3}))
    spec = load_sweep(path)
    assert (spec.scheduler.max_t, spec.scheduler.reduction_factor) == (3, 3.0)
    assert type(spec.scheduler.max_t) is int and type(spec.scheduler.reduction_factor) is float
    assert (spec.resources.population, spec.resources.trial_memory_mb) == (8, 1000.0)
    assert type(spec.resources.population) is int
    assert (spec.resources.gpu_fraction, spec.resources.gpu_memory_gb) == (None, 16.0)
    assert (spec.data.path, spec.data.n_jets) == (None, 2000) and type(spec.data.n_jets) is int
    path.write_text(_with(resources__population="off", resources__trial_memory_mb="auto"))
    spec = load_sweep(path)
    assert (spec.resources.population, spec.resources.trial_memory_mb) == ("off", "auto")


# --- the command line -----------------------------------------------------------------------------

def _cli(*args, cwd=None):
    exe = Path(sys.executable).with_name("hvae-ray")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "hvae_ray.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def _one_error_line(proc):
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("hvae-ray: error:")
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_cli_bad_sweep_file_exits_2_and_creates_nothing(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(BAD["bad scheduler metric"][0])
    storage = tmp_path / "storage"
    line = _one_error_line(_cli("sweep", "run", str(path), "--storage", str(storage), "--name", "x",
                                cwd=tmp_path))
    assert "val_totl" in line
    assert not storage.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_cli_refuses_an_existing_experiment_name(tmp_path, sweep_file):
    path = sweep_file(tmp_path / "ok.yaml", search_space={"learning_rate": {"choice": [1.0e-3]}},
                      scheduler={"max_t": 2, "grace_period": 1})
    exp = tmp_path / "storage" / "taken"
    exp.mkdir(parents=True)
    state = exp / "hvae_sweep.json"
    state.write_text('{"name": "taken"}')
    before = state.stat().st_mtime_ns
    line = _one_error_line(_cli("sweep", "run", str(path), "--storage", str(tmp_path / "storage"),
                                "--name", "taken"))
    assert "an experiment of this name exists" in line and "sweep resume" in line
    assert state.read_text() == '{"name": "taken"}' and state.stat().st_mtime_ns == before
    assert sorted(p.name for p in exp.iterdir()) == ["hvae_sweep.json"]


def test_cli_trials_on_a_directory_that_is_no_experiment(tmp_path):
    line = _one_error_line(_cli("trials", str(tmp_path)))
    assert "not an hvae-ray experiment directory" in line
    line = _one_error_line(_cli("sweep", "resume", str(tmp_path)))
    assert "not an hvae-ray experiment directory" in line


def test_expected_trials_count_grid_combinations():
    qs = REPO / "sweeps" / "quickstart.yaml"
    spec = load_sweep(qs, {"num_samples": 3, "search_space": {"batch_size": {"grid": [4, 8]},
                                                              "model.hidden_dim": {"grid": [16, 32, 64]},
                                                              "kl_max_weight": {"loguniform": [1e-4, 1e-2]}}})
    assert spec.expected_trials() == 3 * 2 * 3
    no_grid = load_sweep(qs, {"num_samples": 5, "search_space": {"kl_max_weight": {"loguniform": [1e-4, 1e-2]}}})
    assert no_grid.expected_trials() == 5


def test_trial_hparams_are_the_searched_keys_and_what_differs_from_the_base():
    from hvae_ray.sweep.hparams import outcome_of, trial_hparams

    spec = load_sweep(REPO / "sweeps" / "quickstart.yaml",
                      {"search_space": {"kl_max_weight": {"loguniform": [1e-4, 1e-2]},
                                        "model.hidden_dim": {"choice": [16, 32]}}})
    base = spec.base.flat()
    same_as_base = {"kl_max_weight": 1e-3, "model.hidden_dim": base["model.hidden_dim"]}
    hp = trial_hparams(spec, same_as_base)
    assert hp == same_as_base  # a searched key is shown even where it equals the base value
    assert "seed" not in hp and "batch_size" not in hp  # equal in every trial: left out
    assert outcome_of({"epochs_done": 3, "diverged": 0.0}, max_t=3) == "completed"
    assert outcome_of({"epochs_done": 1, "diverged": 0.0}, max_t=3) == "early_stopped"
    assert outcome_of({"epochs_done": 1, "diverged": 1.0}, max_t=3) == "diverged"
    assert outcome_of(None, max_t=3, errored=True) == "error"


def test_no_standby_trials_on_a_ray_instance_without_gpus(monkeypatch):
    """auto: a sweep of GPU shares run where the Ray instance has no GPU (it trains on CPUs) launches
    no standby trials; with a GPU it keeps them."""
    from types import SimpleNamespace

    gpus = {"GPU": 0}
    fake = SimpleNamespace(is_initialized=lambda: True, cluster_resources=lambda: {"CPU": 2, **gpus})
    monkeypatch.setitem(sys.modules, "ray", fake)
    spec = load_sweep(REPO / "sweeps" / "kl_caps.yaml")
    assert spec.resources.uses_gpu
    assert spec.standby() == 0 and spec.tune_concurrency() == spec.max_concurrent_trials
    gpus["GPU"] = 1
    assert spec.standby() == spec.max_concurrent_trials
    assert load_sweep(REPO / "sweeps" / "kl_caps.yaml", {"standby_trials": 2}).standby() == 2
