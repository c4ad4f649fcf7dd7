"""A Grid wrapper that records what crosses the wire: payload bytes, per-node metrics, failures.

It sits between any strategy and any Grid (fast simulation, Flower's simulation, deployment), so
strategies stay untouched. ``observers`` see every exchange as (round, sent, replies): this is how
attacks record exactly what an honest-but-curious server observes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedkd import keys
from fedkd.results import RunRecorder

Observer = Callable[[int, list[Message], list[Message]], None]

SPLIT_OF = {"train": "train", "evaluate": "test", "query": "query"}


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


class RecordingGrid(Grid):
    def __init__(self, inner: Grid, recorder: RunRecorder, observers: Iterable[Observer] = ()) -> None:
        self.inner = inner
        self.recorder = recorder
        self.observers = list(observers)
        self.current_round = 0

    # -- delegation
    def set_run(self, run) -> None:
        self.inner.set_run(run)

    @property
    def run(self):
        return self.inner.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self):
        return self.inner.get_node_ids()

    def get_nodes(self):
        return self.inner.get_nodes()

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
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        self._received(replies)
        for obs in self.observers:
            obs(self.current_round, messages, replies)
        train = [r for r in replies if r.metadata.message_type.startswith("train")]
        if messages and messages[0].metadata.message_type.startswith("train") and train and all(r.has_error() for r in train):
            raise RuntimeError(f"all {len(train)} clients failed in round {self.current_round}: {train[0].error.reason}")
        return replies

    # -- recording
    def _sent(self, messages: list[Message]) -> None:
        for m in messages:
            rnd = message_round(m)
            if rnd is not None:
                self.current_round = rnd
            self.recorder.bytes_down += payload_bytes(m.content)
            self.recorder.messages += 1

    def _received(self, replies: list[Message]) -> None:
        for r in replies:
            self.recorder.messages += 1
            if r.has_error():
                self.recorder.failures.append(f"round {self.current_round} node {r.metadata.src_node_id}: {r.error.reason}")
                continue
            self.recorder.bytes_up += reply_bytes(r.content)
            self.recorder.bytes_up_arrays = getattr(self.recorder, "bytes_up_arrays", 0) + payload_bytes(r.content)
            node = r.content.config_records.get(keys.NODE)
            who = node[keys.PARTITION_ID] if node is not None else f"node-{r.metadata.src_node_id}"
            split = SPLIT_OF.get(r.metadata.message_type.split(".")[0], r.metadata.message_type)
            for rec in r.content.metric_records.values():
                self.recorder.add_many(self.current_round, who, split, dict(rec))
