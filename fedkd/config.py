"""Experiment configuration: TOML file + ``--set section.key=value`` -> typed frozen dataclasses.

Everything is validated before anything starts. A bad key or value raises :class:`ConfigError`,
whose message is one line naming the key and what is allowed (the CLI prints it and exits 2).

Sections and keys (defaults = the default experiment)::

    [run]        name, seed, rounds, device ("auto" | "cpu" | "cuda" | "cuda:N"), out_dir, checkpoint
    [data]       dataset, data_dir, num_clients, partitioner, alpha, classes_per_client,
                 min_partition_size, client_test_fraction, server_test_fraction, max_samples,
                 num_subjects, records_per_subject, subjects_per_client, clients_per_subject, subject_separation,
                 domains, domain_alpha (feature-shift domains)
    [model]      name (a name or a list of names, assigned by partition id modulo its length),
                 hidden, dropout
    [train]      local_epochs, batch_size, lr, momentum, weight_decay
    [strategy]   name, fraction_train, fraction_evaluate, proximal_mu, min_replies
    [privacy]    mechanism, noise_multiplier, target_epsilon, max_grad_norm, delta,
                 clip, extend, levels, keep_prob (rqm), theta, trials (pbm), reproducible_noise
    [simulation] backend ("fast" | "flower"), ray_address, num_actors, gpus_per_actor, round_timeout

Types are strict: an integer key takes an integer (or an integral float), a number key a finite number,
a string key a string; a string is never converted into a number.

Other modules add their own sections with :func:`register_section` (one frozen dataclass each,
with an optional ``validate(self, cfg)`` method that raises ConfigError).
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A bad experiment configuration. ``str()`` is one line: ``key: problem``."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


# --------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class RunConfig:
    name: str = "default"
    seed: int = 0
    rounds: int = 10
    device: str = "auto"
    out_dir: str = "runs"
    checkpoint: bool = True  # write checkpoint.pt after every round (fedkd run --resume)

    def validate(self, cfg: "ExperimentConfig") -> None:
        _require(self.rounds >= 1, "run.rounds", f"must be >= 1 (got {self.rounds})")
        _require(0 <= self.seed < 2**32, "run.seed", f"must be in [0, 2**32 - 1] (got {self.seed})")
        ok = self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")
        _require(ok, "run.device", f"must be auto, cpu, cuda or cuda:N (got {self.device!r})")
        _require(bool(self.name.strip()), "run.name", "must not be empty")


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "digits"
    data_dir: str = ""
    num_clients: int = 10
    partitioner: str = "dirichlet"
    alpha: float = 0.5
    classes_per_client: int = 2
    min_partition_size: int = 10
    client_test_fraction: float = 0.2
    server_test_fraction: float = 0.2
    max_samples: int = 0  # 0 = all; otherwise a seeded subsample of the dataset
    # synthetic-subjects knobs
    num_subjects: int = 40
    records_per_subject: int = 60
    subjects_per_client: int = 4
    clients_per_subject: int = 2  # each member subject's records are spread over this many clients
    subject_separation: float = 1.0
    # feature-shift domains (digits-domains, mnist-domains; fedkd/data/domains.py)
    domains: tuple[str, ...] = ("gray", "inverted", "rotated", "noisy", "blurred", "colored")
    domain_alpha: float = 0.0  # 0 = IID inside a domain; > 0 = Dirichlet label skew among a domain's clients

    def validate(self, cfg: "ExperimentConfig") -> None:
        from fedkd.data import DATASETS, PARTITIONERS
        from fedkd.data.domains import DOMAIN_DATASETS, DOMAINS

        _require(self.dataset in DATASETS, "data.dataset", _one_of(self.dataset, DATASETS.names()))
        _require(
            self.partitioner in PARTITIONERS,
            "data.partitioner",
            _one_of(self.partitioner, PARTITIONERS.names()),
        )
        _require(self.num_clients >= 1, "data.num_clients", f"must be >= 1 (got {self.num_clients})")
        _require(
            self.alpha > 0 and math.isfinite(self.alpha),
            "data.alpha",
            f"must be > 0 (got {self.alpha})",
        )
        _require(
            self.classes_per_client >= 1,
            "data.classes_per_client",
            f"must be >= 1 (got {self.classes_per_client})",
        )
        _require(
            self.min_partition_size >= 0,
            "data.min_partition_size",
            f"must be >= 0 (got {self.min_partition_size})",
        )
        _require(0.0 < self.server_test_fraction < 1.0, "data.server_test_fraction", f"must be in (0, 1) (got {self.server_test_fraction})")
        # 0 = clients train on every record (membership inference); then nothing can evaluate on the clients
        v = self.client_test_fraction
        _require(0.0 <= v < 1.0, "data.client_test_fraction", f"must be in (0, 1) (got {v})")
        _require(
            v > 0.0 or cfg.strategy.fraction_evaluate == 0.0,
            "data.client_test_fraction",
            "0 leaves the clients no test split; it needs strategy.fraction_evaluate = 0",
        )
        _require(self.max_samples >= 0, "data.max_samples", f"must be >= 0 (got {self.max_samples})")
        for key in ("num_subjects", "records_per_subject", "subjects_per_client", "clients_per_subject"):
            v = getattr(self, key)
            _require(v >= 1, f"data.{key}", f"must be >= 1 (got {v})")
        _require(
            self.subject_separation >= 0,
            "data.subject_separation",
            f"must be >= 0 (got {self.subject_separation})",
        )
        if self.dataset == "synthetic-subjects":
            from fedkd.data.synthetic import check_shape

            problem = check_shape(self.num_subjects, self.num_clients, self.subjects_per_client, self.clients_per_subject)
            if problem is not None:
                raise ConfigError(*problem)
        _require(len(self.domains) >= 1, "data.domains", f"must name at least one domain; valid: {', '.join(DOMAINS)}")
        for d in self.domains:
            _require(d in DOMAINS, "data.domains", _one_of(d, list(DOMAINS)))
        _require(len(set(self.domains)) == len(self.domains), "data.domains", f"names a domain twice (got {list(self.domains)})")
        _require(
            self.domain_alpha >= 0 and math.isfinite(self.domain_alpha),
            "data.domain_alpha",
            f"must be >= 0 (0 = no label skew; got {self.domain_alpha})",
        )
        if self.partitioner == "domain":
            _require(
                self.dataset in DOMAIN_DATASETS,
                "data.partitioner",
                f"'domain' needs a domain dataset ({', '.join(DOMAIN_DATASETS)}; got {self.dataset!r})",
            )
            _require(
                self.num_clients >= len(self.domains),
                "data.num_clients",
                f"{self.num_clients} clients for {len(self.domains)} domains: each domain needs at least one client",
            )
            if self.domain_alpha > 0:
                _require(
                    self.num_clients // len(self.domains) >= 2,  # client i holds domain i % len(domains)
                    "data.domain_alpha",
                    f"label skew inside a domain needs >= 2 clients per domain; {self.num_clients} clients over "
                    f"{len(self.domains)} domains leave some with one (use data.num_clients >= {2 * len(self.domains)})",
                )


@dataclass(frozen=True)
class ModelConfig:
    name: tuple[str, ...] = ("mlp",)
    hidden: tuple[int, ...] = (64, 64)
    dropout: float = 0.0

    def validate(self, cfg: "ExperimentConfig") -> None:
        from fedkd.models import MODELS

        _require(len(self.name) >= 1, "model.name", "must name at least one model")
        for n in self.name:
            _require(n in MODELS, "model.name", _one_of(n, MODELS.names()))
        _require(all(h >= 1 for h in self.hidden), "model.hidden", f"sizes must be >= 1 (got {list(self.hidden)})")
        _require(0.0 <= self.dropout < 1.0, "model.dropout", f"must be in [0, 1) (got {self.dropout})")

    def for_partition(self, partition_id: int) -> str:
        """The model name of a client: ``name[partition_id % len(name)]``."""
        return self.name[partition_id % len(self.name)]


@dataclass(frozen=True)
class TrainConfig:
    local_epochs: int = 5
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0

    def validate(self, cfg: "ExperimentConfig") -> None:
        _require(self.local_epochs >= 1, "train.local_epochs", f"must be >= 1 (got {self.local_epochs})")
        _require(self.batch_size >= 1, "train.batch_size", f"must be >= 1 (got {self.batch_size})")
        _require(self.lr > 0, "train.lr", f"must be > 0 (got {self.lr})")
        _require(0 <= self.momentum < 1, "train.momentum", f"must be in [0, 1) (got {self.momentum})")
        _require(self.weight_decay >= 0, "train.weight_decay", f"must be >= 0 (got {self.weight_decay})")


@dataclass(frozen=True)
class StrategyConfig:
    name: str = "fedavg"
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    proximal_mu: float = 0.01
    min_replies: int = 1  # a training exchange with fewer valid replies fails the run

    def validate(self, cfg: "ExperimentConfig") -> None:
        from fedkd.strategies import STRATEGIES

        _require(self.name in STRATEGIES, "strategy.name", _one_of(self.name, STRATEGIES.names()))
        if len(set(cfg.model.name)) > 1:
            _require(
                STRATEGIES.get(self.name).heterogeneous,
                "model.name",
                f"strategy {self.name!r} averages weights and needs one architecture (got {list(cfg.model.name)})",
            )
        _require(
            0 < self.fraction_train <= 1,
            "strategy.fraction_train",
            f"must be in (0, 1] (got {self.fraction_train})",
        )
        _require(
            0 <= self.fraction_evaluate <= 1,
            "strategy.fraction_evaluate",
            f"must be in [0, 1] (got {self.fraction_evaluate})",
        )
        _require(self.proximal_mu >= 0, "strategy.proximal_mu", f"must be >= 0 (got {self.proximal_mu})")
        _require(
            1 <= self.min_replies <= cfg.data.num_clients,
            "strategy.min_replies",
            f"must be in [1, data.num_clients = {cfg.data.num_clients}] (got {self.min_replies})",
        )


PRIVACY_MECHANISMS = ("none", "dp-sgd", "rqm", "gaussian", "pbm", "subject-dp")


@dataclass(frozen=True)
class PrivacyConfig:
    mechanism: str = "none"
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    # rqm (fedkd/privacy/rqm.py); gaussian reuses max_grad_norm as the update clipping norm
    clip: float = 0.05
    extend: float = 0.05
    levels: int = 16
    keep_prob: float = 0.5
    # pbm (fedkd/privacy/pbm.py), shares clip
    theta: float = 0.25
    trials: int = 15
    # debugging only: draw every mechanism's noise from run.seed (no guarantee; summary.json says so, epsilon null)
    reproducible_noise: bool = False

    def validate(self, cfg: "ExperimentConfig") -> None:
        _require(
            self.mechanism in PRIVACY_MECHANISMS,
            "privacy.mechanism",
            _one_of(self.mechanism, list(PRIVACY_MECHANISMS)),
        )
        _require(0 < self.delta < 1, "privacy.delta", f"must be in (0, 1) (got {self.delta})")
        _require(self.max_grad_norm > 0, "privacy.max_grad_norm", f"must be > 0 (got {self.max_grad_norm})")
        if self.noise_multiplier is not None:
            _require(
                self.noise_multiplier >= 0,
                "privacy.noise_multiplier",
                f"must be >= 0 (got {self.noise_multiplier})",
            )
        if self.target_epsilon is not None:
            _require(
                self.target_epsilon > 0,
                "privacy.target_epsilon",
                f"must be > 0 (got {self.target_epsilon})",
            )
        if self.mechanism == "dp-sgd":
            _require(
                (self.noise_multiplier is None) != (self.target_epsilon is None),
                "privacy.noise_multiplier",
                "dp-sgd needs exactly one of privacy.noise_multiplier and privacy.target_epsilon",
            )
        if self.mechanism == "gaussian":
            _require(
                (self.noise_multiplier is None) != (self.target_epsilon is None),
                "privacy.noise_multiplier",
                "gaussian needs exactly one of privacy.noise_multiplier and privacy.target_epsilon",
            )
        from fedkd.strategies import STRATEGIES

        if cfg.strategy.name in STRATEGIES:
            supported = STRATEGIES.get(cfg.strategy.name).mechanisms
            _require(
                self.mechanism in supported,
                "privacy.mechanism",
                f"{self.mechanism!r} is not supported by strategy {cfg.strategy.name!r} (supported: {', '.join(supported)})",
            )
        from fedkd.privacy.rqm import check_params

        check_params(self.clip, self.extend, self.levels, self.keep_prob)
        from fedkd.privacy.pbm import check_params as check_pbm

        check_pbm(self.clip, self.theta, self.trials)


SIMULATION_BACKENDS = ("fast", "flower")


@dataclass(frozen=True)
class SimulationConfig:
    backend: str = "fast"
    ray_address: str = ""
    num_actors: int = 0  # 0 = one per CPU (at most one per client)
    gpus_per_actor: float = 0.0  # with run.device = "cuda": GPU share each actor asks Ray for (0 = the GPUs split evenly)
    round_timeout: float = 600.0  # seconds a message exchange waits for replies; late replies count as missing

    def validate(self, cfg: "ExperimentConfig") -> None:
        _require(
            self.backend in SIMULATION_BACKENDS,
            "simulation.backend",
            _one_of(self.backend, list(SIMULATION_BACKENDS)),
        )
        _require(self.num_actors >= 0, "simulation.num_actors", f"must be >= 0 (got {self.num_actors})")
        _require(0 <= self.gpus_per_actor < float("inf"), "simulation.gpus_per_actor", f"must be a finite number >= 0 (got {self.gpus_per_actor})")
        _require(self.round_timeout > 0, "simulation.round_timeout", f"must be > 0 seconds (got {self.round_timeout})")


# Section name -> dataclass. Extended by register_section().
SECTIONS: dict[str, type] = {
    "run": RunConfig,
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "strategy": StrategyConfig,
    "privacy": PrivacyConfig,
    "simulation": SimulationConfig,
}


def register_section(name: str) -> typing.Callable[[type], type]:
    """Add a config section (a frozen dataclass with defaults for every field)."""

    def deco(cls: type) -> type:
        if name in SECTIONS and SECTIONS[name] is not cls:
            raise ValueError(f"config section {name!r} is registered twice")
        SECTIONS[name] = cls
        return cls

    return deco


class ExperimentConfig:
    """The resolved experiment: one frozen dataclass per section, as attributes."""

    __slots__ = ("_sections",)

    def __init__(self, sections: dict[str, Any]) -> None:
        object.__setattr__(self, "_sections", dict(sections))

    def __getattr__(self, name: str) -> Any:
        try:
            return self._sections[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ExperimentConfig) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(self.to_json())

    def __repr__(self) -> str:
        return f"ExperimentConfig({self.to_dict()!r})"

    def replace(self, **overrides: Any) -> "ExperimentConfig":
        """Copy with dotted overrides: ``cfg.replace(**{"run.rounds": 2})``."""
        return build_config(self.to_dict(), overrides)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for name, sec in self._sections.items():
            d = {}
            for f in dataclasses.fields(sec):
                v = getattr(sec, f.name)
                if v is None:
                    continue  # TOML has no null: an absent key means None
                d[f.name] = list(v) if isinstance(v, tuple) else v
            out[name] = d
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def to_toml(self) -> str:
        lines: list[str] = []
        for name, d in self.to_dict().items():
            lines.append(f"[{name}]")
            for k, v in d.items():
                lines.append(f"{k} = {_toml_value(v)}")
            lines.append("")
        return "\n".join(lines)


# --------------------------------------------------------------------------- loading
def load_config(path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> ExperimentConfig:
    """Load a TOML experiment file (or the defaults) and apply ``section.key=value`` strings."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError("config", f"no such file: {p}")
        try:
            raw = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError("config", f"{p} is not valid TOML ({e})") from None
    parsed: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "overrides look like section.key=value")
        key, value = item.split("=", 1)
        parsed[key.strip()] = parse_value(value.strip())
    return build_config(raw, parsed)


def config_from_json(text: str) -> ExperimentConfig:
    return build_config(json.loads(text), {})


def parse_value(text: str) -> Any:
    """A ``--set`` value: a TOML value when it parses as one, else the bare string."""
    if text.lower() in ("none", "null"):
        return None
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load_plugins() -> None:
    """Import the packages that register strategies, clients, attacks and their config sections."""
    import fedkd.attacks  # noqa: F401
    import fedkd.clients  # noqa: F401
    import fedkd.strategies  # noqa: F401
    import fedkd.deploy.settings  # noqa: F401  ([deploy])


def build_config(raw: dict[str, Any], overrides: dict[str, Any]) -> ExperimentConfig:
    """Merge ``raw`` (nested dict) with dotted ``overrides``, coerce types and validate."""
    load_plugins()
    merged: dict[str, dict[str, Any]] = {}
    for sec, body in raw.items():
        if sec not in SECTIONS:
            raise ConfigError(sec, f"unknown section; valid: {', '.join(SECTIONS)}")
        if not isinstance(body, dict):
            raise ConfigError(sec, "must be a table")
        merged[sec] = dict(body)
    for key, value in overrides.items():
        sec, _, name = key.partition(".")
        if sec not in SECTIONS or not name:
            raise ConfigError(key, f"unknown key; sections: {', '.join(SECTIONS)}")
        merged.setdefault(sec, {})[name] = value

    sections: dict[str, Any] = {}
    for sec, cls in SECTIONS.items():
        body = merged.get(sec, {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for name, value in body.items():
            if name not in fields:
                raise ConfigError(f"{sec}.{name}", f"unknown key; valid: {', '.join(fields)}")
            kwargs[name] = _coerce(f"{sec}.{name}", value, hints[name])
        sections[sec] = cls(**kwargs)
    cfg = ExperimentConfig(sections)
    for sec in sections.values():
        if hasattr(sec, "validate"):
            sec.validate(cfg)
    return cfg


def flat_overrides(run_config: dict[str, Any]) -> dict[str, Any]:
    """Dotted ``section.key`` entries of a Flower run config (others are ignored)."""
    return {k: v for k, v in run_config.items() if "." in k and k.split(".", 1)[0] in SECTIONS}


# --------------------------------------------------------------------------- helpers
def _require(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise ConfigError(key, problem)


def _one_of(value: Any, valid: list[str]) -> str:
    return f"unknown value {value!r}; valid: {', '.join(valid)}"


def _coerce(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, value, inner[0])
    if value is None:
        raise ConfigError(key, "must not be empty")
    if origin is tuple:
        item = args[0]
        seq = value if isinstance(value, (list, tuple)) else [value]
        return tuple(_coerce(key, v, item) for v in seq)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(key, f"must be true or false (got {value!r})")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"must be an integer (got {value!r})")
        if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
            raise ConfigError(key, f"must be an integer (got {value!r})")
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"must be a number (got {value!r})")
        try:
            f = float(value)
        except OverflowError:
            f = math.inf
        if not math.isfinite(f):
            raise ConfigError(key, f"must be a finite number (got {value!r})")
        return f
    if hint is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(key, f"must be a string (got {value!r})")
        return str(value)
    return value


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v) if math.isfinite(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


__all__ = [
    "ConfigError",
    "ExperimentConfig",
    "SECTIONS",
    "build_config",
    "config_from_json",
    "field",
    "load_config",
    "parse_value",
    "register_section",
]
