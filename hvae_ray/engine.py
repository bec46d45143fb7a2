"""The training engine: ``fit(cfg, sample, ...)``, free of Ray.

The CLI calls it directly; the sweep layer calls it inside Ray Train workers and forwards what it
reports through callbacks. When a ``torch.distributed`` process group is initialised (as a
TorchTrainer does), the engine trains data-parallel with DDP and a DistributedSampler; every rank
computes the same validation metrics on the full validation split, and only rank 0 writes files.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch_geometric.loader import DataLoader

from hvae_ray.config import COMPONENTS, Config, from_dict
from hvae_ray.data.graphs import FeatureNormaliser, JetHypergraph, build_graphs, raw_features
from hvae_ray.data.jets import JetSample
from hvae_ray.errors import ConfigError, DataError, HvaeError, TrainingDiverged
from hvae_ray.model.hypervae import HyperVAE, dense_targets
from hvae_ray.model.losses import kl_divergence, kl_weight, objective, reconstruction_terms, total_loss

CHECKPOINT_FILE = "checkpoint.pt"
POSTFIX_EVERY = 20  # progress-bar refresh (one host sync) every this many steps


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


@dataclass
class Splits:
    """Seeded train/val/test split of a sample (indices into it) and the graphs built from it."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    normaliser: FeatureNormaliser
    train_graphs: list[JetHypergraph] = field(repr=False)
    val_graphs: list[JetHypergraph] = field(repr=False)


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


def prepare(cfg: Config, sample: JetSample, normaliser: FeatureNormaliser | None = None) -> Splits:
    """Split, fit the normaliser on the training split only (unless given), and build hypergraphs."""
    sample.validate()
    if cfg.data.max_jets and len(sample) > cfg.data.max_jets:
        sample = sample.subset(np.arange(cfg.data.max_jets))
    train, val, test = split_indices(len(sample), cfg)
    raw = raw_features(sample, cfg.data.knn)
    if normaliser is None:
        train_raw = type(raw)(*(getattr(raw, f)[torch.from_numpy(train)] for f in
                                ("nodes", "edges", "hyperedges", "groups", "mask")))
        normaliser = FeatureNormaliser.fit(train_raw)
    return Splits(train, val, test, normaliser, build_graphs(raw, normaliser, train),
                  build_graphs(raw, normaliser, val))


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
    model = getattr(model, "module", model)
    was_training = model.training
    model.eval()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    parts, masks = [], []
    for s in range(0, n_jets, batch_size):
        b = min(batch_size, n_jets - s)
        z = torch.randn(b, model.cfg.latent_dim, generator=gen).to(device)
        dec = model.decode(z, with_edges=False)
        logits = dec.exist_logits.float()
        mask = logits > 0
        mask[torch.arange(b), logits.argmax(dim=1)] = True
        p = normaliser.inverse_particles(dec.particles.float()) * mask[..., None]
        parts.append(p.cpu())
        masks.append(mask.cpu())
    model.train(was_training)
    return torch.cat(parts).numpy(), torch.cat(masks).numpy()


class _Run:
    """State of one fit() call; keeps the loop below short."""

    def __init__(self, cfg: Config, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.rank, self.world = _rank_world()
        torch.manual_seed(cfg.seed)
        model = HyperVAE(cfg.model).to(device)
        self.model = model
        self.net = model
        if self.world > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        use_amp = cfg.mixed_precision and device.type == "cuda"
        self.amp_dtype = (torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16)
        self.use_amp = use_amp
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_amp and self.amp_dtype == torch.float16)
        self.start_epoch = 0
        self.best = math.inf
        self.best_epoch = -1

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp)

    def state(self, epoch: int, normaliser: FeatureNormaliser, splits: Splits) -> dict[str, Any]:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": epoch,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "config": self.cfg.to_dict(),
            "normaliser": normaliser.state_dict(),
            "test_indices": torch.from_numpy(splits.test),
            "rng_cpu": torch.get_rng_state(),
        }
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.start_epoch = int(state["epoch"]) + 1
        self.best = float(state["best"])
        self.best_epoch = int(state["best_epoch"])
        torch.set_rng_state(state["rng_cpu"])
        if "rng_cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng_cuda"], self.device)


def _evaluate(run: _Run, graphs: list[JetHypergraph], beta: float) -> dict[str, float]:
    """Validation metrics on the full validation split (eval mode, posterior mean)."""
    cfg = run.cfg
    run.model.eval()
    sums = {c: 0.0 for c in COMPONENTS} | {"kl": 0.0, "total": 0.0}
    n = 0
    with torch.no_grad(), run.autocast():
        for batch in DataLoader(graphs, batch_size=max(64, cfg.batch_size)):
            batch = batch.to(run.device, non_blocking=True)
            out = run.model(batch)
            terms = reconstruction_terms(out.decoded, dense_targets(batch, run.model.num_slots))
            kl = kl_divergence(out.mu, out.logvar)
            b = batch.num_graphs
            for c in COMPONENTS:
                sums[c] += terms[c].item() * b
            sums["kl"] += kl.item() * b
            sums["total"] += total_loss(terms, kl, beta, cfg).item() * b
            n += b
    run.model.train()
    val = {k: v / max(n, 1) for k, v in sums.items()}
    recon = {c: val[c] for c in COMPONENTS}
    out = {f"val_{c}": val[c] for c in COMPONENTS}
    out |= {"val_kl": val["kl"], "val_total": val["total"], "val_recon": sum(recon.values()),
            "val_objective": objective(recon, val["kl"], cfg)}
    return out


def _val_w1m(run: _Run, normaliser: FeatureNormaliser, val_particles: np.ndarray,
             val_mask: np.ndarray) -> float:
    """W1 between the relative jet mass of validation jets and of as many jets sampled from the prior."""
    from scipy.stats import wasserstein_distance

    from hvae_ray.physics import jet_mass

    gen_p, gen_m = generate(run.model, normaliser, len(val_particles), seed=run.cfg.seed, device=run.device)
    real, fake = jet_mass(val_particles, val_mask), jet_mass(gen_p, gen_m)
    if not (np.isfinite(real).all() and np.isfinite(fake).all()):
        return math.inf
    return float(wasserstein_distance(real, fake))


def fit(cfg: Config, sample: JetSample, *, save_dir: str | Path | None = None,
        log_dir: str | Path | None = None, resume: bool | str | Path = False,
        callbacks: Sequence[Callback] = (), progress: bool = True,
        device: torch.device | str | None = None, save_test_indices: bool = False) -> dict[str, Any]:
    """Train a HyperVAE on ``sample`` with ``cfg``; return the final metrics and where things went.

    save_dir:  checkpoints ``last/`` and ``best/`` (best = lowest ``val_objective``), the config, and
               with ``save_test_indices`` ``test_indices.npy`` (indices into ``sample``).
    log_dir:   TensorBoard event files (tags in :data:`hvae_ray.tracking.TAGS`).
    resume:    True → continue from ``save_dir/last``; a path → from that checkpoint. The run
               continues exactly: model, optimiser, loss scaler, RNG state, epoch and best score.
    callbacks: called after each epoch with an :class:`EpochReport`; one returning True stops.
    A NaN/inf loss, or a validation KL above ``cfg.max_kl``, raises :class:`TrainingDiverged`; the
    last good checkpoint stays in ``save_dir/last``.
    """
    device = torch.device(device) if device is not None else resolve_device(cfg.device)
    run = _Run(cfg, device)
    save_dir = Path(save_dir) if save_dir is not None else None
    resume_state = None
    if resume:
        src = Path(resume) if not isinstance(resume, bool) else (save_dir / "last" if save_dir else None)
        if src is None:
            raise HvaeError("resume=True needs a save_dir holding last/checkpoint.pt")
        resume_state = load_checkpoint(src)
        _check_resumable(cfg, resume_state, src)
    normaliser = (FeatureNormaliser.from_state_dict(resume_state["normaliser"]) if resume_state else None)
    splits = prepare(cfg, sample, normaliser)
    normaliser = splits.normaliser
    if resume_state:
        try:
            run.restore(resume_state)
        except (RuntimeError, KeyError, TypeError, ValueError) as e:
            raise DataError(f"{src}: cannot resume from this checkpoint ({e.__class__.__name__})") from e
    is_main = run.rank == 0
    if is_main and save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
        _write_yaml(save_dir / "config.yaml", cfg.to_dict())
        if save_test_indices:
            np.save(save_dir / "test_indices.npy", splits.test)
    logger = None
    if is_main and log_dir is not None:
        from hvae_ray.tracking import TensorBoardLogger

        logger = TensorBoardLogger(log_dir)

    val_sub = sample.subset(splits.val)
    metrics: dict[str, Any] = {}
    epoch = run.start_epoch - 1
    threads = torch.get_num_threads()
    if device.type == "cuda" and "OMP_NUM_THREADS" not in os.environ:
        # Small batches on a GPU are launch-bound: CPU thread pools over tiny tensors only add overhead
        # (an epoch of the default config on an H100: 4.97 s with 16 threads, 3.50 s with one).
        torch.set_num_threads(1)
    try:
        for epoch in range(run.start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            beta = kl_weight(epoch, cfg)
            loader = train_loader(splits.train_graphs, cfg, epoch)
            train = _train_epoch(run, loader, beta, epoch, progress and is_main)
            metrics = {"epoch": epoch, "kl_weight": beta, "lr": run.opt.param_groups[0]["lr"], **train,
                       **_evaluate(run, splits.val_graphs, beta)}
            metrics["val_w1m"] = _val_w1m(run, normaliser, val_sub.particles, val_sub.mask)
            metrics["epoch_time_s"] = time.perf_counter() - t0
            if not math.isfinite(metrics["val_total"]):
                raise TrainingDiverged(f"epoch {epoch}: validation loss is {metrics['val_total']}")
            if metrics["val_kl"] > cfg.max_kl:
                raise TrainingDiverged(f"epoch {epoch}: validation KL {metrics['val_kl']:.3g} nats "
                                       f"exceeds max_kl={cfg.max_kl:g} (KL runaway)")
            is_best = metrics["val_objective"] < run.best
            if is_best:
                run.best, run.best_epoch = metrics["val_objective"], epoch
            metrics["best_val_objective"] = run.best
            ckpt_dir = None
            if is_main and save_dir is not None:
                ckpt_dir = save_dir / "last"
                save_checkpoint(ckpt_dir / CHECKPOINT_FILE, run.state(epoch, normaliser, splits))
                if is_best:
                    (save_dir / "best").mkdir(exist_ok=True)
                    shutil.copyfile(ckpt_dir / CHECKPOINT_FILE, save_dir / "best" / CHECKPOINT_FILE)
            if logger is not None:
                logger.log_epoch(epoch, metrics)
            report = EpochReport(epoch, metrics, ckpt_dir, is_best)
            if any([bool(cb(report)) for cb in callbacks]):
                break
        if logger is not None and metrics:
            _log_distributions(logger, run, normaliser, val_sub, epoch)
    finally:
        torch.set_num_threads(threads)
        if logger is not None:
            logger.close()
    return {
        **metrics,
        "epochs_run": epoch + 1 - run.start_epoch if metrics else 0,
        "best_epoch": run.best_epoch,
        "best_val_objective": run.best,
        "save_dir": str(save_dir) if save_dir else None,
        "log_dir": str(log_dir) if log_dir else None,
    }


def train_loader(graphs: Sequence[JetHypergraph], cfg: Config, epoch: int) -> DataLoader:
    """The training loader of ``epoch``: in one process, all of ``graphs`` shuffled by a generator seeded
    from ``cfg.seed`` and the epoch; under a process group, this rank's DistributedSampler shard (every
    rank shuffles with the same seed and epoch and takes every ``world``-th graph, so the shards are
    disjoint; when ``world`` does not divide the graphs, the sampler pads the shards to equal length by
    repeating the first graphs of the shuffled order)."""
    rank, world = _rank_world()
    sampler = None
    if world > 1:
        sampler = torch.utils.data.DistributedSampler(graphs, num_replicas=world, rank=rank, shuffle=True,
                                                      seed=cfg.seed)
        sampler.set_epoch(epoch)
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    return DataLoader(graphs, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
                      generator=gen if sampler is None else None, num_workers=cfg.num_workers, drop_last=False)


def _train_epoch(run: _Run, loader: DataLoader, beta: float, epoch: int, progress: bool) -> dict[str, float]:
    """One pass over the training split. Running sums stay on the device (no host sync per step: small
    batches on a GPU are launch-bound); the host reads them every ``POSTFIX_EVERY`` steps for the
    progress bar and once at the end, where a non-finite loss raises :class:`TrainingDiverged`."""
    cfg = run.cfg
    accum = cfg.gradient_accumulation_steps
    keys = (*COMPONENTS, "kl", "total")
    sums = torch.zeros(len(keys), dtype=torch.float64, device=run.device)
    first_bad = torch.full((), -1, dtype=torch.long, device=run.device)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, dynamic_ncols=True)
    run.opt.zero_grad(set_to_none=True)
    n_batches = len(loader)
    steps = 0
    for i, batch in enumerate(loader):
        batch = batch.to(run.device, non_blocking=True)
        with run.autocast():
            out = run.net(batch)
            terms = reconstruction_terms(out.decoded, dense_targets(batch, run.model.num_slots))
            kl = kl_divergence(out.mu, out.logvar, cfg.free_bits)
            loss = total_loss(terms, kl, beta, cfg)
        run.scaler.scale(loss / accum).backward()
        if (i + 1) % accum == 0 or i + 1 == n_batches:
            if cfg.grad_clip > 0:
                run.scaler.unscale_(run.opt)
                torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
            run.scaler.step(run.opt)
            run.scaler.update()
            run.opt.zero_grad(set_to_none=True)
        step_values = torch.stack([*(terms[c] for c in COMPONENTS), kl, loss]).detach().double()
        sums += step_values
        bad = ~torch.isfinite(loss.detach())
        first_bad = torch.where(bad & (first_bad < 0), torch.full_like(first_bad, i), first_bad)
        steps += 1
        if bar is not None:
            bar.update(1)
            if steps % POSTFIX_EVERY == 0 or steps == n_batches:
                mean = (sums / steps).tolist()
                bar.set_postfix(loss=f"{mean[-1]:.4g}", kl=f"{mean[-2]:.4g}", kl_w=f"{beta:.2e}")
    if bar is not None:
        bar.close()
    if run.world > 1:  # every rank must stop together, or the others wait in the next collective
        dist.all_reduce(first_bad, op=dist.ReduceOp.MAX)
    bad_step = int(first_bad.item())
    if bad_step >= 0:
        raise TrainingDiverged(f"epoch {epoch}, batch {bad_step}: loss is not finite; stopped, the last good "
                               "checkpoint is kept")
    totals = dict(zip(keys, sums.tolist()))
    mean = _all_mean(totals, steps, run.device) if run.world > 1 else {k: v / max(steps, 1) for k, v in totals.items()}
    return {f"train_{c}": mean[c] for c in COMPONENTS} | {"train_kl": mean["kl"], "train_total": mean["total"]}


def _log_distributions(logger, run: _Run, normaliser: FeatureNormaliser, val: JetSample, step: int) -> None:
    """Real (validation) vs generated histograms into TensorBoard at the end of training."""
    from hvae_ray.plots import distribution_figures

    gen_p, gen_m = generate(run.model, normaliser, len(val), seed=run.cfg.seed + 1, device=run.device)
    figs = distribution_figures(val.particles, val.mask, gen_p, gen_m)
    logger.log_figures(figs, step)


def _write_yaml(path: Path, data: dict[str, Any]) -> None:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))
