"""Trial tables from a hand-made experiment directory (no Ray): statuses, best/last metrics, sorting,
top-k, exports and the terminal table."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from hvae_ray.cli import main as cli_main
from hvae_ray.config import from_dict
from hvae_ray.errors import ConfigError, DataError
from hvae_ray.sweep import trials
from hvae_ray.sweep.layout import SWEEP_FILE, read_sweep_state
from hvae_ray.sweep.spec import from_raw
from hvae_ray.sweep.tune import _prepare

MAX_T = 3
RAW = {
    "name": "fake",
    "config": {"epochs": MAX_T, "model.hidden_dim": 16, "model.latent_dim": 4, "batch_size": 16},
    "search_space": {"kl_max_weight": {"loguniform": [1.0e-5, 1.0e-2]},
                     "batch_size": {"choice": [8, 16]}},
    "scheduler": {"metric": "val_objective", "mode": "min", "max_t": MAX_T, "grace_period": 1},
    "data": {"n_jets": 60},
}


def _state(exp: Path, raw: dict) -> dict:
    """hvae_sweep.json as run_sweep writes it (same preparation, same keys)."""
    return _prepare(from_raw(raw, "fake.yaml"), exp.name, str(exp.parent)).to_dict()


def _row(epoch: int, objective: float, ckpt: Path | None = None, **extra) -> dict:
    row = {"epoch": float(epoch), "epochs_done": epoch + 1, "diverged": 0.0, "val_objective": objective,
           "val_recon": objective - 0.01, "val_kl": 0.5 + epoch, "val_w1m": 0.1 - 0.01 * epoch,
           "val_total": objective / 2, "train_total": objective / 2 + 0.1, "train_kl": 0.4 + epoch,
           "time_total_s": 10.0 + epoch, "training_iteration": epoch + 1, "node_id": "node-a"}
    if ckpt is not None:
        ckpt.mkdir(parents=True, exist_ok=True)
        row["checkpoint_path"] = str(ckpt)
    row.update(extra)
    return row


def _trial(exp: Path, trial_id: str, params: dict, rows: list[dict] | None, tail: str = "") -> Path:
    d = exp / f"trial_{trial_id}"
    d.mkdir(parents=True)
    (d / "params.json").write_text(json.dumps(params))
    if rows is not None:
        (d / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return d


@pytest.fixture
def exp(tmp_path) -> Path:
    exp = tmp_path / "runs" / "fake"
    exp.mkdir(parents=True)
    (exp / SWEEP_FILE).write_text(json.dumps(_state(exp, RAW), indent=2, default=str))
    ck = exp / "_train"
    # completed: best at epoch 1, its checkpoint kept
    _trial(exp, "t_done", {"kl_max_weight": 1e-4, "batch_size": 16},
           [_row(0, 4.0, ck / "t_done/c0"), _row(1, 3.0, ck / "t_done/c1"), _row(2, 3.5, ck / "t_done/c2")])
    # stopped by ASHA after one epoch; its last line was cut short by a killed driver
    _trial(exp, "t_stop", {"kl_max_weight": 1e-3, "batch_size": 8}, [_row(0, 5.0, ck / "t_stop/c0")],
           tail='{"epoch": 1.0, "val_obj')
    # KL runaway at its second validation: a normal epoch, then the terminal diverged report
    _trial(exp, "t_div", {"kl_max_weight": 1e-2, "batch_size": 16},
           [_row(0, 4.5, ck / "t_div/c0"),
            {"diverged": 1.0, "val_objective": math.inf, "val_w1m": math.inf, "val_recon": math.inf,
             "val_total": math.inf, "time_total_s": 12.0,
             "error": "epoch 1: validation KL 2e+03 nats exceeds max_kl=1000 (KL runaway)"}])
    # raised in its first epoch (after one report)
    d = _trial(exp, "t_err", {"kl_max_weight": 2e-4, "batch_size": 8}, [_row(0, 4.2)])
    (d / "error.txt").write_text("Traceback (most recent call last):\n  File ...\n"
                                 "RuntimeError: trial ran out of GPU memory within its share\n\n")
    # never started
    _trial(exp, "t_wait", {"kl_max_weight": 3e-4, "batch_size": 16}, None)
    return exp


TUNE_STATUS = {"t_done": "TERMINATED", "t_stop": "TERMINATED", "t_div": "TERMINATED", "t_err": "ERROR",
               "t_wait": "PENDING"}


@pytest.fixture
def with_tune_state(monkeypatch):
    """The statuses Ray Tune's experiment state would hold for the fake trials."""
    monkeypatch.setattr(trials, "_tune_statuses", lambda exp: dict(TUNE_STATUS))


def _by_id(table) -> dict[str, dict]:
    return {r["trial_id"]: r for r in table.to_pylist()}


def test_statuses(exp, with_tune_state):
    rows = _by_id(trials.load_trials(exp))
    assert {k: r["status"] for k, r in rows.items()} == {
        "t_done": "completed", "t_stop": "early_stopped", "t_div": "diverged", "t_err": "error",
        "t_wait": "pending"}
    assert rows["t_div"]["error"].endswith("exceeds max_kl=1000 (KL runaway)")
    assert rows["t_err"]["error"] == "RuntimeError: trial ran out of GPU memory within its share"
    assert rows["t_done"]["error"] is None and rows["t_wait"]["error"] is None


def test_statuses_without_tune_state(exp):
    """No readable Tune state (e.g. a driver killed before its first save): statuses from results."""
    rows = _by_id(trials.load_trials(exp))
    assert {k: r["status"] for k, r in rows.items()} == {
        "t_done": "completed", "t_stop": "unfinished", "t_div": "diverged", "t_err": "error",
        "t_wait": "pending"}


@pytest.mark.parametrize(("state", "said"), [
    (None, False),                                              # no Tune state saved yet
    ('{"trial_data": [[{"trial_id": "t_do', False),             # cut short while Tune rewrote it
    ('{"runner_data": {}}', True),                              # readable, but not a Tune state
])
def test_tune_state_missing_or_partial_is_silent_anything_else_is_said(exp, monkeypatch, capsys, state, said):
    monkeypatch.setattr("hvae_ray.sweep.signing.verify", lambda exp: None)  # taken as the user's own
    if state is not None:
        (exp / "experiment_state-2026-12-07_00-00-00.json").write_text(state)
    assert trials._tune_statuses(exp) == {}
    err = capsys.readouterr().err
    if said:
        assert len(err.splitlines()) == 1
        assert "Ray Tune's experiment state cannot be read (KeyError: 'trial_data')" in err
        assert "statuses come from their results alone" in err
    else:
        assert err == ""
    assert _by_id(trials.load_trials(exp))["t_stop"]["status"] == "unfinished"


def test_running_trial(exp, monkeypatch):
    monkeypatch.setattr(trials, "_tune_statuses", lambda exp: {**TUNE_STATUS, "t_stop": "RUNNING"})
    assert _by_id(trials.load_trials(exp))["t_stop"]["status"] == "running"


def test_best_and_last_metrics(exp, with_tune_state):
    table = trials.load_trials(exp)
    rows = _by_id(table)
    done = rows["t_done"]
    assert (done["best_val_objective"], done["last_val_objective"]) == (3.0, 3.5)
    assert done["best_epoch"] == 1 and done["epochs"] == MAX_T
    assert done["best_checkpoint"] == str(exp / "_train" / "t_done" / "c1")
    assert done["best_val_w1m"] == pytest.approx(0.08) and done["last_val_kl"] == 2.5
    assert done["best_train_kl"] == 0.4
    assert done["wall_time_s"] == 12.0 and done["node_id"] == "node-a"
    assert (done["param.kl_max_weight"], done["param.batch_size"]) == (1e-4, 16)

    stop = rows["t_stop"]  # the cut line is skipped
    assert stop["epochs"] == 1 and stop["best_val_objective"] == stop["last_val_objective"] == 5.0

    div = rows["t_div"]  # the diverged report's inf values are not metrics
    assert div["best_val_objective"] == 4.5 and div["last_val_objective"] is None
    assert div["epochs"] == 1

    wait = rows["t_wait"]
    assert wait["epochs"] == 0 and wait["best_val_objective"] is None and wait["best_checkpoint"] is None

    # one row per trial; typed columns in a fixed order
    assert table.num_rows == 5
    assert table.column_names[:4] == ["trial_id", "status", "param.kl_max_weight", "param.batch_size"]
    assert table.column_names[-3:] == ["error", "node_id", "trial_dir"]
    assert str(table.schema.field("param.kl_max_weight").type) == "double"
    assert str(table.schema.field("param.batch_size").type) == "int64"
    assert table.schema.metadata[b"format"] == b"hvae-ray trials v1"


def test_mode_max_ranks_on_the_largest_value(tmp_path, monkeypatch):
    monkeypatch.setattr(trials, "_tune_statuses", lambda exp: {})
    exp = tmp_path / "max"
    exp.mkdir()
    raw = {**RAW, "config": {**RAW["config"], "objective": "generation"},
           "scheduler": {**RAW["scheduler"], "metric": "val_generation", "mode": "max"}}
    (exp / SWEEP_FILE).write_text(json.dumps(_state(exp, raw), default=str))
    gen = [0.1 - 0.01 * e for e in range(3)]
    _trial(exp, "a", {"kl_max_weight": 1e-4, "batch_size": 8},
           [_row(e, 4.0 - e, val_generation=g) for e, g in enumerate(gen)])
    _trial(exp, "b", {"kl_max_weight": 1e-3, "batch_size": 8},
           [_row(0, 1.0, val_generation=0.1), _row(1, 1.0, val_generation=0.1), _row(2, 1.0, val_generation=0.5)])
    rows = _by_id(trials.load_trials(exp))
    assert rows["a"]["best_val_generation"] == pytest.approx(0.1) and rows["a"]["best_epoch"] == 0
    assert rows["b"]["best_val_generation"] == 0.5 and rows["b"]["best_epoch"] == 2
    assert rows["a"]["best_val_objective"] == 2.0  # the other metrics stay "lower is better"
    ranked = trials.sort_trials(trials.load_trials(exp), exp)
    assert ranked.column("trial_id").to_pylist() == ["b", "a"]


def test_sort_and_top(exp, with_tune_state):
    table = trials.load_trials(exp)
    ranked = trials.sort_trials(table, exp)
    # by best val_objective, trials without it last
    assert ranked.column("trial_id").to_pylist()[:4] == ["t_done", "t_err", "t_div", "t_stop"]
    assert ranked.column("trial_id").to_pylist()[4] == "t_wait"
    by_w1m = trials.sort_trials(table, exp, "val_w1m").column("trial_id").to_pylist()
    assert by_w1m[0] == "t_done"
    with pytest.raises(ConfigError, match="unknown metric or column 'val_w1mm'"):
        trials.sort_trials(table, exp, "val_w1mm")


def test_cli_sort_top_and_export(exp, with_tune_state, capsys, tmp_path):
    assert cli_main(["trials", str(exp), "--top", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split()[0] for ln in lines[2:]] == ["t_done", "t_err"]
    out = tmp_path / "top.parquet"
    assert cli_main(["trials", str(exp), "--sort", "val_w1m", "--top", "3", "--export", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"wrote 3 trials to {out}")
    assert pq.read_table(out).column("trial_id").to_pylist()[0] == "t_done"
    # not over an existing file
    assert cli_main(["trials", str(exp), "--export", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_best_config(exp, with_tune_state):
    text = trials.best_config_yaml(trials.load_trials(exp), exp)
    assert text.startswith("# best trial t_done of fake: best_val_objective = 3 after 3 epochs\n")
    cfg = from_dict(yaml.safe_load(text), "best")
    assert cfg.kl_max_weight == 1e-4 and cfg.batch_size == 16
    assert cfg.model.hidden_dim == 16 and cfg.epochs == MAX_T
    assert cfg.data.path == str(read_sweep_state(exp).data_path) != ""  # the sweep's jets, not the default


def test_best_config_needs_a_reported_metric(tmp_path):
    exp = tmp_path / "empty"
    exp.mkdir()
    (exp / SWEEP_FILE).write_text(json.dumps(_state(exp, RAW), default=str))
    _trial(exp, "w", {"kl_max_weight": 1e-4, "batch_size": 8}, None)
    with pytest.raises(DataError, match="no trial has reported best_val_objective yet"):
        trials.best_config_yaml(trials.load_trials(exp), exp)


def test_export_round_trip_and_refusal(exp, with_tune_state, tmp_path):
    table = trials.load_trials(exp)
    path = trials.export(table, tmp_path / "t.parquet")
    assert pq.read_table(path).equals(table, check_metadata=True)
    with pytest.raises(DataError, match="already exists; not overwriting it"):
        trials.export(table, path)
    trials.export(table.slice(0, 2), path, overwrite=True)
    assert pq.read_table(path).num_rows == 2
    csv = trials.export(table, tmp_path / "out" / "t.csv")
    assert csv.read_text().splitlines()[0].startswith('"trial_id","status"')
    with pytest.raises(DataError):
        trials.export(table, csv)
    with pytest.raises(ConfigError, match="must end in .parquet or .csv"):
        trials.export(table, tmp_path / "t.xlsx")
    assert not list(tmp_path.glob("*.tmp"))


def test_format_table_lists_every_trial(exp, with_tune_state):
    text = trials.format_table(trials.load_trials(exp))
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["trial_id", "status", "kl_max_weight", "batch_size"]
    assert set(lines[1]) <= {"-", " "}
    for trial_id in TUNE_STATUS:
        assert any(ln.startswith(trial_id) for ln in lines[2:])
    assert "exceeds max_kl" in text and "diverged" in text and "pending" in text


def test_not_an_experiment_directory(tmp_path):
    with pytest.raises(DataError, match="not an hvae-ray experiment directory"):
        trials.load_trials(tmp_path)
    (tmp_path / SWEEP_FILE).write_text("{not json")
    with pytest.raises(DataError, match="unreadable sweep state"):
        trials.load_trials(tmp_path)


def test_kl_at_the_best_epoch_and_sorting_by_shown_names(tmp_path, monkeypatch, capsys):
    """best_val_kl is the lowest KL of any epoch; val_kl_at_best is the KL of the epoch the trial kept."""
    monkeypatch.setattr(trials, "_tune_statuses", lambda exp: {})
    exp = tmp_path / "kl"
    exp.mkdir()
    (exp / SWEEP_FILE).write_text(json.dumps(_state(exp, RAW), default=str))
    # best objective at epoch 2, where the KL (2.5) is not the lowest (0.5 at epoch 0)
    _trial(exp, "a", {"kl_max_weight": 1e-4, "batch_size": 8}, [_row(0, 4.0), _row(1, 3.0), _row(2, 2.0)])
    _trial(exp, "b", {"kl_max_weight": 1e-3, "batch_size": 16},
           [_row(0, 3.5, val_kl=9.0), _row(1, 2.5, val_kl=0.2)])
    table = trials.load_trials(exp)
    rows = _by_id(table)
    assert rows["a"]["best_val_kl"] == 0.5 and rows["a"]["val_kl_at_best"] == 2.5
    assert rows["b"]["best_val_kl"] == 0.2 and rows["b"]["val_kl_at_best"] == 0.2
    # every header the table prints is a name --sort takes
    text = trials.format_table(table, metric="val_objective")
    heads = text.splitlines()[0].split()
    assert {"kl_max_weight", "batch_size", "best_val_objective", "val_kl_at_best", "last_val_kl"} <= set(heads)
    for head in heads:
        if head not in ("trial_id", "status", "error"):
            trials.sort_trials(table, exp, head)
    assert trials.sort_trials(table, exp, "val_kl_at_best").column("trial_id").to_pylist() == ["b", "a"]
    assert trials.sort_trials(table, exp, "last_val_kl").column("trial_id").to_pylist() == ["b", "a"]
    assert trials.sort_trials(table, exp, "batch_size").column("trial_id").to_pylist() == ["a", "b"]
    # --columns picks the columns, by the names shown; unknown names and --top < 1 are one-line errors
    assert cli_main(["trials", str(exp), "--columns", "trial_id,val_kl_at_best,batch_size",
                     "--sort", "val_kl_at_best"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["trial_id", "val_kl_at_best", "batch_size"]
    assert [ln.split() for ln in lines[2:]] == [["b", "0.2", "16"], ["a", "2.5", "8"]]
    for argv, problem in ((["--columns", "trial_id,nope"], "unknown column 'nope'"),
                          (["--sort", "nope"], "unknown metric or column 'nope'"),
                          (["--top", "-1"], "--top must be >= 1, got -1")):
        assert cli_main(["trials", str(exp), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert problem in err and len(err.splitlines()) == 1, err


def test_headers_are_whole_names(exp, with_tune_state):
    text = trials.format_table(trials.load_trials(exp), metric="val_objective")
    heads = text.splitlines()[0].split()
    assert "best_val_objective" in heads and "wall_time_s" in heads


def test_kl_slope_column(exp, with_tune_state):
    """val_kl_slope_last20: the least-squares slope of val_kl over the epochs (0.5 + epoch: slope 1);
    none with fewer than two epochs."""
    rows = _by_id(trials.load_trials(exp))
    assert rows["t_done"]["val_kl_slope_last20"] == pytest.approx(1.0)
    assert rows["t_stop"]["val_kl_slope_last20"] is None and rows["t_wait"]["val_kl_slope_last20"] is None


START, END = "_hparams_/session_start_info", "_hparams_/session_end_info"


def _hparams_summaries(tb_dir: Path) -> list[str]:
    """Every HParams summary in a run's event files (TensorBoard's own reader), in TensorBoard's order."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return [v.tag for f in sorted(tb_dir.glob("*tfevents*")) for e in EventFileLoader(str(f)).Load()
            for v in e.summary.value if v.metadata.plugin_data.plugin_name == "hparams"]


def _session(content: dict[str, bytes]):
    """(start, end) of a run's HParams session from its PluginTagToContent("hparams"); end None if none."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    def part(tag):
        return plugin_data_pb2.HParamsPluginData.FromString(content[tag]) if tag in content else None

    end = part(END)
    return part(START).session_start_info, end.session_end_info if end else None


def _fresh(tb_dir: Path):
    """A run as a TensorBoard started now reads it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return acc


def _callback(exp: Path):
    from hvae_ray.sweep.hparams import TrialOutcomeCallback

    return TrialOutcomeCallback(from_raw(RAW, "fake.yaml"), exp)


def test_hparams_session_starts_with_the_trial_and_ends_with_it(exp, monkeypatch):
    """As TensorBoard itself reads the experiment folder, and as a TensorBoard left open follows it (it
    reads a run's event files in order of name, and follows only the last one for new events): the
    trial's HParams session is there from Tune's start of the trial, named by the table's trial id, with
    no end (running) while the trial trains and its scalars still coming in; a restarted trial gets no
    second start; the end comes when Tune ends the trial. One run per trial, named trial_<id>."""
    from types import SimpleNamespace

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
    from tensorboard.plugins.hparams import api_pb2
    from tensorboard.util import tensor_util

    from hvae_ray.sweep.layout import TrialPaths
    from hvae_ray.tracking import HPARAM_METRICS, TensorBoardLogger

    callback = _callback(exp)
    trial = SimpleNamespace(trial_id="t_done", config={"kl_max_weight": 1e-4, "batch_size": 16}, last_result=None)
    tb_dir = TrialPaths.of(exp, "t_done").tensorboard
    started = int(time.time())
    callback.on_trial_start(0, [], trial)
    [start_file] = tb_dir.glob("*tfevents*")
    # before any file a writer opens once the trial started (named events.out.tfevents.<time>.<host>...):
    # TensorBoard follows a run's last file only, and would not follow the training's behind it
    assert start_file.name < f"events.out.tfevents.{started:010d}."
    live = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})  # a TensorBoard left open
    live.Reload()
    start, end = _session(live.PluginTagToContent("hparams"))
    assert end is None  # running
    assert start.group_name == "t_done"
    assert set(start.hparams) == {"kl_max_weight", "log10(kl_max_weight)", "batch_size"}  # no outcome
    assert start.hparams["batch_size"].string_value == "16"  # not the number 16, shown as 16.000
    assert start.hparams["kl_max_weight"].number_value == pytest.approx(1e-4)
    assert start.hparams["log10(kl_max_weight)"].number_value == pytest.approx(-4.0)

    tb = TensorBoardLogger(tb_dir)  # the trial's training, in its run
    for epoch in range(2):
        tb.log_epoch(epoch, {"val_kl": 0.5 + epoch, "val_objective": 3.0 - epoch})
    live.Reload()
    assert [e.step for e in live.Scalars("Loss/val_objective")] == [0, 1]  # the metric columns follow
    files = {f: f.read_bytes() for f in tb_dir.glob("*tfevents*")}
    callback.on_trial_start(0, [], trial)  # Tune restarts it after a failure
    with monkeypatch.context() as m:  # `sweep resume` continues it, in a new driver
        m.setattr(os, "getpid", lambda: 4_000_000)
        _callback(exp).on_trial_start(0, [], trial)
    assert {f: f.read_bytes() for f in tb_dir.glob("*tfevents*")} == files  # nothing written, nothing changed
    assert _hparams_summaries(tb_dir).count(START) == 1
    tb.log_epoch(2, {"val_kl": 2.5, "val_objective": 1.0})
    tb.close()
    live.Reload()
    assert END not in live.PluginTagToContent("hparams")

    trial.last_result = {"epochs_done": MAX_T, "diverged": 0.0}
    callback.on_trial_complete(0, [], trial)
    live.Reload()
    assert [e.step for e in live.Scalars("Loss/val_objective")] == [0, 1, 2]
    start, end = _session(live.PluginTagToContent("hparams"))
    assert end.status == api_pb2.STATUS_SUCCESS and start.group_name == "t_done"
    assert sorted(_hparams_summaries(tb_dir)) == sorted(["_hparams_/experiment", START, END])  # each once
    experiment = _fresh(tb_dir).PluginTagToContent("hparams")["_hparams_/experiment"]
    from tensorboard.plugins.hparams import plugin_data_pb2

    metrics = plugin_data_pb2.HParamsPluginData.FromString(experiment).experiment.metric_infos
    assert [m.name.tag for m in metrics] == list(HPARAM_METRICS)

    callback.on_trial_complete(0, [], SimpleNamespace(trial_id="t_wait", config={}, last_result=None))
    mux = EventMultiplexer().AddRunsFromDirectory(str(exp))
    mux.Reload()
    assert set(mux.Runs()) == {"trial_t_done"}  # a trial that never started has no run
    slope = mux.Tensors("trial_t_done", "KL/slope_last20")[-1]
    assert float(tensor_util.make_ndarray(slope.tensor_proto)) == pytest.approx(1.0)
    start, end = _session(mux.PluginRunToTagToContent("hparams")["trial_t_done"])
    assert start.group_name == "t_done" and end.status == api_pb2.STATUS_SUCCESS
    assert "log10(batch_size)" not in start.hparams  # searched on a list, not a log scale


def test_a_failed_trial_that_runs_again_is_running_until_its_new_end(exp):
    """`sweep resume` retries a failed trial: its session loses the failure, keeps its one start, and
    ends as the new run ends."""
    from types import SimpleNamespace

    from tensorboard.plugins.hparams import api_pb2

    from hvae_ray.sweep.layout import TrialPaths
    from hvae_ray.tracking import TensorBoardLogger

    callback = _callback(exp)
    trial = SimpleNamespace(trial_id="t_err", config={"kl_max_weight": 2e-4, "batch_size": 8}, last_result=None)
    tb_dir = TrialPaths.of(exp, "t_err").tensorboard
    callback.on_trial_start(0, [], trial)
    tb = TensorBoardLogger(tb_dir)
    tb.log_epoch(0, {"val_objective": 4.2})
    tb.close()
    trial.last_result = {"epochs_done": 1, "diverged": 0.0}
    callback.on_trial_error(0, [], trial)
    assert _session(_fresh(tb_dir).PluginTagToContent("hparams"))[1].status == api_pb2.STATUS_FAILURE

    callback.on_trial_start(0, [], trial)  # retried
    start, end = _session(_fresh(tb_dir).PluginTagToContent("hparams"))
    assert end is None and start.group_name == "t_err"
    trial.last_result = {"epochs_done": MAX_T, "diverged": 0.0}
    callback.on_trial_complete(0, [], trial)
    start, end = _session(_fresh(tb_dir).PluginTagToContent("hparams"))
    assert end.status == api_pb2.STATUS_SUCCESS
    assert sorted(_hparams_summaries(tb_dir)) == sorted(["_hparams_/experiment", START, END])


def test_a_trial_started_before_live_sessions_gets_its_whole_session_at_its_end(exp):
    """A trial whose run has no session start when it ends (its sweep began with an older version, which
    wrote sessions at the end) gets the start then, with the end; a TensorBoard left open reads both."""
    from types import SimpleNamespace

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import api_pb2

    from hvae_ray.sweep.layout import TrialPaths
    from hvae_ray.tracking import TensorBoardLogger

    tb_dir = TrialPaths.of(exp, "t_stop").tensorboard
    tb = TensorBoardLogger(tb_dir)
    tb.log_epoch(0, {"val_objective": 5.0})
    tb.close()
    [trained] = tb_dir.glob("*tfevents*")  # written on a node whose clock runs an hour ahead
    trained.rename(tb_dir / f"events.out.tfevents.{int(time.time()) + 3600:010d}.node-b.4242.0")
    live = EventAccumulator(str(tb_dir))
    live.Reload()
    trial = SimpleNamespace(trial_id="t_stop", config={"kl_max_weight": 1e-3, "batch_size": 8},
                            last_result={"epochs_done": 1, "diverged": 0.0})
    _callback(exp).on_trial_complete(0, [], trial)
    live.Reload()
    start, end = _session(live.PluginTagToContent("hparams"))
    assert end.status == api_pb2.STATUS_UNKNOWN  # stopped early by ASHA
    assert start.group_name == "t_stop" and start.hparams["batch_size"].string_value == "8"
    assert sorted(_hparams_summaries(tb_dir)) == sorted(["_hparams_/experiment", START, END])
    assert sorted(tb_dir.glob("*tfevents*"))[0].name.endswith(".node-b.4242.0")  # both after the training's


def test_the_session_is_never_written_through_a_link(exp, tmp_path, capsys):
    """A trial folder that is a link (to anywhere) gets no session, in one warning line; a missing one
    is made."""
    from types import SimpleNamespace

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (exp / "trial_t_link").symlink_to(elsewhere, target_is_directory=True)
    callback = _callback(exp)
    linked = SimpleNamespace(trial_id="t_link", config={"batch_size": 8}, last_result=None)
    callback.on_trial_start(0, [], linked)
    callback.on_trial_error(0, [], linked)
    assert list(elsewhere.iterdir()) == []
    err = capsys.readouterr().err
    assert "trial_t_link: is a link or not a folder" in err and len(err.splitlines()) == 2, err

    callback.on_trial_start(0, [], SimpleNamespace(trial_id="t_new", config={"batch_size": 8}, last_result=None))
    assert _hparams_summaries(exp / "trial_t_new") == ["_hparams_/experiment", START]
