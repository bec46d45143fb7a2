"""The dense engine's Trainer: the loaders' batch order, fixed-size steps, the same training as the PyG
engine, checkpoints shared by both engines, and a Parquet-reading worker free of torch_geometric."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from hvae_ray import engine
from hvae_ray.config import COMPONENTS, Config
from hvae_ray.data.generate import generate_jets

BASE = {"epochs": 2, "batch_size": 16, "gradient_accumulation_steps": 2, "learning_rate": 3e-3,
        "model.hidden_dim": 16, "model.latent_dim": 4, "model.num_layers": 1, "model.decoder_layers": 1,
        "model.dropout": 0.0, "data.val_fraction": 0.2, "data.test_fraction": 0.0, "device": "cpu"}


def config(**overrides) -> Config:
    return Config().with_overrides(BASE | overrides)


@pytest.fixture(scope="module")
def jets():
    """60 Pythia q jets: 48 for training (3 batches of 16) and 12 for validation."""
    return generate_jets("q", 60, seed=2, workers=1, progress=False)


def test_epoch_order_is_the_pyg_loaders_order(jets):
    cfg = config()
    splits = engine.prepare(cfg, jets)
    tagged = []
    for i, graph in enumerate(splits.train_graphs):
        graph = graph.clone()
        graph.pos_in_split = torch.tensor([i])
        tagged.append(graph)
    for epoch in (0, 1, 5):
        loader_order = [int(p) for b in engine.train_loader(tagged, cfg, epoch) for p in b.pos_in_split]
        assert engine.epoch_order(len(tagged), cfg, epoch).tolist() == loader_order
    assert engine.epoch_order(48, cfg, 0).tolist() != engine.epoch_order(48, cfg, 1).tolist()


@pytest.mark.parametrize(("n", "world"), [(48, 2), (47, 2), (10, 3)])
def test_epoch_order_under_a_process_group_is_distributed_samplers(n, world):
    cfg = config()
    for rank in range(world):
        sampler = torch.utils.data.DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True,
                                                      seed=cfg.seed)
        sampler.set_epoch(3)
        assert engine.epoch_order(n, cfg, 3, rank, world).tolist() == list(sampler)


def test_step_layout_pads_the_last_batch_and_the_last_step():
    order = torch.arange(37) * 2
    pos, valid, n_batches = engine.step_layout(order, batch_size=8, accum=2)
    assert n_batches == 5 and pos.shape == valid.shape == (3, 2, 8)
    assert pos[valid].tolist() == order.tolist()  # every jet once, in order
    assert valid.sum() == 37 and valid[2, 0, :5].all() and not valid[2, 0, 5:].any()
    assert not valid[2, 1].any()  # the last step's second micro-batch is empty
    assert (pos[~valid] == 0).all()


def test_dense_engine_trains_like_the_pyg_engine(jets):
    """Same weights, same jets, same order: one epoch of each engine ends at the same weights (the last
    optimiser step has one real and one empty micro-batch)."""
    trainers = {}
    for name in ("dense", "pyg"):
        cfg = config(engine=name)
        trainers[name] = engine.Trainer(cfg, engine.prepare(cfg, jets), "cpu")
    dense, pyg = trainers["dense"], trainers["pyg"]
    assert dense.step_mode == "eager: no CUDA graphs on cpu"
    pyg.model.load_state_dict(dense.model.state_dict())
    assert dense.n_train == 48
    metrics = {}
    for name, trainer in trainers.items():
        torch.manual_seed(7)  # the same reparameterisation noise (the two models' initialisations drew differently)
        metrics[name] = trainer.train_epoch(0)
    m_dense, m_pyg = metrics["dense"], metrics["pyg"]
    for key in ("train_total", "train_kl", *(f"train_{c}" for c in COMPONENTS)):
        assert m_dense[key] == pytest.approx(m_pyg[key], rel=1e-4, abs=1e-7), key
    weights = dict(pyg.model.named_parameters())
    h = dense.cfg.model.hidden_dim
    for name, p in dense.model.named_parameters():
        q = weights[name]
        if name.endswith("self_attn.in_proj_bias"):
            # Softmax attention does not depend on the key bias: its gradient is rounding noise, which
            # Adam's normalisation turns into steps of ±lr. Compare the query and value biases only.
            p, q = torch.cat([p[:h], p[2 * h :]]), torch.cat([q[:h], q[2 * h :]])
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    v_dense, v_pyg = dense.evaluate(0), pyg.evaluate(0)
    for key, value in v_pyg.items():
        assert v_dense[key] == pytest.approx(value, rel=1e-4, abs=1e-7), key


def test_a_pyg_engine_checkpoint_loads_in_the_dense_model_and_resumes_there(jets, tmp_path):
    """The dense model loaded from a PyG run's checkpoint validates as the PyG run did, and a dense run
    continues from that checkpoint."""
    pyg = engine.fit(config(engine="pyg", epochs=1), jets, save_dir=tmp_path, progress=False)
    state = engine.load_checkpoint(tmp_path / "last")
    model, normaliser, _ = engine.model_from_checkpoint(state)
    dense = engine.Trainer(config(), engine.prepare(config(), jets, normaliser), "cpu")
    dense.model.load_state_dict(model.state_dict())
    validated = dense.evaluate(0)
    for key in ("val_total", "val_objective", "val_kl"):
        assert validated[key] == pytest.approx(pyg[key], rel=1e-4, abs=1e-7), key
    res = engine.fit(config(epochs=2), jets, save_dir=tmp_path, resume=True, progress=False)
    assert res["epochs_run"] == 1 and np.isfinite(res["val_total"])


def test_a_parquet_training_run_does_not_import_torch_geometric(jets, tmp_path):
    from hvae_ray.data.io import save_parquet

    path = tmp_path / "jets.parquet"
    save_parquet(jets, path)
    code = textwrap.dedent(f"""
        import sys
        from hvae_ray.config import Config
        from hvae_ray.data.io import load_jets
        from hvae_ray.engine import fit
        from hvae_ray.sweep.trainer import train_loop_per_worker  # the Ray worker's module
        cfg = Config().with_overrides({BASE!r} | {{"epochs": 1}})
        res = fit(cfg, load_jets({str(path)!r}), progress=False)
        assert res["epochs_run"] == 1, res
        print("PYG_IMPORTED", "torch_geometric" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "PYG_IMPORTED False" in out.stdout


@pytest.mark.parametrize("share, expected", [(0.0, "every best epoch"), (1e6, "first and last")])
def test_figures_stay_within_their_share_of_the_run_time(jets, tmp_path, monkeypatch, share, expected):
    """Real-vs-generated figures come at the first epoch, at new best epochs while drawing them stays
    within 1/FIGURE_SHARE of the run's time, and at the end: with no limit at every new best epoch (4
    epochs: at most every tenth of the run is every epoch); with one far past the run, only first and last."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from hvae_ray.engine import trainer

    monkeypatch.setattr(trainer, "FIGURE_SHARE", share)
    reports = []
    engine.fit(config(epochs=4), jets, log_dir=tmp_path / "tb", callbacks=[reports.append],
               progress=False)
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    acc.Reload()
    steps = sorted({e.step for e in acc.Images("Distributions/mass")})
    best = [r.epoch for r in reports if r.is_best]
    assert best[0] == 0 and any(0 < b < 3 for b in best), best  # a best epoch between first and last
    assert steps == (sorted(set(best) | {3}) if expected == "every best epoch" else [0, 3])
