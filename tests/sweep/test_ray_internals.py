"""Each use of Ray below its public API (``hvae_ray.sweep.ray_internals``) against the installed Ray: a Ray
upgrade that moves or changes one fails here, by name, before any sweep misbehaves."""

from __future__ import annotations

import inspect
import os

import ray
import ray.tune

from hvae_ray.sweep import ray_internals


def test_the_single_machine_switch_is_where_loopback_only_sets_it():
    constants = ray_internals.internal_module("constants")

    assert isinstance(constants.ENABLE_RAY_CLUSTER, bool), "Ray moved ENABLE_RAY_CLUSTER"
    before = (constants.ENABLE_RAY_CLUSTER, os.environ.get(ray_internals.SINGLE_MACHINE_ENV))
    with ray_internals.loopback_only():
        assert constants.ENABLE_RAY_CLUSTER is False
        assert os.environ[ray_internals.SINGLE_MACHINE_ENV] == "0"
    assert (constants.ENABLE_RAY_CLUSTER, os.environ.get(ray_internals.SINGLE_MACHINE_ENV)) == before
    # Ray still reads the switch from this variable when it is imported
    source = inspect.getsource(constants)
    assert ray_internals.SINGLE_MACHINE_ENV in source and "ENABLE_RAY_CLUSTER" in source


def test_driver_messages_pass_through_the_filtered_printer(monkeypatch):
    worker = ray_internals.internal_module("worker")

    ray_printer = getattr(worker.print_to_stdstream, "__wrapped__", worker.print_to_stdstream)
    params = list(inspect.signature(ray_printer).parameters)
    assert params[0] == "data", f"Ray changed print_to_stdstream's signature: {params}"
    printed = []

    def printer(data, *args, **kwargs):  # stands in for Ray's (which a sweep earlier in this process may have wrapped)
        printed.extend(data["lines"])

    monkeypatch.setattr(worker, "print_to_stdstream", printer)  # Ray's own is put back afterwards
    ray_internals.filter_driver_messages(lambda m: "drop me" in m["lines"][0])
    ray_internals.filter_driver_messages(lambda m: True)  # a second filter is not stacked on the first
    worker.print_to_stdstream({"lines": ["drop me"], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    worker.print_to_stdstream({"lines": ["keep me"], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    assert printed == ["keep me"]


def test_a_tuners_run_config_is_reachable():
    tuner = ray.tune.Tuner(lambda config: None, run_config=ray.tune.RunConfig(name="internals", verbose=0))
    run_config = ray_internals.run_config_of(tuner)
    assert run_config is not None, "Ray moved the Tuner's local tuner"
    assert run_config.name == "internals" and run_config.verbose == 0


def test_every_internal_module_imports_and_the_cluster_checks_work():
    for name in ray_internals.INTERNAL_MODULES:
        assert inspect.ismodule(ray_internals.internal_module(name)), f"Ray moved {name}"
    prepare, validate = ray_internals.cluster_config_checks()
    config = prepare({"cluster_name": "x", "provider": {"type": "local", "head_ip": "10.0.0.1",
                                                        "worker_ips": []},
                      "auth": {"ssh_user": "u"}})
    validate(config)  # a filled-in local cluster passes Ray's schema
    config["max_workers"] = "many"
    try:
        validate(config)
    except Exception as err:  # Ray raises jsonschema's error or a ValueError, by version
        assert "max_workers" in str(err) or "many" in str(err)
    else:
        raise AssertionError("Ray's cluster schema accepted max_workers: 'many'")
