"""What a run trains on and in which order: the seeded split, the epoch's order and step layout, and the
reparameterisation noise of an epoch. Pure functions of the config, the epoch and (under DDP) the rank,
so a run, a resumed run and a population member draw the same batches and the same noise."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from hvae_ray.config import Config
from hvae_ray.data.dense import FeatureNormaliser, device_jets
from hvae_ray.data.jets import JetSample
from hvae_ray.engine.runtime import rank_world
from hvae_ray.errors import DataError


def validation_batch_size(cfg: Config) -> int:
    """Jets per batch of a validation pass (and, on a GPU, of the generation score): max(64, batch_size)."""
    return max(64, cfg.batch_size)


def split_seed(cfg: Config) -> int:
    """The seed of the train/val/test split: ``data.split_seed``, or the run's ``seed`` when it is -1."""
    return cfg.seed if cfg.data.split_seed < 0 else cfg.data.split_seed


def split_indices(n: int, cfg: Config) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded permutation of ``n`` jets into train/val/test (at least one jet in train and val)."""
    perm = np.random.default_rng(split_seed(cfg)).permutation(n)
    n_test = int(round(cfg.data.test_fraction * n))
    n_val = max(1, int(round(cfg.data.val_fraction * n))) if n > 1 else 0
    test, val, train = perm[:n_test], perm[n_test : n_test + n_val], perm[n_test + n_val :]
    if len(train) == 0:
        raise DataError(f"{n} jets leave none for training after the validation/test split")
    if len(val) == 0:
        val = train[:1]
    return np.sort(train), np.sort(val), np.sort(test)


class Splits:
    """Seeded train/val/test split of a sample (indices into it) and the normaliser fitted on train.

    ``sample`` is the sample the indices refer to (the first ``data.max_jets`` jets when set).
    ``train_graphs`` / ``val_graphs``: the PyG hypergraphs of the splits, built on first use (the
    ``pyg`` engine and the tests; the dense engine never builds them).
    """

    def __init__(self, train: np.ndarray, val: np.ndarray, test: np.ndarray, normaliser: FeatureNormaliser,
                 sample: JetSample, knn: int):
        self.train, self.val, self.test = train, val, test
        self.normaliser = normaliser
        self.sample = sample
        self.knn = knn
        self._graphs: tuple[list, list] | None = None

    def _build(self) -> tuple[list, list]:
        if self._graphs is None:
            from hvae_ray.data.graphs import build_graphs, raw_features

            raw = raw_features(self.sample, self.knn)
            self._graphs = (build_graphs(raw, self.normaliser, self.train),
                            build_graphs(raw, self.normaliser, self.val))
        return self._graphs

    @property
    def train_graphs(self) -> list:
        return self._build()[0]

    @property
    def val_graphs(self) -> list:
        return self._build()[1]


def prepare(cfg: Config, sample: JetSample, normaliser: FeatureNormaliser | None = None,
            device: torch.device | str = "cpu") -> Splits:
    """Split and fit the normaliser on the training split only (unless given), on ``device``."""
    sample.validate()
    if cfg.data.max_jets and len(sample) > cfg.data.max_jets:
        sample = sample.subset(np.arange(cfg.data.max_jets))
    train, val, test = split_indices(len(sample), cfg)
    if normaliser is None:
        parts, mask = device_jets(sample, train, device)
        normaliser = FeatureNormaliser.fit_jets(parts, mask, cfg.data.knn)
    return Splits(train, val, test, normaliser, sample, cfg.data.knn)


def epoch_order(n: int, cfg: Config, epoch: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """This rank's training positions (into the training split) of ``epoch``, in order.

    One process: a permutation seeded from ``cfg.seed`` and the epoch. Under a process group:
    DistributedSampler's order (every rank shuffles with the same seed and epoch, pads the order to a
    multiple of ``world`` by repeating its first positions and takes every ``world``-th), so the shards
    are disjoint. Both are exactly the orders of :func:`train_loader`.
    """
    if world == 1:
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        torch.empty((), dtype=torch.int64).random_(generator=gen)  # a DataLoader draws its workers' seed first
        return torch.randperm(n, generator=gen)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + epoch))
    total = math.ceil(n / world) * world
    order = torch.cat([order, order[: total - n]]) if total > n else order
    return order[rank:total:world]


def step_layout(order: torch.Tensor, batch_size: int, accum: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Positions (S, accum, batch_size) and validity (S, accum, batch_size) of the S optimiser steps of an
    epoch, and the number of real batches: batches of ``batch_size`` in ``order``, ``accum`` per step;
    the last batch is filled with padding (position 0, invalid), and the last step with empty batches,
    which change neither the gradient nor the statistics."""
    n = len(order)
    n_batches = max(1, math.ceil(n / batch_size))
    steps = math.ceil(n_batches / accum)
    size = steps * accum * batch_size
    pos = torch.zeros(size, dtype=torch.long)
    valid = torch.zeros(size, dtype=torch.bool)
    pos[:n], valid[:n] = order, True
    return pos.view(steps, accum, batch_size), valid.view(steps, accum, batch_size), n_batches


def epoch_noise(cfg: Config, epoch: int, steps: int, rank: int = 0) -> torch.Tensor:
    """The reparameterisation noise ε ~ N(0, 1) of ``epoch``: (steps, accum, batch_size, latent_dim) float32
    on the CPU, jet b of micro-batch k of step s drawing ε[s, k, b].

    Drawn from a generator seeded by (``seed``, epoch, rank) alone, so a run draws the same noise alone, as
    a member of a population, on a CPU or a GPU, and after a resume (no generator state to carry); each
    rank of a data-parallel run draws its own."""
    state = np.random.SeedSequence([cfg.seed, epoch, rank, 0x9E3779B9]).generate_state(1, np.uint64)[0]
    gen = torch.Generator().manual_seed(int(state))
    shape = (steps, cfg.gradient_accumulation_steps, cfg.batch_size, cfg.model.latent_dim)
    return torch.randn(shape, generator=gen)


def train_loader(graphs: Sequence, cfg: Config, epoch: int):
    """The PyG engine's training loader of ``epoch`` (a ``torch_geometric`` DataLoader): in one process,
    all of ``graphs`` shuffled by a generator seeded from ``cfg.seed`` and the epoch; under a process
    group, this rank's DistributedSampler shard (every rank shuffles with the same seed and epoch and
    takes every ``world``-th graph, so the shards are disjoint; when ``world`` does not divide the
    graphs, the sampler pads the shards to equal length by repeating the first graphs of the shuffled
    order). Its order is :func:`epoch_order`'s."""
    from torch_geometric.loader import DataLoader

    rank, world = rank_world()
    sampler = None
    if world > 1:
        sampler = torch.utils.data.DistributedSampler(graphs, num_replicas=world, rank=rank, shuffle=True,
                                                      seed=cfg.seed)
        sampler.set_epoch(epoch)
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    return DataLoader(graphs, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
                      generator=gen if sampler is None else None, num_workers=cfg.num_workers, drop_last=False)
