"""Fault injection: make chosen clients misbehave on purpose (a client mod, off unless ``[faults]`` says so).

For testing what the server does with a bad client, a crash or a hang, in simulation and deployment alike
(the mod runs inside the ClientApp, so the server sees exactly what a broken client would send)::

    [faults]
    kind = "nan"          # none | raise | nan | inf | shape | count | hang | exit
    clients = [1]         # partition ids that misbehave
    from_round = 2        # first server round in which they do (train messages only)
    hang_s = 3600.0       # how long "hang" sleeps

- ``raise``: the client logic raises (the runtime turns it into an error reply);
- ``nan`` / ``inf``: the first floating-point array of the reply gets a non-finite value;
- ``shape``: the first array of the reply gets one extra row (a wrong shape);
- ``count``: the reply claims 10^9 training examples (``num-examples``);
- ``hang``: the client sleeps ``hang_s`` seconds before answering;
- ``exit``: the client's process dies (``os._exit(1)``), as a crashed worker would.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, Context, Message

from fedkd import keys
from fedkd.config import ConfigError, register_section

from . import MODS
from .base import _config

FAULT_KINDS = ("none", "raise", "nan", "inf", "shape", "count", "hang", "exit")


@register_section("faults")
@dataclass(frozen=True)
class FaultsConfig:
    kind: str = "none"
    clients: tuple[int, ...] = ()
    from_round: int = 1
    hang_s: float = 3600.0

    def validate(self, cfg) -> None:
        if self.kind not in FAULT_KINDS:
            raise ConfigError("faults.kind", f"unknown value {self.kind!r}; valid: {', '.join(FAULT_KINDS)}")
        if self.from_round < 1:
            raise ConfigError("faults.from_round", f"must be >= 1 (got {self.from_round})")
        if not (self.hang_s >= 0 and np.isfinite(self.hang_s)):
            raise ConfigError("faults.hang_s", f"must be a finite number >= 0 (got {self.hang_s})")
        bad = [c for c in self.clients if not 0 <= c < cfg.data.num_clients]
        if bad:
            raise ConfigError("faults.clients", f"partition ids {bad} outside 0..{cfg.data.num_clients - 1}")

    def active(self, server_round: int, partition_id: int) -> bool:
        return self.kind != "none" and partition_id in self.clients and server_round >= self.from_round


def _first_array(reply: Message, floating: bool):
    for rec_name, rec in reply.content.array_records.items():
        for name, arr in rec.items():
            if not floating or np.issubdtype(arr.numpy().dtype, np.floating):
                return rec, name, arr.numpy()
    return None


def fault_mod(msg: Message, context: Context, call_next) -> Message:
    if not msg.metadata.message_type.startswith("train") or not msg.has_content():
        return call_next(msg, context)
    conf = msg.content.config_records.get(keys.CONFIG)
    if conf is None or keys.EXPERIMENT not in conf:
        return call_next(msg, context)
    faults = getattr(_config(str(conf[keys.EXPERIMENT])), "faults", None)
    pid = int(context.node_config[keys.NODE_PARTITION_ID])
    if faults is None or not faults.active(int(conf.get(keys.SERVER_ROUND, 0)), pid):
        return call_next(msg, context)
    kind = faults.kind
    if kind == "raise":
        raise RuntimeError(f"fault injected: client {pid} raises")
    if kind == "exit":
        os._exit(1)
    if kind == "hang":
        time.sleep(faults.hang_s)
        return call_next(msg, context)
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    if kind == "count":
        for rec in reply.content.metric_records.values():
            if keys.NUM_EXAMPLES in rec:
                rec[keys.NUM_EXAMPLES] = 10**9
        return reply
    found = _first_array(reply, floating=kind in ("nan", "inf"))
    if found is not None:
        rec, name, a = found
        if kind in ("nan", "inf"):
            a = np.array(a, copy=True)
            a.reshape(-1)[0] = np.nan if kind == "nan" else np.inf
        else:  # shape: one extra row (or one extra element for a 0-d/1-d array)
            a = np.concatenate([a, a[:1]]) if a.ndim >= 1 and len(a) else np.zeros(2, a.dtype)
        rec[name] = Array(np.ascontiguousarray(a))
    return reply


# Outermost mod (Flower applies MODS[0] first): the reply it corrupts is the one that leaves the client.
MODS.insert(0, fault_mod)
