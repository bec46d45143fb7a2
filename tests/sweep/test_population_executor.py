"""The population executor's slots, driven directly (not as an actor) on the session's Ray instance: a
population that most members have left is resized to those that remain, and grows back when a trial joins;
the members' epochs go on across both."""

from __future__ import annotations

import threading

import pytest

from hvae_ray.config import Config, from_dict
from hvae_ray.data.generate import generate_jets
from hvae_ray.data.io import load_jets, save_parquet
from hvae_ray.engine import fit
from hvae_ray.sweep.population import PopulationExecutor

SHAPE = {"epochs": 3, "batch_size": 16, "model.hidden_dim": 8, "model.latent_dim": 2, "model.num_layers": 1,
         "model.decoder_layers": 1, "model.dropout": 0.0, "device": "cpu", "generation_jets": 100,
         "generation_every": 100, "data.split_seed": 3}


def _cfg(seed: int) -> dict:
    return Config().with_overrides(SHAPE | {"seed": seed}).to_dict()


def _join_all(ex: PopulationExecutor, tmp_path, seeds: list[int]) -> dict[int, str]:
    """Join members from threads (a join returns once the training thread admitted it)."""
    tokens: dict[int, str] = {}

    def one(seed):
        tokens[seed] = ex.join(f"t{seed}", _cfg(seed), str(tmp_path / f"t{seed}"), str(tmp_path / f"tb{seed}"))

    threads = [threading.Thread(target=one, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(tokens.get(s) for s in seeds), tokens
    return tokens


def _epochs(ex: PopulationExecutor, tokens: dict[int, str]) -> dict[int, dict]:
    out: dict[int, dict] = {}

    def one(seed, token):
        out[seed] = ex.epoch(token)

    threads = [threading.Thread(target=one, args=item) for item in tokens.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return out


def test_a_population_most_members_left_is_resized_and_grows_back(ray_local, tmp_path):
    data = tmp_path / "jets.parquet"
    save_parquet(generate_jets("q", 80, seed=4, workers=1, progress=False), data)
    ex = PopulationExecutor(Config().with_overrides(SHAPE).to_dict(), str(data), slots=4, threads=1,
                            max_wait_s=0.5, shrink_after_s=0.0)
    tokens = _join_all(ex, tmp_path, [1, 2, 3, 4])
    first = _epochs(ex, tokens)
    assert {s: r["epoch"] for s, r in first.items()} == {1: 0, 2: 0, 3: 0, 4: 0}
    assert ex.info()["trained_slots"] == 4

    for seed in (3, 4):
        ex.leave(f"t{seed}", tokens.pop(seed))
    second = _epochs(ex, tokens)  # at the boundary: the leaves, then the shrink to the two left
    assert {s: r["epoch"] for s, r in second.items()} == {1: 1, 2: 1}
    alone = []  # member t1 after the shrink trains on as its config alone
    fit(from_dict(_cfg(1), "t1"), load_jets(data), callbacks=[lambda rep: alone.append(rep.metrics["val_objective"])],
        progress=False)
    assert second[1]["row"]["val_objective"] == pytest.approx(alone[1], rel=1e-5)
    info = ex.info()
    assert info["trained_slots"] == 2 and info["resizes"] == [(4, 2)] and info["members"] == ["t1", "t2"]

    tokens |= _join_all(ex, tmp_path, [5])  # a newcomer grows it back
    third = _epochs(ex, tokens)
    assert {s: r["epoch"] for s, r in third.items()} == {1: 2, 2: 2, 5: 0}
    info = ex.info()
    assert info["resizes"][:2] == [(4, 2), (2, 3)]  # then t1 and t2 finish (3 epochs), and t5 trains alone
    assert all(third[s]["done"] for s in (1, 2)) and not third[5]["done"]


def test_once_every_trial_started_a_population_shrinks_without_waiting_for_joins(ray_local, tmp_path):
    """With a join still possible the executor waits ``shrink_after_s`` before resizing (here far longer
    than the test); once the driver says every trial has started, the next boundary resizes at once."""
    data = tmp_path / "jets.parquet"
    save_parquet(generate_jets("q", 80, seed=4, workers=1, progress=False), data)
    ex = PopulationExecutor(Config().with_overrides(SHAPE).to_dict(), str(data), slots=4, threads=1,
                            max_wait_s=0.5, shrink_after_s=3600.0)
    tokens = _join_all(ex, tmp_path, [1, 2, 3, 4])
    _epochs(ex, tokens)
    for seed in (3, 4):
        ex.leave(f"t{seed}", tokens.pop(seed))
    second = _epochs(ex, tokens)
    assert {s: r["epoch"] for s, r in second.items()} == {1: 1, 2: 1}
    assert ex.info()["trained_slots"] == 4 and ex.info()["resizes"] == []  # a trial may still join

    ex.all_started()
    third = _epochs(ex, tokens)  # their last epoch (3), trained as a population of two
    assert {s: (r["epoch"], r["done"]) for s, r in third.items()} == {1: (2, True), 2: (2, True)}
    assert ex.info()["resizes"] == [(4, 2)]
