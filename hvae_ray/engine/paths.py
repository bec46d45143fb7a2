"""The two ways a model meets its jets, behind the same two calls: ``train_epoch`` (one pass over this
rank's share of the training split, returning running sums) and ``val_batches`` (the validation split).

:class:`DensePath` keeps the jets as padded tensors on the device and steps through a
:class:`~hvae_ray.engine.steps.DenseStep`; :class:`PygPath` is the PyG reference (DataLoader batches of
hypergraphs, sparse message passing), which the dense path is tested against.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hvae_ray.config import COMPONENTS, OBJECTIVE_COMPONENTS, Config
from hvae_ray.data.dense import DenseFeaturizer
from hvae_ray.engine.batches import Splits, epoch_noise, epoch_order, step_layout, train_loader, validation_batch_size
from hvae_ray.engine.runtime import Precision, all_mean, rank_world
from hvae_ray.engine.steps import STAT_KEYS, DenseStep, loss_weights, optimizer_steps, update_average
from hvae_ray.errors import TrainingDiverged
from hvae_ray.model.losses import (
    dense_reconstruction_terms,
    kl_divergence,
    objective,
    reconstruction_terms,
    total_loss,
    weighted_loss,
)

POSTFIX_EVERY = 20  # progress-bar refresh (one host sync) every this many steps


@dataclass
class EpochSums:
    """An epoch's statistics on the device: ``sums`` (len(STAT_KEYS),) over its real batches,
    ``first_bad`` the first batch with a non-finite loss (-1: none), ``n_batches``."""

    sums: torch.Tensor
    first_bad: torch.Tensor
    n_batches: int


def epoch_means(done: EpochSums, epoch: int, world: int, device: torch.device) -> dict[str, float]:
    """An epoch's training metrics (means over its batches, and over the ranks of a ``world`` > 1) from its
    sums; a non-finite loss on any rank raises :class:`TrainingDiverged` on every rank together (or the
    others would wait in the next collective)."""
    first_bad = done.first_bad
    if world > 1:
        dist.all_reduce(first_bad, op=dist.ReduceOp.MAX)
    if (bad := int(first_bad.item())) >= 0:
        raise TrainingDiverged(f"epoch {epoch}, batch {bad}: loss is not finite; stopped, the last good "
                               "checkpoint is kept")
    totals = dict(zip(STAT_KEYS, done.sums.tolist()))
    mean = (all_mean(totals, done.n_batches, device) if world > 1
            else {k: v / max(done.n_batches, 1) for k, v in totals.items()})
    return {f"train_{c}": mean[c] for c in COMPONENTS} | {"train_kl": mean["kl"], "train_total": mean["total"]}


def progress_bar(cfg: Config, epoch: int, total: int, progress: bool):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, dynamic_ncols=True)


def _postfix(bar, done: torch.Tensor, beta: float) -> None:
    mean = done.mean(dim=0).tolist()
    bar.set_postfix(loss=f"{mean[-1]:.4g}", kl=f"{mean[-2]:.4g}", kl_w=f"{beta:.2e}")


class DensePath:
    """Training and validation jets as device tensors; the step is :class:`DenseStep`."""

    def __init__(self, cfg: Config, splits: Splits, model, step: DenseStep, featurize: DenseFeaturizer,
                 val_jets: tuple[torch.Tensor, torch.Tensor], node_stats, rank: int, world: int):
        self.cfg, self.model, self.step, self.featurize = cfg, model, step, featurize
        self.n_train, self.val_jets, self.node_stats = len(splits.train), val_jets, node_stats
        self.rank, self.world = rank, world
        self.first_step_at: float | None = None

    def train_epoch(self, epoch: int, beta: float, progress: bool) -> EpochSums:
        import time

        cfg, dev = self.cfg, self.val_jets[0].device
        order = epoch_order(self.n_train, cfg, epoch, self.rank, self.world)
        pos, valid, n_batches = step_layout(order, cfg.batch_size, cfg.gradient_accumulation_steps)
        pos, valid = pos.to(dev), valid.to(dev)
        eps = epoch_noise(cfg, epoch, pos.shape[0], self.rank).to(dev)
        rows = torch.zeros(*pos.shape[:2], len(STAT_KEYS), dtype=torch.float64, device=dev)
        self.step.beta.fill_(beta)
        bar = progress_bar(cfg, epoch, pos.shape[0], progress)
        self.model.train()
        for s in range(pos.shape[0]):
            rows[s] = self.step(pos[s], valid[s], eps[s])
            if self.first_step_at is None:
                self.first_step_at = time.time()
            if bar is not None:
                bar.update(1)
                if (s + 1) % POSTFIX_EVERY == 0 or s + 1 == pos.shape[0]:
                    _postfix(bar, rows.view(-1, len(STAT_KEYS))[: min((s + 1) * pos.shape[1], n_batches)], beta)
        if bar is not None:
            bar.close()
        per_batch = rows.view(-1, len(STAT_KEYS))[:n_batches]  # empty batches left out
        return EpochSums(per_batch.sum(dim=0), first_nonfinite(per_batch[:, -1]), n_batches)

    def val_batches(self, model) -> Iterator[tuple[int, dict[str, torch.Tensor], torch.Tensor]]:
        return dense_val_batches(model, self.cfg, self.featurize, self.val_jets, self.node_stats)


def dense_val_batches(model, cfg: Config, featurize: DenseFeaturizer, val_jets: tuple[torch.Tensor, torch.Tensor],
                      node_stats) -> Iterator[tuple[int, dict[str, torch.Tensor], torch.Tensor]]:
    """(jets in the batch, terms, KL) over the validation jets in batches of max(64, batch_size)."""
    size = validation_batch_size(cfg)
    parts, mask = val_jets
    for s in range(0, parts.shape[0], size):
        batch = featurize(parts[s : s + size], mask[s : s + size])
        out = model(batch)
        terms = dense_reconstruction_terms(out.decoded, batch, node_stats, cfg.particle_loss)
        yield batch.num_graphs, terms, kl_divergence(out.mu, out.logvar)


class PygPath:
    """PyG batches of hypergraphs from a DataLoader, one optimiser step per ``accum`` batches."""

    def __init__(self, cfg: Config, splits: Splits, model, net, opt, precision: Precision, node_stats,
                 device: torch.device, average: list[torch.Tensor] | None = None):
        self.cfg, self.splits, self.model, self.net, self.opt = cfg, splits, model, net, opt
        self.average = average
        self.precision, self.node_stats, self.device = precision, node_stats, device
        self.first_step_at: float | None = None

    def train_epoch(self, epoch: int, beta: float, progress: bool) -> EpochSums:
        import time

        from hvae_ray.model.hypervae import dense_targets

        cfg, scaler = self.cfg, self.precision.scaler
        accum = cfg.gradient_accumulation_steps
        loader = train_loader(self.splits.train_graphs, cfg, epoch)
        n_batches = len(loader)
        eps = epoch_noise(cfg, epoch, -(-n_batches // accum), rank_world()[0]).to(self.device)  # the dense path's
        sums = torch.zeros(len(STAT_KEYS), dtype=torch.float64, device=self.device)
        first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        bar = progress_bar(cfg, epoch, n_batches, progress)
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        for i, batch in enumerate(loader):
            batch = batch.to(self.device, non_blocking=True)
            with self.precision.autocast():
                out = self.net(batch, eps[i // accum, i % accum, : batch.num_graphs])
                terms = reconstruction_terms(out.decoded, dense_targets(batch, self.model.num_slots),
                                             self.node_stats, cfg.particle_loss)
                kl = kl_divergence(out.mu, out.logvar, cfg.free_bits)
                loss = weighted_loss(terms, kl, beta, loss_weights(cfg))
            scaler.scale(loss / accum).backward()
            if (i + 1) % accum == 0 or i + 1 == n_batches:
                if cfg.grad_clip > 0:
                    scaler.unscale_(self.opt)
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                scaler.step(self.opt)
                scaler.update()
                self.opt.zero_grad(set_to_none=True)
                update_average(self.average, self.model.parameters(), cfg.ema_decay, optimizer_steps(self.opt))
            if self.first_step_at is None:
                self.first_step_at = time.time()
            sums += torch.stack([*(terms[c] for c in COMPONENTS), kl, loss]).detach().double()
            bad = ~torch.isfinite(loss.detach())
            first_bad = torch.where(bad & (first_bad < 0), torch.full_like(first_bad, i), first_bad)
            if bar is not None:
                bar.update(1)
                if (i + 1) % POSTFIX_EVERY == 0 or i + 1 == n_batches:
                    _postfix(bar, (sums / (i + 1))[None], beta)
        if bar is not None:
            bar.close()
        return EpochSums(sums, first_bad, n_batches)

    def val_batches(self, model) -> Iterator[tuple[int, dict[str, torch.Tensor], torch.Tensor]]:
        from torch_geometric.loader import DataLoader

        from hvae_ray.model.hypervae import dense_targets

        for batch in DataLoader(self.splits.val_graphs, batch_size=validation_batch_size(self.cfg)):
            batch = batch.to(self.device, non_blocking=True)
            out = model(batch)
            terms = reconstruction_terms(out.decoded, dense_targets(batch, model.num_slots), self.node_stats,
                                         self.cfg.particle_loss)
            yield batch.num_graphs, terms, kl_divergence(out.mu, out.logvar)


def first_nonfinite(losses: torch.Tensor) -> torch.Tensor:
    """The index of the first non-finite entry of ``losses`` (on the device, no host sync), or -1."""
    bad = ~torch.isfinite(losses)
    return torch.where(bad.any(), bad.long().argmax(), -1)


@torch.no_grad()
def validation_metrics(batches, beta: float, cfg: Config, device: torch.device, autocast) -> dict[str, float]:
    """Validation metrics from ``val_batches``' (jets, terms, KL) at KL weight ``beta``: the terms, KL,
    total, the unweighted sum of the objective's terms and the objective."""
    sums = torch.zeros(len(STAT_KEYS), dtype=torch.float64, device=device)
    n = 0
    with autocast:
        for b, terms, kl in batches:
            loss = total_loss(terms, kl, beta, cfg)
            sums += torch.stack([*(terms[c] for c in COMPONENTS), kl, loss]).double() * b
            n += b
    val = dict(zip(STAT_KEYS, (sums / max(n, 1)).tolist()))
    recon = {c: val[c] for c in OBJECTIVE_COMPONENTS}
    out = {f"val_{c}": val[c] for c in COMPONENTS}
    return out | {"val_kl": val["kl"], "val_total": val["total"], "val_recon": sum(recon.values()),
                  "val_objective": objective(recon, val["kl"], cfg)}
