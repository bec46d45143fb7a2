"""The training engine end to end on CPU: learning, TensorBoard tags, exact resume, divergence guards,
callbacks, test-split indices and safe checkpoint loading."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from hvae_ray import engine
from hvae_ray.config import COMPONENTS, Config, load_config
from hvae_ray.data.generate import generate_jets
from hvae_ray.errors import ConfigError, DataError, HvaeError, TrainingDiverged
from hvae_ray.model.losses import kl_weight

MAIN_EPOCHS = 6


def small_config(**overrides) -> Config:
    """A model small enough to train for a few epochs in seconds on one CPU core."""
    base = {"epochs": 4, "batch_size": 16, "gradient_accumulation_steps": 2, "learning_rate": 3e-3,
            "model.hidden_dim": 8, "model.latent_dim": 4, "model.num_layers": 1, "model.decoder_layers": 1,
            "kl_warmup_epochs": 2, "device": "cpu"}
    return Config().with_overrides(base | overrides)


@pytest.fixture(scope="module")
def jets():
    """120 Pythia q jets (about 1-2 s)."""
    return generate_jets("q", 120, seed=1, workers=1, progress=False)


@pytest.fixture(scope="module")
def few_jets(jets):
    return jets.subset(np.arange(40))


@dataclass
class MainRun:
    cfg: Config
    result: dict
    reports: list
    save_dir: Path
    log_dir: Path


@pytest.fixture(scope="module")
def main_run(jets, tmp_path_factory):
    """One end-to-end CPU run on all 120 jets, shared by the tests that inspect its outputs."""
    root = tmp_path_factory.mktemp("main_run")
    cfg = small_config(**{"epochs": MAIN_EPOCHS, "model.hidden_dim": 32, "kl_warmup_epochs": 3,
                          "gradient_accumulation_steps": 1})
    reports: list[engine.EpochReport] = []
    result = engine.fit(cfg, jets, save_dir=root / "run", log_dir=root / "tb", save_test_indices=True,
                        callbacks=[reports.append], progress=False)
    return MainRun(cfg, result, reports, root / "run", root / "tb")


def model_state(path) -> dict[str, torch.Tensor]:
    return engine.load_checkpoint(path)["model"]


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------------------------------------
# (a) End to end


def test_training_reduces_the_loss_and_keeps_kl_finite(main_run):
    train = [r.metrics["train_total"] for r in main_run.reports]
    assert len(train) == MAIN_EPOCHS
    assert train[-1] < train[0]
    for r in main_run.reports:
        for key in ("train_kl", "val_kl", "val_total", "val_objective", "val_w1m"):
            assert math.isfinite(r.metrics[key]), (r.epoch, key)
        assert r.metrics["val_kl"] >= 0
    res = main_run.result
    assert res["epochs_run"] == MAIN_EPOCHS and res["epoch"] == MAIN_EPOCHS - 1
    assert res["save_dir"] == str(main_run.save_dir) and res["log_dir"] == str(main_run.log_dir)


def test_best_checkpoint_is_the_lowest_validation_objective(main_run):
    objectives = [r.metrics["val_objective"] for r in main_run.reports]
    best_epoch = int(np.argmin(objectives))
    assert main_run.result["best_epoch"] == best_epoch
    assert main_run.result["best_val_objective"] == pytest.approx(min(objectives))
    assert engine.load_checkpoint(main_run.save_dir / "best")["epoch"] == best_epoch
    assert engine.load_checkpoint(main_run.save_dir / "last")["epoch"] == MAIN_EPOCHS - 1
    # is_best marks each new minimum.
    running = math.inf
    for r in main_run.reports:
        assert r.is_best == (r.metrics["val_objective"] < running)
        running = min(running, r.metrics["val_objective"])


def test_run_directory_holds_the_config(main_run):
    assert load_config(main_run.save_dir / "config.yaml") == main_run.cfg


def test_generation_objective_with_set_and_jet_losses_picks_the_best_checkpoint_by_val_generation(
        tmp_path, monkeypatch):
    """particle_loss sinkhorn + the jet term, best checkpoint by val_generation (prior samples against
    100 validation jets every epoch): the metrics are finite and best/ is the epoch of the lowest
    val_generation, not of the lowest val_objective."""
    jets = generate_jets("q", 200, seed=3, workers=1, progress=False)
    cfg = small_config(**{"epochs": 2, "particle_loss": "sinkhorn", "loss_weights.jet_features": 1.0,
                          "objective": "generation", "generation_every": 1, "generation_jets": 100,
                          "data.val_fraction": 0.5, "data.test_fraction": 0.0})
    assert len(engine.split_indices(len(jets), cfg)[1]) == cfg.generation_jets  # 100 validation jets

    # The real metrics, except that the second epoch's val_generation is pushed to the side opposite
    # to its val_objective, so that choosing by val_objective would pick the other checkpoint.
    real_evaluate, real_generation = engine.Trainer.evaluate, engine.Trainer.generation_metrics
    objectives, computed = [], []

    def evaluate(self, epoch):
        out = real_evaluate(self, epoch)
        objectives.append(out["val_objective"])
        return out

    def generation_metrics(self):
        out = real_generation(self)
        computed.append(dict(out))
        if len(computed) == 2:
            out["val_generation"] *= 1e3 if objectives[1] < objectives[0] else 1e-3
        return out

    monkeypatch.setattr(engine.Trainer, "evaluate", evaluate)
    monkeypatch.setattr(engine.Trainer, "generation_metrics", generation_metrics)
    reports: list[engine.EpochReport] = []
    res = engine.fit(cfg, jets, save_dir=tmp_path, callbacks=[reports.append], progress=False)
    assert [r.epoch for r in reports] == [0, 1] and res["epochs_run"] == 2
    assert len(computed) == 2  # generation_every: 1 samples every epoch
    for r, raw in zip(reports, computed, strict=True):
        for key in ("val_w1m", "val_w1p", "val_fpd", "val_generation", "train_jet_features", "val_jet_features"):
            assert math.isfinite(r.metrics[key]), (r.epoch, key)
        for key in ("val_w1m", "val_w1p", "val_fpd"):
            assert r.metrics[key] == raw[key] and raw[key] >= 0, (r.epoch, key)
        assert r.metrics["train_jet_features"] > 0 and r.metrics["val_jet_features"] > 0
        # val_generation is the mean ratio of the three metrics to their fidelity targets
        assert raw["val_generation"] == pytest.approx(np.mean(
            [raw[k] / target for k, target in engine.GENERATION_TARGETS.items()]), rel=1e-9)
    generation = [r.metrics["val_generation"] for r in reports]
    best_epoch = int(np.argmin(generation))
    assert best_epoch != int(np.argmin([r.metrics["val_objective"] for r in reports]))
    assert "best_val_objective" not in res
    assert res["best_val_generation"] == min(generation)
    assert res["best_epoch"] == best_epoch
    running = math.inf
    for r in reports:  # each report carries the running minimum; is_best marks each new one
        assert r.is_best == (r.metrics["val_generation"] < running)
        running = min(running, r.metrics["val_generation"])
        assert r.metrics["best_val_generation"] == running
    assert engine.load_checkpoint(tmp_path / "best")["epoch"] == best_epoch
    assert engine.load_checkpoint(tmp_path / "last")["epoch"] == 1


# ---------------------------------------------------------------------------------------------------------
# (b) TensorBoard


@pytest.mark.parametrize("prior", ["fitted", "standard"])
def test_generation_metrics_are_scipys_w1_and_jetnets_fpd_of_the_jets_they_compare(jets, prior):
    """The per-epoch score takes its W1s with torch (on the run's device) and caches the validation side:
    each value equals scipy's W1 and our jetnet-equal FPD recomputed from the same validation jets and the
    same seeded samples, call after call."""
    from scipy.stats import wasserstein_distance

    from hvae_ray.evaluation.efp import efps, jet_mass
    from hvae_ray.evaluation.metrics import fpd

    cfg = small_config(**{"generation_jets": 100, "generation_prior": prior, "data.val_fraction": 0.5,
                          "data.test_fraction": 0.0})
    tr = engine.Trainer(cfg, engine.prepare(cfg, jets), torch.device("cpu"))
    tr.train_epoch(0)
    first, second = tr.generation_metrics(), tr.generation_metrics()
    assert first == second and all(math.isfinite(v) for v in first.values())
    val = jets.subset(tr.splits.val[:cfg.generation_jets])
    train = jets.subset(tr.splits.train[:cfg.generation_jets])
    gen_p, gen_m = tr.scorer.generated(tr.model, tr.normaliser, cfg, train)
    assert first["val_w1m"] == pytest.approx(
        wasserstein_distance(jet_mass(val.particles, val.mask), jet_mass(gen_p, gen_m)), rel=1e-12)
    w1p = np.mean([wasserstein_distance(val.particles[..., f][val.mask], gen_p[..., f][gen_m]) for f in range(3)])
    assert first["val_w1p"] == pytest.approx(w1p, rel=1e-12)
    n = len(val)
    assert n == 60  # fewer than generation_jets: the validation split is half of 120 jets
    expected_fpd = fpd(efps(val.particles, val.mask), efps(gen_p, gen_m), min_samples=n // 2, max_samples=n,
                       num_batches=4, num_points=4, seed=cfg.seed)[0]
    assert first["val_fpd"] == pytest.approx(expected_fpd, rel=1e-9, abs=1e-12)


def test_tensorboard_has_every_required_tag_once_per_epoch(main_run):
    acc = EventAccumulator(str(main_run.log_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    # the loss curves, KL and its weight, and one curve per loss component, train and val
    required = {"Loss/train_total", "Loss/train_kl", "KL/weight", "Loss/val_total", "Loss/val_kl",
                *(f"Loss/{s}_{c}" for s in ("train", "val") for c in COMPONENTS)}
    assert required <= scalars
    for tag in required:
        assert [e.step for e in acc.Scalars(tag)] == list(range(MAIN_EPOCHS)), tag
    weights = [e.value for e in acc.Scalars("KL/weight")]
    assert weights == pytest.approx([kl_weight(e, main_run.cfg) for e in range(MAIN_EPOCHS)], rel=1e-6)
    # The warm-up is visible: floor first, cap from kl_warmup_epochs on.
    assert weights[0] == pytest.approx(main_run.cfg.kl_min_weight, rel=1e-6)
    assert weights[-1] == pytest.approx(main_run.cfg.kl_max_weight, rel=1e-6)
    train_total = [e.value for e in acc.Scalars("Loss/train_total")]
    assert train_total == pytest.approx([r.metrics["train_total"] for r in main_run.reports], rel=1e-6)
    # Real-vs-generated distributions at new best epochs (at most every tenth of the run) and at the end
    assert any(t.startswith("Distributions/") for t in acc.Tags()["images"])
    steps = sorted({e.step for e in acc.Images("Distributions/mass")})
    best_epochs = [r.epoch for r in main_run.reports if r.is_best]
    assert steps[0] == 0 and steps[-1] == MAIN_EPOCHS - 1
    assert set(steps) <= set(best_epochs) | {MAIN_EPOCHS - 1}
    gap = max(1, main_run.cfg.epochs // 10)
    assert all(b - a >= gap for a, b in zip(steps[:-2], steps[1:-1]))


# ---------------------------------------------------------------------------------------------------------
# (f) Callbacks


def test_callbacks_get_one_report_per_epoch(main_run):
    assert [r.epoch for r in main_run.reports] == list(range(MAIN_EPOCHS))
    for r in main_run.reports:
        assert r.checkpoint_dir == main_run.save_dir / "last"
        assert r.metrics["epoch"] == r.epoch
        assert r.metrics["kl_weight"] == kl_weight(r.epoch, main_run.cfg)
        assert {"train_total", "val_total", "val_kl", "val_objective", "lr", "epoch_time_s"} <= set(r.metrics)


def test_callback_returning_true_stops_after_that_epoch(few_jets, tmp_path):
    seen: list[int] = []
    result = engine.fit(small_config(epochs=5), few_jets, save_dir=tmp_path,
                        callbacks=[lambda r: r.epoch == 1, lambda r: seen.append(r.epoch)], progress=False)
    assert result["epochs_run"] == 2 and result["epoch"] == 1
    assert seen == [0, 1]        # every callback still sees the stopping epoch
    assert engine.load_checkpoint(tmp_path / "last")["epoch"] == 1


# ---------------------------------------------------------------------------------------------------------
# (c) Exact resume


def test_resume_continues_exactly(few_jets, tmp_path):
    cfg = small_config(epochs=4)  # dropout on, gradient accumulation on: RNG and optimiser state matter
    straight = engine.fit(cfg, few_jets, save_dir=tmp_path / "straight", progress=False)

    interrupted = engine.fit(cfg, few_jets, save_dir=tmp_path / "resumed", progress=False,
                             callbacks=[lambda r: r.epoch == 1])
    assert interrupted["epochs_run"] == 2
    resumed = engine.fit(cfg, few_jets, save_dir=tmp_path / "resumed", resume=True, progress=False)
    assert resumed["epochs_run"] == 2 and resumed["epoch"] == 3

    assert_same_state(model_state(tmp_path / "straight" / "last"), model_state(tmp_path / "resumed" / "last"))
    for key in ("train_total", "train_kl", "val_total", "val_kl", "val_objective", "best_val_objective"):
        assert resumed[key] == pytest.approx(straight[key], rel=1e-6, abs=1e-9), key
    assert resumed["best_epoch"] == straight["best_epoch"]
    a = engine.load_checkpoint(tmp_path / "straight" / "last")
    b = engine.load_checkpoint(tmp_path / "resumed" / "last")
    assert a["optimizer"]["state"][0]["step"] == b["optimizer"]["state"][0]["step"]
    assert torch.equal(a["optimizer"]["state"][0]["exp_avg"], b["optimizer"]["state"][0]["exp_avg"])


def test_resume_from_an_explicit_checkpoint_path(few_jets, tmp_path):
    cfg = small_config(epochs=2)
    engine.fit(cfg, few_jets, save_dir=tmp_path / "a", progress=False, callbacks=[lambda r: True])
    res = engine.fit(cfg, few_jets, save_dir=tmp_path / "b", resume=tmp_path / "a" / "last", progress=False)
    assert res["epochs_run"] == 1 and res["epoch"] == 1
    assert engine.load_checkpoint(tmp_path / "b" / "last")["epoch"] == 1


def test_resume_without_a_checkpoint(few_jets, tmp_path):
    with pytest.raises(DataError, match="checkpoint not found"):
        engine.fit(small_config(), few_jets, save_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(HvaeError, match="save_dir"):
        engine.fit(small_config(), few_jets, resume=True, progress=False)


def test_resume_with_a_different_model_shape_is_a_config_error(main_run, jets):
    before = (main_run.save_dir / "last" / engine.CHECKPOINT_FILE).read_bytes()
    cfg = main_run.cfg.with_overrides({"model.latent_dim": 8, "epochs": MAIN_EPOCHS + 1})
    with pytest.raises(ConfigError, match="'model.latent_dim' is 8 here but 4"):
        engine.fit(cfg, jets, save_dir=main_run.save_dir, resume=True, progress=False)
    assert (main_run.save_dir / "last" / engine.CHECKPOINT_FILE).read_bytes() == before


# ---------------------------------------------------------------------------------------------------------
# (d), (e) Divergence


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(few_jets, tmp_path, monkeypatch):
    from hvae_ray.engine import steps

    real_loss = steps.weighted_loss
    poisoned = {"on": False}
    good: dict = {}

    def weighted_loss(terms, kl, beta, weights):
        loss = real_loss(terms, kl, beta, weights)
        return loss * float("nan") if poisoned["on"] else loss

    def after_epoch(report):
        if report.epoch == 1:  # epochs 0 and 1 train normally, the 3rd epoch turns NaN
            good["state"] = model_state(report.checkpoint_dir)
            poisoned["on"] = True

    monkeypatch.setattr(steps, "weighted_loss", weighted_loss)
    with pytest.raises(TrainingDiverged) as excinfo:
        engine.fit(small_config(epochs=5), few_jets, save_dir=tmp_path, callbacks=[after_epoch], progress=False)
    msg = str(excinfo.value)
    assert msg.startswith("epoch 2") and "not finite" in msg and "last good checkpoint" in msg
    assert "\n" not in msg
    assert isinstance(excinfo.value, HvaeError)  # the CLI reports it in one line

    state = engine.load_checkpoint(tmp_path / "last")
    assert state["epoch"] == 1
    assert_same_state(state["model"], good["state"])
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    model, normaliser, cfg = engine.model_from_checkpoint(state)
    assert_same_state(model.state_dict(), state["model"])  # the weights of the last good epoch
    assert cfg.epochs == 5


def test_kl_runaway_stops_the_run(few_jets, tmp_path):
    with pytest.raises(TrainingDiverged, match="max_kl") as excinfo:
        engine.fit(small_config(max_kl=1e-9), few_jets, save_dir=tmp_path, progress=False)
    assert "epoch 0" in str(excinfo.value)
    assert not (tmp_path / "last" / engine.CHECKPOINT_FILE).exists()  # no checkpoint of a runaway epoch


# ---------------------------------------------------------------------------------------------------------
# (g) Test indices and splits


def test_save_test_indices(main_run, jets):
    test = np.load(main_run.save_dir / "test_indices.npy")
    train, val, test_expected = engine.split_indices(len(jets), main_run.cfg)
    np.testing.assert_array_equal(test, test_expected)
    assert len(test) == round(main_run.cfg.data.test_fraction * len(jets))
    assert not set(test) & set(train) and not set(test) & set(val) and not set(train) & set(val)
    assert sorted(set(test) | set(train) | set(val)) == list(range(len(jets)))
    ckpt = engine.load_checkpoint(main_run.save_dir / "last")
    np.testing.assert_array_equal(ckpt["test_indices"].numpy(), test)


def test_splits_are_seeded():
    cfg = Config()
    a, b = engine.split_indices(200, cfg), engine.split_indices(200, cfg)
    c = engine.split_indices(200, cfg.with_overrides({"seed": 7}))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[2], c[2])
    assert [len(x) for x in a] == [140, 30, 30]


def test_max_jets_limits_the_sample(jets):
    splits = engine.prepare(Config().with_overrides({"data.max_jets": 50}), jets)
    idx = np.concatenate([splits.train, splits.val, splits.test])
    assert len(idx) == 50 and idx.max() < 50
    assert len(splits.train_graphs) == len(splits.train) and len(splits.val_graphs) == len(splits.val)


def test_too_few_jets_for_a_split(few_jets):
    with pytest.raises(DataError, match="none for training"):
        engine.split_indices(1, Config().with_overrides({"data.test_fraction": 0.6, "data.val_fraction": 0.2}))
    with pytest.raises(DataError):
        engine.prepare(Config(), few_jets.subset(np.array([], dtype=np.int64)))


# ---------------------------------------------------------------------------------------------------------
# (h) Checkpoints


def test_checkpoints_load_weights_only_and_rebuild_the_model(main_run):
    path = main_run.save_dir / "best" / engine.CHECKPOINT_FILE
    raw = torch.load(path, map_location="cpu", weights_only=True)  # plain tensors and containers only
    assert {"model", "optimizer", "config", "normaliser", "epoch", "test_indices"} <= set(raw)
    state = engine.load_checkpoint(main_run.save_dir / "best")  # a directory works as well
    model, normaliser, cfg = engine.model_from_checkpoint(state)
    assert cfg == main_run.cfg and not model.training
    particles, mask = engine.generate(model, normaliser, 20, seed=3)
    assert particles.shape == (20, 30, 3) and mask.shape == (20, 30)
    assert mask.any(axis=1).all()                            # no empty jet
    assert (particles[~mask] == 0).all() and np.isfinite(particles).all()
    again, _ = engine.generate(model, normaliser, 20, seed=3)
    np.testing.assert_array_equal(particles, again)          # seeded


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_not_a_checkpoint_is_a_data_error(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(DataError, match="not a readable hvae-ray checkpoint") as excinfo:
        engine.load_checkpoint(text)
    assert str(text) in str(excinfo.value) and "\n" not in str(excinfo.value)

    partial = tmp_path / "partial.pt"
    torch.save({"model": {"w": torch.zeros(2)}}, partial)
    with pytest.raises(DataError, match="missing model/config/normaliser"):
        engine.load_checkpoint(partial)

    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(DataError, match="not an hvae-ray checkpoint"):
        engine.load_checkpoint(tensor)

    with pytest.raises(DataError, match="not found"):
        engine.load_checkpoint(tmp_path / "missing")
    with pytest.raises(DataError, match="not found"):
        engine.load_checkpoint(tmp_path)  # a directory without checkpoint.pt


def test_checkpoint_loading_never_runs_code(tmp_path):
    marker = tmp_path / "was_executed"
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "config": {}, "normaliser": _RunsCodeWhenUnpickled(marker)}, evil)
    with pytest.raises(DataError, match="not a readable hvae-ray checkpoint"):
        engine.load_checkpoint(evil)
    assert not marker.exists()


def test_patience_stops_a_run_whose_score_no_longer_improves(few_jets, tmp_path):
    """At a learning rate too small to move a float32 weight the score never improves after the first
    epoch: with patience 3 and no warm-up the run stops after epoch 4 of 20, keeping epoch 1 as its best;
    with a 6-epoch KL warm-up the 3 epochs count from the first at the cap (epoch 7), so it stops after 10."""
    cfg = small_config(epochs=20, patience=3, learning_rate=1e-12, kl_warmup_epochs=0, **{"model.dropout": 0.0})
    result = engine.fit(cfg, few_jets, save_dir=tmp_path / "run", progress=False)
    assert (result["epochs_run"], result["best_epoch"]) == (4, 0)
    assert (tmp_path / "run" / "best" / "checkpoint.pt").exists()
    warmed = engine.fit(cfg.with_overrides({"kl_warmup_epochs": 6}), few_jets, progress=False)
    assert warmed["epochs_run"] == 10
    unlimited = engine.fit(cfg.with_overrides({"patience": 0, "epochs": 5}), few_jets, progress=False)
    assert unlimited["epochs_run"] == 5


def test_the_first_epoch_reports_when_the_first_optimiser_step_was_launched(few_jets):
    """A sweep's start-up critical path ends at the first optimiser step: the first epoch's metrics carry
    its Unix time, between the call and the end of that epoch; later epochs do not repeat it."""
    reports = []
    t0 = time.time()
    engine.fit(small_config(epochs=2), few_jets, callbacks=[lambda r: reports.append((r, time.time()))],
               progress=False)
    first, at_first = reports[0]
    assert t0 < first.metrics["first_step_at"] < at_first
    assert "first_step_at" not in reports[1][0].metrics


def test_a_checkpoint_that_cannot_be_written_stops_in_one_line_and_keeps_the_last_good_one(few_jets, tmp_path):
    """A file-size limit stands in for a full disk: the resumed run's first checkpoint does not fit. One
    DataError line naming the file, and last/ stays the whole checkpoint of the epoch before."""
    import subprocess
    import sys

    from hvae_ray.data.io import save_parquet

    save_parquet(few_jets, tmp_path / "jets.parquet")
    engine.fit(small_config(epochs=1), few_jets, save_dir=tmp_path / "probe", progress=False)
    size = (tmp_path / "probe" / "last" / engine.CHECKPOINT_FILE).stat().st_size
    code = f"""
import resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
from hvae_ray import engine
from hvae_ray.data.io import load_jets
from hvae_ray.config import Config
from hvae_ray.errors import HvaeError
cfg = Config().with_overrides({small_config(epochs=3).flat()!r})
jets = load_jets({str(tmp_path / "jets.parquet")!r})
engine.fit(cfg.with_overrides({{"epochs": 1}}), jets, save_dir={str(tmp_path / "run")!r}, progress=False)
resource.setrlimit(resource.RLIMIT_FSIZE, ({size // 2}, {size // 2}))
try:
    engine.fit(cfg, jets, save_dir={str(tmp_path / "run")!r}, resume=True, progress=False)
except HvaeError as e:
    print("ERROR", e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    lines = [x for x in out.stdout.splitlines() if x.startswith("ERROR")]
    assert len(lines) == 1, out.stdout + out.stderr[-2000:]
    assert "could not write it" in lines[0] and "training stopped after epoch 1" in lines[0], lines[0]
    assert "is the last good checkpoint" in lines[0]
    state = engine.load_checkpoint(tmp_path / "run" / "last")
    assert state["epoch"] == 0
    assert [p.name for p in (tmp_path / "run" / "last").iterdir()] == [engine.CHECKPOINT_FILE]


def test_the_cosine_schedule_runs_from_the_learning_rate_to_its_floor():
    from hvae_ray.engine.steps import scheduled_lr

    cfg = small_config(epochs=11, lr_schedule="cosine", lr_min_ratio=0.1, learning_rate=2e-3)
    lrs = [scheduled_lr(e, cfg) for e in range(11)]
    assert lrs[0] == pytest.approx(2e-3) and lrs[-1] == pytest.approx(2e-4) and lrs[5] == pytest.approx(1.1e-3)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert scheduled_lr(7, small_config()) == small_config().learning_rate  # constant by default


def test_the_moving_average_warms_up_so_it_forgets_the_random_start():
    """The average's decay after t steps is min(decay, (1 + t) / (10 + t)): a run much shorter than
    1 / (1 - decay) steps still averages its trained weights, not its initial ones."""
    from hvae_ray.engine.steps import average_decay, update_average

    steps = torch.tensor([1.0, 10.0, 100.0, 10_000.0])
    assert average_decay(0.999, steps).tolist() == pytest.approx([2 / 11, 11 / 20, 101 / 110, 0.999])
    assert average_decay(torch.tensor([0.5, 0.0]), torch.tensor([100.0, 100.0])).tolist() == [0.5, 0.0]
    start, trained = torch.zeros(3), torch.ones(3)
    average = [start.clone()]
    for t in range(1, 301):  # 300 steps at the trained weights
        update_average(average, [trained], 0.999, torch.tensor(float(t)))
    # without the warm-up 0.999**300 = 74 % of the start would remain; with it, the product of the decays
    expected = math.prod(average_decay(0.999, torch.arange(1.0, 301)).tolist())
    assert 0.999 ** 300 > 0.7 and expected < 1e-12
    assert float(1 - average[0][0]) < 1e-6  # float32 rounding of the average


def test_a_moving_average_of_the_weights_is_validated_saved_and_resumed_exactly(few_jets, tmp_path):
    """With ema_decay the checkpoint's model is the average (validated, sampled), train_model the trained
    weights; three epochs straight, and two (stopped by a callback) then a resume, end at the same bits, metrics
    and (cosine) learning rate included."""
    cfg = small_config(epochs=3, ema_decay=0.9, lr_schedule="cosine")
    reports = []
    whole = engine.fit(cfg, few_jets, save_dir=tmp_path / "a", progress=False, callbacks=[reports.append])
    engine.fit(cfg, few_jets, save_dir=tmp_path / "b", progress=False, callbacks=[lambda r: r.epoch == 1])
    resumed = engine.fit(cfg, few_jets, save_dir=tmp_path / "b", resume=True, progress=False)
    assert resumed["epochs_run"] == 1 and [r.metrics["lr"] for r in reports][-1] == resumed["lr"] < cfg.learning_rate
    for key in ("train_total", "val_total", "val_kl", "val_objective"):
        assert resumed[key] == whole[key], key
    a, b = (engine.load_checkpoint(tmp_path / d / "last") for d in "ab")
    for part in ("model", "train_model"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert any(not torch.equal(a["model"][k], a["train_model"][k]) for k in a["model"])
    # the reported validation loss is the averaged model's
    tr = engine.Trainer(cfg.with_overrides({"ema_decay": 0.0}), engine.prepare(cfg, few_jets), "cpu")
    tr.model.load_state_dict(a["model"])
    assert tr.evaluate(2)["val_total"] == pytest.approx(whole["val_total"], rel=1e-6)
