"""What every client logic gets: the experiment, its partition, a device, and reply helpers."""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedkd import keys
from fedkd.config import ExperimentConfig, config_from_json
from fedkd.data import ClientData, Federation
from fedkd.deploy.cache import node_federation
from fedkd.training import resolve_device


@functools.lru_cache(maxsize=8)
def _config(text: str) -> ExperimentConfig:
    return config_from_json(text)


@dataclass
class ClientEnv:
    cfg: ExperimentConfig
    partition_id: int
    server_round: int
    federation: Federation
    device: torch.device

    @property
    def data(self) -> ClientData:
        return self.federation.clients[self.partition_id]

    @property
    def model_name(self) -> str:
        return self.cfg.model.for_partition(self.partition_id)

    def seed(self, *salt: int) -> int:
        """A PUBLIC seed that differs per run seed, round, client and ``salt`` and is stable across
        processes: the server can compute it. Never use it for noise, sampling, shuffles or dropout."""
        key = ",".join(str(v) for v in (self.cfg.run.seed, self.server_round, self.partition_id, *salt))
        return zlib.crc32(key.encode())

    def noise_seed(self, *salt: int) -> int | None:
        """The seed of private randomness (noise, quantization draws, sampling, shuffles, dropout):
        None = OS entropy (:mod:`fedkd.privacy.entropy`); the public :meth:`seed` only when the
        experiment sets ``privacy.reproducible_noise`` (debugging; the run then has no guarantee)."""
        return self.seed(*salt) if self.cfg.privacy.reproducible_noise else None


# (msg, env) -> env, applied in order by client_env (e.g. the attacks' single-batch threat setting).
ENV_HOOKS: list = []


def client_env(msg: Message, context: Context) -> ClientEnv:
    conf = msg.content[keys.CONFIG]
    cfg = _config(str(conf[keys.EXPERIMENT]))
    pid = int(context.node_config[keys.NODE_PARTITION_ID])
    fed = node_federation(cfg.data, cfg.run.seed)  # load_federation, through the node's cache in a deployment
    if not 0 <= pid < fed.num_clients:
        raise ValueError(f"partition-id {pid} outside the federation's {fed.num_clients} partitions")
    env = ClientEnv(cfg, pid, int(conf.get(keys.SERVER_ROUND, 0)), fed, resolve_device(cfg.run.device))
    for hook in ENV_HOOKS:
        env = hook(msg, env)
    return env


def node_record(env: ClientEnv) -> ConfigRecord:
    return ConfigRecord({keys.PARTITION_ID: env.partition_id, keys.MODEL_NAME: env.model_name})


def reply(msg: Message, env: ClientEnv, metrics: dict, **records) -> Message:
    """A reply holding ``records`` (e.g. arrays=ArrayRecord(...)), the metrics and who answered."""
    content = RecordDict({**records, keys.METRICS: MetricRecord(metrics), keys.NODE: node_record(env)})
    return Message(content=content, reply_to=msg)


class ClientLogic:
    """One algorithm's client side. Override ``train`` and/or ``evaluate``."""

    def train(self, msg: Message, context: Context, env: ClientEnv) -> Message:
        raise ValueError(f"{type(self).__name__} has no train step")

    def evaluate(self, msg: Message, context: Context, env: ClientEnv) -> Message:
        raise ValueError(f"{type(self).__name__} has no evaluate step")
