"""hvae-ray: distributed sweeps (Ray Tune + Ray Train) for hypergraph VAEs of particle jets.

Public API: ``load_config``, ``train``, ``sample``, ``evaluate``, ``run_sweep``, ``resume_sweep``,
``load_trials``.
Ray is imported only when a sweep function is first used.
"""

from hvae_ray.api import evaluate, sample, train
from hvae_ray.config import Config, load_config

__version__ = "0.1.0"
__all__ = ["Config", "evaluate", "load_config", "load_trials", "resume_sweep", "run_sweep", "sample",
           "train", "__version__"]


def __getattr__(name: str):
    if name in ("run_sweep", "resume_sweep", "load_trials"):
        from hvae_ray import api

        return getattr(api, name)
    raise AttributeError(f"module 'hvae_ray' has no attribute {name!r}")
