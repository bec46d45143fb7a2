"""The training engine: a :class:`Trainer` (``train_epoch``, ``evaluate``, ``state``, ``restore``) and
``fit(cfg, sample, ...)`` around it, free of Ray.

The CLI calls ``fit`` directly; the sweep layer calls it inside Ray Train workers and forwards what it
reports through callbacks. When a ``torch.distributed`` process group is initialised (as a
TorchTrainer does), the engine trains data-parallel with DDP, each rank on its shard of every epoch's
shuffled order (DistributedSampler's); every rank computes the same validation metrics on the full
validation split, and only rank 0 writes files.

``engine: dense`` (the default) keeps the training and validation jets as padded tensors on the
training device and computes each batch's features there (:mod:`hvae_ray.data.dense`): no per-jet
objects, no collation, no DataLoader. Batches have a fixed size (the last one of an epoch is filled
with padding jets of weight 0), so on CUDA one optimiser step (its ``gradient_accumulation_steps``
micro-batches, backward, clipping and AdamW) is captured once in a CUDA graph and replayed; elsewhere
the same step runs eagerly. ``engine: pyg`` trains the PyG reference model on PyG batches of
hypergraphs (``torch_geometric`` is imported only then).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from hvae_ray.config import COMPONENTS, OBJECTIVE_COMPONENTS, Config, from_dict
from hvae_ray.data.dense import DenseFeaturizer, FeatureNormaliser, device_jets
from hvae_ray.data.jets import JetSample
from hvae_ray.errors import ConfigError, DataError, HvaeError, TrainingDiverged
from hvae_ray.model.hypervae import HyperVAE
from hvae_ray.model.losses import (
    dense_reconstruction_terms,
    kl_divergence,
    kl_weight,
    objective,
    reconstruction_terms,
    total_loss,
)

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
# The fidelity targets (generated vs held-out q jets): val_generation is the mean ratio to them.
GENERATION_TARGETS = {"val_w1m": 4e-3, "val_w1p": 4e-3, "val_fpd": 1e-2}
GENERATION_KEYS = (*GENERATION_TARGETS, "val_generation")
#: Jets per chunk of the score's EFPs (at least): fewer chunks, fewer small kernel launches. Its (chunk, 30, 30)
#: float64 powers of θ and einsum intermediates take ~30 MB at 512, within even a 64-jet validation batch's
#: activations, which the trial's GPU share is sized by (2,048 raised the default config's peak by ~80 MiB).
EFP_CHUNK = 512
# The validation metric that picks best/ for each ``objective``; fit reports its best as "best_<metric>".
OBJECTIVE_METRICS = {"reconstruction": "val_objective", "generation": "val_generation"}
POSTFIX_EVERY = 20  # progress-bar refresh (one host sync) every this many steps


@dataclass(frozen=True)
class GenerationReference:
    """The validation jets that the per-epoch generation score compares samples with, made once per run:
    jet masses (N,) and real particles (M, 3) as float tensors on the run's device, EFPs (N, 36)."""

    mass: torch.Tensor
    particles: torch.Tensor
    efps: np.ndarray


@dataclass
class EpochReport:
    """What the engine tells callbacks after each epoch.

    metrics: the epoch's metrics (keys in :data:`hvae_ray.tracking.TAGS` plus ``epoch``).
    checkpoint_dir: directory holding this epoch's checkpoint (rank 0 only; None on other ranks).
    is_best: whether this epoch improved ``val_objective``.
    """

    epoch: int
    metrics: dict[str, float]
    checkpoint_dir: Path | None
    is_best: bool


# A callback returns True to stop training after this epoch.
Callback = Callable[[EpochReport], "bool | None"]



def validation_batch_size(cfg: Config) -> int:
    """Jets per batch of a validation pass (and, on a GPU, of the generation score): max(64, batch_size)."""
    return max(64, cfg.batch_size)


def split_indices(n: int, cfg: Config) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded permutation of ``n`` jets into train/val/test (at least one jet in train and val)."""
    perm = np.random.default_rng(cfg.seed).permutation(n)
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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise HvaeError(f"config: device '{name}' requested but CUDA is not available")
    return torch.device(name)


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_mean(values: dict[str, float], count: int, device: torch.device) -> dict[str, float]:
    """Average running sums over ranks (weighted by batch count)."""
    _, world = _rank_world()
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys] + [float(count)], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(t)
    total = max(t[-1].item(), 1.0)
    return {k: t[i].item() / total for i, k in enumerate(keys)}


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomic write: a crash mid-save never leaves a truncated checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file or directory safely (``weights_only=True``: no code can run)."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        raise DataError(f"{path}: not a readable hvae-ray checkpoint ({e.__class__.__name__})") from e
    if not isinstance(state, dict) or not {"model", "config", "normaliser"} <= set(state):
        raise DataError(f"{path}: not an hvae-ray checkpoint (missing model/config/normaliser)")
    return state


def model_from_checkpoint(state: dict[str, Any], where: str = "checkpoint"
                          ) -> tuple[HyperVAE, FeatureNormaliser, Config]:
    cfg = from_dict(state["config"], f"{where} config")
    model = HyperVAE(cfg.model)
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError) as e:
        raise DataError(f"{where}: the model weights do not match the checkpoint's config") from e
    return model.eval(), FeatureNormaliser.from_state_dict(state["normaliser"]), cfg


def _check_resumable(cfg: Config, state: dict[str, Any], where: Path) -> None:
    """The model shape of ``cfg`` must be the checkpoint's; a one-line error names the first difference."""
    saved = state["config"].get("model", {}) if isinstance(state["config"], dict) else {}
    for key, value in cfg.to_dict()["model"].items():
        if key != "dropout" and key in saved and saved[key] != value:
            raise ConfigError(f"{where}: cannot resume: 'model.{key}' is {value!r} here but {saved[key]!r} "
                              "in the checkpoint")


@torch.no_grad()
def generate(model: HyperVAE, normaliser: FeatureNormaliser, n_jets: int, seed: int = 0,
             device: torch.device | str = "cpu", batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Sample jets from the prior. Returns particles (N, P, 3) physical (η_rel, φ_rel, pT_rel) and
    mask (N, P): a slot exists where its existence probability exceeds 1/2 (the most likely slot at
    least, so no jet is empty); padded slots are zero."""
    from hvae_ray.latent import decode

    model = getattr(model, "module", model)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    z = torch.cat([torch.randn(min(batch_size, n_jets - s), model.cfg.latent_dim, generator=gen)
                   for s in range(0, n_jets, batch_size)])  # the same draws as batch by batch
    return decode(model, normaliser, z, device=device, batch_size=batch_size)


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


class Trainer:
    """One training run on one device: model, optimiser and data; the loop of :func:`fit` calls it.

    ``train_epoch(epoch)`` trains one epoch and returns its training metrics; ``evaluate(epoch)`` the
    validation metrics; ``generation_metrics()`` W1 and FPD of prior samples against the validation jets;
    ``state(epoch)`` is a checkpoint and ``restore(state)`` continues from one exactly.
    ``cuda_graphs`` (default: where possible) captures the dense training step in a CUDA graph;
    ``compile_model`` (default: the config's ``compile``) also compiles each micro-batch's loss with
    ``torch.compile`` (fused elementwise kernels over the pair tensors, at the price of a compilation
    at start-up).
    """

    STAT_KEYS = (*COMPONENTS, "kl", "total")

    def __init__(self, cfg: Config, splits: Splits, device: torch.device | str | None = None,
                 cuda_graphs: bool | None = None, compile_model: bool | None = None):
        device = torch.device(device) if device is not None else resolve_device(cfg.device)
        self.cfg, self.splits, self.device = cfg, splits, device
        self.normaliser = splits.normaliser
        self.rank, self.world = _rank_world()
        self.dense = cfg.engine == "dense"
        torch.manual_seed(cfg.seed)
        if self.dense:
            model = HyperVAE(cfg.model).to(device)
        else:
            from hvae_ray.model.pyg import PygHyperVAE

            model = PygHyperVAE(cfg.model).to(device)
        self.model = model
        self.net = model
        if self.world > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        use_amp = cfg.mixed_precision and device.type == "cuda"
        self.amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
        self.use_amp = use_amp
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_amp and self.amp_dtype == torch.float16)
        self.step_mode = self._step_mode(cuda_graphs)
        self.graphed = self.step_mode == "cuda-graph"
        self.opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                     capturable=self.graphed)
        self.start_epoch = 0
        self.best = math.inf
        self.best_epoch = -1
        self._graph = None
        self._generation_ref: GenerationReference | None = None
        self.generation: dict[str, float] | None = None  # the last generation metrics (generation_every)
        self.first_step_at: float | None = None  # Unix time [s] this process launched its first optimiser step
        self.node_stats = tuple(torch.tensor(self.normaliser.stats["nodes"][k], dtype=torch.float32, device=device)
                                for k in ("mean", "std"))
        if self.dense:
            self.featurize = DenseFeaturizer(self.normaliser, cfg.data.knn, device)
            self.train_jets = device_jets(splits.sample, splits.train, device)
            self.val_jets = device_jets(splits.sample, splits.val, device)
            self._beta = torch.zeros((), device=device)
            compile_model = cfg.compile if compile_model is None else compile_model
            self._micro = torch.compile(self._micro_loss, dynamic=False) if compile_model else self._micro_loss

    def _step_mode(self, cuda_graphs: bool | None) -> str:
        """'cuda-graph', or 'eager: <why not>' (said once, in the log and by :func:`fit`)."""
        if not self.dense:
            return "eager: engine pyg"
        why = None
        if self.device.type != "cuda":
            why = f"no CUDA graphs on {self.device.type}"
        elif self.world > 1:
            why = "data-parallel (DDP) steps are not captured"
        elif self.scaler.is_enabled():
            why = "fp16 loss scaling synchronises with the host"
        elif cuda_graphs is False:
            why = "CUDA graphs turned off"
        return "cuda-graph" if why is None else f"eager: {why}"

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp,
                              cache_enabled=not self.graphed)

    @property
    def n_train(self) -> int:
        return len(self.splits.train)

    # ---------------------------------------------------------------------------------------------
    # Training

    def train_epoch(self, epoch: int, progress: bool = False) -> dict[str, float]:
        """One pass over this rank's share of the training split at the KL weight of ``epoch``.

        Running statistics stay on the device (no host sync per step); the host reads them once at the
        end, where a non-finite loss raises :class:`TrainingDiverged`."""
        beta = kl_weight(epoch, self.cfg)
        if not self.dense:
            return self._train_epoch_pyg(epoch, beta, progress)
        cfg = self.cfg
        accum = cfg.gradient_accumulation_steps
        order = epoch_order(self.n_train, cfg, epoch, self.rank, self.world)
        pos, valid, n_batches = step_layout(order, cfg.batch_size, accum)
        pos, valid = pos.to(self.device), valid.to(self.device)
        steps = pos.shape[0]
        rows = torch.zeros(steps, accum, len(self.STAT_KEYS), dtype=torch.float64, device=self.device)
        self._beta.fill_(beta)
        bar = self._bar(epoch, steps, progress)
        if self.graphed and self._graph is None:
            self._capture()
        self.model.train()
        for s in range(steps):
            if self.graphed:
                self._pos.copy_(pos[s])
                self._valid.copy_(valid[s])
                self._graph.replay()
                rows[s].copy_(self._rows)
            else:
                rows[s] = self._step(pos[s], valid[s])
            if self.first_step_at is None:
                self.first_step_at = time.time()
            if bar is not None:
                bar.update(1)
                if (s + 1) % POSTFIX_EVERY == 0 or s + 1 == steps:
                    done = rows.view(-1, len(self.STAT_KEYS))[: min((s + 1) * accum, n_batches)]
                    mean = done.mean(dim=0).tolist()
                    bar.set_postfix(loss=f"{mean[-1]:.4g}", kl=f"{mean[-2]:.4g}", kl_w=f"{beta:.2e}")
        if bar is not None:
            bar.close()
        per_batch = rows.view(-1, len(self.STAT_KEYS))[:n_batches]  # (n_batches, 6): empty batches left out
        bad = ~torch.isfinite(per_batch[:, -1])
        first_bad = torch.where(bad.any(), bad.long().argmax(), -1)  # first non-finite batch, or -1
        return self._finish_epoch(epoch, per_batch.sum(dim=0), first_bad, n_batches)

    def _step(self, pos: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """One optimiser step over ``accum`` micro-batches: positions (accum, B) into the training split,
        validity (accum, B). Returns (accum, 6) float64: each micro-batch's terms, KL and loss. Static
        shapes, no host synchronisation: the body of the captured CUDA graph."""
        accum = pos.shape[0]
        rows = []
        for k in range(accum):
            loss, row = self._micro(pos[k], valid[k])
            self.scaler.scale(loss / accum).backward()
            rows.append(row)
        self._optimiser_step()
        return torch.stack(rows)

    def _micro_loss(self, pos: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss of one micro-batch (positions (B,), validity (B,)) and its row of statistics (6,)."""
        parts, mask = self.train_jets
        batch = self.featurize(parts[pos], mask[pos], valid.float())
        with self.autocast():
            out = self.net(batch)
            terms = dense_reconstruction_terms(out.decoded, batch, self.node_stats, self.cfg.particle_loss)
            kl = kl_divergence(out.mu, out.logvar, self.cfg.free_bits, weight=batch.weight)
            loss = total_loss(terms, kl, self._beta, self.cfg)
        return loss, torch.stack([*(terms[c] for c in COMPONENTS), kl, loss]).detach().double()

    def _optimiser_step(self) -> None:
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)

    def _capture(self) -> None:
        """Capture :meth:`_step` in a CUDA graph. The warm-up steps that must precede the capture run on
        a side stream and are then undone (weights, optimiser state and RNG state restored), so the run
        is the same as an eager one."""
        cfg, dev = self.cfg, self.device
        t0 = time.perf_counter()
        self._pos = torch.zeros(cfg.gradient_accumulation_steps, cfg.batch_size, dtype=torch.long, device=dev)
        self._valid = torch.ones_like(self._pos, dtype=torch.bool)
        rng_cpu, rng_cuda = torch.get_rng_state(), torch.cuda.get_rng_state(dev)
        params = list(self.model.parameters())
        saved_params = [p.detach().clone() for p in params]
        saved_state = {id(p): {k: v.clone() for k, v in self.opt.state[p].items() if torch.is_tensor(v)}
                       for p in params if p in self.opt.state}
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        self.model.train()
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step(self._pos, self._valid)
        torch.cuda.current_stream(dev).wait_stream(side)
        with torch.no_grad():
            for p, saved in zip(params, saved_params):
                p.copy_(saved)
            for p in params:
                for k, v in self.opt.state[p].items():
                    if torch.is_tensor(v):
                        v.copy_(saved_state[id(p)][k]) if id(p) in saved_state else v.zero_()
        self.opt.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._rows = self._step(self._pos, self._valid)
        torch.set_rng_state(rng_cpu)
        torch.cuda.set_rng_state(rng_cuda, dev)
        torch.cuda.empty_cache()  # the warm-up's blocks, cached for the side stream, are not used again
        self._graph = graph
        log.info("training step captured in a CUDA graph in %.2f s", time.perf_counter() - t0)

    def _finish_epoch(self, epoch: int, sums: torch.Tensor, first_bad: torch.Tensor, n_batches: int
                      ) -> dict[str, float]:
        if self.world > 1:  # every rank must stop together, or the others wait in the next collective
            dist.all_reduce(first_bad, op=dist.ReduceOp.MAX)
        bad_step = int(first_bad.item())
        if bad_step >= 0:
            raise TrainingDiverged(f"epoch {epoch}, batch {bad_step}: loss is not finite; stopped, the last good "
                                   "checkpoint is kept")
        totals = dict(zip(self.STAT_KEYS, sums.tolist()))
        mean = (_all_mean(totals, n_batches, self.device) if self.world > 1
                else {k: v / max(n_batches, 1) for k, v in totals.items()})
        return {f"train_{c}": mean[c] for c in COMPONENTS} | {"train_kl": mean["kl"], "train_total": mean["total"]}

    def _bar(self, epoch: int, total: int, progress: bool):
        if not progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=f"epoch {epoch + 1}/{self.cfg.epochs}", leave=False, dynamic_ncols=True)

    def _train_epoch_pyg(self, epoch: int, beta: float, progress: bool) -> dict[str, float]:
        """The PyG engine's epoch: DataLoader batches of hypergraphs, one optimiser step per ``accum``."""
        from hvae_ray.model.hypervae import dense_targets

        cfg = self.cfg
        accum = cfg.gradient_accumulation_steps
        loader = train_loader(self.splits.train_graphs, cfg, epoch)
        sums = torch.zeros(len(self.STAT_KEYS), dtype=torch.float64, device=self.device)
        first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        bar = self._bar(epoch, len(loader), progress)
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        n_batches = len(loader)
        for i, batch in enumerate(loader):
            batch = batch.to(self.device, non_blocking=True)
            with self.autocast():
                out = self.net(batch)
                terms = reconstruction_terms(out.decoded, dense_targets(batch, self.model.num_slots),
                                             self.node_stats, cfg.particle_loss)
                kl = kl_divergence(out.mu, out.logvar, cfg.free_bits)
                loss = total_loss(terms, kl, beta, cfg)
            self.scaler.scale(loss / accum).backward()
            if (i + 1) % accum == 0 or i + 1 == n_batches:
                self._optimiser_step()
            sums += torch.stack([*(terms[c] for c in COMPONENTS), kl, loss]).detach().double()
            bad = ~torch.isfinite(loss.detach())
            first_bad = torch.where(bad & (first_bad < 0), torch.full_like(first_bad, i), first_bad)
            if bar is not None:
                bar.update(1)
                if (i + 1) % POSTFIX_EVERY == 0 or i + 1 == n_batches:
                    mean = (sums / (i + 1)).tolist()
                    bar.set_postfix(loss=f"{mean[-1]:.4g}", kl=f"{mean[-2]:.4g}", kl_w=f"{beta:.2e}")
        if bar is not None:
            bar.close()
        return self._finish_epoch(epoch, sums, first_bad, n_batches)

    # ---------------------------------------------------------------------------------------------
    # Validation

    @torch.no_grad()
    def evaluate(self, epoch: int) -> dict[str, float]:
        """Validation metrics on the full validation split (eval mode, posterior mean) at the KL weight of
        ``epoch``: the terms, KL, total, the unweighted sum of the objective's terms and the objective."""
        cfg = self.cfg
        beta = kl_weight(epoch, cfg)
        self.model.eval()
        sums = torch.zeros(len(self.STAT_KEYS), dtype=torch.float64, device=self.device)
        n = 0
        with self.autocast():
            for b, terms, kl in self._val_batches():
                loss = total_loss(terms, kl, beta, cfg)
                sums += torch.stack([*(terms[c] for c in COMPONENTS), kl, loss]).double() * b
                n += b
        self.model.train()
        val = dict(zip(self.STAT_KEYS, (sums / max(n, 1)).tolist()))
        recon = {c: val[c] for c in OBJECTIVE_COMPONENTS}
        out = {f"val_{c}": val[c] for c in COMPONENTS}
        out |= {"val_kl": val["kl"], "val_total": val["total"], "val_recon": sum(recon.values()),
                "val_objective": objective(recon, val["kl"], cfg)}
        return out

    def _val_batches(self):
        """(jets in the batch, terms, KL) over the validation split in batches of max(64, batch_size)."""
        size = validation_batch_size(self.cfg)
        if self.dense:
            parts, mask = self.val_jets
            for s in range(0, parts.shape[0], size):
                batch = self.featurize(parts[s : s + size], mask[s : s + size])
                out = self.model(batch)
                terms = dense_reconstruction_terms(out.decoded, batch, self.node_stats, self.cfg.particle_loss)
                yield batch.num_graphs, terms, kl_divergence(out.mu, out.logvar)
            return
        from torch_geometric.loader import DataLoader

        from hvae_ray.model.hypervae import dense_targets

        for batch in DataLoader(self.splits.val_graphs, batch_size=size):
            batch = batch.to(self.device, non_blocking=True)
            out = self.model(batch)
            terms = reconstruction_terms(out.decoded, dense_targets(batch, self.model.num_slots), self.node_stats,
                                         self.cfg.particle_loss)
            yield batch.num_graphs, terms, kl_divergence(out.mu, out.logvar)

    def generation_metrics(self) -> dict[str, float]:
        """How well jets sampled from the prior match the validation jets, by jetnet-equal metrics.

        ``generation_jets`` jets (at most the validation split's size) are decoded from codes of the
        ``generation_prior``, seeded with the run's seed: ``fitted``, a 20-component Gaussian mixture fitted
        to the posterior means of as many training jets at this epoch (a cheap stand-in for the
        100-component mixture that ``prior fit`` fits after training; N(0, 1) samples rank models
        poorly when the KL weight is small), or ``standard``, N(0, 1). They are compared with as many
        validation jets (their masses, particles and EFPs prepared once per run, on the run's device):
        ``val_w1m`` (relative mass), ``val_w1p`` (mean over η_rel, φ_rel, pT_rel of all particles),
        ``val_fpd`` (Fréchet distance of the 36 d ≤ 4 EFPs, extrapolated over subsample sizes n/2…n
        as jetnet does, with fewer draws) and ``val_generation``, their mean ratio to the fidelity
        targets (:data:`GENERATION_TARGETS`): at most 1 when a model meets all three on average.
        Full-sized numbers to quote are ``hvae-ray evaluate``'s on held-out jets. On a GPU jets are
        encoded (under the run's autocast) and decoded in validation's batches (``max(64, batch_size)``
        jets) and their EFPs computed in chunks of :data:`EFP_CHUNK`, so the score's memory stays within
        a validation pass's, which the trial's GPU share is sized by; the W1s are taken there too
        (:func:`~hvae_ray.evaluation.metrics.wasserstein_1d`).
        """
        from hvae_ray.evaluation.efp import jet_mass
        from hvae_ray.evaluation.metrics import fpd, wasserstein_1d

        ref = self._generation_reference()
        n = len(ref.mass)
        gen_p, gen_m = self._generated_jets(n, self._generation_batch())
        if gen_p is None or not np.isfinite(gen_p).all():
            return {k: math.inf for k in GENERATION_KEYS}
        gen_mass = torch.as_tensor(jet_mass(gen_p, gen_m), device=self.device)
        gen_parts = torch.as_tensor(gen_p[gen_m], device=self.device)
        out = {"val_w1m": wasserstein_1d(ref.mass, gen_mass),
               "val_w1p": float(np.mean([wasserstein_1d(ref.particles[:, f], gen_parts[:, f])
                                         for f in range(gen_p.shape[-1])]))}
        gen_efps = self._score_efps(gen_p, gen_m)
        if np.isfinite(gen_efps).all() and n >= 4:
            out["val_fpd"] = float(fpd(ref.efps, gen_efps, min_samples=max(2, n // 2), max_samples=n,
                                       num_batches=4, num_points=4, seed=self.cfg.seed)[0])
        else:
            out["val_fpd"] = math.inf
        out["val_generation"] = float(np.mean([out[k] / t for k, t in GENERATION_TARGETS.items()]))
        return out

    def _generation_batch(self) -> int:
        return validation_batch_size(self.cfg) if self.device.type == "cuda" else 1024

    def _score_efps(self, particles: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The score's EFPs: on a GPU with torch in chunks of at least :data:`EFP_CHUNK`; numpy on a CPU."""
        from hvae_ray.evaluation.efp import efps

        cuda = self.device.type == "cuda"  # numpy is the faster on a CPU
        return efps(particles, mask, chunk_size=max(self._generation_batch(), EFP_CHUNK),
                    device=self.device if cuda else None)

    def _generation_reference(self) -> GenerationReference:
        """The validation side of :meth:`generation_metrics`, made on the first call: the first
        ``generation_jets`` validation jets' masses, real particles (on the run's device) and EFPs."""
        if self._generation_ref is None:
            from hvae_ray.evaluation.efp import jet_mass

            val = self.splits.sample.subset(self.splits.val[: self.cfg.generation_jets])
            self._generation_ref = GenerationReference(
                mass=torch.as_tensor(jet_mass(val.particles, val.mask), device=self.device),
                particles=torch.as_tensor(val.particles[val.mask], device=self.device),
                efps=self._score_efps(val.particles, val.mask))
        return self._generation_ref

    def _generated_jets(self, n: int, size: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """``n`` jets decoded from ``generation_prior``'s codes (seeded); (None, None) if the training
        jets' posterior means are not finite. The training jets are encoded under the run's autocast."""
        from hvae_ray.latent import GaussianMixture, decode, encode

        if self.cfg.generation_prior != "fitted":
            return generate(self.model, self.normaliser, n, seed=self.cfg.seed, device=self.device)
        train = self.splits.sample.subset(self.splits.train[:n])
        model = self.model
        if not self.dense:  # the PyG model encodes PyG batches: its dense twin takes the same weights
            model = HyperVAE(self.cfg.model).to(self.device)
            model.load_state_dict(self.model.state_dict())
        with self.autocast():
            mu, _ = encode(model, self.normaliser, self.cfg, train.particles, train.mask, self.device, size)
        if not np.isfinite(mu).all():
            return None, None
        gmm = GaussianMixture.fit(mu, components=20, seed=self.cfg.seed, iterations=100, tol=1e-4,
                                  device=self.device)
        return decode(self.model, self.normaliser, gmm.sample(n, seed=self.cfg.seed), self.device, size)

    # ---------------------------------------------------------------------------------------------
    # Checkpoints

    def state(self, epoch: int) -> dict[str, Any]:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": epoch,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "generation": self.generation,  # the generation metrics carried to the next epochs
            "config": self.cfg.to_dict(),
            "normaliser": self.normaliser.state_dict(),
            "test_indices": torch.from_numpy(self.splits.test),
            "rng_cpu": torch.get_rng_state(),
        }
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (of :meth:`state`): weights, optimiser, loss scaler, RNG, epoch, best."""
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.start_epoch = int(state["epoch"]) + 1
        self.best = float(state["best"])
        self.best_epoch = int(state["best_epoch"])
        self.generation = state.get("generation")
        torch.set_rng_state(state["rng_cpu"])
        if "rng_cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng_cuda"], self.device)
        self._graph = None  # the optimiser's state tensors are new: capture again


def fit(cfg: Config, sample: JetSample, *, save_dir: str | Path | None = None,
        log_dir: str | Path | None = None, resume: bool | str | Path = False,
        callbacks: Sequence[Callback] = (), progress: bool = True,
        device: torch.device | str | None = None, save_test_indices: bool = False) -> dict[str, Any]:
    """Train a HyperVAE on ``sample`` with ``cfg``; return the final metrics and where things went.

    save_dir:  checkpoints ``last/`` and ``best/`` (best by the ``objective``'s metric), the config, and
               with ``save_test_indices`` ``test_indices.npy`` (indices into ``sample``).
    log_dir:   TensorBoard event files (tags in :data:`hvae_ray.tracking.TAGS`).
    resume:    True → continue from ``save_dir/last``; a path → from that checkpoint. The run
               continues exactly: model, optimiser, loss scaler, RNG state, epoch and best score.
    callbacks: called after each epoch with an :class:`EpochReport`; one returning True stops, as do
               ``cfg.patience`` epochs (when > 0) without a better score.
    A NaN/inf loss, or a validation KL above ``cfg.max_kl``, raises :class:`TrainingDiverged`; the
    last good checkpoint stays in ``save_dir/last``.
    """
    device = torch.device(device) if device is not None else resolve_device(cfg.device)
    save_dir = Path(save_dir) if save_dir is not None else None
    trainer = _start(cfg, sample, device, _resume_state(resume, save_dir, cfg), progress)
    logger = _open_outputs(trainer, save_dir, log_dir, save_test_indices)
    score_key = OBJECTIVE_METRICS[cfg.objective]
    metrics: dict[str, Any] = {}
    epoch = trainer.start_epoch - 1
    last_figures = -cfg.epochs  # the epoch of the last Distributions/* figures
    val = trainer.splits.sample.subset(trainer.splits.val) if logger is not None else None  # for the figures
    threads = _limit_threads(device)
    try:
        for epoch in range(trainer.start_epoch, cfg.epochs):
            metrics = _epoch_metrics(trainer, epoch, progress and trainer.rank == 0)
            is_best = metrics[score_key] < trainer.best
            if is_best:
                trainer.best, trainer.best_epoch = metrics[score_key], epoch
            metrics[f"best_{score_key}"] = trainer.best
            report = EpochReport(epoch, metrics, _save_epoch(trainer, save_dir, epoch, is_best), is_best)
            if logger is not None:
                logger.log_epoch(epoch, metrics)
                # figures at new best epochs, at most every tenth of the run, so that a trial that Tune
                # stops before the end (ASHA) has them too
                if is_best and epoch - last_figures >= max(1, cfg.epochs // 10):
                    _log_distributions(logger, trainer, val, epoch)
                    last_figures = epoch
            if any([bool(cb(report)) for cb in callbacks]) or _patience_ran_out(trainer, epoch, progress):
                break
        if logger is not None and metrics and last_figures != epoch:
            _log_distributions(logger, trainer, val, epoch)
    finally:
        torch.set_num_threads(threads)
        if logger is not None:
            logger.close()
    return {
        **metrics,
        "epochs_run": epoch + 1 - trainer.start_epoch if metrics else 0,
        "best_epoch": trainer.best_epoch,
        f"best_{score_key}": trainer.best,
        "save_dir": str(save_dir) if save_dir else None,
        "log_dir": str(log_dir) if log_dir else None,
    }


def _limit_threads(device: torch.device) -> int:
    """One intra-op thread when training on CUDA (unless OMP_NUM_THREADS says otherwise); returns the
    thread count to restore. Small batches on a GPU are launch-bound: CPU thread pools over tiny
    tensors only add overhead (an epoch of the default config on an H100: 4.97 s with 16 threads,
    3.50 s with one)."""
    threads = torch.get_num_threads()
    if device.type == "cuda" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    return threads


def _resume_state(resume: bool | str | Path, save_dir: Path | None, cfg: Config
                  ) -> tuple[dict[str, Any], Path] | None:
    """The checkpoint ``fit(resume=...)`` continues from and where it was read, or None."""
    if not resume:
        return None
    src = Path(resume) if not isinstance(resume, bool) else (save_dir / "last" if save_dir else None)
    if src is None:
        raise HvaeError("resume=True needs a save_dir holding last/checkpoint.pt")
    state = load_checkpoint(src)
    _check_resumable(cfg, state, src)
    return state, src


def _start(cfg: Config, sample: JetSample, device: torch.device,
           resumed: tuple[dict[str, Any], Path] | None, progress: bool) -> Trainer:
    """Splits, normaliser (a resumed run's own) and a Trainer, restored when resuming."""
    state, src = resumed if resumed else (None, None)
    normaliser = FeatureNormaliser.from_state_dict(state["normaliser"]) if state else None
    trainer = Trainer(cfg, prepare(cfg, sample, normaliser, device), device)
    if state:
        try:
            trainer.restore(state)
        except (RuntimeError, KeyError, TypeError, ValueError) as e:
            raise DataError(f"{src}: cannot resume from this checkpoint ({e.__class__.__name__})") from e
    if trainer.dense:
        line = f"training step: {trainer.step_mode}"
        log.info(line)
        if progress and trainer.rank == 0:
            print(line, file=sys.stderr)
    return trainer


def _open_outputs(trainer: Trainer, save_dir: Path | None, log_dir: str | Path | None,
                  save_test_indices: bool):
    """Rank 0 writes the config (and test indices) into ``save_dir``; returns the TensorBoard logger or None."""
    if trainer.rank != 0:
        return None
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
        _write_yaml(save_dir / "config.yaml", trainer.cfg.to_dict())
        if save_test_indices:
            np.save(save_dir / "test_indices.npy", trainer.splits.test)
    if log_dir is None:
        return None
    from hvae_ray.tracking import TensorBoardLogger

    return TensorBoardLogger(log_dir)


def _epoch_metrics(trainer: Trainer, epoch: int, progress: bool) -> dict[str, Any]:
    """Train one epoch, validate, score generation when due; raise on divergence."""
    cfg = trainer.cfg
    t0 = time.perf_counter()
    train = trainer.train_epoch(epoch, progress)
    if epoch == trainer.start_epoch:  # the end of this process's start-up, for a sweep's critical path
        train["first_step_at"] = trainer.first_step_at
    metrics = {"epoch": epoch, "kl_weight": kl_weight(epoch, cfg), "lr": trainer.opt.param_groups[0]["lr"],
               **train, **trainer.evaluate(epoch)}
    if trainer.generation is None or epoch % cfg.generation_every == 0 or epoch == cfg.epochs - 1:
        trainer.generation = trainer.generation_metrics()  # carried over the epochs in between
    metrics |= trainer.generation
    metrics["epoch_time_s"] = time.perf_counter() - t0
    if not math.isfinite(metrics["val_total"]):
        raise TrainingDiverged(f"epoch {epoch}: validation loss is {metrics['val_total']}")
    if metrics["val_kl"] > cfg.max_kl:
        raise TrainingDiverged(f"epoch {epoch}: validation KL {metrics['val_kl']:.3g} nats "
                               f"exceeds max_kl={cfg.max_kl:g} (KL runaway)")
    return metrics


def _save_epoch(trainer: Trainer, save_dir: Path | None, epoch: int, is_best: bool) -> Path | None:
    """Rank 0 writes ``last/`` and, at a new best, copies it to ``best/``; returns ``last/`` or None."""
    if trainer.rank != 0 or save_dir is None:
        return None
    last = save_dir / "last"
    save_checkpoint(last / CHECKPOINT_FILE, trainer.state(epoch))
    if is_best:
        (save_dir / "best").mkdir(exist_ok=True)
        shutil.copyfile(last / CHECKPOINT_FILE, save_dir / "best" / CHECKPOINT_FILE)
    return last


def _patience_ran_out(trainer: Trainer, epoch: int, progress: bool) -> bool:
    """True once ``patience`` epochs (when > 0) have passed since the best one and since the end of a linear
    KL warm-up: while β still rises the run is not judged (the model it is trained for is not there yet)."""
    cfg = trainer.cfg
    capped = cfg.kl_warmup_epochs if cfg.kl_schedule == "linear" else 0  # first epoch at the cap
    if cfg.patience <= 0 or epoch - max(trainer.best_epoch, capped) < cfg.patience:
        return False
    line = (f"early stop after epoch {epoch + 1}: no better {OBJECTIVE_METRICS[cfg.objective]} "
            f"for {cfg.patience} epochs (best epoch {trainer.best_epoch + 1})")
    log.info(line)
    if progress and trainer.rank == 0:
        print(line, file=sys.stderr)
    return True


def train_loader(graphs: Sequence, cfg: Config, epoch: int):
    """The PyG engine's training loader of ``epoch`` (a ``torch_geometric`` DataLoader): in one process,
    all of ``graphs`` shuffled by a generator seeded from ``cfg.seed`` and the epoch; under a process
    group, this rank's DistributedSampler shard (every rank shuffles with the same seed and epoch and
    takes every ``world``-th graph, so the shards are disjoint; when ``world`` does not divide the
    graphs, the sampler pads the shards to equal length by repeating the first graphs of the shuffled
    order). Its order is :func:`epoch_order`'s."""
    from torch_geometric.loader import DataLoader

    rank, world = _rank_world()
    sampler = None
    if world > 1:
        sampler = torch.utils.data.DistributedSampler(graphs, num_replicas=world, rank=rank, shuffle=True,
                                                      seed=cfg.seed)
        sampler.set_epoch(epoch)
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    return DataLoader(graphs, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
                      generator=gen if sampler is None else None, num_workers=cfg.num_workers, drop_last=False)


def _log_distributions(logger, trainer: Trainer, val: JetSample, step: int) -> None:
    """Real (validation) vs generated histograms into TensorBoard at the end of training."""
    from hvae_ray.evaluation.plots import distribution_figures

    gen_p, gen_m = generate(trainer.model, trainer.normaliser, len(val), seed=trainer.cfg.seed + 1,
                            device=trainer.device)
    figs = distribution_figures(val.particles, val.mask, gen_p, gen_m)
    logger.log_figures(figs, step)


def _write_yaml(path: Path, data: dict[str, Any]) -> None:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))
