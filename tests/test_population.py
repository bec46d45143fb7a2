"""engine.Population: K same-shape runs as one vectorised model. Each member trains as ``fit`` trains its
config alone, one that diverges leaves the others' numbers untouched, members come and go at epoch
boundaries, and a member's checkpoint is an ordinary one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from hvae_ray import engine
from hvae_ray.config import COMPONENTS, Config
from hvae_ray.data.generate import generate_jets
from hvae_ray.errors import ConfigError
from hvae_ray.tracking import TAGS

BASE = {"epochs": 3, "batch_size": 16, "gradient_accumulation_steps": 2, "model.hidden_dim": 16,
        "model.latent_dim": 4, "model.num_layers": 1, "model.decoder_layers": 1, "model.dropout": 0.0,
        "data.val_fraction": 0.2, "data.test_fraction": 0.1, "device": "cpu", "generation_jets": 100,
        "data.split_seed": 5, "kl_warmup_epochs": 2, "generation_every": 100}
# Three members with different seeds, KL caps, loss weights, learning rates (one on a cosine schedule), weight
# decay, clipping, free bits and a moving average of the weights
MEMBERS = [{"seed": 1, "kl_max_weight": 1e-3, "learning_rate": 3e-3},
           {"seed": 2, "kl_max_weight": 1e-2, "loss_weights.topology": 0.7, "learning_rate": 1e-3, "free_bits": 0.1},
           {"seed": 3, "kl_max_weight": 1e-4, "loss_weights.edge_features": 0.1, "learning_rate": 5e-3,
            "weight_decay": 0.01, "grad_clip": 0.05, "lr_schedule": "cosine", "ema_decay": 0.8}]
KEYS = ("train_total", "train_kl", *(f"train_{c}" for c in COMPONENTS), "val_total", "val_kl", "val_objective")


def config(**overrides) -> Config:
    return Config().with_overrides(BASE | overrides)


@pytest.fixture(scope="module")
def jets():
    return generate_jets("q", 90, seed=2, workers=1, progress=False)


def assert_weights_close(a: dict, b: dict, tol: float = 1e-5) -> None:
    for name, w in a.items():
        v = b[name]
        if name.endswith("in_proj_bias"):
            # Softmax attention does not depend on the key bias: its gradient is rounding noise, which Adam's
            # normalisation turns into steps of ±lr. Compare the query and value biases only.
            h = w.shape[0] // 3
            w, v = torch.cat([w[:h], w[2 * h:]]), torch.cat([v[:h], v[2 * h:]])
        torch.testing.assert_close(w, v, rtol=tol, atol=tol, msg=name)


def population(jets, members: list[dict], slots: int | None = None) -> engine.Population:
    cfgs = [config(**m) for m in members]
    pop = engine.Population(cfgs[0], engine.prepare(cfgs[0], jets), slots or len(cfgs))
    for cfg in cfgs:
        pop.add(cfg)
    return pop


@pytest.fixture(scope="module")
def alone_and_together(jets, tmp_path_factory):
    """Each member's config trained by fit alone, and the three as one population (fit_population)."""
    root = tmp_path_factory.mktemp("pop")
    cfgs = [config(**m) for m in MEMBERS]
    alone = []
    for i, cfg in enumerate(cfgs):
        reports = []
        engine.fit(cfg, jets, save_dir=root / f"alone{i}", progress=False, callbacks=[reports.append])
        alone.append([r.metrics for r in reports])
    together = engine.fit_population(cfgs, jets, save_dirs=[root / f"pop{i}" for i in range(3)],
                                     log_dirs=[root / f"tb{i}" for i in range(3)])
    return root, cfgs, alone, together


def test_each_member_trains_epoch_by_epoch_as_its_config_alone(alone_and_together):
    """Losses of every epoch (read back from each member's TensorBoard run) to 1e-5, weights to 1e-5."""
    root, cfgs, alone, together = alone_and_together
    for i, cfg in enumerate(cfgs):
        assert together[i]["epochs_run"] == cfg.epochs and "diverged" not in together[i]
        acc = EventAccumulator(str(root / f"tb{i}"), size_guidance={"scalars": 0})
        acc.Reload()
        for key in KEYS:
            logged = [e.value for e in acc.Scalars(TAGS[key])]
            assert logged == pytest.approx([m[key] for m in alone[i]], rel=1e-5), (i, key)
        mine, theirs = (engine.load_checkpoint(root / f"{kind}{i}" / "last") for kind in ("pop", "alone"))
        assert mine["epoch"] == theirs["epoch"] == cfg.epochs - 1
        assert_weights_close(mine["model"], theirs["model"])
        assert together[i]["best_epoch"] == mine["best_epoch"] == theirs["best_epoch"]
        assert (root / f"pop{i}" / "best" / engine.CHECKPOINT_FILE).is_file()
        assert engine.load_checkpoint(root / f"pop{i}" / "best")["epoch"] == mine["best_epoch"]


def test_a_members_checkpoint_is_an_ordinary_one(alone_and_together, jets):
    """fit resumes from it (its AdamW state included), model_from_checkpoint reads it, and the resumed run
    goes on as the member's config alone goes on."""
    root, cfgs, alone, _ = alone_and_together
    averaged = engine.load_checkpoint(root / "pop2" / "last")  # the member with a moving average
    assert set(averaged["train_model"]) == set(averaged["model"])
    assert any(not torch.equal(averaged["model"][k], averaged["train_model"][k]) for k in averaged["model"])
    state = engine.load_checkpoint(root / "pop0" / "last")
    model, _, cfg = engine.model_from_checkpoint(state)
    assert cfg == cfgs[0] and len(state["optimizer"]["state"]) == len(list(model.parameters()))
    longer = cfgs[0].with_overrides({"epochs": 4})  # (a constant learning rate: more epochs change no epoch's)
    resumed = engine.fit(longer, jets, resume=root / "pop0" / "last", progress=False)
    straight = engine.fit(longer, jets, progress=False)
    assert resumed["epochs_run"] == 1
    for key in KEYS:
        assert resumed[key] == pytest.approx(straight[key], rel=1e-5), key


def test_a_member_that_diverges_leaves_the_others_bit_identical(jets):
    """Slot 1 trained at a learning rate of 1e6 goes non-finite within its first epoch: it alone is reported
    diverged, and slots 0 and 2 train to the same bits as in a population whose slot 1 is idle."""
    bad = {**MEMBERS[1], "learning_rate": 1e6, "grad_clip": 0.0}
    with_bad = population(jets, [MEMBERS[0], bad, MEMBERS[2]])
    idle = population(jets, MEMBERS)
    idle.remove(1)
    a = [with_bad.train_epoch() for _ in range(2)]
    b = [idle.train_epoch() for _ in range(2)]
    assert a[0][1].slot == 1 and a[0][1].metrics is None and "not finite" in a[0][1].diverged
    assert [r.slot for r in a[1]] == [r.slot for r in b[1]] == [0, 2]  # the diverged member trains no more
    for ea, eb in zip(a, b):
        healthy = [r for r in ea if r.slot != 1]
        for ra, rb in zip(healthy, eb):
            assert {k: ra.metrics[k] for k in KEYS} == {k: rb.metrics[k] for k in KEYS}
    for slot in (0, 2):
        wa, wb = with_bad.state(slot, 1)["model"], idle.state(slot, 1)["model"]
        assert all(torch.equal(wa[n], wb[n]) for n in wa)


def test_members_come_and_go_and_a_restored_member_continues_exactly(jets):
    """A member removed after epoch 1 and added back (into another population, another slot) from its
    checkpoint trains epoch 2 to the same bits as the member that never left."""
    steady = population(jets, MEMBERS)
    left = population(jets, MEMBERS[:2], slots=3)
    for _ in range(2):
        steady.train_epoch()
        left.train_epoch()
    state = left.state(1, 1)
    left.remove(1)
    assert left.occupied == [0]
    slot = left.add(config(**MEMBERS[2]))  # a new member takes the freed slot
    assert slot == 1
    back = left.add(config(**MEMBERS[1]), state)
    assert back == 2 and left.member(back).epoch == 2
    out = {r.slot: r for r in left.train_epoch()}
    ref = {r.slot: r for r in steady.train_epoch()}
    assert out[back].epoch == ref[1].epoch == 2
    assert {k: out[back].metrics[k] for k in KEYS} == {k: ref[1].metrics[k] for k in KEYS}
    assert out[1].epoch == 0  # the newcomer starts at its own first epoch


def test_a_population_resized_to_its_remaining_members_trains_them_on_as_before(jets):
    """Members left in a population of 4 slots, moved into one of 2 (and one back into 5), train their next
    epochs to the numbers of the population that kept its slots; too few slots are refused."""
    cfgs = MEMBERS + [{"seed": 4, "kl_max_weight": 3e-3}]
    steady, shrunk = population(jets, cfgs), population(jets, cfgs)
    for pop in (steady, shrunk):
        pop.train_epoch()
        pop.remove(0)
        pop.remove(3)
    with pytest.raises(ConfigError, match="2 members do not fit 1 slots"):
        shrunk.resized(1)
    shrunk, moved = shrunk.resized(2)
    assert moved == {1: 0, 2: 1} and shrunk.slots == 2
    grown, moved_back = shrunk.resized(5)
    assert moved_back == {0: 0, 1: 1} and len(grown.occupied) == 2 and grown.slots == 5
    for _ in range(2):
        ref = {r.slot: r for r in steady.train_epoch()}
        for pop in (shrunk, grown):
            out = {r.slot: r for r in pop.train_epoch()}
            for old, new in moved.items():
                assert out[new].epoch == ref[old].epoch
                for k in KEYS:
                    assert out[new].metrics[k] == pytest.approx(ref[old].metrics[k], rel=1e-5, abs=1e-6), k
    for old, new in moved.items():
        assert_weights_close(shrunk.state(new, 2)["model"], steady.state(old, 2)["model"])
        assert shrunk.member(new).start_epoch == 0


def test_a_config_of_another_shape_is_refused_in_one_line(jets):
    pop = population(jets, MEMBERS[:1], slots=2)
    with pytest.raises(ConfigError, match="'model' is") as err:
        pop.add(config(**{"model.hidden_dim": 32}))
    with pytest.raises(ConfigError, match="split seed"):
        pop.add(config(**{"data.split_seed": 6}))
    assert "\n" not in str(err.value)
    pop.add(config(seed=9))
    with pytest.raises(ConfigError, match="all 2 slots are taken"):
        pop.add(config(seed=10))


def test_members_generation_scores_are_each_ones_scored_alone(jets):
    """The scores computed for all members together (vmapped encoding and decoding, mixtures fitted side
    by side, one EFP call) equal GenerationScorer.score of each member's model alone: fitted and standard
    priors, and a member with a larger reference of training jets."""
    from hvae_ray.engine.trainer import generation_scorer
    from hvae_ray.evaluation.scorer import GENERATION_KEYS

    members = [*MEMBERS, {"seed": 4, "generation_prior": "standard"}, {"seed": 5, "generation_jets": 200}]
    pop = population(jets, members)
    reports = pop.train_epoch()  # epoch 0: every member is scored
    assert [r.slot for r in reports] == [0, 1, 2, 3, 4]
    for rep, m in zip(reports, members):
        cfg = config(**m)
        train = pop.splits.sample.subset(pop.splits.train[: cfg.generation_jets])
        alone = generation_scorer(cfg, pop.splits, pop.device).score(pop.load_member(rep.slot).eval(), pop.normaliser,
                                                                    cfg, train, pop.precision.autocast())
        for key in GENERATION_KEYS:
            assert np.isfinite(alone[key]), (rep.slot, key)
            assert rep.metrics[key] == pytest.approx(alone[key], rel=1e-5), (rep.slot, key)
