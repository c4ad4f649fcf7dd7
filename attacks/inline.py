"""An in-process Grid (no Ray) for attack tests and benchmarks: the real ServerApp logic, strategy,
RecordingGrid, observers, ClientApp, mods and client logic, with every node hosted in this process.

It saves Ray's several-second start per run; ``fedkd attack CONFIG`` uses the experiment's own
backend instead (:func:`fedkd.experiment.run_experiment`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from pathlib import Path

import torch
from flwr.app import Context, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedkd.simulation import CLIENT_APP, NODE_ID_BASE, ClientHost, LocalGrid, node_config


class NodeHost:
    """A ClientHost serving a fixed set of nodes in this process, their Contexts held here (the
    simulation's driver-side contract: each message travels with its node's Context)."""

    def __init__(self, nodes: dict[int, dict], run_id: int = 1, threads: int | None = None) -> None:
        self.host = ClientHost(CLIENT_APP, threads=threads or torch.get_num_threads())
        self.contexts = {nid: Context(run_id=run_id, node_id=nid, node_config=conf, state=RecordDict(), run_config={})
                         for nid, conf in nodes.items()}

    def handle(self, messages: list[Message]) -> list[Message]:
        done = self.host.handle(0, [(m, self.contexts[m.metadata.dst_node_id]) for m in messages])
        for m, (_, state) in zip(messages, done):
            if state is not None:
                self.contexts[m.metadata.dst_node_id].state = state
        return [reply for reply, _ in done]


class InlineGrid(LocalGrid):
    def __init__(self, num_nodes: int, run_id: int = 1) -> None:
        self.node_ids = [NODE_ID_BASE + i for i in range(num_nodes)]
        nodes = {nid: node_config(i, num_nodes) for i, nid in enumerate(self.node_ids)}
        self.host = NodeHost(nodes, run_id)
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
        self._run = Run.create_empty(run_id)
        self._done: dict[str, Message] = {}

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        for m in messages:
            m.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        replies = self.host.handle(messages)
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        for m, r in zip(messages, replies):
            self._done[m.metadata.message_id] = r
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._done.pop(mid) for mid in list(message_ids) if mid in self._done]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def run_inline(cfg, out: str | Path | None = None, echo=lambda s: None) -> dict:
    """Like :func:`fedkd.experiment.run_experiment`, on an :class:`InlineGrid`. Returns the summary."""
    from fedkd.data import load_federation
    from fedkd.results import RunRecorder
    from fedkd.server import new_run_dir, run_server, summarize
    from fedkd.strategies import build_strategy

    t0 = time.perf_counter()
    fed = load_federation(cfg.data, cfg.run.seed)
    spec = build_strategy(cfg, fed)
    recorder = RunRecorder(new_run_dir(cfg, out))
    threads = torch.get_num_threads()
    try:
        run_server(InlineGrid(cfg.data.num_clients), cfg, recorder, spec=spec, progress=False, echo=echo)
    finally:
        torch.set_num_threads(threads)
    summary = summarize(cfg, recorder, t0)
    summary["run_dir"] = str(recorder.out_dir)
    return summary
