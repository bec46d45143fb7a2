"""The places where hvae-ray reaches into Ray below its public API, each behind one function, so that a
Ray upgrade that moves one breaks here, loudly (``tests/sweep/test_ray_internals.py`` checks each against
the installed Ray), and nowhere else. Ray's internal modules are named once, in :data:`INTERNAL_MODULES`,
and imported only through :func:`internal_module`.

- :func:`loopback_only`: Ray's single-machine switch, so that a local instance listens on 127.0.0.1 only.
- :func:`filter_driver_messages`: the function through which Ray prints its processes' messages on the
  driver, wrapped to drop the ones a sweep's user cannot act on.
- :func:`run_config_of`: the run config a restored ``Tuner`` keeps, to set a resumed sweep's console.
- :func:`cluster_config_checks`: the functions ``ray up`` fills in and validates a cluster file with (tests
  check the shipped cluster files with them).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

#: Ray's internal modules used here, by a short name; nothing else in the package or its tests names one.
INTERNAL_MODULES = {
    "constants": "ray._private.ray_constants",
    "worker": "ray._private.worker",
    "autoscaler_util": "ray.autoscaler._private.util",
}

#: Ray's single-machine switch: read into the constants module's ``ENABLE_RAY_CLUSTER`` when Ray is
#: imported; "0" keeps a node's IP at 127.0.0.1.
SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def internal_module(name: str):
    """The Ray-internal module ``INTERNAL_MODULES[name]``, imported (a KeyError names an unknown one)."""
    return importlib.import_module(INTERNAL_MODULES[name])


@contextmanager
def loopback_only():
    """While a local instance starts, make every one of its listeners bind to 127.0.0.1 alone.

    Ray 2.60 binds its gRPC servers (GCS, raylet, workers, driver) and its agents (dashboard, metrics,
    runtime env, autoscaler monitor) to loopback only when the node's IP is exactly "127.0.0.1"; on
    Linux it replaces a loopback node IP with the host's outbound address unless its single-machine
    switch is off. Ray has no public setting for this, so the switch is turned off for the start (the
    processes it spawns inherit the environment variable) and restored after it: a later connection to
    a cluster in this process must advertise the host's address again.
    """
    constants = internal_module("constants")
    saved_flag, saved_env = constants.ENABLE_RAY_CLUSTER, os.environ.get(SINGLE_MACHINE_ENV)
    constants.ENABLE_RAY_CLUSTER = False
    os.environ[SINGLE_MACHINE_ENV] = "0"
    try:
        yield
    finally:
        constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(SINGLE_MACHINE_ENV, None)
        else:
            os.environ[SINGLE_MACHINE_ENV] = saved_env


def filter_driver_messages(drop: Callable[[dict[str, Any]], bool]) -> None:
    """Drop the messages of Ray's processes for which ``drop(message)`` is true before the driver prints
    them (Ray hands each batch to its worker module's ``print_to_stdstream`` as a dict with ``pid`` and
    ``lines``); every other message passes. Applied once per process."""
    worker = internal_module("worker")

    printer = worker.print_to_stdstream
    if getattr(printer, "_hvae_filtered", False):
        return

    def print_to_stdstream(data, *args, **kwargs):
        if isinstance(data, dict) and drop(data):
            return None
        return printer(data, *args, **kwargs)

    print_to_stdstream._hvae_filtered = True
    print_to_stdstream.__wrapped__ = printer
    worker.print_to_stdstream = print_to_stdstream


def run_config_of(tuner) -> Any | None:
    """The run config a (restored) ``ray.tune.Tuner`` will run with, to change in place; None under Ray
    Client, which keeps its own."""
    local = getattr(tuner, "_local_tuner", None)
    return local.get_run_config() if local is not None else None


def cluster_config_checks() -> tuple[Callable[[dict], dict], Callable[[dict], None]]:
    """``(prepare_config, validate_config)``: how ``ray up`` fills a cluster file's defaults in and checks it
    against Ray's schema (Ray exposes no public call for either)."""
    util = internal_module("autoscaler_util")
    return util.prepare_config, util.validate_config
