"""GPU shares per trial, the allocator cap inside a share, and the distributed backend choice."""

from __future__ import annotations

import doctest
import json
import math

import pytest

from hvae_ray.sweep import resources
from hvae_ray.sweep.resources import (
    CUDA_CONTEXT,
    DEFAULT_TRIAL_MEMORY,
    GiB,
    MiB,
    allocator_fraction,
    gpu_fraction,
    trial_share,
)
from hvae_ray.sweep.spec import ResourceSpec
from hvae_ray.sweep.trainer import backend_for


def test_four_trials_fit_a_4gib_card_without_headroom():
    assert gpu_fraction(4 * GiB, 900 * MiB, 1.0) == 0.25


def test_headroom_leaves_room_for_three():
    assert gpu_fraction(4 * GiB, 900 * MiB, 1.25) == pytest.approx(1 / 3)


@pytest.mark.parametrize(("card", "trial", "headroom", "share"), [
    (4 * GiB, 4 * GiB, 1.0, 1.0),      # exactly one
    (80 * GiB, 900 * MiB, 1.25, 1 / 72),
    (16 * GiB, 1 * GiB, 1.0, 1 / 16),
])
def test_share_is_one_over_the_largest_k_that_fits(card, trial, headroom, share):
    got = gpu_fraction(card, trial, headroom)
    assert got == pytest.approx(share)
    k = round(1 / got)
    assert k * trial * headroom <= card < (k + 1) * trial * headroom


def test_a_trial_bigger_than_the_card_is_refused():
    with pytest.raises(ValueError, match="one trial needs .* GiB with headroom; the card has 4.00 GiB"):
        gpu_fraction(4 * GiB, 3.5 * GiB, 1.25)
    for card, trial in ((0, 1), (1, 0), (-1, 1)):
        with pytest.raises(ValueError, match="must be positive"):
            gpu_fraction(card, trial)


def test_docstring_example_holds():
    assert doctest.testmod(resources).failed == 0


@pytest.mark.parametrize("share", [0.25, 1 / 3, 0.5, 1.0])
@pytest.mark.parametrize("card_gb", [16, 24, 80])
def test_allocator_cap_keeps_the_whole_process_inside_its_share(share, card_gb):
    card = card_gb * GiB
    fraction = allocator_fraction(share, card)
    # tensors + cache (capped by the allocator) + the CUDA context (outside the cap) = the share
    assert fraction * card + CUDA_CONTEXT == pytest.approx(share * card)
    assert 0 < fraction < share


@pytest.mark.parametrize("share", [0.25, 1 / 3, 1.0])
def test_allocator_cap_of_a_smaller_card_budget_on_a_bigger_device(share):
    """Shares sized for a 4 GiB card, run on an 80 GiB device: the cap is a fraction of the real device
    that still keeps the process inside its 4 GiB-card budget."""
    card, device = 4 * GiB, 80 * GiB
    fraction = allocator_fraction(share, card, device)
    assert fraction * device + CUDA_CONTEXT == pytest.approx(share * card)
    assert allocator_fraction(share, card, card) == allocator_fraction(share, card)


def test_allocator_cap_never_goes_to_zero_or_above_one():
    small = 0.05 * 4 * GiB  # a 205 MiB share: smaller than the CUDA context itself
    assert small < CUDA_CONTEXT
    assert allocator_fraction(0.05, 4 * GiB) == pytest.approx(0.05 * 0.05)
    assert allocator_fraction(1.0, 1 * GiB, context_bytes=0) == 1.0
    assert allocator_fraction(1.0, 1 * GiB, context_bytes=-GiB) == 1.0


def test_trial_share_with_a_given_trial_size():
    # a given size is whole-process, of which the usual CUDA context is fixed: headroom on the rest
    share, trial, context = trial_share(4, 1000, 1.1)
    assert trial == 1000 * MiB and context == CUDA_CONTEXT
    assert share == gpu_fraction(4 * GiB, 1000 * MiB, 1.1, CUDA_CONTEXT) == 0.25
    assert trial_share(4, 1000, 1.6)[0] == pytest.approx(1 / 3)  # 760 + 240 · 1.6 = 1144 MiB


def test_headroom_covers_the_allocator_not_the_context():
    """The default config on an H100 (validation included): 972 MiB whole process, 208 MiB of it torch's
    reserved peak. Headroom on all of it would leave room for 3 on a 4 GiB card; on the allocator's part,
    4 fit, and each one's allocator cap (its share less its context) still exceeds its reserved peak."""
    assert gpu_fraction(4 * GiB, 972 * MiB, 1.15) == pytest.approx(1 / 3)
    assert gpu_fraction(4 * GiB, 972 * MiB, 1.15, 764 * MiB) == 0.25
    cap = allocator_fraction(0.25, 4 * GiB, 80 * GiB, 764 * MiB) * 80 * GiB
    assert cap > 208 * MiB * 1.15


def test_trial_share_auto_without_cuda_uses_the_default_estimate(monkeypatch):
    monkeypatch.setattr(resources, "measure_trial_memory", lambda steps=20, cfg=None: None)
    share, trial, context = trial_share(4, "auto", 1.25)
    assert trial == DEFAULT_TRIAL_MEMORY and context == CUDA_CONTEXT
    assert share == gpu_fraction(4 * GiB, DEFAULT_TRIAL_MEMORY, 1.25, CUDA_CONTEXT)


def test_trial_share_auto_uses_the_measured_process_memory(monkeypatch):
    measured = {"allocated_peak": 100 * MiB, "reserved_peak": 200 * MiB, "process": 700 * MiB}
    monkeypatch.setattr(resources, "measure_trial_memory", lambda steps=20, cfg=None: measured)
    assert trial_share(8, "auto", 1.0) == (1 / 11, 700 * MiB, 500 * MiB)
    share, trial, context = trial_share(8, "auto", 1.5)  # need 500 + 200 · 1.5 = 800 MiB: 10 fit
    assert share == 0.1 and context == 500 * MiB
    # without a whole-process figure (no NVML): the allocator's peak plus a CUDA context
    measured["process"] = math.nan
    share, trial, context = trial_share(8, "auto", 1.0)
    assert trial == 200 * MiB + CUDA_CONTEXT and context == CUDA_CONTEXT
    assert share == gpu_fraction(8 * GiB, trial, 1.0)


def test_measure_trial_memory_without_cuda_is_none():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    assert resources.measure_trial_memory() is None


def test_measured_trial_memory_is_cached_per_config(monkeypatch, tmp_path):
    """A second sweep of the same shape reuses the measurement; another model size measures again."""
    import subprocess

    import torch

    from hvae_ray.config import Config

    monkeypatch.setenv("HVAE_RAY_CACHE", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    calls = []

    def fake_run(cmd, **kw):  # the measuring subprocess, as a GPU host would answer it
        calls.append(cmd)
        hidden = json.loads(cmd[-1])["model"]["hidden_dim"]
        return subprocess.CompletedProcess(cmd, 0, stdout="RESULT " + json.dumps(
            {"allocated_peak": 1.0 * hidden, "reserved_peak": 2.0 * hidden, "process": 10.0 * hidden}), stderr="")

    monkeypatch.setattr(subprocess, "run", fake_run)
    first = resources.measure_trial_memory(cfg=Config())
    again = resources.measure_trial_memory(cfg=Config())
    assert len(calls) == 1 and again == {**first, "cached": True}
    wider = resources.measure_trial_memory(cfg=Config().with_overrides({"model.hidden_dim": 128}))
    assert len(calls) == 2 and wider["process"] == 1280.0 != first["process"]
    assert resources.measure_trial_memory(cfg=Config(), use_cache=False) == first and len(calls) == 3
    assert len(json.loads((tmp_path / "trial-memory.json").read_text())) == 2


def _failing_burst(monkeypatch, tmp_path, **answer):
    """measure_trial_memory on a (pretended) GPU host whose burst subprocess answers ``answer`` or raises
    ``answer["raises"]``."""
    import subprocess

    import torch

    monkeypatch.setenv("HVAE_RAY_CACHE", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def fake_run(cmd, **kw):
        if "raises" in answer:
            raise answer["raises"]
        return subprocess.CompletedProcess(cmd, answer.get("rc", 1), stdout=answer.get("stdout", ""),
                                           stderr=answer.get("stderr", ""))

    monkeypatch.setattr(subprocess, "run", fake_run)


@pytest.mark.parametrize(("answer", "why"), [
    ({"stderr": "Traceback (most recent call last):\n  File ...\ntorch.OutOfMemoryError: CUDA out of memory. "
                "Tried to allocate 2.00 GiB\n"},
     "exit status 1: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"),
    ({"rc": 0, "stdout": "warming up\n"}, "it printed no result"),
    ({"raises": __import__("subprocess").TimeoutExpired("python", 600)}, "it ran past 600 s"),
])
def test_a_failed_burst_raises_with_its_reason(monkeypatch, tmp_path, answer, why):
    _failing_burst(monkeypatch, tmp_path, **answer)
    with pytest.raises(resources.BurstFailed) as err:
        resources.measure_trial_memory()
    assert str(err.value) == why
    assert not (tmp_path / "trial-memory.json").exists()  # nothing cached from a failed burst


def test_trial_share_says_a_failed_burst_and_the_size_it_uses_instead(monkeypatch, tmp_path, capsys):
    _failing_burst(monkeypatch, tmp_path, stderr="RuntimeError: CUDA error: no kernel image is available\n")
    share, trial, context = trial_share(4, "auto", 1.25)
    assert (trial, context) == (DEFAULT_TRIAL_MEMORY, CUDA_CONTEXT)
    assert share == gpu_fraction(4 * GiB, DEFAULT_TRIAL_MEMORY, 1.25, CUDA_CONTEXT)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert "burst failed (exit status 1: RuntimeError: CUDA error: no kernel image is available)" in lines[0]
    assert f"default {DEFAULT_TRIAL_MEMORY / MiB:.0f} MiB per trial instead" in lines[0]


@pytest.mark.parametrize(("res", "cuda_here", "backend"), [
    # several GPU workers per trial: NCCL only where CUDA exists; a logical GPU on a CPU host is gloo
    (ResourceSpec(num_workers=2, gpu_fraction=0.5), False, "gloo"),
    (ResourceSpec(num_workers=2, gpu_fraction=0.5), True, "nccl"),
    (ResourceSpec(num_workers=4, gpu_memory_gb=16), False, "gloo"),
    (ResourceSpec(num_workers=4, gpu_memory_gb=16), True, "nccl"),
    # one worker, or CPU workers: gloo
    (ResourceSpec(num_workers=1, gpu_fraction=0.25), True, "gloo"),
    (ResourceSpec(num_workers=2, gpu_fraction=0.0), True, "gloo"),
    (ResourceSpec(num_workers=2), True, "gloo"),
    # explicit choices are kept
    (ResourceSpec(num_workers=2, backend="gloo", gpu_fraction=0.5), True, "gloo"),
    (ResourceSpec(num_workers=1, backend="nccl", gpu_fraction=0.5), False, "nccl"),
])
def test_backend_for(res, cuda_here, backend):
    assert backend_for(res, cuda_here) == backend


def test_trainer_keeps_the_best_checkpoints_by_the_sweep_metric(monkeypatch, tmp_path):
    """Ray Train keeps the latest checkpoint (for resume) plus the best 2 by the sweep's metric, so the
    trial table's best_checkpoint is never a deleted directory."""
    import ray.tune.integration.ray_train as tune_integration
    from ray.train.v2.api.callback import UserCallback

    from hvae_ray.sweep.layout import TrialLoop
    from hvae_ray.sweep.trainer import make_trainer

    class Callback(UserCallback):  # the real one needs a running Tune trial
        pass

    monkeypatch.setattr(tune_integration, "TuneReportCallback", Callback)
    loop = TrialLoop(config={}, data_path="x", tb_dir="tb", work_dir="engine", gpu_share=0.25)
    res = ResourceSpec(num_workers=1, cpus_per_worker=0.5, gpu_fraction=0.25)
    trainer = make_trainer(loop, res, 0.25, str(tmp_path), "t0", score=("val_w1m", "min"))
    ckpt = trainer.run_config.checkpoint_config
    assert (ckpt.num_to_keep, ckpt.checkpoint_score_attribute, ckpt.checkpoint_score_order) == \
        (2, "val_w1m", "min")
    scaling = trainer.scaling_config
    assert scaling.use_gpu and scaling.num_workers == 1
    assert scaling.resources_per_worker == {"CPU": 0.5, "GPU": 0.25}
