"""Ray-backed simulation: fedkd's fast Grid, its actor pool, and Flower's own ``run_simulation`` path.

``FastGrid`` is a ``flwr.serverapp.Grid`` that hands messages straight to a pool of Ray actors
(``ActorPool``), each holding the ClientApp and, through ``load_federation``'s cache, the data
partitions loaded once. Strategies are untouched: they see an ordinary Grid.

Scheduling (dynamic, not a fixed split of nodes over actors):

- the messages of an exchange form a queue; every actor keeps at most two batches in flight (one
  running, one waiting, so it never idles on the driver) and takes the next batch from the queue as
  soon as one finishes. Batch sizes are guided: ``ceil(queued / (2 x actors))``, at most
  ``max_batch``, so the many messages of a large round travel in few Ray calls and the last ones
  spread evenly over the actors;
- every node's ``Context`` lives on the driver and travels with its message; the reply brings the
  new ``Context.state`` back. Any actor can therefore serve any node, a node's state is always the one
  of its last successful reply (a failed call leaves it unchanged), and ``client_states()`` is a
  snapshot of every client's state at any time;
- ``send_and_receive(..., timeout=T)`` gives every message T seconds of its own running time (the
  time its ClientApp call takes on an actor, not the time it waits in the queue, as if every client
  had its own machine). A message past T is abandoned: it gets no reply (as a client that never
  answers), its actor is killed and replaced, and the messages batched behind it go back to the queue;
- an actor that dies (a client calling ``os._exit``, a crash) is replaced; the messages it had not
  answered run again, one per batch, so that only the message that kills its actor again is lost (it
  gets an error reply). Node states are untouched by the failed calls.
"""

from __future__ import annotations

import math
import os
import time
import traceback
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedkd import keys
from fedkd.config import ConfigError

CLIENT_APP = "fedkd.apps:client_app"
NODE_ID_BASE = 1_000  # node id of partition i is NODE_ID_BASE + i
MAX_BATCH = 16  # messages per Ray call at most
PROGRESS_WAIT_S = 10.0  # how long the driver waits for an actor to say how far it is
ERROR_ACTOR_DIED = 2  # Error.code of the reply to a message whose client process died (0: the client raised)


def _load(ref: str):
    import importlib

    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def node_config(pid: int, n: int) -> dict:
    return {keys.NODE_PARTITION_ID: pid, keys.NODE_NUM_PARTITIONS: n}


# -- Context.state <-> plain dict (the checkpoint contract: client_states / restore_client_states)

def state_to_dict(state: RecordDict) -> dict:
    """A plain, picklable copy of a ``Context.state``: ``{record name: {"kind": "arrays"|"metrics"|"configs",
    "items": {key: value}}}``; arrays as ``{"dtype", "shape", "stype", "data"}`` (their exact bytes)."""
    out = {}
    for name, rec in state.items():
        if isinstance(rec, ArrayRecord):
            items = {k: {"dtype": a.dtype, "shape": tuple(a.shape), "stype": a.stype, "data": bytes(a.data)} for k, a in rec.items()}
            out[name] = {"kind": "arrays", "items": items}
        elif isinstance(rec, MetricRecord):
            out[name] = {"kind": "metrics", "items": {k: (list(v) if isinstance(v, list) else v) for k, v in rec.items()}}
        else:
            out[name] = {"kind": "configs", "items": {k: (list(v) if isinstance(v, list) else v) for k, v in rec.items()}}
    return out


def state_from_dict(d: dict) -> RecordDict:
    """The inverse of :func:`state_to_dict`."""
    state = RecordDict()
    for name, rec in d.items():
        kind, items = rec["kind"], rec["items"]
        if kind == "arrays":
            state[name] = ArrayRecord({k: Array(dtype=a["dtype"], shape=tuple(a["shape"]), stype=a["stype"], data=a["data"]) for k, a in items.items()})
        elif kind == "metrics":
            state[name] = MetricRecord(dict(items))
        elif kind == "configs":
            state[name] = ConfigRecord(dict(items))
        else:
            raise ValueError(f"state record {name!r}: unknown kind {kind!r}")
    return state


# -- actor resources

@dataclass(frozen=True)
class ActorPlan:
    num_actors: int
    num_cpus: float  # per actor
    num_gpus: float  # per actor
    threads: int  # torch threads per actor


def plan_actors(*, num_actors: int, gpus_per_actor: float, device: str, cpus: float, gpus: float, remote: bool = False) -> ActorPlan:
    """How many actors, and what each asks Ray for, given the cluster's CPUs and GPUs.

    ``num_actors`` 0 = one per CPU. With ``device`` "cuda" every actor asks for ``gpus_per_actor`` of a GPU
    (0 = the cluster's GPUs shared evenly over the actors); with "auto" it does so when the cluster has GPUs;
    with "cpu" it asks for none. "cuda" on a cluster without GPUs is refused (it would wait forever).
    """
    n = int(num_actors) or max(int(cpus), 1)
    per_cpu = 1.0 if remote else float(max(int(cpus) // n, 1))
    wants_gpu = device == "cuda" or (device == "auto" and gpus > 0)
    if not wants_gpu or device == "cpu":
        return ActorPlan(n, per_cpu, 0.0, max(int(per_cpu), 1))
    if gpus <= 0:
        raise ConfigError("run.device", "cuda, but the Ray cluster has no GPU")
    g = float(gpus_per_actor) if gpus_per_actor > 0 else min(float(gpus) / n, 1.0)
    if g > gpus:
        raise ConfigError("simulation.gpus_per_actor", f"{g} GPUs per actor, but the Ray cluster has {gpus:g}")
    if g > 1 and g != int(g):
        raise ConfigError("simulation.gpus_per_actor", f"a share above 1 must be a whole number of GPUs (got {g})")
    return ActorPlan(n, per_cpu, g, max(int(per_cpu), 1))


# -- the actor body

class ClientHost:
    """Runs the ClientApp for any node in one process (the body of a Ray actor).

    ``handle`` runs in the actor's default (serial) group; ``progress`` in a group of its own, so the
    driver can ask how far a long batch is while it runs."""

    def __init__(self, app_ref: str, threads: int = 1) -> None:
        import torch

        torch.set_num_threads(threads)
        self.app = _load(app_ref)
        self._bid: int | None = None
        self._done: list = []
        self._t = 0.0
        self._warmed: set[str] = set()
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, NODE_ID_BASE

    def ready(self, experiment_json: str = "", federation: bytes | None = None) -> int:
        """Warm up: import everything and load the experiment's partitions (``federation``: the driver's,
        pickled, so this process builds none). Returns the process id."""
        if experiment_json:
            from fedkd.clients.base import _config
            from fedkd.deploy.cache import node_federation, preload

            cfg = _config(experiment_json)
            if federation is not None:
                import pickle

                preload(cfg.data, cfg.run.seed, pickle.loads(federation))
            fed = node_federation(cfg.data, cfg.run.seed)  # what the clients call
            if experiment_json not in self._warmed:  # torch's lazy first-call set-up here, not in round 1
                self._warmed.add(experiment_json)
                try:
                    import numpy as np

                    from fedkd.models import model_from_config
                    from fedkd.training import train

                    model = model_from_config(cfg.model, 0, fed.input_shape, fed.num_classes)
                    data = fed.clients[0].train
                    train(model, data.take(np.arange(min(len(data), 2))), epochs=1, batch_size=2, lr=0.0)
                except Exception:  # only a warm-up: the real call reports any problem
                    pass
        return os.getpid()

    def handle(self, bid: int, items: list[tuple[Message, Context]]) -> list[tuple[Message, RecordDict | None]]:
        """Run each (message, context); reply and the context's new state (None when the call failed)."""
        done: list = []
        self._done, self._bid = done, bid
        for m, ctx in items:
            self._t = time.monotonic()
            TaskIdentity.run_id, TaskIdentity.node_id = ctx.run_id, ctx.node_id
            try:
                reply, state = self.app(m, ctx), ctx.state
            except Exception as e:  # a failing client becomes an error reply, as in Flower
                reply, state = Message(Error(code=0, reason=f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}"), reply_to=m), None
            reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            done.append((reply, state))
        self._bid = None
        return done

    def progress(self, with_done: bool = False):
        """(batch id or None, messages done in it, seconds the current one has run[, the done results])."""
        bid, done, t = self._bid, list(self._done), self._t
        out = (bid, len(done), time.monotonic() - t if bid is not None else 0.0)
        return out + (done,) if with_done else out


# -- the pool of actors

def _ray_init(ray_address: str) -> bool:
    """Start (or connect to) Ray unless this process already did. True if this call started it."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    ray.init(
        address=ray_address or None, include_dashboard=False, configure_logging=True,
        logging_level="ERROR", log_to_driver=True,
        **({} if ray_address else {"num_cpus": os.cpu_count() or 1}),
    )
    return True


def shutdown_ray() -> None:
    """``ray.shutdown()`` of a Ray this process started, less the second its autoscaler monitor costs.

    ``ray.shutdown()`` stops the node's processes one after another, each with SIGTERM and up to 1 s of grace
    before SIGKILL. The ``monitor`` process (the autoscaler's; it keeps no state a local run needs) does not exit
    within that second, so Ray SIGKILLs it after waiting: measured 1.00 s of a 1.38 s shutdown. It gets SIGKILL
    at once here; ``ray.shutdown()`` then stops every process as before (the monitor is already gone, so its
    turn costs nothing). Ray's internals are read defensively: if they differ, this is plain ``ray.shutdown()``.
    """
    import ray

    try:
        from ray._private import ray_constants
        from ray._private import worker as ray_worker

        node = ray_worker._global_node
        monitors = list(node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, [])) if node is not None else []
        for info in monitors:
            if info.process.poll() is None:
                info.process.kill()
                info.process.wait(timeout=5)
    except Exception:  # noqa: BLE001  another Ray version: its own shutdown does everything
        pass
    ray.shutdown()


class _Slot:
    def __init__(self, index: int) -> None:
        self.index = index
        self.actor = None
        self.ready_ref = None  # set while the actor starts up
        self.warm: str | None = None  # experiment the actor has loaded
        self.inflight: deque[_Batch] = deque()
        self.head_since = 0.0  # when the head batch (the running one) began, at the latest
        self.check_at = math.inf  # when to look at the head batch's progress next


@dataclass
class _Batch:
    bid: int
    mids: list[str]
    ref: object
    slot: _Slot
    suspect: bool = False


class ActorPool:
    """Ray and a set of ClientHost actors, reusable by the grids of many experiments (a sweep).

    ``start()`` returns once Ray is up; the actors then import torch and load data while the driver
    loads its own; the first exchange waits for them. Close it (or use it as a context manager); it
    stops Ray only if it started it.
    """

    def __init__(self, *, num_actors: int = 0, ray_address: str = "", device: str = "cpu", gpus_per_actor: float = 0.0, app_ref: str = CLIENT_APP, max_actors: int = 0) -> None:
        self.num_actors, self.ray_address, self.device, self.gpus_per_actor = num_actors, ray_address, device, gpus_per_actor
        self.app_ref, self.max_actors = app_ref, max_actors
        self.key = (num_actors, ray_address, device, gpus_per_actor, app_ref, max_actors)
        self.slots: list[_Slot] = []
        self.plan: ActorPlan | None = None
        self.replaced = 0
        self._started_ray = False
        self._warmup = ""
        self._cls = None

    @classmethod
    def for_config(cls, cfg, max_actors: int = 0) -> "ActorPool":
        s = cfg.simulation
        return cls(num_actors=s.num_actors, ray_address=s.ray_address, device=cfg.run.device, gpus_per_actor=getattr(s, "gpus_per_actor", 0.0), max_actors=max_actors)

    # -- start-up
    def start(self, warmup: str = "") -> "ActorPool":
        """Start (or connect to) Ray and create the actors; returns once Ray is up, while the actors are
        still starting (importing torch, loading ``warmup``'s data): the first exchange waits for them.
        Call it from the main thread (Ray's driver does not work when started from another thread)."""
        if self.slots:
            return self
        import ray

        self._warmup = warmup
        self._started_ray = _ray_init(self.ray_address)
        res = ray.cluster_resources()
        self.plan = plan_actors(num_actors=self.num_actors, gpus_per_actor=self.gpus_per_actor, device=self.device, cpus=res.get("CPU", 1), gpus=res.get("GPU", 0), remote=bool(self.ray_address))
        n = min(self.plan.num_actors, self.max_actors) if self.max_actors else self.plan.num_actors
        self._cls = ray.remote(num_cpus=self.plan.num_cpus, num_gpus=self.plan.num_gpus, concurrency_groups={"ctl": 1})(ClientHost)
        self.slots = [_Slot(i) for i in range(n)]
        for s in self.slots:
            self._spawn(s)
        return self

    def _spawn(self, slot: _Slot) -> None:
        slot.warm = slot.warm or self._warmup
        slot.actor = self._cls.remote(self.app_ref, self.plan.threads)
        slot.ready_ref = slot.actor.ready.remote(slot.warm)
        slot.inflight.clear()
        slot.check_at = math.inf

    def warm(self, experiment_json: str) -> None:
        """Have every actor load this experiment's data (queued before any message of the experiment): the
        federation this process loads (``fedkd run`` has it already from its preflight check; it is cached for
        the run) goes to them through Ray's object store, so the actors build none."""
        self.start(experiment_json)
        blob = None
        for s in self.slots:
            if s.warm != experiment_json:
                if blob is None:
                    blob = self._federation(experiment_json)
                s.warm = experiment_json
                s.ready_ref = s.actor.ready.remote(experiment_json, blob or None)  # the slot takes work once this returns

    @staticmethod
    def _federation(experiment_json: str):
        """A Ray reference to this experiment's federation, pickled (plain bytes: the actors get arrays of their
        own, not read-only views of the object store); False when it cannot be loaded here (the actors try)."""
        import pickle

        import ray

        from fedkd.config import config_from_json
        from fedkd.data import load_federation

        try:
            cfg = config_from_json(experiment_json)
            fed = load_federation(cfg.data, cfg.run.seed)
        except Exception:  # noqa: BLE001  the actors load it themselves and the run reports any problem
            return False
        return ray.put(pickle.dumps(fed, protocol=pickle.HIGHEST_PROTOCOL))

    def replace(self, slot: _Slot) -> None:
        import ray

        try:
            ray.kill(slot.actor, no_restart=True)
        except Exception:  # already gone
            pass
        self.replaced += 1
        self._spawn(slot)

    # -- lifecycle
    def close(self) -> None:
        import ray

        for s in self.slots:
            try:
                ray.kill(s.actor, no_restart=True)
            except Exception:
                pass
        self.slots = []
        if self._started_ray:
            shutdown_ray()
            self._started_ray = False

    def __enter__(self) -> "ActorPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- Grids

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


@dataclass
class _Pending:
    msg: Message
    timeout: float | None
    suspect: bool = False  # its batch lost its actor: runs alone from now on
    extra: dict = field(default_factory=dict)


class FastGrid(LocalGrid):
    """A Grid over a pool of Ray actors. Use as a context manager; it closes the pool if it made it.

    ``pool``: an :class:`ActorPool` to use (and leave open), e.g. a sweep's; without one the grid makes its
    own from ``num_actors``/``ray_address``/``device``/``gpus_per_actor`` (at most one actor per node).
    """

    def __init__(
        self, num_nodes: int, *, pool: ActorPool | None = None, num_actors: int = 0, ray_address: str = "",
        app_ref: str = CLIENT_APP, run_id: int = 1, warmup: str = "", device: str = "cpu", gpus_per_actor: float = 0.0,
        max_batch: int = MAX_BATCH,
    ) -> None:
        self._own_pool = pool is None
        if pool is None:
            pool = ActorPool(num_actors=num_actors, ray_address=ray_address, device=device, gpus_per_actor=gpus_per_actor, app_ref=app_ref, max_actors=num_nodes)
            pool.start(warmup)
        self.pool = pool
        if warmup:
            pool.warm(warmup)
        self.max_batch = max(int(max_batch), 1)
        self.node_ids = [NODE_ID_BASE + i for i in range(num_nodes)]
        self.contexts = {nid: Context(run_id=run_id, node_id=nid, node_config=node_config(i, num_nodes), state=RecordDict(), run_config={}) for i, nid in enumerate(self.node_ids)}
        self._run = Run.create_empty(run_id)
        self._queue: deque[str] = deque()
        self._pending: dict[str, _Pending] = {}
        self._done: dict[str, Message] = {}
        self._next_bid = 0
        self.abandoned: list[tuple[int, str]] = []  # (node id, reason) of messages that got no reply
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
        self.wait_ready()

    def wait_ready(self) -> None:
        """Wait until every actor has started and loaded the data (so round times hold no start-up)."""
        import ray

        while any(s.ready_ref is not None for s in self.pool.slots):
            refs = {s.ready_ref: s for s in self.pool.slots if s.ready_ref is not None}
            ready, _ = ray.wait(list(refs), num_returns=len(refs))
            for ref in ready:
                self._on_ready(refs[ref], ref)

    # -- client state (the checkpoint contract)
    def client_states(self) -> dict[int, dict]:
        """Partition id -> its node's ``Context.state`` as a plain dict (:func:`state_to_dict`)."""
        return {int(c.node_config[keys.NODE_PARTITION_ID]): state_to_dict(c.state) for c in self.contexts.values()}

    def restore_client_states(self, states: dict[int, dict]) -> None:
        """Set the states saved by :meth:`client_states` (partition id -> dict); other nodes are left as they are."""
        by_pid = {int(c.node_config[keys.NODE_PARTITION_ID]): c for c in self.contexts.values()}
        unknown = sorted(set(int(p) for p in states) - set(by_pid))
        if unknown:
            raise ValueError(f"no node for partition ids {unknown}")
        for pid, d in states.items():
            by_pid[int(pid)].state = state_from_dict(d)

    # -- the Grid API
    def push_messages(self, messages: Iterable[Message], timeout: float | None = None) -> Iterable[str]:
        ids = []
        for m in messages:
            if m.metadata.dst_node_id not in self.contexts:
                raise ValueError(f"unknown node {m.metadata.dst_node_id}")
            m.metadata.__dict__["_message_id"] = mid = uuid.uuid4().hex
            self._pending[mid] = _Pending(m, timeout)
            self._queue.append(mid)
            ids.append(mid)
        self._pump(set(), deadline=0.0)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        wanted = list(message_ids)
        self._pump(set(wanted), deadline=0.0)
        return [self._done.pop(mid) for mid in wanted if mid in self._done]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        ids = list(self.push_messages(messages, timeout=timeout))
        self._pump(set(ids), deadline=None)
        return [self._done.pop(mid) for mid in ids if mid in self._done]

    # -- scheduling
    def _batch_size(self, n_slots: int) -> int:
        return max(1, min(self.max_batch, math.ceil(len(self._queue) / (2 * max(n_slots, 1)))))

    def _fill(self) -> None:
        """Give every ready actor work until it has two batches in flight."""
        ready = [s for s in self.pool.slots if s.ready_ref is None]
        now = time.monotonic()
        for depth in (0, 1):
            for s in ready:
                if not self._queue or len(s.inflight) > depth:
                    continue
                first = self._pending[self._queue[0]]
                # A suspect runs alone on an idle actor, nothing queued behind it: if that actor dies, the
                # suspect did it (an actor that exits may take the not yet sent reply of its previous call along).
                if (first.suspect and s.inflight) or (s.inflight and s.inflight[0].suspect):
                    continue
                size = 1 if first.suspect else self._batch_size(len(ready))
                mids = []
                while self._queue and len(mids) < size and not (mids and self._pending[self._queue[0]].suspect):
                    mids.append(self._queue.popleft())
                self._next_bid += 1
                items = [(self._pending[mid].msg, self.contexts[self._pending[mid].msg.metadata.dst_node_id]) for mid in mids]
                ref = s.actor.handle.remote(self._next_bid, items)
                s.inflight.append(_Batch(self._next_bid, mids, ref, s, suspect=first.suspect))
                if len(s.inflight) == 1:
                    self._start_head(s, now)

    def _start_head(self, slot: _Slot, now: float) -> None:
        slot.head_since = now
        timeouts = [self._pending[m].timeout for m in slot.inflight[0].mids] if slot.inflight else []
        ts = [t for t in timeouts if t is not None]
        slot.check_at = now + min(ts) if ts else math.inf

    def _pump(self, wanted: set[str], deadline: float | None) -> None:
        """Run the queue until every id in ``wanted`` is answered or abandoned (``deadline`` None), or just
        once without blocking (``deadline`` 0)."""
        import ray

        while True:
            self._fill()
            refs = {}
            for s in self.pool.slots:
                if s.ready_ref is not None:
                    refs[s.ready_ref] = ("ready", s)
                for b in s.inflight:
                    refs[b.ref] = ("batch", b)
            if not refs or (wanted and not (wanted & (set(self._pending)))):
                return
            now = time.monotonic()
            next_check = min((s.check_at for s in self.pool.slots), default=math.inf)
            wait = 0.0 if deadline == 0.0 else (None if next_check == math.inf else max(next_check - now, 0.0))
            ready, _ = ray.wait(list(refs), num_returns=1, timeout=wait)
            if ready:
                ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
            done = set(ready)
            for ref in ready:
                kind, obj = refs[ref]
                if kind == "ready":
                    self._on_ready(obj, ref)
            for s in list(self.pool.slots):  # an actor answers its batches in order (serial group)
                while s.inflight and s.inflight[0].ref in done:
                    self._on_batch(s.inflight[0])
            self._check_timeouts()
            if deadline == 0.0:
                self._fill()
                return

    def _on_ready(self, slot: _Slot, ref) -> None:
        import ray

        if slot.ready_ref is not ref:
            return
        try:
            ray.get(ref)
        except ray.exceptions.RayActorError as e:
            self._give_up_if_flapping(e)
            self.pool.replace(slot)
            return
        slot.ready_ref = None

    def _give_up_if_flapping(self, err) -> None:
        if self.pool.replaced > 10 + 2 * len(self.node_ids):
            raise RuntimeError(f"fast simulation: {self.pool.replaced} actors lost, giving up; last: {err}")

    def _on_batch(self, batch: _Batch) -> None:
        import ray

        slot = batch.slot
        try:
            results = ray.get(batch.ref)
        except ray.exceptions.RayActorError as e:
            self._actor_died(slot, e)
            return
        except ray.exceptions.RayTaskError:
            raise
        assert slot.inflight[0] is batch
        slot.inflight.popleft()
        self._deliver(batch.mids, results)
        self._start_head(slot, time.monotonic())

    def _deliver(self, mids: list[str], results: list) -> None:
        for mid, (reply, state) in zip(mids, results):
            p = self._pending.pop(mid, None)
            if p is None:
                continue
            if state is not None:
                self.contexts[p.msg.metadata.dst_node_id].state = state
            self._done[mid] = reply

    def _actor_died(self, slot: _Slot, err) -> None:
        """The head batch was running when the actor died: its messages run again alone; a message that
        was already alone is the culprit and gets an error reply. Later batches go back to the queue."""
        self._give_up_if_flapping(err)
        batches = list(slot.inflight)
        head, rest = batches[0], batches[1:]
        self.pool.replace(slot)
        again: list[str] = []
        if len(head.mids) == 1 and head.suspect:
            mid = head.mids[0]
            p = self._pending.pop(mid)
            reason = f"client process died (the Ray actor running it was lost): {type(err).__name__}"
            self._done[mid] = Message(Error(code=ERROR_ACTOR_DIED, reason=reason), reply_to=p.msg)
            self._done[mid].metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self.abandoned.append((p.msg.metadata.dst_node_id, reason))
        else:
            for mid in head.mids:
                self._pending[mid].suspect = True
                again.append(mid)
        for b in rest:
            again += b.mids
        self._queue.extendleft(reversed([m for m in again if m in self._pending]))

    def _check_timeouts(self) -> None:
        import ray

        now = time.monotonic()
        for slot in list(self.pool.slots):
            if not slot.inflight or slot.check_at > now:
                continue
            head = slot.inflight[0]
            try:
                bid, n_done, running = ray.get(slot.actor.progress.options(concurrency_group="ctl").remote(), timeout=PROGRESS_WAIT_S)
            except ray.exceptions.GetTimeoutError:
                bid, n_done, running = head.bid, 0, math.inf  # wedged: cannot even answer
            except ray.exceptions.RayActorError:
                slot.check_at = math.inf  # died: its batch's error arrives through ray.wait
                continue
            if bid != head.bid:  # finished (its result is on its way) or not begun: look again soon
                slot.check_at = now + 0.05
                continue
            mid = head.mids[n_done]
            limit = self._pending[mid].timeout
            if limit is None or running < limit:
                slot.check_at = now + ((limit - running) if limit is not None else math.inf)
                continue
            self._abandon(slot, head, n_done)

    def _abandon(self, slot: _Slot, head: _Batch, n_done: int) -> None:
        import ray

        try:
            *_, done = ray.get(slot.actor.progress.options(concurrency_group="ctl").remote(True), timeout=PROGRESS_WAIT_S)
        except Exception:
            done = []
        self._deliver(head.mids[: len(done)], done)
        hung = head.mids[n_done]
        p = self._pending.pop(hung)
        limit = p.timeout
        self.abandoned.append((p.msg.metadata.dst_node_id, f"no reply within {limit:g}s (timeout)"))
        again = [m for m in head.mids[n_done + 1:]] + [m for b in list(slot.inflight)[1:] for m in b.mids]
        again += [m for m in head.mids[len(done): n_done]]  # done but not handed back: run again
        self.pool.replace(slot)
        self._queue.extendleft(reversed([m for m in again if m in self._pending]))

    # -- lifecycle
    def close(self) -> None:
        if self._own_pool:
            self.pool.close()
        else:  # a shared pool: leave no batch of ours running
            for s in self.pool.slots:
                if s.inflight:
                    self.pool.replace(s)

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

    gpus = 0.0
    if cfg.run.device == "cuda":
        import torch

        gpus = float(getattr(cfg.simulation, "gpus_per_actor", 0.0)) or (1.0 / max(os.cpu_count() or 1, 1) if torch.cuda.is_available() else 0.0)
    backend_config = {"client_resources": {"num_cpus": 1, "num_gpus": gpus}, "init_args": {"logging_level": "ERROR", "log_to_driver": True}}
    if cfg.simulation.ray_address:
        backend_config["init_args"]["address"] = cfg.simulation.ray_address
    t = time.perf_counter()
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=cfg.data.num_clients, backend_config=backend_config)
    if "error" in box:
        raise box["error"]
    if "result" not in box:
        raise RuntimeError(f"Flower's simulation ended after {time.perf_counter() - t:.1f}s without running the ServerApp")
    return box["result"]


def early_pool(config_path, overrides) -> ActorPool | None:
    """A pool to start while the config is still being validated (``fedkd run``): read from the TOML and the
    overrides without validation; None unless the experiment would start a local Ray for the fast path."""
    import tomllib

    from fedkd.config import parse_value

    raw: dict = {}
    if active_session() is not None:
        return None
    try:
        if config_path:
            raw = tomllib.loads(open(config_path).read())
        for item in overrides:
            key, eq, value = item.partition("=")
            section, dot, name = key.strip().partition(".")
            if eq and dot:
                raw.setdefault(section, {})[name] = parse_value(value.strip())
        sim, run = raw.get("simulation", {}), raw.get("run", {})
        if sim.get("backend", "fast") != "fast" or sim.get("ray_address", ""):
            return None
        return ActorPool(num_actors=int(sim.get("num_actors", 0)), device=str(run.get("device", "auto")), gpus_per_actor=float(sim.get("gpus_per_actor", 0.0)),
                         max_actors=int(raw.get("data", {}).get("num_clients", 10)))
    except Exception:  # anything odd: no head start; validation reports it
        return None


# -- sessions: one Ray start for many experiments

class Session:
    """Keeps one warm :class:`ActorPool` for the experiments run while it is active (sweeps, test suites).

    ``run_experiment`` uses the active session's pool for every fast-path experiment; a pool whose actors
    ask for other resources (another device, actor count or cluster) is closed and a new one started."""

    def __init__(self) -> None:
        self.pool: ActorPool | None = None
        self.pools_started = 0

    def pool_for(self, cfg) -> ActorPool:
        want = ActorPool.for_config(cfg)
        if self.pool is not None and self.pool.slots:
            import ray

            if not ray.is_initialized():  # someone shut Ray down (e.g. Flower's run_simulation): start afresh
                self.pool.slots, self.pool._started_ray = [], False
                self.pool = None
        if self.pool is not None and self.pool.key == want.key:
            return self.pool
        if self.pool is not None:
            self.pool.close()
        self.pool = want
        self.pools_started += 1
        return want

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def __enter__(self) -> "Session":
        _SESSIONS.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _SESSIONS.remove(self)
        self.close()


_SESSIONS: list[Session] = []


def active_session() -> Session | None:
    """The innermost active :class:`Session`, if any."""
    return _SESSIONS[-1] if _SESSIONS else None
