"""Data-parallel training across two Ray Train workers (DDP over a gloo process group) on CPU.

One TorchTrainer of two workers on the session's Ray instance runs, on each rank, the engine's own
training loader and ``engine.fit`` several times; each rank writes down what it saw and what the engine
reported. Plain one-process ``engine.fit`` runs on the same jets are the reference. A 2-worker sweep
trial through ``run_sweep`` checks the checkpoints that Ray Train and the engine keep.

The 2-worker runs train with batch size B per rank and the reference with 2B, so both take the same
number of optimiser steps on global batches of the same size; the 32 training jets fill every batch.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import hvae_ray
from hvae_ray import engine
from hvae_ray.config import COMPONENTS, Config

pytestmark = pytest.mark.slow

N_JETS = 40  # 8 validation and 32 training jets with the fractions below
N_TRAIN = 32
B = 4  # per rank; the one-process reference trains with 2B
EPOCHS = 2
# At a learning rate of 1e-30 an Adam step moves a weight by a few 1e-30 at most: less than half a unit in
# the last place of any float32 |w| > 1e-22, so the weights stay what the seed made them (asserted below)
# and every epoch evaluates the same model.
FROZEN_LR = 1.0e-30
LR = 3.0e-3
BASE = {"model.hidden_dim": 16, "model.latent_dim": 4, "model.num_layers": 1, "model.decoder_layers": 1,
        "model.dropout": 0.0, "gradient_accumulation_steps": 1, "kl_warmup_epochs": 1, "epochs": EPOCHS,
        "data.val_fraction": 0.2, "data.test_fraction": 0.0, "weight_decay": 0.0, "device": "cpu",
        "batch_size": B}
VAL_KEYS = ("val_total", "val_kl", "val_recon", "val_objective", "val_w1m", *(f"val_{c}" for c in COMPONENTS))
TRAIN_KEYS = ("train_total", "train_kl", *(f"train_{c}" for c in COMPONENTS))
RUNS = ("frozen", "trained", "halted", "resumed")


def config(**overrides) -> Config:
    return Config().with_overrides(BASE | overrides)


def loader_batches(splits: engine.Splits, cfg: Config, epoch: int) -> list[list[int]]:
    """The jets (indices into the sample) of each batch of ``engine.train_loader`` in ``epoch``, on this
    rank: the loader runs over copies of the training graphs tagged with their position in the split."""
    tagged = []
    for i, graph in enumerate(splits.train_graphs):
        graph = graph.clone()
        graph.split_pos = torch.tensor([i])
        tagged.append(graph)
    return [[int(splits.train[p]) for p in batch.split_pos.tolist()]
            for batch in engine.train_loader(tagged, cfg, epoch)]


def _ddp_loop(loop: dict) -> None:
    """On each Ray Train worker: this rank's training shards of epochs 0 and 1 (jet indices, from the
    engine's own loader over graphs tagged with their position in the split), then four engine runs:
    ``frozen`` (learning rate 1e-30), ``trained``, ``halted`` (the trained run stopped by its callback
    after epoch 0) and ``resumed`` (continued from rank 0's checkpoint of the halted run, on every rank,
    as a Ray Train restart hands every worker the same reported checkpoint). The engine saves under
    ``<out>/<run>/rank<r>``; the rank's record goes to ``<out>/rank<r>.json``."""
    import ray.train
    import torch.distributed as dist

    from hvae_ray.config import from_dict
    from hvae_ray.data.io import load_jets

    rank = ray.train.get_context().get_world_rank()
    out = Path(loop["out"])
    sample = load_jets(loop["data"]).subset(np.arange(N_JETS))
    frozen, trained = from_dict(loop["frozen"]), from_dict(loop["trained"])
    record: dict = {"rank": rank, "group": [dist.is_initialized(), dist.get_world_size(), dist.get_backend()]}

    splits = engine.prepare(trained, sample)
    record["train_split"] = splits.train.tolist()
    record["batches"] = [loader_batches(splits, trained, epoch) for epoch in range(EPOCHS)]

    def run(name: str, cfg: Config, stop_after: int | None = None, **kw) -> list[dict]:
        reports = []

        def keep(rep) -> bool:
            reports.append({"epoch": rep.epoch, "metrics": rep.metrics,
                            "checkpoint_dir": str(rep.checkpoint_dir) if rep.checkpoint_dir else None})
            return rep.epoch == stop_after

        engine.fit(cfg, sample, save_dir=out / name / f"rank{rank}", progress=False, callbacks=[keep], **kw)
        return reports

    record["frozen"] = run("frozen", frozen)
    record["trained"] = run("trained", trained)
    record["halted"] = run("halted", trained, stop_after=0)
    dist.barrier()  # rank 0 has saved the halted run's checkpoint
    record["resumed"] = run("resumed", trained, resume=out / "halted" / "rank0" / "last")
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    ray.train.report({"rank": rank})


@pytest.fixture(scope="module")
def data_path(hvae_cache) -> Path:
    """The tiny sweep's sample (60 q jets, seed 0), generated once per session."""
    from hvae_ray.data.generate import default_sample

    return default_sample("q", 60, 0, progress=False)


@pytest.fixture(scope="module")
def two_workers(ray_local, data_path, tmp_path_factory):
    """Runs :func:`_ddp_loop` on a TorchTrainer of two workers; ``ranks`` holds each rank's record."""
    import ray.cloudpickle
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this file
    root = tmp_path_factory.mktemp("ddp")
    loop = {"out": str(root / "out"), "data": str(data_path), "frozen": config(learning_rate=FROZEN_LR).to_dict(),
            "trained": config(learning_rate=LR).to_dict()}
    trainer = TorchTrainer(_ddp_loop, train_loop_config=loop, torch_config=TorchConfig(backend="gloo"),
                           scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                           run_config=ray.train.RunConfig(name="ddp", storage_path=str(root / "storage")))
    trainer.fit()
    ranks = [json.loads((root / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]
    return SimpleNamespace(ranks=ranks, out=root / "out")


@pytest.fixture(scope="module")
def one_process(data_path):
    """The frozen and trained runs in this process (no process group) at batch size 2B; each run's
    per-epoch metrics."""
    from hvae_ray.data.io import load_jets

    sample = load_jets(data_path).subset(np.arange(N_JETS))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a Ray worker holding one CPU
    try:
        runs = {}
        for name, lr in (("frozen", FROZEN_LR), ("trained", LR)):
            reports: list[dict] = []
            engine.fit(config(learning_rate=lr, batch_size=2 * B), sample, progress=False,
                       callbacks=[reports.append])
            runs[name] = [rep.metrics for rep in reports]
    finally:
        torch.set_num_threads(threads)
    return runs


def metrics(record: dict, run: str) -> list[dict]:
    """A rank's per-epoch metrics of one run, less the epoch's wall time and its first step's clock time."""
    return [{k: v for k, v in rep["metrics"].items() if k not in ("epoch_time_s", "first_step_at")}
            for rep in record[run]]


def test_ranks_train_on_disjoint_shards_that_cover_the_training_split(two_workers, data_path):
    rank0, rank1 = two_workers.ranks
    for r, rec in enumerate(two_workers.ranks):
        assert rec["rank"] == r and rec["group"] == [True, 2, "gloo"]
    # both ranks split the sample alike (seeded), into the 32 training jets the batch sizes assume
    assert rank0["train_split"] == rank1["train_split"]
    split = rank0["train_split"]
    assert len(split) == N_TRAIN and N_TRAIN % (2 * B) == 0
    shards = []
    for epoch in range(EPOCHS):
        a, b = ([j for batch in rec["batches"][epoch] for j in batch] for rec in (rank0, rank1))
        assert len(a) == len(set(a)) == len(b) == len(set(b)) == N_TRAIN // 2
        assert not set(a) & set(b), epoch
        assert sorted(a + b) == split, epoch
        assert all(len(batch) == B for rec in (rank0, rank1) for batch in rec["batches"][epoch])
        shards.append(set(a))
    assert shards[0] != shards[1]  # reshuffled each epoch (DistributedSampler.set_epoch)

    # without a process group the same loader goes over the whole split once, in batches of B
    from hvae_ray.data.io import load_jets

    cfg = config()
    splits = engine.prepare(cfg, load_jets(data_path).subset(np.arange(N_JETS)))
    assert splits.train.tolist() == split
    batches = loader_batches(splits, cfg, 0)
    assert sorted(j for batch in batches for j in batch) == split
    assert [len(batch) for batch in batches] == [B] * (N_TRAIN // B)


def test_with_frozen_weights_two_workers_report_the_one_process_losses(two_workers, one_process):
    """The weights do not move, so every epoch evaluates the model the seed made. The validation
    metrics (full validation split on every rank) and the training KL (a per-jet mean that depends on
    the encoder only, not on the sampled latents) must then be the one-process figures to float
    precision; the training KL does so only if the all-reduced sums over the two shards are the sums
    over the whole training split and are divided by the number of batches of both ranks."""
    rank0, rank1 = two_workers.ranks
    assert metrics(rank0, "frozen") == metrics(rank1, "frozen")  # all-reduced: identical on both ranks
    ours, ref = metrics(rank0, "frozen"), one_process["frozen"]
    assert [m["epoch"] for m in ours] == [m["epoch"] for m in ref] == list(range(EPOCHS))
    for m, r in zip(ours, ref):
        for key in (*VAL_KEYS, "train_kl"):
            assert m[key] == pytest.approx(r[key], rel=1e-6, abs=1e-9), (m["epoch"], key)
        # The reconstruction terms of a training step depend on the latents sampled for its jets (and,
        # normalised per particle or per edge, on which jets share a batch): at frozen weights that
        # noise moves the one-process figure by a few per mille from epoch to epoch. 2% is several
        # times that, and far below the factor 2 of a sum divided by one rank's batch count.
        for key in TRAIN_KEYS:
            # The marginal term compares the sorted particles of a whole batch: its finite-sample bias
            # depends on the batch size itself (B per rank against 2B in one process), not only on noise.
            tolerance = 0.05 if key == "train_particle_marginals" else 0.02
            assert m[key] == pytest.approx(r[key], rel=tolerance), (m["epoch"], key)

    from hvae_ray.model.hypervae import HyperVAE

    cfg = config(learning_rate=FROZEN_LR)
    torch.manual_seed(cfg.seed)
    initial = HyperVAE(cfg.model).state_dict()
    saved = engine.load_checkpoint(two_workers.out / "frozen" / "rank0" / "last")
    assert saved["epoch"] == EPOCHS - 1
    for k, w in initial.items():
        assert torch.allclose(saved["model"][k], w, rtol=0, atol=1e-24), k


def test_two_workers_learn_like_one_process(two_workers, one_process):
    """A normal learning rate: the two ranks stay one model, and the run learns as fast as one process
    with the same global batch."""
    rank0, rank1 = two_workers.ranks
    ours = metrics(rank0, "trained")
    # Every rank validates its own replica on the whole validation split: identical validation metrics
    # after every epoch mean identical weights, i.e. DDP averaged the same gradients into every replica.
    assert [{k: m[k] for k in VAL_KEYS} for m in metrics(rank1, "trained")] == [{k: m[k] for k in VAL_KEYS}
                                                                                for m in ours]
    untrained = one_process["frozen"][0]["val_objective"]
    assert metrics(rank0, "frozen")[0]["val_objective"] == pytest.approx(untrained, rel=1e-6)
    for m, r in zip(ours, one_process["trained"], strict=True):
        # Both start from the same weights and take the same number of Adam steps (whose size is about
        # the learning rate whatever the batch) on global batches of 2B jets; they differ in which jets
        # share a step and in the sampled latents. So both lower the validation objective, by amounts
        # within half of each other (about 15% apart here).
        gained, reference_gain = untrained - m["val_objective"], untrained - r["val_objective"]
        assert reference_gain > 0 and gained > 0, m["epoch"]
        # (as a relative tolerance on the objective: 0.5 * gain / objective, about 2% here)
        assert abs(gained - reference_gain) <= 0.5 * reference_gain, (m["epoch"], gained, reference_gain)


def test_only_rank_zero_writes_checkpoints(two_workers):
    """The engine saves on rank 0 only, once per epoch, and reports its checkpoint there; rank 1 reports
    none and writes nothing."""
    rank0, rank1 = two_workers.ranks
    for run in RUNS:
        last = two_workers.out / run / "rank0" / "last"
        assert [rep["checkpoint_dir"] for rep in rank0[run]] == [str(last)] * len(rank0[run]), run
        assert [rep["checkpoint_dir"] for rep in rank1[run]] == [None] * len(rank1[run]), run
        assert [rep["epoch"] for rep in rank0[run]] == [rep["epoch"] for rep in rank1[run]], run
        assert engine.load_checkpoint(last)["epoch"] == rank0[run][-1]["epoch"]
        assert not (two_workers.out / run / "rank1").exists(), run
        assert sorted(p.name for p in (two_workers.out / run / "rank0").iterdir()) == ["best", "config.yaml",
                                                                                    "last"]


def test_resumed_two_worker_run_continues_from_rank_zeros_checkpoint(two_workers):
    """Both ranks resume from rank 0's checkpoint of epoch 0 and train epoch 1 exactly as the
    uninterrupted run did: the checkpoint carries the whole state (rank 0's RNG state serves rank 1,
    whose random stream is the same)."""
    rank0, rank1 = two_workers.ranks
    for rec in (rank0, rank1):
        assert [rep["epoch"] for rep in rec["halted"]] == [0]
        assert [rep["epoch"] for rep in rec["resumed"]] == list(range(1, EPOCHS))
        uninterrupted = {m["epoch"]: m for m in metrics(rec, "trained")}
        for m in metrics(rec, "resumed"):
            assert m == uninterrupted[m["epoch"]], m["epoch"]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_sweep_trial_keeps_one_rank_zero_checkpoint_per_epoch(ray_local, tmp_path, sweep_file):
    """A 2-worker trial of 3 epochs through run_sweep: every epoch reports one checkpoint to Ray Train
    (rank 0's; Ray Train gathers the reports of both ranks into one per epoch), Ray Train keeps what
    CheckpointConfig(num_to_keep=2, by val_objective) says, and the engine's directory holds rank 0's
    files only."""
    epochs = 3
    path = sweep_file(tmp_path / "ddp3.yaml", config={"epochs": epochs},
                      search_space={"learning_rate": {"grid": [3.0e-3]}},
                      scheduler={"max_t": epochs, "grace_period": epochs},
                      resources={"num_workers": 2, "cpus_per_worker": 0.5})
    result = hvae_ray.run_sweep(path, storage=str(tmp_path / "runs"), name="ddp3")
    assert not result.results.errors
    exp = result.experiment_dir
    (row,) = hvae_ray.load_trials(exp).to_pylist()
    assert row["status"] == "completed" and row["epochs"] == epochs
    trial_dir, train_dir = Path(row["trial_dir"]), exp / "_train" / row["trial_id"]

    # Tune's rows: one per epoch, each with the checkpoint reported with it, all different
    rows = _jsonl(trial_dir / "result.json")
    assert [int(r["epoch"]) for r in rows] == list(range(epochs))
    reported = [Path(r["checkpoint_path"]) for r in rows]
    assert len(set(reported)) == epochs and all(p.parent == train_dir for p in reported)

    # Ray Train's checkpoint manager: one report per epoch; it keeps the 2 best by val_objective and
    # the latest, and deleted the others
    snapshot = json.loads((train_dir / "checkpoint_manager_snapshot.json").read_text())
    assert snapshot["current_report_index"] == epochs
    kept = {c["checkpoint_dir_name"] for c in snapshot["checkpoint_results"]}
    best_two = sorted(range(epochs), key=lambda e: rows[e]["val_objective"])[:2]
    assert kept == {reported[e].name for e in (*best_two, epochs - 1)}
    assert {p.name for p in train_dir.glob("checkpoint_*") if p.is_dir()} == kept
    for epoch, ckpt in enumerate(reported):
        if ckpt.name in kept:
            assert [p.name for p in ckpt.iterdir()] == [engine.CHECKPOINT_FILE]
            assert engine.load_checkpoint(ckpt)["epoch"] == epoch
        else:
            assert not ckpt.exists()

    # The engine's directory: rank 0's files, one epoch log row per epoch (each rank appending would
    # double them); its last checkpoint is the one reported for the last epoch.
    work = trial_dir / "engine"
    assert sorted(p.name for p in work.iterdir()) == ["best", "config.yaml", "last", "metrics.jsonl"]
    log = _jsonl(work / "metrics.jsonl")
    assert [int(r["epoch"]) for r in log] == list(range(epochs))
    assert [r["val_objective"] for r in log] == [r["val_objective"] for r in rows]
    last = engine.load_checkpoint(work / "last")
    assert last["epoch"] == epochs - 1
    reported_last = engine.load_checkpoint(reported[-1])["model"]
    assert all(torch.equal(last["model"][k], reported_last[k]) for k in reported_last)
    assert engine.load_checkpoint(work / "best")["epoch"] == best_two[0]
    # TensorBoard files: the HParams session files the sweep's driver (this process) wrote at the trial's start and end,
    # and one training process's (rank 0) events
    writers = {p.name.split(".")[-2] for p in trial_dir.glob("events.out.tfevents.*")}
    assert str(os.getpid()) in writers and len(writers) == 2
