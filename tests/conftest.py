"""Shared fixtures.

``hvae_cache``: one temporary data cache (``HVAE_RAY_CACHE``) for the whole session, so generated jet
samples are made once and nothing is written to the user's cache.

``ray_local``: one local Ray instance for the whole session, started only by the tests that ask for it.
It declares 4 logical CPUs and 1 logical GPU (the machine has 2 cores and no GPU): Ray schedules by
these numbers, so fractional-GPU trials are placed exactly as on a one-GPU machine, while torch itself
trains on the CPU. ``run_sweep``/``resume_sweep`` reuse an instance that is already initialised.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml


@pytest.fixture(scope="session", autouse=True)
def hvae_cache(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hvae-cache")
    old = os.environ.get("HVAE_RAY_CACHE")
    os.environ["HVAE_RAY_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("HVAE_RAY_CACHE", None)
    else:
        os.environ["HVAE_RAY_CACHE"] = old


@pytest.fixture(scope="session")
def ray_local(hvae_cache):
    """The session's Ray instance; yields the context ``ray.init`` returned (``.dashboard_url``,
    ``.address_info``)."""
    import ray

    from hvae_ray.sweep.trainer import env_vars
    from hvae_ray.sweep.tune import ray_init

    os.environ.update(env_vars())
    if ray.is_initialized():
        ray.shutdown()
    # started as a sweep starts its own (workers told where its API server is), at the logical sizes
    # above; worker output reaches the test's captured output
    context = ray_init(None, num_cpus=4, num_gpus=1, log_to_driver=True)
    yield context
    ray.shutdown()


@pytest.fixture
def child_env() -> dict[str, str]:
    """Environment for a child process that starts its own Ray instance."""
    return {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}


# A model and data small enough that an epoch takes a fraction of a second on one CPU core.
TINY_CONFIG = {"model.hidden_dim": 16, "model.latent_dim": 4, "batch_size": 16,
               "gradient_accumulation_steps": 1, "kl_warmup_epochs": 1, "epochs": 3}
TINY_DATA = {"flavor": "q", "n_jets": 60, "seed": 0}


def write_sweep(path: Path, **sections) -> Path:
    """Write a sweep file: the tiny model and data, overridden/extended by ``sections``
    (``config`` entries are merged into the tiny config). Its trials train one process each
    (``resources.population: off``) unless ``resources`` says otherwise."""
    raw = {"name": path.stem.replace(".", "_"), "config": dict(TINY_CONFIG), "data": dict(TINY_DATA),
           "resources": {"num_workers": 1, "cpus_per_worker": 0.5, "gpu_fraction": 0, "population": "off"}}
    for key, value in sections.items():
        if key == "config":
            raw["config"].update(value)
        elif key == "resources" and isinstance(value, dict):
            raw[key] = {"population": "off", **value}
        else:
            raw[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def sweep_file():
    """Factory: ``sweep_file(path, **sections)`` → a written sweep file."""
    return write_sweep
