"""The experiment directory's contract: old sweep state files still read, a trial's loop config and
reports keep their keys, trial paths are where Tune and the engine write."""

from __future__ import annotations

import json
import math

import pytest

from hvae_ray.errors import DataError
from hvae_ray.sweep.layout import (
    SWEEP_FILE,
    DivergedReport,
    EpochReport,
    SweepState,
    TrialLoop,
    TrialPaths,
    read_jsonl,
    read_sweep_state,
    trial_paths,
)
from hvae_ray.tracking import RANKABLE_METRICS

# hvae_sweep.json as sweeps wrote it before the state had a type (before context_bytes and populations existed,
# and with the sweep stored twice: as written, and validated)
OLD_STATE = {
    "raw": {"name": "old", "search_space": {"learning_rate": {"choice": [0.001]}},
            "scheduler": {"metric": "val_objective", "mode": "min", "max_t": 7}},
    "source": "sweeps/old.yaml", "name": "old-20260101-000000", "storage": "/runs/sweeps",
    "experiment_dir": "/runs/sweeps/old-20260101-000000", "data_path": "/cache/q.parquet",
    "gpu_share": 0.25, "card_bytes": 8.0e10, "trial_bytes": 1.2e9,
    "train_storage": "/runs/sweeps/old-20260101-000000/_train",
    "spec": {"search_space": {"learning_rate": {"choice": [0.001]}},
             "scheduler": {"metric": "val_objective", "mode": "min", "max_t": 7}},
}


def test_an_old_sweep_state_file_reads(tmp_path):
    (tmp_path / SWEEP_FILE).write_text(json.dumps(OLD_STATE, indent=2))
    state = read_sweep_state(tmp_path)
    assert (state.metric, state.mode, state.max_t, state.searched_keys) == ("val_objective", "min", 7,
                                                                            ["learning_rate"])
    assert state.gpu_share == 0.25 and state.context_bytes is None and state.population_slots == 0
    # written back, it holds the sweep once (as written; validated when read) and the keys it lacked
    assert set(state.to_dict()) == (set(OLD_STATE) - {"spec"}) | {"context_bytes", "population_slots",
                                                                  "population_executors"}
    state = SweepState.from_dict({**state.to_dict(), "experiment_dir": str(tmp_path)}, "here")
    state.write()
    written = json.loads((tmp_path / SWEEP_FILE).read_text())
    assert "spec" not in written and written["raw"] == OLD_STATE["raw"]
    assert state.on_cpus().gpu_share == 0.0 and state.on_cpus().card_bytes is None


def test_a_state_file_written_reads_back(tmp_path):
    state = SweepState.from_dict({**OLD_STATE, "experiment_dir": str(tmp_path)}, "here")
    assert state.write() == tmp_path / SWEEP_FILE
    assert read_sweep_state(tmp_path) == state


@pytest.mark.parametrize("text, why", [(None, "not an hvae-ray experiment directory"),
                                       ("{not json", "unreadable sweep state"),
                                       ("[1, 2]", "unreadable sweep state"),
                                       ('{"name": "x"}', "incomplete sweep state")])
def test_a_missing_or_broken_state_is_one_data_error(tmp_path, text, why):
    if text is not None:
        (tmp_path / SWEEP_FILE).write_text(text)
    with pytest.raises(DataError, match=why):
        read_sweep_state(tmp_path)


def test_a_trials_loop_config_is_plain_data_that_round_trips(tmp_path):
    state = SweepState.from_dict(OLD_STATE, "here")
    paths = TrialPaths.of(tmp_path, "abc_00001")
    loop = TrialLoop.of(state, paths, {"epochs": 3})
    # the trial directory is its TensorBoard run (named trial_<id>); an older experiment's tensorboard/ stays
    assert loop.tb_dir == str(tmp_path / "trial_abc_00001")
    (tmp_path / "trial_abc_00001" / "tensorboard").mkdir(parents=True)
    assert TrialLoop.of(state, paths, {"epochs": 3}).tb_dir == str(tmp_path / "trial_abc_00001" / "tensorboard")
    assert loop.work_dir == str(tmp_path / "trial_abc_00001" / "engine")
    assert (loop.gpu_share, loop.card_bytes, loop.data_path) == (0.25, 8.0e10, "/cache/q.parquet")
    assert TrialLoop.from_dict(json.loads(json.dumps(loop.to_dict()))) == loop


def test_report_rows_keep_the_keys_tune_and_the_trial_table_read():
    row = EpochReport({"epoch": 2.0, "val_objective": 1.5}, epochs_done=3, node_id="n", worker_started_at=1.0,
                      loop_started_at=2.0, reported_at=3.0).to_row()
    assert row == {"epoch": 2.0, "val_objective": 1.5, "epochs_done": 3, "diverged": 0.0, "node_id": "n",
                   "worker_started_at": 1.0, "loop_started_at": 2.0, "reported_at": 3.0}
    final = DivergedReport("KL runaway", "n").to_row()
    assert final["diverged"] == 1.0 and final["error"] == "KL runaway"
    assert all(final[m] == math.inf for m in RANKABLE_METRICS)


def test_trial_paths_find_tunes_trial_directories(tmp_path):
    for name in ("trial_b", "trial_a", "_train", "other"):
        (tmp_path / name).mkdir()
    (tmp_path / "trial_file").write_text("")
    assert [p.trial_id for p in trial_paths(tmp_path)] == ["a", "b"]
    paths = trial_paths(tmp_path)[0]
    assert paths.metrics_log == tmp_path / "trial_a" / "engine" / "metrics.jsonl"
    assert paths.results == tmp_path / "trial_a" / "result.json"


def test_jsonl_skips_a_line_cut_short(tmp_path):
    f = tmp_path / "r.jsonl"
    assert read_jsonl(f) == []
    f.write_text('{"a": 1}\n\n{"a": 2}\n{"a": ')
    assert read_jsonl(f) == [{"a": 1}, {"a": 2}]
