"""Ray-backed simulation: fedkd's fast Grid, and Flower's own ``run_simulation`` path.

``FastGrid`` is a ``flwr.serverapp.Grid`` that hands messages straight to a pool of Ray actors.
Each actor holds the ClientApp, the Contexts of the nodes it hosts (so ``Context.state`` persists
across rounds) and, through ``load_federation``'s cache, the data partitions loaded once. A round
costs one Ray call per actor (its messages travel as one batch) instead of Flower's 0.1 s polling
loops. Strategies are untouched: they see an ordinary Grid.
"""

from __future__ import annotations

import os
import time
import traceback
import uuid
from collections.abc import Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedkd import keys

CLIENT_APP = "fedkd.apps:client_app"
NODE_ID_BASE = 1_000  # node id of partition i is NODE_ID_BASE + i


def _load(ref: str):
    import importlib

    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def node_config(pid: int, n: int) -> dict:
    return {keys.NODE_PARTITION_ID: pid, keys.NODE_NUM_PARTITIONS: n}


class ClientHost:
    """Runs the ClientApp for a set of nodes in one process (the body of a Ray actor)."""

    def __init__(self, app_ref: str, nodes: dict[int, dict], run_id: int, threads: int = 1) -> None:
        import torch

        torch.set_num_threads(threads)
        self.app = _load(app_ref)
        self.contexts = {nid: Context(run_id=run_id, node_id=nid, node_config=cfg, state=RecordDict(), run_config={}) for nid, cfg in nodes.items()}
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, next(iter(nodes))

    def handle(self, messages: list[Message]) -> list[Message]:
        out = []
        for m in messages:
            try:
                reply = self.app(m, self.contexts[m.metadata.dst_node_id])
            except Exception as e:  # a failing client becomes an error reply, as in Flower
                reply = Message(Error(code=0, reason=f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}"), reply_to=m)
            reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            out.append(reply)
        return out

    def ready(self, experiment_json: str = "") -> bool:
        """Warm up: import everything and load the partitions before round 1."""
        if experiment_json:
            from fedkd.clients.base import _config
            from fedkd.data import load_federation

            cfg = _config(experiment_json)
            load_federation(cfg.data, cfg.run.seed)
        return True


class LocalGrid(Grid):
    """What every in-process simulation Grid shares: a fixed set of node ids and the run it serves.
    Subclasses set ``node_ids`` and ``_run`` and implement the message exchange."""

    node_ids: list[int]
    _run: Run

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)


class FastGrid(LocalGrid):
    """A Grid over Ray actors. Use as a context manager; it stops the actors (and Ray, if it started it)."""

    def __init__(self, num_nodes: int, *, num_actors: int = 0, ray_address: str = "", app_ref: str = CLIENT_APP, run_id: int = 1, warmup: str = "") -> None:
        import ray

        self._started_ray = False
        if not ray.is_initialized():
            os.environ.setdefault("RAY_DEDUP_LOGS", "0")
            os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
            ray.init(
                address=ray_address or None, include_dashboard=False, configure_logging=True,
                logging_level="ERROR", log_to_driver=True,
                **({} if ray_address else {"num_cpus": os.cpu_count() or 1}),
            )
            self._started_ray = True
        self.node_ids = [NODE_ID_BASE + i for i in range(num_nodes)]
        cpus = int(ray.cluster_resources().get("CPU", 1))
        n_actors = min(num_nodes, num_actors or cpus)
        actor_cls = ray.remote(num_cpus=max(cpus // n_actors, 1) if not ray_address else 1)(ClientHost)
        self.owner: dict[int, int] = {}
        self.actors = []
        for a in range(n_actors):
            mine = {nid: node_config(i, num_nodes) for i, nid in enumerate(self.node_ids) if i % n_actors == a}
            self.owner.update({nid: a for nid in mine})
            self.actors.append(actor_cls.remote(app_ref, mine, run_id))
        ray.get([a.ready.remote(warmup) for a in self.actors])  # actors up (and data loaded) before round 1
        self._run = Run.create_empty(run_id)
        self._pending: dict[str, tuple[object, int]] = {}
        self._done: dict[str, Message] = {}
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        batches: dict[int, list[Message]] = {}
        ids = []
        for m in messages:
            if m.metadata.dst_node_id not in self.owner:
                raise ValueError(f"unknown node {m.metadata.dst_node_id}")
            m.metadata.__dict__["_message_id"] = mid = uuid.uuid4().hex
            batches.setdefault(self.owner[m.metadata.dst_node_id], []).append(m)
            ids.append(mid)
        for a, batch in batches.items():
            ref = self.actors[a].handle.remote(batch)
            for pos, m in enumerate(batch):
                self._pending[m.metadata.message_id] = (ref, pos)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        import ray

        wanted = set(message_ids)
        refs = {id(ref): ref for mid, (ref, _) in self._pending.items() if mid in wanted}
        if refs:
            ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=0)
            self._collect(ready)
        return [self._done.pop(mid) for mid in list(wanted) if mid in self._done]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        import ray

        ids = list(self.push_messages(messages))
        refs = list({id(self._pending[m][0]): self._pending[m][0] for m in ids}.values())
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        self._collect(ready)
        return [self._done.pop(m) for m in ids if m in self._done]

    def _collect(self, ready) -> None:
        import ray

        for ref in ready:
            replies = ray.get(ref)
            for mid in [mid for mid, (r, _) in self._pending.items() if r == ref]:
                _, pos = self._pending.pop(mid)
                self._done[mid] = replies[pos]

    # -- lifecycle
    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False

    def __enter__(self) -> "FastGrid":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_flower_simulation(cfg, run_server_fn) -> None:
    """Flower's own path: ``run_simulation`` with a ServerApp that calls ``run_server_fn(grid)``."""
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from fedkd.apps import client_app

    box: dict = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context) -> None:
        try:
            box["result"] = run_server_fn(grid)
        except BaseException as e:  # run_simulation swallows ServerApp exceptions: carry it out
            box["error"] = e
            raise

    backend_config = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"logging_level": "ERROR", "log_to_driver": True}}
    if cfg.simulation.ray_address:
        backend_config["init_args"]["address"] = cfg.simulation.ray_address
    t = time.perf_counter()
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=cfg.data.num_clients, backend_config=backend_config)
    if "error" in box:
        raise box["error"]
    if "result" not in box:
        raise RuntimeError(f"Flower's simulation ended after {time.perf_counter() - t:.1f}s without running the ServerApp")
    return box["result"]
