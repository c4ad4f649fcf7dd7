"""Rounds of one exchange: the evaluation of the received model comes back in the train reply.

A FedAvg round with client-side evaluation is two exchanges: ``train`` (nodes train the global model of round
r-1) and ``evaluate`` (nodes evaluate the aggregate of round r). In a deployment each exchange pays Flower's
polling and a ClientApp process start. The evaluate message of round r carries exactly the arrays the train
message of round r+1 carries, so the node can evaluate those arrays when the train message arrives, before
training them, and send the result back with its update. :class:`OneExchange` asks for that from round 2 on
(config key ``keys.EVALUATE_RECEIVED``), records each reply's ``keys.RECEIVED_EVALUATION`` as round r-1's client
evaluation (split ``test``, the same rows an evaluate exchange writes), and keeps only the last round's
evaluate exchange: R + 1 exchanges instead of 2R.

What stays the same: every metric's meaning and value (the same model, the same data, deterministic
evaluation), ``accuracy`` (the server's evaluation of the global model, untouched), the node sampling (the
wrapped strategy's ``configure_evaluate`` is still called every round, so Flower's ``random`` draws are the
same). What changes: round r's client evaluation reaches metrics.csv during round r+1, so the table line of
round r shows no client test accuracy.

It is valid only where the evaluate message is the next train message's model sent to the same nodes:
:func:`allowed` says where (``deploy.one_exchange``: ``auto`` uses it there, ``on`` refuses other
experiments, ``off`` never uses it).
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedkd import keys

# Strategies whose evaluate message of round r holds the global arrays the train message of round r+1 holds
# (Flower's FedAvg family; the privacy wrappers delegate configure_evaluate to them) and whose client is "weights".
STRATEGIES = ("fedavg", "fedprox")


def allowed(cfg, client: str) -> tuple[bool, str]:
    """Whether an experiment may run rounds of one exchange, and why not."""
    s = cfg.strategy
    if s.name not in STRATEGIES or client != "weights":
        return False, f"strategy {s.name!r} (client {client!r}) evaluates something other than the next round's model; valid: {', '.join(STRATEGIES)}"
    if s.fraction_evaluate == 0:
        return False, "strategy.fraction_evaluate = 0: there is no client evaluation to fold into training"
    if s.fraction_train != 1 or s.fraction_evaluate != 1:
        return False, "strategy.fraction_train and strategy.fraction_evaluate must both be 1 (the nodes that evaluate round r must be the ones that train round r+1)"
    return True, ""


class OneExchange(Strategy):
    """Wraps a strategy (see the module docstring). ``record(round, node, metrics)`` stores a client evaluation."""

    def __init__(self, strategy: Strategy, num_rounds: int, record) -> None:
        self.strategy = strategy
        self.num_rounds = num_rounds
        self.record = record

    def __repr__(self) -> str:
        return f"OneExchange({self.strategy!r})"

    def summary(self) -> None:
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        if server_round > 1:  # round 1 receives the initial model: two-exchange runs do not evaluate it on clients
            for m in messages:
                m.content[keys.CONFIG][keys.EVALUATE_RECEIVED] = True
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for r in replies:
            if r.has_error() or keys.RECEIVED_EVALUATION not in r.content.config_records:
                continue
            metrics = dict(r.content.config_records[keys.RECEIVED_EVALUATION])
            del r.content[keys.RECEIVED_EVALUATION]
            node = r.content.config_records.get(keys.NODE)
            who = node[keys.PARTITION_ID] if node is not None else f"node-{r.metadata.src_node_id}"
            if server_round > 1:
                self.record(server_round - 1, who, metrics)
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        messages = list(self.strategy.configure_evaluate(server_round, arrays, config, grid))  # same sampling draws
        return messages if server_round == self.num_rounds else []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)
