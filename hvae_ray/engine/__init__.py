"""The training engine, free of Ray: :func:`fit` and :class:`Trainer` for one run,
:class:`Population` for many same-shape runs trained as one vectorised model.

Parts: :mod:`~hvae_ray.engine.batches` (split, order, noise), :mod:`~hvae_ray.engine.steps` (step
strategies), :mod:`~hvae_ray.engine.paths` (dense and PyG data paths), :mod:`~hvae_ray.engine.checkpoint`,
:mod:`~hvae_ray.engine.runtime` (device, ranks, precision), :mod:`~hvae_ray.engine.trainer`,
:mod:`~hvae_ray.engine.population`, :mod:`~hvae_ray.engine.runs` (a population's members as runs); the
generation score is :mod:`hvae_ray.evaluation.scorer`.
"""

from hvae_ray.engine.batches import (
    Splits,
    epoch_noise,
    epoch_order,
    prepare,
    split_indices,
    step_layout,
    train_loader,
    validation_batch_size,
)
from hvae_ray.engine.checkpoint import (
    CHECKPOINT_FILE,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from hvae_ray.engine.population import MemberReport, Population
from hvae_ray.engine.runs import PopulationRuns, fit_population
from hvae_ray.engine.runtime import resolve_device
from hvae_ray.engine.trainer import OBJECTIVE_METRICS, Callback, EpochReport, Trainer, fit
from hvae_ray.evaluation.scorer import EFP_CHUNK, GENERATION_KEYS, GENERATION_TARGETS, generate

__all__ = [
    "CHECKPOINT_FILE", "EFP_CHUNK", "GENERATION_KEYS", "GENERATION_TARGETS", "OBJECTIVE_METRICS", "Callback",
    "EpochReport", "MemberReport", "Population", "PopulationRuns", "Splits", "Trainer", "epoch_noise",
    "epoch_order", "fit",
    "fit_population", "generate", "load_checkpoint", "model_from_checkpoint", "prepare", "resolve_device",
    "save_checkpoint", "split_indices", "step_layout", "train_loader", "validation_batch_size",
]
