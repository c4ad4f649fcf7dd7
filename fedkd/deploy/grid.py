"""A Grid that pulls replies every ``interval`` seconds instead of Flower's 3 s.

Flower 1.41's deployed Grid (``HttpGrid.send_and_receive``) pushes the messages, then pulls replies and sleeps
a hard-coded 3 s between pulls, so every exchange ends on a 3 s tick after its last reply. This wrapper does
the same push/pull loop through the Grid's public ``push_messages`` / ``pull_messages`` with a shorter sleep
(``deploy.pull_interval``); everything else is delegated. The ServerApp of ``fedkd/apps.py`` puts it around
the deployed Grid.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

from fedkd.recording import DelegatingGrid


class PollingGrid(DelegatingGrid):
    def __init__(self, inner: Grid, interval: float = 0.2) -> None:
        super().__init__(inner)
        self.interval = interval

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if not messages:
            return []
        pending = set(self.inner.push_messages(messages))
        del messages
        end = None if timeout is None else time.time() + timeout
        replies: list[Message] = []
        while pending:
            got = list(self.inner.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending or (end is not None and time.time() >= end):
                break
            time.sleep(self.interval)
        return replies
