"""The one typed training configuration: defaults, YAML loading, dotted overrides, validation.

Every knob lives in :class:`Config` (nested dataclasses for data, model and loss weights; the training
knobs flat, as in the original configuration file). ``hvae_ray/config.yaml`` lists the defaults.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hvae_ray.errors import ConfigError

COMPONENTS = ("particle_features", "edge_features", "hyperedge_features", "topology", "jet_features",
              "particle_marginals")
PARTICLE_LOSSES = ("slot", "chamfer", "sinkhorn")
OBJECTIVES = ("reconstruction", "generation")
#: The validation metric by which a run keeps its best epoch, per ``objective`` (and a sweep ranks trials).
OBJECTIVE_METRICS = {"reconstruction": "val_objective", "generation": "val_generation"}
GENERATION_PRIORS = ("fitted", "standard")
# The terms val_recon and val_objective sum: the jet and marginal terms are reported but left out, so that
# both stay comparable between runs that train them and runs that do not (rank those on val_generation).
OBJECTIVE_COMPONENTS = COMPONENTS[:4]
KL_SCHEDULES = ("linear", "cyclical")
LR_SCHEDULES = ("constant", "cosine")
ENGINES = ("dense", "pyg")


@dataclass
class DataConfig:
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    knn: int = 3
    max_jets: int = 0
    split_seed: int = -1
    # The jets file ``train`` reads when none is passed (``--data-path``); "" then means the default
    # generated sample. ``trials --best`` writes the sweep's file here.
    path: str = ""


@dataclass
class ModelConfig:
    hidden_dim: int = 64
    latent_dim: int = 16
    num_layers: int = 2
    decoder_layers: int = 1
    dropout: float = 0.1


@dataclass
class LossWeights:
    particle_features: float = 1.0
    edge_features: float = 0.5
    hyperedge_features: float = 0.3
    topology: float = 0.1
    jet_features: float = 0.0
    particle_marginals: float = 0.0


@dataclass
class Config:
    seed: int = 42
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss_weights: LossWeights = field(default_factory=LossWeights)
    kl_min_weight: float = 1.0e-5
    kl_warmup_epochs: int = 100
    kl_max_weight: float = 1.0e-4
    kl_schedule: str = "linear"
    kl_cycles: int = 4
    kl_cycle_ramp: float = 0.5
    free_bits: float = 0.0
    objective_kl_weight: float = 1.0e-4
    particle_loss: str = "slot"
    objective: str = "reconstruction"
    generation_every: int = 2
    generation_jets: int = 5000
    generation_prior: str = "fitted"
    max_kl: float = 1000.0
    epochs: int = 300
    patience: int = 20  # benchmarks/results/patience-2026-12-07-cpu
    batch_size: int = 8
    gradient_accumulation_steps: int = 4
    learning_rate: float = 1.0e-3
    lr_schedule: str = "constant"
    lr_min_ratio: float = 0.1
    ema_decay: float = 0.0
    weight_decay: float = 1.0e-4
    grad_clip: float = 1.0
    mixed_precision: bool = True
    device: str = "auto"
    num_workers: int = 0
    engine: str = "dense"
    compile: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted key → value, e.g. {'loss_weights.topology': 0.1, ...}."""
        return flatten(self.to_dict())

    def with_overrides(self, overrides: dict[str, Any], where: str = "override") -> Config:
        """A new validated Config with dotted-key overrides applied."""
        return from_dict(apply_overrides(self.to_dict(), overrides, where), where)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def apply_overrides(d: dict[str, Any], overrides: dict[str, Any], where: str) -> dict[str, Any]:
    """Copy of nested dict ``d`` with each dotted key of ``overrides`` set; unknown keys are errors."""
    out = _deepcopy(d)
    for dotted, value in overrides.items():
        dotted = current_key(dotted, where)
        node = out
        parts = dotted.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                raise ConfigError(f"{where}: unknown key '{dotted}'")
            node = node[p]
        if parts[-1] not in node or isinstance(node[parts[-1]], dict):
            raise ConfigError(f"{where}: unknown key '{dotted}'")
        node[parts[-1]] = value
    return out


def _deepcopy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deepcopy(v) if isinstance(v, dict) else v for k, v in d.items()}


def _type_names(typ: Any) -> list[str]:
    """A declared type's accepted values as a sweep or config file spells them: ``float``, ``null``, and
    each word of a ``Literal``."""
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        return [name for t in typing.get_args(typ) for name in _type_names(t)]
    if typing.get_origin(typ) is typing.Literal:
        return [str(v) for v in typing.get_args(typ)]
    return ["null" if typ is type(None) else getattr(typ, "__name__", str(typ))]


def _type_name(typ: Any) -> str:
    """``float or null``, ``int, auto or off``: what a message says a key must be."""
    *head, last = _type_names(typ)
    return f"{', '.join(head)} or {last}" if head else last


def _coerce(value: Any, typ: Any, key: str, where: str) -> Any:
    """Check one leaf value against its declared type; ints are accepted for floats. A ``Literal`` takes
    its listed values only. A union (``float | None``, ``int | Literal["auto", "off"]``) takes the first
    of its members, in declared order, that accepts the value: ``float | Literal["auto"]`` reads ``"1e3"``
    as 1000.0 and keeps ``auto``."""
    if typing.get_origin(typ) is typing.Literal:
        if any(value == v and type(value) is type(v) for v in typing.get_args(typ)):
            return value
    elif typing.get_origin(typ) in (typing.Union, types.UnionType):
        for member in typing.get_args(typ):
            if member is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, member, key, where)
            except ConfigError:
                pass
    elif typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{where}: '{key}' must be {_type_name(typ)}, got {type(value).__name__} {value!r}")


def _build(cls: type, raw: Any, prefix: str, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: '{prefix.rstrip('.') or 'config'}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    for k in raw:
        if k not in hints:
            raise ConfigError(f"{where}: unknown key '{prefix}{k}'")
    kwargs = {}
    for name, typ in hints.items():
        if name not in raw:
            continue
        if dataclasses.is_dataclass(typ):
            kwargs[name] = _build(typ, raw[name], f"{prefix}{name}.", where)
        else:
            kwargs[name] = _coerce(raw[name], typ, prefix + name, where)
    return cls(**kwargs)


def build_section(cls: type, raw: Any, section: str, where: str) -> Any:
    """A typed dataclass (a sweep file's ``scheduler``, ``resources``, ``data``) from its mapping, checked
    and coerced as :class:`Config` is; a missing or null section gives the defaults."""
    return cls() if raw is None else _build(cls, raw, f"{section}.", where)


# Old key names still read, each with the key that replaced it (and a warning that names it).
RENAMED_KEYS = {"kl_divergence": "kl_min_weight"}


def current_key(key: str, where: str) -> str:
    """The current name of a (dotted) config key; an old name is accepted with a FutureWarning."""
    new = RENAMED_KEYS.get(key)
    if new is None:
        return key
    warnings.warn(f"{where}: '{key}' is now called '{new}'", FutureWarning, stacklevel=3)
    return new


def _current_keys(raw: dict[str, Any], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        new = RENAMED_KEYS.get(key)
        if new in raw:
            raise ConfigError(f"{where}: '{key}' is the old name of '{new}'; give only '{new}'")
        out[current_key(key, where)] = value
    return out


def from_dict(raw: dict[str, Any] | None, where: str = "config") -> Config:
    """Validated Config from a (possibly partial) nested dict; missing keys keep their defaults (old key
    names, :data:`RENAMED_KEYS`, are read as their new ones)."""
    raw = raw or {}
    cfg = _build(Config, _current_keys(raw, where) if isinstance(raw, dict) else raw, "", where)
    validate(cfg, where)
    return cfg


def footprint_bytes(cfg: Config) -> float:
    """A rough upper estimate of a run's memory: weights, gradients and two AdamW moments (16 bytes per
    parameter) and one micro-batch's activations, a dozen (B, 30, 30, H) float32 pair tensors per layer."""
    m = cfg.model
    h, z = max(m.hidden_dim, 1), max(m.latent_dim, 1)
    params = h * h * (12 + 4 * m.num_layers + 12 * m.decoder_layers) + 4 * h * z
    activations = 12 * max(cfg.batch_size, 1) * 900 * h * 4 * (m.num_layers + m.decoder_layers + 1)
    return 16.0 * params + activations


def _check_footprint(cfg: Config, where: str) -> None:
    """Refuse, before any work, a model and batch that cannot fit this machine's memory."""
    import os

    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    need = footprint_bytes(cfg)
    if need > physical:
        raise ConfigError(f"{where}: model.hidden_dim={cfg.model.hidden_dim}, model.latent_dim={cfg.model.latent_dim}, "
                          f"batch_size={cfg.batch_size} and {cfg.model.num_layers + cfg.model.decoder_layers} layers "
                          f"need about {need / 2**30:.3g} GiB; this machine has {physical / 2**30:.3g} GiB")


def validate(cfg: Config, where: str = "config") -> None:
    """Raise ConfigError naming the first impossible value."""

    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"{where}: '{key}' {why}, got {cfg.flat()[key]!r}")

    for key, value in cfg.flat().items():
        if isinstance(value, float) and not math.isfinite(value):
            raise bad(key, "must be finite")
    for c in COMPONENTS:
        if getattr(cfg.loss_weights, c) < 0:
            raise bad(f"loss_weights.{c}", "must be >= 0")
    if sum(getattr(cfg.loss_weights, c) for c in COMPONENTS) <= 0:
        raise bad("loss_weights.particle_features", "and the other loss weights must not all be 0")
    _check_footprint(cfg, where)
    positive = ["kl_max_weight", "epochs", "batch_size", "gradient_accumulation_steps", "learning_rate",
                "model.hidden_dim", "model.latent_dim", "model.num_layers", "data.knn", "max_kl", "kl_cycles",
                "generation_every"]
    for key in positive:
        if cfg.flat()[key] <= 0:
            raise bad(key, "must be > 0")
    non_negative = ["kl_min_weight", "kl_warmup_epochs", "free_bits", "objective_kl_weight", "weight_decay",
                    "grad_clip", "data.max_jets", "model.decoder_layers", "num_workers", "seed", "patience"]
    for key in non_negative:
        if cfg.flat()[key] < 0:
            raise bad(key, "must be >= 0")
    if cfg.kl_max_weight < cfg.kl_min_weight:
        raise ConfigError(f"{where}: 'kl_max_weight' ({cfg.kl_max_weight:g}) must be >= "
                          f"'kl_min_weight' ({cfg.kl_min_weight:g})")
    for key in ("data.val_fraction", "data.test_fraction", "model.dropout"):
        if not 0 <= cfg.flat()[key] < 1:
            raise bad(key, "must be in [0, 1)")
    if cfg.data.split_seed < -1:
        raise bad("data.split_seed", "must be >= 0, or -1 for the run's seed")
    if not 0 < cfg.kl_cycle_ramp <= 1:
        raise bad("kl_cycle_ramp", "must be in (0, 1]")
    if cfg.generation_jets < 100:
        raise bad("generation_jets", "must be >= 100 (jets sampled for val_w1m, val_w1p and val_fpd)")
    if cfg.data.val_fraction + cfg.data.test_fraction >= 0.9:
        raise bad("data.val_fraction", "plus data.test_fraction must leave at least 10% for training")
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise bad("lr_schedule", f"must be one of {', '.join(LR_SCHEDULES)}")
    if not 0 <= cfg.lr_min_ratio <= 1:
        raise bad("lr_min_ratio", "must be in [0, 1]")
    if not 0 <= cfg.ema_decay < 1:
        raise bad("ema_decay", "must be in [0, 1) (0: no moving average)")
    if cfg.kl_schedule not in KL_SCHEDULES:
        raise bad("kl_schedule", f"must be one of {', '.join(KL_SCHEDULES)}")
    if cfg.particle_loss not in PARTICLE_LOSSES:
        raise bad("particle_loss", f"must be one of {', '.join(PARTICLE_LOSSES)}")
    if cfg.generation_prior not in GENERATION_PRIORS:
        raise bad("generation_prior", f"must be one of {', '.join(GENERATION_PRIORS)}")
    if cfg.objective not in OBJECTIVES:
        raise bad("objective", f"must be one of {', '.join(OBJECTIVES)}")
    if cfg.engine not in ENGINES:
        raise bad("engine", f"must be one of {', '.join(ENGINES)}")
    if cfg.model.hidden_dim % 4:
        raise bad("model.hidden_dim", "must be a multiple of 4 (attention heads)")
    if not (cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:")):
        raise bad("device", "must be auto, cpu, cuda or cuda:N")


#: A sweep or config file is refused when it is larger than this, or when its YAML aliases would expand it
#: to more than ``MAX_YAML_NODES`` values (an alias bomb: a few lines that expand to billions).
MAX_YAML_BYTES = 1 << 20
MAX_YAML_NODES = 100_000


def check_yaml_size(path: Path, what: str) -> None:
    """ConfigError (one line, with the estimate) when ``path`` is too large or its aliases expand it beyond
    ``MAX_YAML_NODES`` values; counted on the node graph (an alias is the node it names, counted once
    per use without building the expansion). Files that do not parse are left to ``read_yaml``'s message."""
    import yaml

    try:
        size = path.stat().st_size
    except OSError:
        return
    if size > MAX_YAML_BYTES:
        raise ConfigError(f"{path}: {what} file of {size} bytes; at most {MAX_YAML_BYTES} are read")
    try:
        node = yaml.compose(path.read_text(), Loader=yaml.SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return
    except RecursionError:
        raise ConfigError(f"{path}: {what} file nested too deeply") from None
    weights: dict[int, int] = {}

    def weight(n) -> int:
        if id(n) in weights:
            return weights[id(n)]
        weights[id(n)] = MAX_YAML_NODES + 1  # a node that holds itself expands for ever
        if isinstance(n, yaml.MappingNode):
            w = 1 + sum(weight(k) + weight(v) for k, v in n.value)
        elif isinstance(n, yaml.SequenceNode):
            w = 1 + sum(weight(v) for v in n.value)
        else:
            w = 1
        weights[id(n)] = w = min(w, 10 * MAX_YAML_NODES)
        return w

    try:
        total = weight(node) if node is not None else 0
    except RecursionError:
        raise ConfigError(f"{path}: {what} file nested too deeply") from None
    if total > MAX_YAML_NODES:
        over = "over " if total >= 10 * MAX_YAML_NODES else ""
        raise ConfigError(f"{path}: {what} file's aliases expand it to {over}{total} values; at most "
                          f"{MAX_YAML_NODES} are accepted")


def read_yaml(path: str | Path, what: str = "config") -> dict[str, Any]:
    """Parse a YAML mapping; missing, unreadable or non-mapping files are one-line ConfigErrors."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} file not found")
    check_yaml_size(path, what)
    try:
        text = path.read_text()
        raw = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read {what} file ({e.__class__.__name__})") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        tabs = [i + 1 for i, row in enumerate(text.splitlines()) if "\t" in row[:len(row) - len(row.lstrip())]]
        if tabs:  # YAML forbids tabs in indentation; say so rather than leave the user guessing
            raise ConfigError(f"{path}: not valid YAML{line}: a tab in the indentation of line {tabs[0]} "
                              "(YAML indents with spaces)") from e
        raise ConfigError(f"{path}: not valid YAML{line}") from e
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: {what} must be a YAML mapping, got {type(raw).__name__}")
    return raw


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """The Config in ``path`` (defaults when None), with dotted ``overrides`` applied."""
    raw = read_yaml(path) if path is not None else {}
    where = str(path) if path is not None else "config"
    cfg = from_dict(raw, where)
    return cfg.with_overrides(overrides, "override") if overrides else cfg


def warmup_warning(cfg: Config) -> str | None:
    """One line when a linear KL warm-up is longer than the run: β rises through every epoch and never
    reaches ``kl_max_weight`` (it is at the cap from epoch ``kl_warmup_epochs`` on, 0-based)."""
    if cfg.kl_schedule != "linear" or cfg.kl_warmup_epochs < cfg.epochs:
        return None
    last = max(cfg.kl_min_weight, cfg.kl_max_weight * (cfg.epochs - 1) / cfg.kl_warmup_epochs)
    return (f"warning: kl_warmup_epochs={cfg.kl_warmup_epochs} >= epochs={cfg.epochs}: the KL weight never "
            f"reaches kl_max_weight={cfg.kl_max_weight:g} (the last epoch's is {last:.2g}); set "
            f"kl_warmup_epochs below {cfg.epochs}")


def parse_override(text: str) -> tuple[str, Any]:
    """'model.latent_dim=32' → ('model.latent_dim', 32); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected KEY=VALUE")
    key, value = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': value is not valid YAML") from e
