"""A Grid wrapper that records what crosses the wire: payload bytes, per-node metrics, failures.

It sits between any strategy and any Grid (fast simulation, Flower's simulation, deployment), so
strategies stay untouched. ``observers`` see every exchange as (round, sent, replies): this is how
attacks record exactly what an honest-but-curious server observes.

It is also where replies are checked, for every strategy alike (:class:`ReplyValidator`): a reply with
non-finite arrays, arrays the server did not send (names, shapes, dtypes), or an implausible example
count is dropped before the strategy sees it, and recorded with its node, round and reason. Error
replies and missing replies (no answer within the timeout) are recorded the same way. A training
exchange left with fewer valid replies than ``strategy.min_replies`` raises :class:`RoundFailed`
(:class:`Diverged` when every reply was non-finite).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedkd import keys
from fedkd.results import RunRecorder

Observer = Callable[[int, list[Message], list[Message]], None]

SPLIT_OF = {"train": "train", "evaluate": "test", "query": "query"}
FAULTS_SPLIT = "faults"  # metrics.csv split of rejected, failed and missing replies (metric = the kind, value 1)


class Diverged(RuntimeError):
    """The global model (or whatever the server sends) is no longer finite: the run stops with status ``diverged``."""

    status = "diverged"


class RoundFailed(RuntimeError):
    """A training exchange ended with fewer valid replies than ``strategy.min_replies``."""

    status = "failed"


def nonfinite(arrays) -> str | None:
    """Name of the first floating-point array holding NaN or Inf, else None."""
    for name, arr in arrays.items():
        a = arr.numpy()
        if a.dtype.kind in "fc" and not np.isfinite(a).all():
            return name
    return None


def _matching_group(ref: dict, names: set) -> dict:
    """``ref``, or the group of it the reply answers: a server that sends several models packed as
    ``<group>/<name>`` (FedDF before it knows a node's architecture) gets back one group's plain names."""
    if names <= set(ref) or not any("/" in k for k in ref):
        return ref
    for group in {k.split("/", 1)[0] for k in ref if "/" in k}:
        sub = {k[len(group) + 1 :]: v for k, v in ref.items() if k.startswith(group + "/")}
        if names == set(sub):
            return sub
    return ref


class ReplyValidator:
    """What a plausible reply looks like, for any strategy.

    - every floating-point array is finite;
    - under a record name the server sent arrays in, the reply holds only names it sent, each with the shape
      and dtype it sent, and all of them (``encoded=True``, for quantizing mechanisms: a subset, any unsigned
      integer dtype);
    - ``num-examples`` in a metric record is an integer in [0, max_examples] (>= 1 in a training reply),
      ``max_examples`` being what the whole federation holds;
    - ``extra(sent, reply)`` (a strategy's own ``check_reply``) has nothing to say.
    """

    def __init__(self, max_examples: int | None = None, *, encoded: bool = False, extra: Callable | None = None) -> None:
        self.max_examples = max_examples
        self.encoded = encoded
        self.extra = extra

    def __call__(self, sent: Message | None, reply: Message) -> str | None:
        """None if ``reply`` is acceptable, else the reason (one line, starting with its kind)."""
        try:
            return self._check(sent, reply)
        except Exception as e:  # an undecodable payload is a bad reply, not a server crash
            return f"undecodable: {type(e).__name__}: {e}"

    def _check(self, sent: Message | None, reply: Message) -> str | None:
        train = reply.metadata.message_type.startswith("train")
        ref_records = sent.content.array_records if sent is not None and sent.has_content() else {}
        for rec_name, rec in reply.content.array_records.items():
            ref = ref_records.get(rec_name)
            if ref is not None and len(ref):
                ref = _matching_group(dict(ref.items()), set(rec.keys()))
                extra = sorted(set(rec.keys()) - set(ref.keys()))
                if extra:
                    return f"names: arrays {extra[:3]} in {rec_name!r} were not sent"
                missing = sorted(set(ref.keys()) - set(rec.keys()))
                if missing and not self.encoded:
                    return f"names: arrays {missing[:3]} missing from {rec_name!r}"
                for name, arr in rec.items():
                    want = ref[name]
                    if tuple(arr.shape) != tuple(want.shape):
                        return f"shape: {rec_name}/{name} is {tuple(arr.shape)}, expected {tuple(want.shape)}"
                    if arr.dtype != want.dtype and not (self.encoded and np.dtype(arr.dtype).kind == "u"):
                        return f"dtype: {rec_name}/{name} is {arr.dtype}, expected {want.dtype}"
            bad = nonfinite(rec)
            if bad is not None:
                return f"non-finite: {rec_name}/{bad} holds NaN or Inf"
        for rec in reply.content.metric_records.values():
            if keys.NUM_EXAMPLES not in rec:
                continue
            n = rec[keys.NUM_EXAMPLES]
            if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) or n != int(n):
                return f"num-examples: {n!r} is not an integer"
            low = 1 if train else 0
            if n < low or (self.max_examples is not None and n > self.max_examples):
                return f"num-examples: {int(n)} outside [{low}, {self.max_examples}] (the federation's size)"
        if self.extra is not None:
            return self.extra(sent, reply)
        return None


def payload_bytes(content: RecordDict) -> int:
    """Bytes of array payload in a message (every array of every ArrayRecord)."""
    return sum(len(arr.data) for rec in content.array_records.values() for arr in rec.values())


def reply_bytes(content: RecordDict) -> int:
    """Bytes a client sends: array payload plus every metric and config value (8 bytes per number or
    list element, UTF-8 length of strings, length of bytes, 1 per bool). Keys and framing are not counted."""

    def size(v) -> int:
        if isinstance(v, (list, tuple)):
            return sum(size(x) for x in v)
        if isinstance(v, bool):
            return 1
        if isinstance(v, str):
            return len(v.encode())
        if isinstance(v, bytes):
            return len(v)
        return 8

    values = [v for rec in (*content.metric_records.values(), *content.config_records.values()) for v in rec.values()]
    return payload_bytes(content) + sum(size(v) for v in values)


def message_round(msg: Message) -> int | None:
    conf = msg.content.config_records.get(keys.CONFIG) if msg.has_content() else None
    if conf is not None and keys.SERVER_ROUND in conf:
        return int(conf[keys.SERVER_ROUND])
    return None


class DelegatingGrid(Grid):
    """A Grid around ``inner`` that hands every call on; wrappers override what they change."""

    def __init__(self, inner: Grid) -> None:
        self.inner = inner

    def set_run(self, run) -> None:
        self.inner.set_run(run)

    @property
    def run(self):
        return self.inner.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self):
        return self.inner.get_node_ids()

    def get_nodes(self):
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.inner.send_and_receive(messages, timeout=timeout)


class RecordingGrid(DelegatingGrid):
    """``timeout`` caps every exchange's wait (``simulation.round_timeout``) whatever a strategy asks for;
    ``validator`` checks each reply (None: no checks); ``min_replies``: see the module docstring."""

    def __init__(
        self,
        inner: Grid,
        recorder: RunRecorder,
        observers: Iterable[Observer] = (),
        *,
        validator: ReplyValidator | None = None,
        timeout: float | None = None,
        min_replies: int = 1,
    ) -> None:
        super().__init__(inner)
        self.recorder = recorder
        self.observers = list(observers)
        self.current_round = 0
        self.validator = validator
        self.timeout = timeout
        self.min_replies = min_replies
        self.partition_of: dict[int, str] = {}  # node id -> partition id, learnt from replies

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self._sent(messages)
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.inner.pull_messages(message_ids))
        self._received(replies)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        self._sent(messages)
        if self.timeout is not None:
            timeout = self.timeout if timeout is None else min(timeout, self.timeout)
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        self._received(replies, metrics=False)
        for obs in self.observers:
            obs(self.current_round, messages, replies)
        replies = self._screen(messages, replies, timeout)
        for r in replies:  # a rejected reply's metrics (NaN losses, lying counts) stay out of metrics.csv
            self._metrics(r)
        if messages and messages[0].metadata.message_type.startswith("train"):
            need = max(1, min(self.min_replies, len(messages)))
            if len(replies) < need:
                now = [f for f in self.recorder.faults if f["round"] == self.current_round]
                why = "; ".join(f["reason"] for f in now)[:300]
                if now and len(now) >= len(messages) and all(f["reason"].startswith("non-finite") for f in now):
                    raise Diverged(f"round {self.current_round}: every client's reply is non-finite ({why})")
                raise RoundFailed(
                    f"round {self.current_round}: {len(replies)} valid training replies of {len(messages)}, "
                    f"fewer than strategy.min_replies = {need} ({why})"
                )
        return replies

    def _screen(self, messages: list[Message], replies: list[Message], timeout: float | None) -> list[Message]:
        """Valid replies only; the others, and the messages nobody answered, are recorded."""
        answered = {r.metadata.src_node_id for r in replies}
        for m in messages:
            if m.metadata.dst_node_id not in answered:
                wait = f"within {timeout:g} s" if timeout is not None else "(the grid returned without it)"
                self._fault(m.metadata.dst_node_id, "missing", f"no reply {wait}")
        sent = {m.metadata.dst_node_id: m for m in messages}
        keep = []
        for r in replies:
            node = r.metadata.src_node_id
            if r.has_error():
                self._fault(node, "error", r.error.reason.splitlines()[0] if r.error.reason else f"error code {r.error.code}")
                continue
            reason = self.validator(sent.get(node), r) if self.validator is not None else None
            if reason is not None:
                self._fault(node, "rejected", reason)
                continue
            keep.append(r)
        return keep

    def _fault(self, node_id: int, kind: str, reason: str) -> None:
        who = self.partition_of.get(node_id, f"node-{node_id}")
        self.recorder.add_fault(self.current_round, who, kind, reason)

    # -- recording
    def _sent(self, messages: list[Message]) -> None:
        # (what the server sends is not checked for NaN: FD's per-label logits mark unknown labels with NaN)
        for m in messages:
            rnd = message_round(m)
            if rnd is not None:
                self.current_round = rnd
            self.recorder.bytes_down += payload_bytes(m.content)
            self.recorder.messages += 1

    def _received(self, replies: list[Message], metrics: bool = True) -> None:
        for r in replies:
            self.recorder.messages += 1
            if r.has_error():
                self.recorder.failures.append(f"round {self.current_round} node {r.metadata.src_node_id}: {r.error.reason}")
                continue
            self.recorder.bytes_up += reply_bytes(r.content)
            self.recorder.bytes_up_arrays = getattr(self.recorder, "bytes_up_arrays", 0) + payload_bytes(r.content)
            node = r.content.config_records.get(keys.NODE)
            who = str(node[keys.PARTITION_ID]) if node is not None else f"node-{r.metadata.src_node_id}"
            self.partition_of[r.metadata.src_node_id] = who
            if metrics:
                self._metrics(r, who)

    def _metrics(self, r: Message, who: str | None = None) -> None:
        if who is None:
            who = self.partition_of.get(r.metadata.src_node_id, f"node-{r.metadata.src_node_id}")
        split = SPLIT_OF.get(r.metadata.message_type.split(".")[0], r.metadata.message_type)
        for rec in r.content.metric_records.values():
            self.recorder.add_many(self.current_round, who, split, dict(rec))
