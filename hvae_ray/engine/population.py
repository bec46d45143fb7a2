"""A population: K runs of the same shape trained as one vectorised model in one process.

Runs whose configs differ only in scalars (seed, KL schedule, loss weights, learning rate, weight decay,
gradient clipping, free bits) share every tensor shape, so their weights stack along a leading member
axis and one step trains them all: each member's batch is featurised together, then
``torch.func.vmap(loss)`` over ``functional_call`` of one :class:`HyperVAE` gives every member's loss, one
``autograd.grad`` of their sum every member's gradient of its own loss (members share no op), and a
vectorised AdamW (per-member learning rate, weight decay, step
count and clipping norm) updates them. On CUDA the whole step is one CUDA graph, captured once for the
population's life: members come and go at epoch boundaries by writing their slot's rows in place and
flipping its ``active`` flag, and an idle slot is masked (its weights and optimiser state do not move).

Each member draws its own batches and noise (:func:`~hvae_ray.engine.batches.epoch_order` and
:func:`~hvae_ray.engine.batches.epoch_noise` of its seed and epoch) and starts from its own seed's
weights, so with dropout off it trains as ``fit`` trains the same config alone (the tests hold the two to
1e-5). Its checkpoint is an ordinary single-model checkpoint. Members are independent: one that diverges
changes no other member's numbers.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hvae_ray.config import COMPONENTS, Config
from hvae_ray.data.dense import DenseFeaturizer, device_jets
from hvae_ray.engine.batches import Splits, epoch_noise, epoch_order, split_seed, step_layout, validation_batch_size
from hvae_ray.engine.paths import validation_metrics
from hvae_ray.engine.runtime import Precision, resolve_device
from hvae_ray.engine.steps import STAT_KEYS, PopulationStep, scheduled_lr
from hvae_ray.engine.trainer import check_divergence, generation_due, generation_scorer, node_stats
from hvae_ray.errors import ConfigError, TrainingDiverged
from hvae_ray.evaluation.scorer import GenerationScorer
from hvae_ray.model.hypervae import HyperVAE
from hvae_ray.model.losses import kl_weight

#: The config keys every member shares (the tensors' shapes, the data and how a step is computed);
#: everything else may differ per member.
SHAPE_KEYS = ("model", "batch_size", "gradient_accumulation_steps", "particle_loss", "engine", "data.val_fraction",
              "data.test_fraction", "data.knn", "data.max_jets", "mixed_precision", "device")


def shape_of(cfg: Config) -> dict[str, Any]:
    """The values of :data:`SHAPE_KEYS` and the split's seed: two configs with equal shapes can share a
    population."""
    flat = cfg.to_dict()
    shape = {}
    for key in SHAPE_KEYS:
        value: Any = flat
        for part in key.split("."):
            value = value[part]
        shape[key] = value
    return shape | {"split seed": split_seed(cfg)}


def shape_difference(a: Config, b: Config) -> str | None:
    """The first shape key on which ``a`` and ``b`` differ, as a phrase, or None."""
    sa, sb = shape_of(a), shape_of(b)
    for key in sa:
        if sa[key] != sb[key]:
            return f"'{key}' is {sb[key]!r} here but {sa[key]!r} in the population"
    return None


@dataclass
class MemberReport:
    """One member's epoch: ``metrics`` as ``fit`` reports them (None when it diverged), or ``diverged``,
    the reason (the member is then inactive; its last good checkpoint is the previous epoch's)."""

    slot: int
    epoch: int
    metrics: dict[str, Any] | None
    diverged: str | None = None


class Member:
    """A population's member as the run loop sees a :class:`Trainer`: its config, ``best``, ``best_epoch``,
    ``generation``, next epoch, ``model`` (the population's model holding this member's weights),
    ``normaliser``, ``device`` and ``state(epoch)``."""

    def __init__(self, population: Population, slot: int, cfg: Config):
        self.population, self.slot, self.cfg = population, slot, cfg
        self.start_epoch = self.epoch = 0
        self.best, self.best_epoch = math.inf, -1
        self.generation: dict[str, float] | None = None
        self.active = True

    @property
    def model(self) -> HyperVAE:
        return self.population.load_member(self.slot)

    @contextlib.contextmanager
    def averaged(self):
        """As :meth:`Trainer.averaged`: the model with this member's averaged (or, without one, own) weights."""
        yield self.model

    @property
    def normaliser(self):
        return self.population.normaliser

    @property
    def device(self) -> torch.device:
        return self.population.device

    def state(self, epoch: int) -> dict[str, Any]:
        return self.population.state(self.slot, epoch)


class Population:
    """Up to ``slots`` members of ``shape``'s shape on one device, trained together on ``splits``.

    ``add(cfg, state=None)`` puts a new (or, from a checkpoint, resumed) member into a free slot and
    returns the slot; ``remove(slot)`` frees it; ``train_epoch()`` trains every active member one epoch
    (each at its own epoch and KL weight), validates and scores it, and returns a
    :class:`MemberReport` per member; ``state(slot, epoch)`` is a member's checkpoint. The step trains in
    fp32: under bf16 autocast on CUDA the backward of ``vmap``'s batched attention fails (the math kernel
    mixes bf16 inputs with fp32 gradients; the fused kernels have no batching rule that runs), so it is
    not offered.
    """

    def __init__(self, shape: Config, splits: Splits, slots: int, device: torch.device | str | None = None,
                 cuda_graphs: bool | None = None):
        if shape.engine != "dense":
            raise ConfigError("population: members train on the dense engine only (engine: pyg given)")
        if slots < 1:
            raise ConfigError(f"population: slots must be >= 1, not {slots}")
        self.shape, self.splits, self.slots = shape, splits, slots
        self.device = torch.device(device) if device is not None else resolve_device(shape.device)
        self.normaliser = splits.normaliser
        self.precision = Precision(shape, self.device)
        if self.precision.scaler.is_enabled():
            raise ConfigError("population: fp16 loss scaling is not supported (bf16 or mixed_precision: false)")
        self.graphed = self.device.type == "cuda" and cuda_graphs is not False
        self.precision.graphed = self.graphed
        self.model = HyperVAE(shape.model).to(self.device)
        self.model.requires_grad_(False)
        self.members: list[Member | None] = [None] * slots
        self.featurize = DenseFeaturizer(self.normaliser, shape.data.knn, self.device)
        self.val_jets = device_jets(splits.sample, splits.val, self.device)
        self.node_stats = node_stats(self.normaliser, self.device)
        self.step = PopulationStep(shape, self.model, slots, self.featurize,
                                   device_jets(splits.sample, splits.train, self.device), self.node_stats,
                                   self.precision, self.graphed)
        self._scorers: dict[int, GenerationScorer] = {}

    # ---------------------------------------------------------------------------------------------
    # Members

    @property
    def occupied(self) -> list[int]:
        return [s for s, m in enumerate(self.members) if m is not None]

    def add(self, cfg: Config, state: dict[str, Any] | None = None) -> int:
        """Put ``cfg`` into a free slot: initialised from its seed, or continuing from ``state`` (a
        checkpoint of ``fit`` or of a member). Returns the slot."""
        if (why := shape_difference(self.shape, cfg)) is not None:
            raise ConfigError(f"population: cannot add this config: {why}")
        free = [s for s, m in enumerate(self.members) if m is None]
        if not free:
            raise ConfigError(f"population: all {self.slots} slots are taken")
        slot = free[0]
        torch.manual_seed(cfg.seed)  # the weights Trainer starts from
        init = HyperVAE(cfg.model)
        member = Member(self, slot, cfg)
        average = None
        if state is not None:
            init.load_state_dict(state.get("train_model", state["model"]))
            average = state["model"] if "train_model" in state else None
            member.start_epoch = member.epoch = int(state["epoch"]) + 1
            member.best, member.best_epoch = float(state["best"]), int(state["best_epoch"])
            member.generation = state.get("generation")
        self.step.load(slot, cfg, dict(init.named_parameters()),
                       _adam_moments(state["optimizer"] if state is not None else None, init), average)
        self.members[slot] = member
        return slot

    def remove(self, slot: int) -> None:
        """Free ``slot`` (at an epoch boundary); its weights stay until another member takes it."""
        self.members[slot] = None
        self.step.active[slot] = False

    def resized(self, slots: int) -> tuple[Population, dict[int, int]]:
        """This population's members in a new one of ``slots`` slots (at least as many as it has members),
        each moved through its checkpoint state as a resumed member is; returns it and the slot map
        old → new. Every slot of a population is computed whether a member holds it or not, so a
        population that most of its members have left trains faster resized to those that remain.
        Members continue as they would have to float rounding (the same arithmetic batched over another
        number of slots), save for dropout's masks (all members draw them from one stream, whose draws
        depend on the slot count)."""
        occupied = self.occupied
        if slots < len(occupied):
            raise ConfigError(f"population: {len(occupied)} members do not fit {slots} slots")
        new = Population(self.shape, self.splits, slots, self.device, self.graphed)
        new._scorers = self._scorers  # the reference sets depend on the split and the device alone
        moved = {}
        for slot in occupied:
            old = self.members[slot]
            moved[slot] = new.add(old.cfg, self.state(slot, old.epoch - 1))
            member = new.members[moved[slot]]
            member.start_epoch, member.active = old.start_epoch, old.active
            new.step.active[moved[slot]] = old.active
        return new, moved

    def member(self, slot: int) -> Member:
        member = self.members[slot]
        if member is None:
            raise KeyError(f"population slot {slot} is free")
        return member

    def load_member(self, slot: int) -> HyperVAE:
        """The population's model holding member ``slot``'s weights (valid until the next call)."""
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                p.copy_(self.step.average[name][slot])  # the member's own weights when it keeps no average
        return self.model

    def state(self, slot: int, epoch: int) -> dict[str, Any]:
        """Member ``slot``'s checkpoint after ``epoch``: the same dict as :meth:`Trainer.state`, with a
        ``torch.optim.AdamW`` state dict, so every single-model tool reads it. Each of the slot's stacks
        (averaged weights, weights, moments) comes to the CPU in one copy."""
        member = self.member(slot)
        model = self._host(self.step.average, slot)
        for name, b in self.model.named_buffers():
            model[name] = b.detach().cpu().clone()
        weights = [model[name] for name, _ in self.model.named_parameters()]
        opt = torch.optim.AdamW(weights, lr=member.cfg.learning_rate, weight_decay=member.cfg.weight_decay)
        steps = float(self.step.hyper["steps"][slot])
        if steps > 0:
            m, v = self._host(self.step.exp_avg, slot), self._host(self.step.exp_avg_sq, slot)
            for (name, _), p in zip(self.model.named_parameters(), weights):
                opt.state[p] = {"step": torch.tensor(steps), "exp_avg": m[name], "exp_avg_sq": v[name]}
        extra = {"train_model": self._host(self.step.params, slot)} if member.cfg.ema_decay > 0 else {}
        state_dict_order = {k: model[k] for k in self.model.state_dict()}
        return {**extra, "model": state_dict_order, "optimizer": opt.state_dict(),
                "scaler": self.precision.scaler.state_dict(), "epoch": epoch, "best": member.best,
                "best_epoch": member.best_epoch, "generation": member.generation,
                "config": member.cfg.to_dict(), "normaliser": self.normaliser.state_dict(),
                "test_indices": torch.from_numpy(self.splits.test), "rng_cpu": torch.get_rng_state()}

    @staticmethod
    @torch.no_grad()
    def _host(stack: dict[str, torch.Tensor], slot: int) -> dict[str, torch.Tensor]:
        """Slot ``slot`` of each stacked tensor, on the CPU, by one device-to-host copy of them all."""
        parts = [t[slot] for t in stack.values()]
        flat = torch.cat([p.reshape(-1) for p in parts]).cpu()
        return {name: chunk.view(p.shape).clone()
                for (name, p), chunk in zip(zip(stack, parts), flat.split([p.numel() for p in parts]))}

    # ---------------------------------------------------------------------------------------------
    # Training

    def train_epoch(self, slots: Sequence[int] | None = None) -> list[MemberReport]:
        """One epoch of every active member (or of those in ``slots``: the others wait, their weights and
        optimiser state untouched), then its validation and (when due) generation metrics."""
        live = [s for s in self.occupied if self.members[s].active and (slots is None or s in slots)]
        if not live:
            return []
        self.step.active[:] = False
        self.step.active[live] = True
        t0 = time.perf_counter()
        rows, n_batches = self._train(live)
        per_batch = rows.view(self.slots, -1, len(STAT_KEYS))[:, :n_batches]  # (K, batches, 8)
        sums, finite = per_batch.sum(dim=1).tolist(), torch.isfinite(per_batch[..., -1]).all(dim=1).tolist()
        train_time = time.perf_counter() - t0
        t0 = time.perf_counter()
        val = self.step.validation_batches([s for s in live if finite[s]], self.val_jets,
                                           validation_batch_size(self.shape))
        due = [s for s in live if finite[s] and generation_due(self.members[s].generation, self.members[s].epoch,
                                                                  self.members[s].cfg)]
        for slot, scores in self._generation_scores(due).items():
            self.members[slot].generation = scores
        val_time = (time.perf_counter() - t0) / max(1, len(val))
        reports = []
        for slot in live:
            member = self.members[slot]
            epoch = member.epoch
            member.epoch += 1
            if not finite[slot]:
                reports.append(self._diverged(slot, epoch, f"epoch {epoch}: training loss is not finite"))
                continue
            try:
                metrics = self._epoch_metrics(member, epoch, sums[slot], n_batches, val[slot])
            except TrainingDiverged as e:
                reports.append(self._diverged(slot, epoch, str(e)))
                continue
            metrics["epoch_time_s"] = (train_time / len(live) + val_time) + metrics.pop("_eval_s")
            reports.append(MemberReport(slot, epoch, metrics))
        return reports

    def _diverged(self, slot: int, epoch: int, why: str) -> MemberReport:
        self.members[slot].active = False
        self.step.active[slot] = False
        return MemberReport(slot, epoch, None, why)

    def _epoch_metrics(self, member: Member, epoch: int, sums: list[float], n_batches: int,
                       val_batches: list) -> dict[str, Any]:
        cfg = member.cfg
        t0 = time.perf_counter()
        mean = {k: v / max(n_batches, 1) for k, v in zip(STAT_KEYS, sums)}
        metrics = {"epoch": epoch, "kl_weight": kl_weight(epoch, cfg), "lr": scheduled_lr(epoch, cfg),
                   **{f"train_{c}": mean[c] for c in COMPONENTS}, "train_kl": mean["kl"],
                   "train_total": mean["total"]}
        metrics |= validation_metrics(val_batches, kl_weight(epoch, cfg), cfg, self.device, contextlib.nullcontext())
        metrics |= member.generation
        check_divergence(metrics, epoch, cfg)
        return metrics | {"_eval_s": time.perf_counter() - t0}

    def _generation_scores(self, slots: list[int]) -> dict[int, dict[str, float]]:
        """The generation metrics of members ``slots``, as :meth:`GenerationScorer.score` gives each alone,
        computed together: every slot's posterior means and decodings in one ``vmap`` per batch (batches
        of the scorer's size over the slots, so the memory stays a model's), their mixtures fitted side by
        side and their EFPs in one call."""
        from hvae_ray.latent import decoded_jets

        out: dict[int, dict[str, float]] = {}
        groups: dict[int, list[int]] = {}
        for slot in slots:  # one scorer per reference size
            groups.setdefault(self.members[slot].cfg.generation_jets, []).append(slot)
        latent = self.shape.model.latent_dim
        for group in groups.values():
            cfgs = [self.members[s].cfg for s in group]
            scorer = self._scorer(cfgs[0])
            n, size = len(scorer.reference_jets), max(1, scorer.batch // self.slots)
            mus: list = [None] * len(group)
            if any(c.generation_prior == "fitted" for c in cfgs):
                m = min(n, cfgs[0].generation_jets)
                means = self.step.encode((self.step.jets[0][:m], self.step.jets[1][:m]), size).cpu().numpy()
                mus = [means[s] if c.generation_prior == "fitted" else None for s, c in zip(group, cfgs)]
            codes = scorer.codes(mus, cfgs, latent)
            z = torch.zeros(self.slots, n, latent)
            for s, c in zip(group, codes):
                if c is not None:
                    z[s] = torch.as_tensor(c)
            parts, logits = self.step.decode(z.to(self.device), size)
            generated = []
            for s, c in zip(group, codes):
                jets = decoded_jets(parts[s], logits[s], self.normaliser) if c is not None else None
                generated.append((jets[0].cpu().numpy(), jets[1].cpu().numpy()) if jets else (None, None))
            out.update(zip(group, scorer.compare(generated, [c.seed for c in cfgs])))
        return out

    def _scorer(self, cfg: Config) -> GenerationScorer:
        if cfg.generation_jets not in self._scorers:  # members share a scorer per reference size
            self._scorers[cfg.generation_jets] = generation_scorer(cfg, self.splits, self.device)
        return self._scorers[cfg.generation_jets]

    def _train(self, live: list[int]) -> tuple[torch.Tensor, int]:
        """Every slot's positions, validity and noise for its member's epoch (idle slots: padding), then
        the steps. Returns the statistics rows (K, S, accum, 8) and the number of real batches."""
        cfg, k, dev = self.shape, self.slots, self.device
        accum, b = cfg.gradient_accumulation_steps, cfg.batch_size
        order = torch.arange(len(self.splits.train))
        _, _, n_batches = step_layout(order, b, accum)
        steps = -(-n_batches // accum)
        pos = torch.zeros(k, steps, accum, b, dtype=torch.long)
        valid = torch.zeros(k, steps, accum, b, dtype=torch.bool)
        eps = torch.zeros(k, steps, accum, b, cfg.model.latent_dim)
        for slot in live:
            member = self.members[slot]
            pos[slot], valid[slot], _ = step_layout(epoch_order(len(order), member.cfg, member.epoch), b, accum)
            eps[slot] = epoch_noise(member.cfg, member.epoch, steps)
            self.step.beta[slot] = kl_weight(member.epoch, member.cfg)
            self.step.hyper["lr"][slot] = scheduled_lr(member.epoch, member.cfg)
        pos, valid, eps = pos.to(dev), valid.to(dev), eps.to(dev)
        rows = torch.zeros(k, steps, accum, len(STAT_KEYS), dtype=torch.float64, device=dev)
        self.model.train()
        for s in range(steps):
            rows[:, s] = self.step(pos[:, s], valid[:, s], eps[:, s])
        return rows, n_batches

def _adam_moments(optimizer: dict[str, Any] | None, model: torch.nn.Module
                  ) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None, float]]:
    """(exp_avg, exp_avg_sq, step) of each parameter of ``model`` by name from a ``torch.optim.AdamW`` state
    dict, whose state is keyed by the parameters' positions (Nones and 0 for a fresh optimiser)."""
    state = (optimizer or {}).get("state", {})
    out = {}
    for i, (name, _) in enumerate(model.named_parameters()):
        s = state.get(i, {})
        out[name] = (s.get("exp_avg"), s.get("exp_avg_sq"), float(s.get("step", 0.0)))
    return out
