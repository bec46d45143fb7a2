"""The typed training configuration: documented defaults, the packaged YAML, overrides and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

import hvae_ray
from hvae_ray.config import Config, flatten, from_dict, load_config, parse_override, read_yaml
from hvae_ray.errors import ConfigError

PACKAGED_YAML = Path(hvae_ray.__file__).parent / "config.yaml"


def config_error(raw: dict) -> str:
    """The message of the ConfigError that ``from_dict(raw)`` raises; it must be a single line."""
    with pytest.raises(ConfigError) as excinfo:
        from_dict(raw)
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


# ---------------------------------------------------------------------------------------------------------
# Defaults


def test_defaults_are_the_documented_ones():
    cfg = Config()
    assert cfg.kl_min_weight == 1e-5
    assert cfg.kl_warmup_epochs == 100
    assert cfg.kl_max_weight == 1e-4
    assert cfg.kl_schedule == "linear"
    assert (cfg.loss_weights.particle_features, cfg.loss_weights.edge_features,
            cfg.loss_weights.hyperedge_features, cfg.loss_weights.topology,
            cfg.loss_weights.jet_features) == (1.0, 0.5, 0.3, 0.1, 0.0)
    assert (cfg.particle_loss, cfg.objective) == ("slot", "reconstruction")
    assert (cfg.generation_every, cfg.generation_jets) == (2, 5000)
    assert cfg.batch_size == 8
    assert cfg.gradient_accumulation_steps == 4
    assert cfg.epochs == 300


def test_packaged_yaml_equals_the_defaults():
    assert PACKAGED_YAML.is_file()
    assert load_config(PACKAGED_YAML) == Config()
    # Every knob of the dataclass is spelled out in the file (it documents them all).
    assert set(flatten(read_yaml(PACKAGED_YAML))) == set(Config().flat())


def test_load_config_without_a_path_gives_the_defaults():
    assert load_config() == Config()


def test_partial_yaml_keeps_defaults_and_reads_exponents_without_a_dot(tmp_path):
    # YAML 1.1 reads `1e-5` (no dot) as a string; a float key must still accept it.
    path = tmp_path / "c.yaml"
    path.write_text("kl_min_weight: 2e-5\nmodel:\n  latent_dim: 8\n")
    cfg = load_config(path)
    assert cfg.kl_min_weight == pytest.approx(2e-5)
    assert isinstance(cfg.kl_min_weight, float)
    assert cfg.model.latent_dim == 8
    assert cfg.model.hidden_dim == Config().model.hidden_dim
    assert cfg.epochs == 300


def test_empty_yaml_file_gives_the_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing set\n")
    assert load_config(path) == Config()


def test_integral_float_is_accepted_for_an_int_key():
    cfg = from_dict({"epochs": 10.0})
    assert cfg.epochs == 10 and isinstance(cfg.epochs, int)


def test_int_is_accepted_for_a_float_key():
    cfg = from_dict({"learning_rate": 1})
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)


# ---------------------------------------------------------------------------------------------------------
# Errors: one line, naming the key


@pytest.mark.parametrize("raw, key", [
    ({"epoch": 3}, "epoch"),
    ({"model": {"hiden_dim": 32}}, "model.hiden_dim"),
    ({"loss_weights": {"particles": 1.0}}, "loss_weights.particles"),
    ({"data": {"knn": 3, "k": 4}}, "data.k"),
])
def test_unknown_key_is_named(raw, key):
    msg = config_error(raw)
    assert "unknown key" in msg
    assert f"'{key}'" in msg


@pytest.mark.parametrize("raw, key", [
    ({"epochs": "ten"}, "epochs"),
    ({"model": {"hidden_dim": "64"}}, "model.hidden_dim"),
    ({"epochs": 10.5}, "epochs"),
    ({"learning_rate": True}, "learning_rate"),
    ({"loss_weights": {"topology": False}}, "loss_weights.topology"),
    ({"kl_min_weight": "small"}, "kl_min_weight"),
    ({"mixed_precision": "yes"}, "mixed_precision"),
    ({"mixed_precision": 1}, "mixed_precision"),
    ({"kl_schedule": 3}, "kl_schedule"),
])
def test_wrong_type_is_named(raw, key):
    msg = config_error(raw)
    assert f"'{key}' must be" in msg


def test_section_that_is_not_a_mapping():
    msg = config_error({"model": 64})
    assert "'model'" in msg and "mapping" in msg


@pytest.mark.parametrize("key", ["particle_features", "edge_features", "hyperedge_features", "topology",
                                 "jet_features", "particle_marginals"])
def test_negative_loss_weight(key):
    msg = config_error({"loss_weights": {key: -0.1}})
    assert f"'loss_weights.{key}'" in msg and ">= 0" in msg


def test_all_zero_loss_weights():
    msg = config_error({"loss_weights": dict.fromkeys(
        ("particle_features", "edge_features", "hyperedge_features", "topology", "jet_features",
         "particle_marginals"), 0.0)})
    assert "loss_weights" in msg


def test_zero_loss_weight_alone_is_allowed():
    assert from_dict({"loss_weights": {"topology": 0.0}}).loss_weights.topology == 0.0


def test_kl_cap_below_floor():
    msg = config_error({"kl_max_weight": 1e-6, "kl_min_weight": 1e-5})
    assert "'kl_max_weight'" in msg and "'kl_min_weight'" in msg


def test_kl_cap_equal_to_floor_is_allowed():
    cfg = from_dict({"kl_max_weight": 1e-5, "kl_min_weight": 1e-5})
    assert cfg.kl_max_weight == cfg.kl_min_weight


def test_the_old_name_of_the_kl_floor_is_read_with_a_warning_naming_the_new_one(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("kl_divergence: 3.0e-5\n")
    with pytest.warns(FutureWarning, match=r"old.yaml: 'kl_divergence' is now called 'kl_min_weight'"):
        cfg = load_config(path)
    assert cfg.kl_min_weight == pytest.approx(3e-5) and "kl_divergence" not in cfg.to_dict()
    with pytest.warns(FutureWarning, match="kl_min_weight"):
        assert Config().with_overrides({"kl_divergence": 0.0}).kl_min_weight == 0.0
    with pytest.raises(ConfigError, match="give only 'kl_min_weight'"):
        from_dict({"kl_divergence": 1e-5, "kl_min_weight": 1e-5})


def test_bad_kl_schedule():
    msg = config_error({"kl_schedule": "cosine"})
    assert "'kl_schedule'" in msg and "linear" in msg and "cyclical" in msg


@pytest.mark.parametrize("raw, key", [
    ({"data": {"val_fraction": 1.0}}, "data.val_fraction"),
    ({"data": {"val_fraction": -0.1}}, "data.val_fraction"),
    ({"data": {"test_fraction": 1.5}}, "data.test_fraction"),
    ({"data": {"val_fraction": 0.5, "test_fraction": 0.45}}, "data.val_fraction"),
    ({"model": {"dropout": 1.0}}, "model.dropout"),
    ({"kl_cycle_ramp": 0.0}, "kl_cycle_ramp"),
])
def test_fraction_out_of_range(raw, key):
    assert f"'{key}'" in config_error(raw)


@pytest.mark.parametrize("raw, key", [
    ({"epochs": 0}, "epochs"),
    ({"batch_size": -8}, "batch_size"),
    ({"learning_rate": 0.0}, "learning_rate"),
    ({"kl_warmup_epochs": -1}, "kl_warmup_epochs"),
    ({"free_bits": -0.5}, "free_bits"),
    ({"model": {"hidden_dim": 30}}, "model.hidden_dim"),  # not a multiple of 4 (attention heads)
    ({"learning_rate": float("nan")}, "learning_rate"),
    ({"device": "tpu"}, "device"),
])
def test_impossible_values(raw, key):
    assert f"'{key}'" in config_error(raw)


def test_error_names_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  hiden_dim: 32\n")
    with pytest.raises(ConfigError, match="model.hiden_dim") as excinfo:
        load_config(path)
    assert str(path) in str(excinfo.value)


# ---------------------------------------------------------------------------------------------------------
# Dotted overrides


def test_with_overrides_sets_nested_and_flat_keys_and_leaves_the_original_alone():
    base = Config()
    cfg = base.with_overrides({"model.latent_dim": 32, "epochs": 5, "loss_weights.topology": 0.0})
    assert (cfg.model.latent_dim, cfg.epochs, cfg.loss_weights.topology) == (32, 5, 0.0)
    assert (base.model.latent_dim, base.epochs, base.loss_weights.topology) == (16, 300, 0.1)


@pytest.mark.parametrize("key", ["model.hiden_dim", "modle.hidden_dim", "model", "epochs.x"])
def test_override_of_unknown_key(key):
    with pytest.raises(ConfigError, match="unknown key") as excinfo:
        Config().with_overrides({key: 1})
    assert f"'{key}'" in str(excinfo.value)


def test_override_is_validated():
    with pytest.raises(ConfigError, match="'loss_weights.edge_features'"):
        Config().with_overrides({"loss_weights.edge_features": -1.0})
    with pytest.raises(ConfigError, match="'batch_size' must be int"):
        Config().with_overrides({"batch_size": "big"})


def test_load_config_applies_overrides_after_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 7\nmodel:\n  latent_dim: 8\n")
    cfg = load_config(path, {"model.latent_dim": 12})
    assert (cfg.epochs, cfg.model.latent_dim) == (7, 12)


@pytest.mark.parametrize("text, expected", [
    ("model.latent_dim=32", ("model.latent_dim", 32)),
    ("learning_rate=3.0e-4", ("learning_rate", 3.0e-4)),
    ("kl_schedule=cyclical", ("kl_schedule", "cyclical")),
    ("mixed_precision=false", ("mixed_precision", False)),
    (" epochs = 2", ("epochs", 2)),
    ("device=cuda:1", ("device", "cuda:1")),
])
def test_parse_override(text, expected):
    assert parse_override(text) == expected


def test_parse_override_then_apply():
    cfg = Config().with_overrides(dict(map(parse_override, ["epochs=2", "model.hidden_dim=32"])))
    assert (cfg.epochs, cfg.model.hidden_dim) == (2, 32)


def test_parse_override_without_equals():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("epochs")


def test_parse_override_invalid_yaml_value():
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_override("epochs=[1,")


def test_flat_uses_dotted_keys():
    flat = Config().flat()
    assert flat["loss_weights.topology"] == 0.1
    assert flat["model.hidden_dim"] == 64
    assert flat["epochs"] == 300
    assert not any(isinstance(v, dict) for v in flat.values())


def test_to_dict_round_trips():
    cfg = Config().with_overrides({"model.latent_dim": 8, "kl_schedule": "cyclical"})
    assert from_dict(cfg.to_dict()) == cfg


# ---------------------------------------------------------------------------------------------------------
# YAML files


def test_yaml_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- epochs\n- 3\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    msg = str(excinfo.value)
    assert str(path) in msg and "mapping" in msg and "\n" not in msg


def test_invalid_yaml_reports_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("epochs: 3\nmodel: [1, 2\nseed: 1\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    msg = str(excinfo.value)
    assert str(path) in msg and "not valid YAML" in msg and "line" in msg and "\n" not in msg


def test_missing_config_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    msg = str(excinfo.value)
    assert str(path) in msg and "not found" in msg


def test_directory_as_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path)


def test_binary_config_file(tmp_path):
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"\xff\xfe\x00\x81garbage")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    assert str(path) in str(excinfo.value)


def test_a_tab_in_the_indentation_is_named(tmp_path):
    path = tmp_path / "tabs.yaml"
    path.write_text("model:\n\thidden_dim: 32\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert "a tab in the indentation of line 2" in msg and "spaces" in msg and "\n" not in msg


def test_a_model_too_large_for_the_machine_is_refused_with_its_estimate():
    with pytest.raises(ConfigError) as info:
        Config().with_overrides({"model.hidden_dim": 1_000_000_000})
    msg = str(info.value)
    assert "model.hidden_dim=1000000000" in msg and "GiB" in msg and "this machine has" in msg and "\n" not in msg
    Config().with_overrides({"model.hidden_dim": 256, "batch_size": 64})  # a large but real model passes


def test_an_alias_bomb_in_a_config_file_is_refused_before_it_expands(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, "
              f"*a{i - 1}, *a{i - 1}]" for i in range(1, 9)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match="aliases expand it to over") as info:
        load_config(path)
    assert "\n" not in str(info.value)
