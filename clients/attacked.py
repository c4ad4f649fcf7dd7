"""The attacks' threat settings on the client side (an ``ENV_HOOKS`` entry; off unless configured).

When ``attack.rounds``/``attack.clients`` name this client and round, its train message runs on
``attack.batch_size`` of its training images, a deterministic function of (run seed, round,
partition) that the evaluation side recomputes from the federation (:func:`attacked_batch`):

- ``attack.setting = "gradient"``: one epoch with batch size = that batch, i.e. ONE local step;
- ``attack.setting = "update"``: the client's ordinary local training (``train.local_epochs`` with
  ``train.batch_size``) on those images, i.e. several steps.

Whatever logic and privacy mechanism the experiment uses then trains as usual on that data; the
server only ever sees the reply. Nothing here is sent to the server.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fedkd.data import ArrayDataset, Federation

from .base import ENV_HOOKS, ClientEnv


def attacked_indices(seed: int, server_round: int, partition_id: int, num_train: int, batch_size: int) -> np.ndarray:
    """Sorted indices into the client's training set of the images it trains on when attacked."""
    rng = np.random.default_rng([seed, server_round, partition_id, 0xA77AC])
    return np.sort(rng.choice(num_train, min(batch_size, num_train), replace=False))


def attacked_batch(cfg, fed: Federation, server_round: int, partition_id: int) -> ArrayDataset:
    """The images (and labels) an attacked client trained on: for metrics only, never for attacks."""
    train = fed.clients[partition_id].train
    return train.take(attacked_indices(cfg.run.seed, server_round, partition_id, len(train), cfg.attack.batch_size))


def threat_setting(msg, env: ClientEnv) -> ClientEnv:
    attack = getattr(env.cfg, "attack", None)
    if attack is None or not msg.metadata.message_type.startswith("train"):
        return env
    if not attack.records(env.server_round, env.partition_id):
        return env
    data = env.data
    idx = attacked_indices(env.cfg.run.seed, env.server_round, env.partition_id, len(data.train), attack.batch_size)
    clients = list(env.federation.clients)
    clients[env.partition_id] = dataclasses.replace(data, train=data.train.take(idx))
    fed = dataclasses.replace(env.federation, clients=tuple(clients))
    cfg = env.cfg
    if attack.setting == "gradient":
        cfg = cfg.replace(**{"train.local_epochs": 1, "train.batch_size": len(idx)})
    return dataclasses.replace(env, cfg=cfg, federation=fed)


ENV_HOOKS.append(threat_setting)
