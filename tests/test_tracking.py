"""TensorBoard logging: scalar tags per epoch, skipped non-finite values, the HParams summary, figures."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader  # noqa: E402
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2  # noqa: E402

from hvae_ray.tracking import (  # noqa: E402
    BEST_TAGS,
    HPARAM_METRICS,
    KL_AT_BEST_TAG,
    KL_SLOPE_TAG,
    TAGS,
    TensorBoardLogger,
)


def read(log_dir) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_log_epoch_writes_each_metric_under_its_tag(tmp_path):
    logger = TensorBoardLogger(tmp_path)
    for epoch in range(3):
        logger.log_epoch(epoch, {key: float(epoch + i) for i, key in enumerate(TAGS)} | {"epoch": epoch,
                                                                                         "unrelated": 1.0})
    logger.close()
    acc = read(tmp_path)
    written = set(acc.Tags()["scalars"])
    assert written == set(TAGS.values()) | set(BEST_TAGS.values()) | {KL_AT_BEST_TAG, KL_SLOPE_TAG}
    assert len(set(TAGS.values())) == len(TAGS)  # no two metrics share a curve
    assert set(HPARAM_METRICS) <= written  # every HParams column is a curve a run writes
    for i, tag in enumerate(TAGS.values()):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [0, 1, 2]
        assert [e.value for e in events] == pytest.approx([0.0 + i, 1.0 + i, 2.0 + i])


def test_non_finite_and_non_numeric_values_are_skipped(tmp_path):
    logger = TensorBoardLogger(tmp_path)
    logger.log_epoch(0, {"train_total": math.nan, "val_total": math.inf, "val_kl": -math.inf,
                         "train_kl": 2.5, "lr": "0.001", "val_w1m": None, "kl_weight": 1e-5})
    logger.log_epoch(1, {"train_total": 1.5, "train_kl": math.nan})
    logger.close()
    acc = read(tmp_path)
    assert set(acc.Tags()["scalars"]) == {"Loss/train_kl", "KL/weight", "Loss/train_total"}  # no Lowest/*: no val
    assert [(e.step, e.value) for e in acc.Scalars("Loss/train_kl")] == [(0, 2.5)]
    assert [(e.step, e.value) for e in acc.Scalars("Loss/train_total")] == [(1, 1.5)]
    assert acc.Scalars("KL/weight")[0].value == pytest.approx(1e-5)


def test_int_metric_values_are_logged(tmp_path):
    logger = TensorBoardLogger(tmp_path)
    logger.log_epoch(4, {"epoch_time_s": 3})
    logger.close()
    assert [(e.step, e.value) for e in read(tmp_path).Scalars("Train/epoch_time_s")] == [(4, 3.0)]


def test_log_hparams_start_writes_a_readable_session_start(tmp_path):
    logger = TensorBoardLogger(tmp_path)
    hparams = {"learning_rate": 1e-3, "model.hidden_dim": 32, "kl_schedule": "cyclical",
               "loss_weights": {"topology": 0.1}}
    logger.log_hparams_start(hparams, HPARAM_METRICS)
    logger.close()
    # One event file, in the run's own directory (TensorBoard lists runs by directory).
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1

    content = read(tmp_path).PluginTagToContent("hparams")
    # a session without an end: TensorBoard shows it as running
    assert set(content) == {"_hparams_/experiment", "_hparams_/session_start_info"}

    exp = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {h.name for h in exp.hparam_infos} == set(hparams)  # no outcome column: the trial table has it
    assert [m.name.tag for m in exp.metric_infos] == list(HPARAM_METRICS)

    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    values = start.session_start_info.hparams
    assert set(values) == set(hparams)
    assert values["learning_rate"].number_value == pytest.approx(1e-3)
    assert values["model.hidden_dim"].number_value == 32
    assert values["kl_schedule"].string_value == "cyclical"
    # Values TensorBoard cannot show (dicts, lists) are written as their text.
    assert values["loss_weights"].string_value == str({"topology": 0.1})


def test_hparams_and_scalars_share_the_run(tmp_path):
    logger = TensorBoardLogger(tmp_path)
    logger.log_hparams_start({"seed": 1}, ["Loss/val_objective"])
    logger.log_epoch(0, {"val_objective": 3.0})
    logger.close()
    acc = read(tmp_path)
    assert acc.Scalars("Loss/val_objective")[0].value == 3.0
    exp = plugin_data_pb2.HParamsPluginData.FromString(acc.PluginTagToContent("hparams")["_hparams_/experiment"])
    assert [m.name.tag for m in exp.experiment.metric_infos] == ["Loss/val_objective"]


def test_log_figures_writes_images_under_the_prefix(tmp_path):
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    logger = TensorBoardLogger(tmp_path)
    logger.log_figures({"mass": fig}, step=7, prefix="Evaluate")
    logger.close()
    plt.close(fig)
    acc = read(tmp_path)
    assert acc.Tags()["images"] == ["Evaluate/mass"]
    img = acc.Images("Evaluate/mass")[0]
    assert img.step == 7 and img.encoded_image_string.startswith(b"\x89PNG")


def test_best_so_far_scalars_and_the_kl_at_the_best_epoch(tmp_path):
    objective = [5.0, 3.0, 4.0, 2.5, 2.7]
    kl = [1.0, 8.0, 2.0, 6.0, 0.5]
    logger = TensorBoardLogger(tmp_path)
    for epoch in range(3):
        logger.log_epoch(epoch, {"val_objective": objective[epoch], "val_kl": kl[epoch], "val_w1m": 0.1 * epoch})
    logger.close()
    logger = TensorBoardLogger(tmp_path)  # a resumed run goes on from the bests on disk
    for epoch in range(3, 5):
        logger.log_epoch(epoch, {"val_objective": objective[epoch], "val_kl": kl[epoch], "val_w1m": 0.1 * epoch})
    logger.close()
    acc = read(tmp_path)
    best = [e.value for e in sorted(acc.Scalars("Lowest/val_objective"), key=lambda e: e.step)]
    assert best == pytest.approx([5.0, 3.0, 3.0, 2.5, 2.5])
    at_best = [e.value for e in sorted(acc.Scalars(KL_AT_BEST_TAG), key=lambda e: e.step)]
    assert at_best == pytest.approx([1.0, 8.0, 8.0, 6.0, 6.0])  # not the lowest KL (0.5)
    assert [e.value for e in acc.Scalars("Lowest/val_w1m")] == pytest.approx([0.0] * 5)


@pytest.mark.parametrize("outcome, status", [("early_stopped", api_pb2.STATUS_UNKNOWN),
                                             ("diverged", api_pb2.STATUS_FAILURE),
                                             ("error", api_pb2.STATUS_FAILURE),
                                             ("completed", api_pb2.STATUS_SUCCESS)])
def test_log_hparams_end_states_how_the_run_ended(tmp_path, outcome, status):
    """The end is a summary of its own, written later than the start (here by another writer, as the
    sweep's driver writes it when the trial ends), and only the end: the start stays as it was."""
    logger = TensorBoardLogger(tmp_path)
    logger.log_hparams_start({"lr": 1e-3}, HPARAM_METRICS, group_name="t0")
    logger.log_epoch(0, {"val_objective": 3.0})
    logger.close()
    assert "_hparams_/session_end_info" not in read(tmp_path).PluginTagToContent("hparams")
    logger = TensorBoardLogger(tmp_path)
    logger.log_hparams_end(outcome)
    logger.close()
    content = read(tmp_path).PluginTagToContent("hparams")
    end = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_end_info"])
    assert end.session_end_info.status == status
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    assert start.session_start_info.group_name == "t0" and set(start.session_start_info.hparams) == {"lr"}
    written = [v.tag for f in tmp_path.glob("events.out.tfevents.*") for e in EventFileLoader(str(f)).Load()
               for v in e.summary.value if v.tag.startswith("_hparams_/")]
    assert sorted(written) == ["_hparams_/experiment", "_hparams_/session_end_info",
                               "_hparams_/session_start_info"]  # one start, one end: nothing else


def test_log_hparams_end_refuses_an_unknown_outcome(tmp_path):
    logger = TensorBoardLogger(tmp_path)
    with pytest.raises(ValueError, match="unknown outcome 'running'"):
        logger.log_hparams_end("running")  # a running session has no end
    logger.close()
    with pytest.raises(KeyError, match="hparams"):  # no HParams summary at all
        read(tmp_path).PluginTagToContent("hparams")


def test_kl_slope_is_the_least_squares_slope_of_the_last_20_epochs_across_a_resume(tmp_path):
    """KL/slope_last20 at epoch e is the fitted slope of val_kl over epochs max(0, e-19)..e (none at
    epoch 0); a resumed run reads the earlier epochs back from its own event file."""
    import numpy as np

    kl = [30.0 - 2.0 * e if e < 12 else 6.0 + 0.01 * (e % 3) for e in range(40)]  # falls, then levels off
    logger = TensorBoardLogger(tmp_path)
    for epoch in range(17):
        logger.log_epoch(epoch, {"val_kl": kl[epoch]})
    logger.close()
    logger = TensorBoardLogger(tmp_path)
    for epoch in range(17, 40):
        logger.log_epoch(epoch, {"val_kl": kl[epoch]} if epoch != 20 else {"val_kl": math.nan})
    logger.close()
    slopes = {e.step: e.value for e in read(tmp_path).Scalars(KL_SLOPE_TAG)}
    assert 0 not in slopes and 20 not in slopes  # one point; no KL that epoch
    for epoch, value in slopes.items():
        window = [e for e in range(epoch + 1) if e != 20][-20:]
        expected = np.polyfit(window, [kl[e] for e in window], 1)[0]
        assert value == pytest.approx(expected, rel=1e-5, abs=1e-6), epoch
    assert slopes[5] == pytest.approx(-2.0, rel=1e-5)
    assert abs(slopes[39]) < 0.01 < abs(slopes[12])  # levelled off by the end


def test_a_session_can_be_named(tmp_path):
    """group_name is the session's name in the HParams tab (its Trial ID column)."""
    logger = TensorBoardLogger(tmp_path)
    logger.log_hparams_start({"lr": 1e-3}, HPARAM_METRICS, group_name="ef772_00000")
    logger.close()
    content = read(tmp_path).PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    assert start.session_start_info.group_name == "ef772_00000"
    assert start.session_start_info.hparams["lr"].number_value == pytest.approx(1e-3)


def test_tensorboard_lists_the_kl_and_loss_groups_first():
    """TensorBoard orders scalar groups alphabetically: a run opens on KL and Loss, best-so-far after them."""
    groups = sorted({t.split("/")[0] for t in [*TAGS.values(), *BEST_TAGS.values(), KL_AT_BEST_TAG, KL_SLOPE_TAG]})
    assert groups[:3] == ["KL", "Loss", "Lowest"], groups
