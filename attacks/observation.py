"""What an honest-but-curious server observes of one client in one round, and nothing more.

An :class:`Observation` holds the global model the server sent, the client's reply (decoded into a
state dict), the architecture, the training hyperparameters the server knows (it configured them)
and the reply's metrics (e.g. ``num-examples``). It never holds the client's data: attacks get only
this, and the true images are recomputed from the federation by the metrics side.

Privacy mechanisms whose replies are not a plain ``arrays`` record (e.g. quantised updates)
register a decoder in :data:`REPLY_DECODERS` (``privacy.mechanism`` -> ``fn(content, cfg) -> state
dict``); the default reads ``keys.ARRAYS``. Strategies that do not send weights (distillation,
hypernetworks) can fill the same type from what they do send.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from fedkd import keys
from fedkd.models import build_model


class ObservationError(ValueError):
    """An attack was given an observation that lacks what it needs (one line)."""


@dataclass(frozen=True)
class KnownTraining:
    """The client's local training as the server configured it."""

    setting: str  # "gradient" (one step on one batch) | "update" (the whole local training)
    lr: float
    momentum: float
    weight_decay: float
    local_epochs: int
    batch_size: int  # the client's mini-batch size
    num_examples: int  # from the reply's metrics
    proximal_mu: float = 0.0
    dropout: float = 0.0  # model.dropout: the client trained with unknown dropout masks
    # The client's mini-batch order, one permutation of range(num_examples) per epoch. A server never sees
    # it (the client reshuffles every epoch); only an oracle attacker is given it (``attack.order = "known"``).
    batch_order: tuple[tuple[int, ...], ...] | None = None

    @property
    def steps(self) -> int:
        """Local SGD steps the client took (ceil(N / batch) per epoch)."""
        return self.local_epochs * -(-self.num_examples // self.batch_size)


@dataclass(frozen=True)
class Observation:
    server_round: int
    partition_id: int
    model_name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    training: KnownTraining
    global_state: dict[str, torch.Tensor]  # the arrays the server sent
    reply_state: dict[str, torch.Tensor] | None  # the client's returned arrays, decoded
    model_hidden: tuple[int, ...] | None = None
    defence: str = "none"  # the privacy mechanism (and its public parameters)
    metrics: dict = field(default_factory=dict)  # the reply's MetricRecord
    experiment: str = ""  # the experiment JSON the server sent to every client

    # ---------------------------------------------------------------- model
    def build_model(self) -> nn.Module:
        """The client's architecture with the global weights loaded."""
        m = build_model(self.model_name, self.input_shape, self.num_classes, hidden=self.model_hidden, dropout=self.training.dropout)
        m.load_state_dict(self.global_state)
        return m

    def require(self, attack: str, *, reply: bool = True, setting: str | None = None) -> None:
        """Raise :class:`ObservationError` when this observation cannot feed ``attack``."""
        if reply and self.reply_state is None:
            raise ObservationError(f"{attack}: the observation of client {self.partition_id} round {self.server_round} has no reply arrays")
        if reply and set(self.reply_state) != set(self.global_state):
            raise ObservationError(f"{attack}: reply arrays {sorted(self.reply_state)[:3]}... do not match the global model's")
        t = self.training
        if t.num_examples < 1:
            raise ObservationError(f"{attack}: the reply does not say how many examples the client used ({keys.NUM_EXAMPLES})")
        if t.lr <= 0:
            raise ObservationError(f"{attack}: the client's learning rate is unknown")
        if setting is not None and t.setting != setting:
            raise ObservationError(f"{attack}: needs a {setting!r} observation, got {t.setting!r}")

    # ---------------------------------------------------------------- files
    kind = "weights"  # OBSERVATION_KINDS key; subclasses (e.g. HyperFL's) set their own

    def to_dict(self) -> dict:
        d = asdict(self)
        d["kind"] = self.kind
        d["input_shape"] = list(self.input_shape)
        d["model_hidden"] = list(self.model_hidden) if self.model_hidden is not None else None
        return d

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.to_dict(), path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Observation":
        d = torch.load(Path(path), weights_only=True)
        cls = OBSERVATION_KINDS.get(d.pop("kind", "weights"), cls)
        d["training"] = KnownTraining(**d["training"])
        d["input_shape"] = tuple(d["input_shape"])
        d["model_hidden"] = tuple(d["model_hidden"]) if d.get("model_hidden") is not None else None
        return cls(**d)


# Observation.kind -> class, so load() returns the subclass a file was saved from.
OBSERVATION_KINDS: dict[str, type] = {"weights": Observation}
# strategy.name -> fn(cfg, server_round, partition_id, model_name, sent Message, reply Message) -> Observation, for
# strategies whose messages are not a model and its trained copy (e.g. HyperFL's hypernetwork); the recorder uses it.
OBSERVATION_BUILDERS: dict = {}


def observation_name(server_round: int, partition_id: int) -> str:
    return f"round{server_round:04d}-client{partition_id:04d}.pt"


def load_observations(run_dir: str | Path) -> list[Observation]:
    folder = Path(run_dir) / "observations"
    files = sorted(folder.glob("round*-client*.pt"))
    if not files:
        raise FileNotFoundError(f"no observations in {folder} (record some with attack.rounds and attack.clients)")
    return [Observation.load(f) for f in files]


# ---------------------------------------------------------------- decoding replies
def _arrays(content, cfg, sent=None) -> dict[str, torch.Tensor] | None:
    rec = content.array_records.get(keys.ARRAYS)
    return None if rec is None else {k: v.clone() for k, v in rec.to_torch_state_dict().items()}


def _quantized(content, cfg, sent=None) -> dict[str, torch.Tensor] | None:
    """RQM/PBM replies carry level indices: the server decodes them exactly as its wrapper does
    (global model + decoded update), with the parameters in force for this run."""
    from fedkd.strategies.rqm import IN_FORCE, decode_quantized

    params = IN_FORCE.get(cfg.to_json())
    rec = content.array_records.get(keys.ARRAYS)
    if params is None or rec is None or sent is None:
        return None
    return {k: v.clone() for k, v in decode_quantized(sent[keys.ARRAYS], rec, params).to_torch_state_dict().items()}


# privacy.mechanism -> fn(reply content: RecordDict, cfg, sent content: RecordDict | None) -> state dict | None
REPLY_DECODERS: dict = {"rqm": _quantized, "pbm": _quantized}


def decode_reply(content, cfg, sent=None) -> dict[str, torch.Tensor] | None:
    return REPLY_DECODERS.get(cfg.privacy.mechanism, _arrays)(content, cfg, sent)


def describe_defence(cfg) -> str:
    """A short public description of the defences of a run (what the server configured)."""
    p = cfg.privacy
    parts = []
    if p.mechanism == "dp-sgd":
        noise = f"sigma={p.noise_multiplier:g}" if p.noise_multiplier is not None else f"eps={p.target_epsilon:g}"
        parts.append(f"dp-sgd({noise},C={p.max_grad_norm:g})")
    elif p.mechanism != "none":
        parts.append(p.mechanism)
    if cfg.model.dropout > 0:
        parts.append(f"dropout({cfg.model.dropout:g})")
    return "+".join(parts) or "none"


def known_training(cfg, num_examples: int, proximal_mu: float = 0.0) -> KnownTraining:
    t, a = cfg.train, cfg.attack
    epochs, batch = (1, max(num_examples, 1)) if a.setting == "gradient" else (t.local_epochs, t.batch_size)
    return KnownTraining(
        setting=a.setting, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, local_epochs=epochs,
        batch_size=batch, num_examples=num_examples, proximal_mu=proximal_mu, dropout=cfg.model.dropout,
    )


def local_observation(
    model: nn.Module,
    data,
    *,
    model_name: str,
    setting: str = "gradient",
    lr: float = 0.1,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    local_epochs: int = 1,
    batch_size: int | None = None,
    dp=None,
    seed: int = 0,
    server_round: int = 1,
    partition_id: int = 0,
) -> Observation:
    """What a server would observe if one client trained ``model`` on ``data`` (an ArrayDataset)
    with :func:`fedkd.training.train`, the weights client's own routine. For unit tests and studies
    without a federation; ``model`` is not modified. ``gradient``: one step on all of ``data``."""
    import copy

    from fedkd.training import train

    n = len(data)
    if setting == "gradient":
        local_epochs, batch_size = 1, n
    batch_size = batch_size or n
    dropout = max((m.p for m in model.modules() if isinstance(m, nn.Dropout)), default=0.0)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    client = copy.deepcopy(model)
    res = train(client, data, epochs=local_epochs, batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay, seed=seed, dp=dp)
    hidden = tuple(m.out_features for m in model.modules() if isinstance(m, nn.Linear))[:-1] if model_name == "mlp" else None
    return Observation(
        server_round=server_round, partition_id=partition_id, model_name=model_name,
        input_shape=tuple(data.input_shape), num_classes=data.num_classes,
        training=KnownTraining(setting, lr, momentum, weight_decay, local_epochs, batch_size, res.num_examples, 0.0, float(dropout)),
        global_state=before, reply_state={k: v.detach().cpu().clone() for k, v in client.state_dict().items()},
        model_hidden=hidden, defence="dp-sgd" if dp is not None else ("dropout" if dropout else "none"),
        metrics={"num-examples": float(res.num_examples)},
    )
