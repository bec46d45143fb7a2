"""One training run: :class:`Trainer` (``train_epoch``, ``evaluate``, ``generation_metrics``, ``state``,
``restore``) and :func:`fit`, the loop around it. Free of Ray.

The CLI calls ``fit`` directly; the sweep layer calls it inside Ray Train workers and forwards what it
reports through callbacks. When a ``torch.distributed`` process group is initialised (as a
TorchTrainer does), the engine trains data-parallel with DDP, each rank on its shard of every epoch's
shuffled order (DistributedSampler's); every rank computes the same validation metrics on the full
validation split, and only rank 0 writes files.

``engine: dense`` (the default) keeps the training and validation jets as padded tensors on the
training device and computes each batch's features there (:mod:`hvae_ray.data.dense`): no per-jet
objects, no collation, no DataLoader. Batches have a fixed size (the last one of an epoch is filled
with padding jets of weight 0), so on CUDA one optimiser step is captured once in a CUDA graph and
replayed (:mod:`hvae_ray.engine.steps`). ``engine: pyg`` trains the PyG reference model on PyG batches
of hypergraphs (:mod:`hvae_ray.engine.paths`; ``torch_geometric`` is imported only then).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hvae_ray.config import OBJECTIVE_METRICS, Config, warmup_warning
from hvae_ray.data.dense import DenseFeaturizer, FeatureNormaliser, device_jets
from hvae_ray.data.jets import JetSample
from hvae_ray.engine.batches import Splits, prepare, validation_batch_size
from hvae_ray.engine.checkpoint import restore_rng, resume_state, rng_state, save_epoch, write_run_files
from hvae_ray.engine.paths import DensePath, PygPath, epoch_means, validation_metrics
from hvae_ray.engine.runtime import Precision, limit_threads, rank_world, resolve_device
from hvae_ray.engine.steps import STAT_KEYS, DenseStep, holding, scheduled_lr, set_learning_rate, step_mode
from hvae_ray.errors import DataError, TrainingDiverged
from hvae_ray.evaluation.scorer import GenerationScorer, generate
from hvae_ray.model.hypervae import HyperVAE
from hvae_ray.model.losses import kl_weight

log = logging.getLogger(__name__)



@dataclass
class EpochReport:
    """What the engine tells callbacks after each epoch.

    metrics: the epoch's metrics (keys in :data:`hvae_ray.tracking.TAGS`, plus ``epoch``, ``best_<the
             objective's metric>`` and, at a process's first epoch, ``first_step_at``).
    checkpoint_dir: directory holding this epoch's checkpoint (rank 0 only; None on other ranks).
    is_best: whether this epoch improved the objective's metric (:data:`OBJECTIVE_METRICS`).
    """

    epoch: int
    metrics: dict[str, float]
    checkpoint_dir: Path | None
    is_best: bool


# A callback returns True to stop training after this epoch.
Callback = Callable[[EpochReport], "bool | None"]


def node_stats(normaliser: FeatureNormaliser, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The node normaliser's (mean, std) on ``device``, for the jet term."""
    return tuple(torch.tensor(normaliser.stats["nodes"][k], dtype=torch.float32, device=device)
                 for k in ("mean", "std"))


def generation_scorer(cfg: Config, splits: Splits, device: torch.device) -> GenerationScorer:
    """The scorer of ``cfg``'s first ``generation_jets`` validation jets: on a GPU in validation's batches
    (within the memory a trial's share is sized by), on a CPU in batches of 1024."""
    batch = validation_batch_size(cfg) if device.type == "cuda" else 1024
    return GenerationScorer(splits.sample.subset(splits.val[: cfg.generation_jets]), device, batch)


class Trainer:
    """One training run on one device: model, optimiser, the data path and the generation scorer.

    ``train_epoch(epoch)`` trains one epoch and returns its training metrics; ``evaluate(epoch)`` the
    validation metrics; ``generation_metrics()`` W1 and FPD of prior samples against the validation jets;
    ``state(epoch)`` is a checkpoint and ``restore(state)`` continues from one exactly.
    ``cuda_graphs`` (default: where possible) captures the dense training step in a CUDA graph;
    ``compile_model`` (default: the config's ``compile``) compiles each micro-batch's loss.
    """

    STAT_KEYS = STAT_KEYS

    def __init__(self, cfg: Config, splits: Splits, device: torch.device | str | None = None,
                 cuda_graphs: bool | None = None, compile_model: bool | None = None):
        device = torch.device(device) if device is not None else resolve_device(cfg.device)
        self.cfg, self.splits, self.device, self.normaliser = cfg, splits, device, splits.normaliser
        self.rank, self.world = rank_world()
        self.dense = cfg.engine == "dense"
        self.model, self.net = build_model(cfg, device, self.world)
        self.precision = Precision(cfg, device)
        self.step_mode = step_mode(device, self.world, self.precision, cuda_graphs) if self.dense \
            else "eager: engine pyg"
        graphed = self.step_mode == "cuda-graph"
        lr = torch.tensor(cfg.learning_rate, device=device) if graphed else cfg.learning_rate  # a graph reads it
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=cfg.weight_decay,
                                     capturable=graphed)
        self.average = [p.detach().clone() for p in self.model.parameters()] if cfg.ema_decay > 0 else None
        self.start_epoch, self.best, self.best_epoch = 0, math.inf, -1
        self.generation: dict[str, float] | None = None  # the last generation metrics (generation_every)
        self.path = self._data_path(graphed, cfg.compile if compile_model is None else compile_model)
        self.scorer = generation_scorer(cfg, splits, device)

    def _data_path(self, graphed: bool, compiled: bool) -> DensePath | PygPath:
        """The engine's path through the data: its training step and validation batches."""
        cfg, splits, device = self.cfg, self.splits, self.device
        stats = node_stats(self.normaliser, device)
        if not self.dense:
            return PygPath(cfg, splits, self.model, self.net, self.opt, self.precision, stats, device, self.average)
        featurize = DenseFeaturizer(self.normaliser, cfg.data.knn, device)
        step = DenseStep(cfg, self.model, self.net, self.opt, self.precision, featurize,
                         device_jets(splits.sample, splits.train, device), stats, graphed, compiled, self.average)
        return DensePath(cfg, splits, self.model, step, featurize, device_jets(splits.sample, splits.val, device),
                         stats, self.rank, self.world)

    @property
    def n_train(self) -> int:
        return len(self.splits.train)

    @property
    def first_step_at(self) -> float | None:
        """Unix time [s] this process launched its first optimiser step."""
        return self.path.first_step_at

    def autocast(self):
        return self.precision.autocast()

    def train_epoch(self, epoch: int, progress: bool = False) -> dict[str, float]:
        """One pass over this rank's share of the training split at the KL weight of ``epoch``. Running
        statistics stay on the device; the host reads them once at the end, where a non-finite loss
        raises :class:`TrainingDiverged`."""
        set_learning_rate(self.opt, scheduled_lr(epoch, self.cfg))
        return epoch_means(self.path.train_epoch(epoch, kl_weight(epoch, self.cfg), progress), epoch, self.world,
                           self.device)

    def averaged(self):
        """A context in which the model holds the weights' moving average (its own weights without one):
        what is validated, scored, sampled and saved as ``model``."""
        return holding(self.model, self.average)

    def evaluate(self, epoch: int) -> dict[str, float]:
        """Validation metrics on the full validation split (eval mode, posterior mean) at the KL weight of
        ``epoch`` (:func:`~hvae_ray.engine.paths.validation_metrics`)."""
        with self.averaged() as model:
            model.eval()
            out = validation_metrics(self.path.val_batches(model), kl_weight(epoch, self.cfg), self.cfg,
                                     self.device, self.autocast())
            model.train()
        return out

    def generation_metrics(self) -> dict[str, float]:
        """:meth:`GenerationScorer.score` of this model (the PyG model scores through its dense twin)."""
        train = self.splits.sample.subset(self.splits.train[: self.cfg.generation_jets])
        with self.averaged() as model:
            if not self.dense:
                model = HyperVAE(self.cfg.model).to(self.device)
                model.load_state_dict(self.model.state_dict())
            return self.scorer.score(model, self.normaliser, self.cfg, train, self.autocast())

    def state(self, epoch: int) -> dict[str, Any]:
        """A checkpoint (:mod:`hvae_ray.engine.checkpoint`) after ``epoch``: ``model`` holds the weights'
        moving average when there is one, ``train_model`` then the trained weights."""
        state = {"optimizer": self.opt.state_dict(),
                 "scaler": self.precision.scaler.state_dict(), "epoch": epoch, "best": self.best,
                 "best_epoch": self.best_epoch, "generation": self.generation, "config": self.cfg.to_dict(),
                 "normaliser": self.normaliser.state_dict(), "test_indices": torch.from_numpy(self.splits.test),
                 **rng_state(self.device)}
        with self.averaged() as model:
            state["model"] = {k: v.clone() for k, v in model.state_dict().items()}
        if self.average is not None:
            state["train_model"] = self.model.state_dict()
        return state

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (of :meth:`state`): weights, optimiser, loss scaler, RNG, epoch, best."""
        self.model.load_state_dict(state.get("train_model", state["model"]))
        if self.average is not None:
            with torch.no_grad():
                for a, v in zip(self.average, state["model"].values()):
                    a.copy_(v)
        graphed_lr = self.opt.param_groups[0]["lr"]
        self.opt.load_state_dict(state["optimizer"])
        for group in self.opt.param_groups:  # the learning rate's kind is this run's (a tensor when captured)
            group["lr"] = graphed_lr if torch.is_tensor(graphed_lr) else float(group["lr"])
        self.precision.scaler.load_state_dict(state["scaler"])
        self.start_epoch = int(state["epoch"]) + 1
        self.best, self.best_epoch = float(state["best"]), int(state["best_epoch"])
        self.generation = state.get("generation")
        restore_rng(state, self.device)
        if self.dense:
            self.path.step.reset()  # the optimiser's state tensors are new: capture again


def build_model(cfg: Config, device: torch.device, world: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The run's model (dense, or the PyG reference) seeded by ``cfg.seed``, and what trains it: the model
    itself, or its DDP wrapper across ``world`` processes."""
    torch.manual_seed(cfg.seed)
    if cfg.engine == "dense":
        model = HyperVAE(cfg.model).to(device)
    else:
        from hvae_ray.model.pyg import PygHyperVAE

        model = PygHyperVAE(cfg.model).to(device)
    if world == 1:
        return model, model
    ids = [device.index] if device.type == "cuda" else None
    return model, torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


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
    trainer = _start(cfg, sample, device, resume_state(resume, save_dir, cfg), progress)
    logger = _open_outputs(trainer, save_dir, log_dir, save_test_indices)
    run = RunLog(cfg, logger, trainer.splits, save_dir if trainer.rank == 0 else None)
    metrics: dict[str, Any] = {}
    epoch = trainer.start_epoch - 1
    threads = limit_threads(device)
    try:
        for epoch in range(trainer.start_epoch, cfg.epochs):
            metrics = epoch_metrics(trainer, epoch, progress and trainer.rank == 0)
            if epoch == trainer.start_epoch and progress and trainer.rank == 0:
                from tqdm.auto import tqdm

                tqdm.write(run_estimate(cfg, len(trainer.splits.train), device, epoch, metrics["epoch_time_s"]),
                           file=sys.stderr)
            report = run.record(trainer, epoch, metrics)
            if any([bool(cb(report)) for cb in callbacks]) or patience_ran_out(
                    cfg, trainer.best_epoch, epoch, progress and trainer.rank == 0):
                break
        run.close(trainer, epoch if metrics else None)
    finally:
        torch.set_num_threads(threads)
        if logger is not None:
            logger.close()
    key = OBJECTIVE_METRICS[cfg.objective]
    return {**metrics, "epochs_run": epoch + 1 - trainer.start_epoch if metrics else 0,
            "best_epoch": trainer.best_epoch, f"best_{key}": trainer.best,
            "save_dir": str(save_dir) if save_dir else None, "log_dir": str(log_dir) if log_dir else None}


#: Real-vs-generated figures during a run take at most about 1/FIGURE_SHARE of its time: after figures that
#: took s seconds, the next wait at least FIGURE_SHARE * s. Drawing them (matplotlib, one core) costs 1-4 s a
#: set on a laptop CPU, more than an epoch of a small run; drawn at every new best epoch, they took most of a
#: quickstart population's time, one member's set after another.
FIGURE_SHARE = 20.0


class RunLog:
    """What a run leaves after each epoch: the best score, ``last/`` and ``best/`` checkpoints, the
    TensorBoard scalars and real-vs-generated figures: at the first epoch and at later new best epochs at
    most every tenth of the run and at most every :data:`FIGURE_SHARE` times the last set's drawing time
    (so that a trial Tune stops early has them too), and at the end."""

    def __init__(self, cfg: Config, logger, splits: Splits, save_dir: Path | None):
        self.cfg, self.logger, self.save_dir = cfg, logger, save_dir
        self.key = OBJECTIVE_METRICS[cfg.objective]
        self.last_figures = -cfg.epochs
        self.next_figures_at = -math.inf  # time.monotonic() from which figures may be drawn again
        self.val = splits.sample.subset(splits.val) if logger is not None else None

    def record(self, trainer, epoch: int, metrics: dict[str, Any]) -> EpochReport:
        """Update ``trainer.best``/``best_epoch`` from ``metrics``, write what is due, return the report."""
        report, write = self.prepare(trainer, epoch, metrics)
        write()
        self.figures(trainer, report)
        return report

    def prepare(self, trainer, epoch: int, metrics: dict[str, Any]) -> tuple[EpochReport, Callable[[], None]]:
        """Update ``trainer.best``/``best_epoch`` from ``metrics`` and take the checkpoint's state; returns the
        report and the writes it needs (``last/``, ``best/`` at a new best, the TensorBoard scalars), which
        may run in another thread: the report's ``last`` holds its checkpoint once they have run."""
        is_best = metrics[self.key] < trainer.best
        if is_best:
            trainer.best, trainer.best_epoch = metrics[self.key], epoch
        metrics[f"best_{self.key}"] = trainer.best
        state = trainer.state(epoch) if self.save_dir is not None else None

        def write() -> None:
            if state is not None:
                save_epoch(state, self.save_dir, is_best)
            if self.logger is not None:
                self.logger.log_epoch(epoch, metrics)

        last = self.save_dir / "last" if self.save_dir is not None else None
        return EpochReport(epoch, metrics, last, is_best), write

    def figures(self, trainer, report: EpochReport) -> None:
        """Real-vs-generated figures at a new best epoch, at most every tenth of the run and within the
        figures' share of the run's time."""
        if self.logger is not None and report.is_best and time.monotonic() >= self.next_figures_at and \
                report.epoch - self.last_figures >= max(1, self.cfg.epochs // 10):
            self._figures(trainer, report.epoch)

    def close(self, trainer, epoch: int | None) -> None:
        if self.logger is not None and epoch is not None and self.last_figures != epoch:
            self._figures(trainer, epoch)

    def _figures(self, trainer, epoch: int) -> None:
        """Validation jets against jets decoded from N(0, 1) codes, whatever ``generation_prior`` says: the
        generation metrics beside them decode codes of the fitted mixture by default, so the figures can
        look worse than those metrics."""
        from hvae_ray.evaluation.plots import distribution_figures

        started = time.monotonic()
        with trainer.averaged() as model:
            gen_p, gen_m = generate(model, trainer.normaliser, len(self.val), seed=trainer.cfg.seed + 1,
                                    device=trainer.device)
        self.logger.log_figures(distribution_figures(self.val.particles, self.val.mask, gen_p, gen_m), epoch)
        self.last_figures = epoch
        done = time.monotonic()
        self.next_figures_at = done + FIGURE_SHARE * (done - started)


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
        log.info("training step: %s", trainer.step_mode)  # engine detail: the log only, not the console
    if (note := warmup_warning(cfg)) is not None:
        log.info(note)  # the console line below when shown; a warning record would print it twice
        if progress and trainer.rank == 0:
            print(note, file=sys.stderr)
    return trainer


def duration(seconds: float) -> str:
    """A duration as a person reads it: seconds, minutes or hours."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def run_estimate(cfg: Config, jets: int, device: torch.device, start_epoch: int, first_epoch_s: float) -> str:
    """One line after the run's first epoch: what it trains, where, and about how long the whole run
    takes (that epoch's time, validation and generation scoring included, times the run's epochs)."""
    epochs = f"{cfg.epochs} epochs" if start_epoch == 0 else f"epochs {start_epoch + 1}-{cfg.epochs}"
    where = "cpu" if device.type == "cpu" else "the GPU" if device.type == "cuda" else device.type
    total = first_epoch_s * (cfg.epochs - start_epoch)
    stop = f", less if {cfg.patience} epochs without a better {OBJECTIVE_METRICS[cfg.objective]} stop it" \
        if patience_can_stop(cfg) else ""
    return (f"training {jets} jets, {epochs} on {where}: about {duration(total)} in all "
            f"(first epoch {first_epoch_s:.1f} s){stop}")


def _open_outputs(trainer: Trainer, save_dir: Path | None, log_dir: str | Path | None,
                  save_test_indices: bool):
    """Rank 0 writes the config (and test indices) into ``save_dir``; returns the TensorBoard logger or None."""
    if trainer.rank != 0:
        return None
    if save_dir is not None:
        write_run_files(save_dir, trainer.cfg, trainer.splits.test if save_test_indices else None)
    if log_dir is None:
        return None
    from hvae_ray.tracking import TensorBoardLogger

    return TensorBoardLogger(log_dir)


def generation_due(last: dict[str, float] | None, epoch: int, cfg: Config) -> bool:
    """Whether ``epoch`` gets a generation score: the first scored epoch (no ``last`` score yet), every
    ``generation_every``-th, and the run's last; the others carry ``last`` over."""
    return last is None or epoch % cfg.generation_every == 0 or epoch == cfg.epochs - 1


def epoch_metrics(trainer, epoch: int, progress: bool) -> dict[str, Any]:
    """Train one epoch, validate, score generation when due; raise :class:`TrainingDiverged` on divergence."""
    cfg = trainer.cfg
    t0 = time.perf_counter()
    train = trainer.train_epoch(epoch, progress)
    if epoch == trainer.start_epoch:  # the end of this process's start-up, for a sweep's critical path
        train["first_step_at"] = trainer.first_step_at
    metrics = {"epoch": epoch, "kl_weight": kl_weight(epoch, cfg), "lr": scheduled_lr(epoch, cfg),
               **train, **trainer.evaluate(epoch)}
    if generation_due(trainer.generation, epoch, cfg):
        trainer.generation = trainer.generation_metrics()  # carried over the epochs in between
    metrics |= trainer.generation
    metrics["epoch_time_s"] = time.perf_counter() - t0
    check_divergence(metrics, epoch, cfg)
    return metrics


def check_divergence(metrics: dict[str, Any], epoch: int, cfg: Config) -> None:
    """A non-finite validation loss, or a validation KL above ``max_kl``, raises :class:`TrainingDiverged`."""
    if not math.isfinite(metrics["val_total"]):
        raise TrainingDiverged(f"epoch {epoch}: validation loss is {metrics['val_total']}")
    if metrics["val_kl"] > cfg.max_kl:
        raise TrainingDiverged(f"epoch {epoch}: validation KL {metrics['val_kl']:.3g} nats "
                               f"exceeds max_kl={cfg.max_kl:g} (KL runaway)")


def first_judged_epoch(cfg: Config) -> int:
    """The first epoch (0-based) at the KL cap: patience counts from here at the earliest."""
    return cfg.kl_warmup_epochs if cfg.kl_schedule == "linear" else 0


def patience_can_stop(cfg: Config) -> bool:
    """Whether ``patience`` can end the run before its last epoch."""
    return cfg.patience > 0 and first_judged_epoch(cfg) + cfg.patience < cfg.epochs - 1


def patience_ran_out(cfg: Config, best_epoch: int, epoch: int, say: bool) -> bool:
    """True once ``patience`` epochs (when > 0) have passed since the best one and since the end of a linear
    KL warm-up: while β still rises the run is not judged (the model it is trained for is not there yet)."""
    if cfg.patience <= 0 or epoch - max(best_epoch, first_judged_epoch(cfg)) < cfg.patience:
        return False
    line = (f"early stop after epoch {epoch + 1}: no better {OBJECTIVE_METRICS[cfg.objective]} "
            f"for {cfg.patience} epochs (best epoch {best_epoch + 1})")
    log.info(line)
    if say:
        print(line, file=sys.stderr)
    return True
