"""The GPU tier: what only a CUDA device exercises. Skipped without one; run on a GPU machine whenever
the engine changes (``pytest -m gpu``), its output kept under ``benchmarks/results/gpu-tests-<date>/``.

CUDA-graph steps against eager ones, bf16 and fp16 mixed precision (finite, resuming exactly),
``compile: true``, the allocator cap and its out-of-memory message, the trial memory burst, and the
population's captured step against its eager step and against runs trained alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hvae_ray import engine
from hvae_ray.config import Config
from hvae_ray.data.jets import from_padded

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BASE = {"epochs": 2, "batch_size": 16, "gradient_accumulation_steps": 2, "learning_rate": 3e-3,
        "model.hidden_dim": 32, "model.latent_dim": 8, "model.num_layers": 1, "model.decoder_layers": 1,
        "model.dropout": 0.0, "data.val_fraction": 0.2, "data.test_fraction": 0.0, "device": "cuda",
        "generation_jets": 100, "mixed_precision": False, "data.split_seed": 0}


def config(**overrides) -> Config:
    return Config().with_overrides(BASE | overrides)


@pytest.fixture(scope="module")
def jets():
    """400 synthetic jets of 10-30 particles (no generator on a GPU machine)."""
    rng = np.random.default_rng(0)
    eta_phi = rng.normal(0, 0.1, (400, 30, 2))
    pt = rng.exponential(1, (400, 30)) * (np.arange(30)[None] < rng.integers(10, 31, 400)[:, None])
    return from_padded(np.concatenate([eta_phi, (pt / pt.sum(1, keepdims=True))[..., None]], -1).astype(np.float32))


def trained(cfg: Config, jets, epochs: int, **kw) -> engine.Trainer:
    tr = engine.Trainer(cfg, engine.prepare(cfg, jets, device="cuda"), "cuda", **kw)
    tr.losses = [tr.train_epoch(e)["train_total"] for e in range(epochs)]
    return tr


def max_weight_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    pb = dict(b.named_parameters())
    return max((p.detach() - pb[n].detach()).abs().max().item() for n, p in a.named_parameters()
               if not n.endswith("in_proj_bias"))  # the attention key bias: rounding noise that Adam amplifies


def test_a_captured_step_trains_as_the_eager_step(jets):
    graph, eager = trained(config(), jets, 2), trained(config(), jets, 2, cuda_graphs=False)
    assert graph.step_mode == "cuda-graph" and eager.step_mode.startswith("eager")
    assert graph.losses == pytest.approx(eager.losses, rel=1e-4)
    assert max_weight_diff(graph.model, eager.model) < 1e-4


@pytest.mark.parametrize("bf16", [True, False])
def test_mixed_precision_is_finite_and_resumes_exactly(jets, tmp_path, monkeypatch, bf16):
    """bf16 (captured) or fp16 with a loss scaler (eager): three epochs straight equal two, then a resume."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    cfg = config(mixed_precision=True, epochs=3)
    whole = engine.fit(cfg, jets, save_dir=tmp_path / "a", progress=False)
    engine.fit(cfg.with_overrides({"epochs": 2}), jets, save_dir=tmp_path / "b", progress=False)
    resumed = engine.fit(cfg, jets, save_dir=tmp_path / "b", resume=True, progress=False)
    assert np.isfinite(whole["train_total"]) and np.isfinite(whole["val_total"])
    assert resumed["epochs_run"] == 1
    for key in ("train_total", "val_total", "val_kl"):
        assert resumed[key] == whole[key], key
    a, b = (engine.load_checkpoint(tmp_path / d / "last") for d in "ab")
    assert (a["scaler"] != {}) == (not bf16)  # fp16 keeps a loss scale
    for name, w in a["model"].items():
        assert torch.equal(w, b["model"][name]), name


def test_compiled_training_matches_eager(jets):
    compiled, eager = trained(config(), jets, 1, compile_model=True), trained(config(), jets, 1, cuda_graphs=False)
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-3)


def test_the_allocator_cap_ends_a_trial_with_an_out_of_memory_error(jets):
    from hvae_ray.sweep.resources import allocator_fraction

    total = torch.cuda.get_device_properties(0).total_memory
    frac = allocator_fraction(0.05, 4 * 2**30, total)  # 5 % of a 4 GB card: ~200 MiB, less the context
    torch.cuda.set_per_process_memory_fraction(frac, 0)
    try:
        with pytest.raises(torch.cuda.OutOfMemoryError):
            trained(config(batch_size=2048, **{"model.hidden_dim": 128}), jets, 1)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
        torch.cuda.empty_cache()


def test_the_trial_memory_burst_measures_the_whole_process():
    from hvae_ray.sweep.resources import measure_trial_memory

    small = measure_trial_memory(5, config(), use_cache=False)
    large = measure_trial_memory(5, config(batch_size=128), use_cache=False)
    assert 0 < small["allocated_peak"] <= small["reserved_peak"] < small["process"]
    assert large["allocated_peak"] > small["allocated_peak"]


MEMBERS = [{"seed": 1, "kl_max_weight": 1e-3}, {"seed": 2, "loss_weights.topology": 0.7, "learning_rate": 1e-3},
           {"seed": 3, "free_bits": 0.1, "weight_decay": 0.01, "grad_clip": 0.05}]


def population(jets, graphed: bool) -> engine.Population:
    cfgs = [config(**m) for m in MEMBERS]
    pop = engine.Population(cfgs[0], engine.prepare(cfgs[0], jets, device="cuda"), 4, "cuda", cuda_graphs=graphed)
    for cfg in cfgs:
        pop.add(cfg)
    return pop


def test_the_population_captured_step_trains_as_its_eager_step_and_as_runs_alone(jets):
    graph, eager = population(jets, True), population(jets, False)
    assert graph.graphed and not eager.graphed
    reports = {name: [pop.train_epoch() for _ in range(2)] for name, pop in (("graph", graph), ("eager", eager))}
    alone = [trained(config(**m), jets, 2, cuda_graphs=False) for m in MEMBERS]
    for slot in range(len(MEMBERS)):
        g = [r[slot].metrics["train_total"] for r in reports["graph"]]
        e = [r[slot].metrics["train_total"] for r in reports["eager"]]
        assert g == pytest.approx(e, rel=1e-4)
        assert g == pytest.approx(alone[slot].losses, rel=1e-4)
        assert max_weight_diff(graph.load_member(slot), alone[slot].model) < 1e-3
