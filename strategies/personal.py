"""Shared plumbing for strategies whose clients keep their own models (FedMD, FD, local-only, FedD2S, ...),
and the two summary metrics every strategy reports.

**Summary metrics (one meaning for every strategy; ``benchmarks/`` read these names only):**

- ``accuracy``: mean accuracy, on the server's test set (``Federation.server_test``, the same samples
  for every strategy on the same data config), of what the strategy produces for deployment: the global
  model (FedAvg, FedProx, FedDF: the mean over its architecture groups, DP wrappers), or each client's
  own model, averaged over the clients (strategies built on :class:`PersonalStrategy`). It is the last
  round's ``accuracy`` row of node ``server``.
- ``personal_accuracy``: mean over clients (unweighted) of the accuracy on each client's *own* test
  split of the model that client would use: the global model it received (weight-sharing strategies)
  or its own model (personal strategies). It is the mean of the last evaluated round's per-node
  ``accuracy`` rows of split ``test`` (the clients' evaluate replies), so it needs
  ``strategy.fraction_evaluate > 0`` (``None`` otherwise). :func:`metric_summary` writes it for every run.

**Personalised evaluation** (no global model to evaluate on the server): every client evaluates *its
own* model on its own test split (``loss``, ``accuracy``) and on the server's test set
(``global_loss``, ``global_accuracy``); those replies land per node in metrics.csv (split "test").
:class:`PersonalStrategy` then records, per round, under node ``server`` (split "test"):
``personal_accuracy_mean/min/max`` and ``personal_global_accuracy_mean/min/max`` (plus the matching
``_loss_mean``), and ``accuracy``/``loss`` = the clients' mean on the server test set. summary.json of a
personal strategy also keeps ``personal_accuracy_mean`` (= ``personal_accuracy``) and
``personal_global_accuracy_mean`` (= ``accuracy``) for existing callers.

Use it: subclass :class:`PersonalStrategy`, build the per-node train messages in ``configure_train``,
and pass ``strategy.evaluate_fn`` as the StrategySpec's ``evaluate_fn``; the client side derives from
``fedkd.clients.personal.PersonalClient`` (own model in ``Context.state``, evaluation done for you), or
replies to evaluate messages with ``accuracy`` (own test split) and ``global_accuracy`` (server test set).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedkd import keys

# (client metric, server metric prefix)
PERSONAL_METRICS = (
    (keys.ACCURACY, "personal_accuracy"),
    (keys.GLOBAL_ACCURACY, "personal_global_accuracy"),
)
PERSONAL_LOSSES = ((keys.LOSS, "personal_loss"), (keys.GLOBAL_LOSS, "personal_global_loss"))


def personal_stats(client_metrics: list[dict]) -> dict[str, float]:
    """Mean/min/max over clients of their own models' accuracy (own test split, global test set)."""
    out: dict[str, float] = {}
    for key, name in PERSONAL_METRICS:
        vals = np.array([float(m[key]) for m in client_metrics if key in m])
        if len(vals):
            out.update({f"{name}_mean": float(vals.mean()), f"{name}_min": float(vals.min()), f"{name}_max": float(vals.max())})
    for key, name in PERSONAL_LOSSES:
        vals = np.array([float(m[key]) for m in client_metrics if key in m])
        if len(vals):
            out[f"{name}_mean"] = float(vals.mean())
    if "personal_global_accuracy_mean" in out:
        out[keys.ACCURACY] = out["personal_global_accuracy_mean"]
        out[keys.LOSS] = out.get("personal_global_loss_mean", float("nan"))
    return out


def mean_metrics(replies: list[Message]) -> MetricRecord | None:
    """Example-weighted mean of the scalar train metrics of the replies (lists are skipped)."""
    if not replies:
        return None
    recs = [dict(r.content[keys.METRICS]) for r in replies]
    w = np.array([float(m.get(keys.NUM_EXAMPLES, 1)) for m in recs])
    w = w / w.sum() if w.sum() > 0 else np.full(len(recs), 1.0 / len(recs))
    names = {k for m in recs for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return MetricRecord({k: float(sum(wi * float(m[k]) for wi, m in zip(w, recs) if k in m)) for k in sorted(names)})


class PersonalStrategy(FedAvg):
    """FedAvg's sampling, with no global weights: clients keep their own models.

    - ``configure_evaluate`` sends no arrays (the client evaluates its own model).
    - ``aggregate_evaluate`` turns the replies into :func:`personal_stats`, kept per round for
      :meth:`evaluate_fn` (Flower's ``start`` calls it right after ``aggregate_evaluate``).
    - ``aggregate_train`` averages metrics only; subclasses aggregate their knowledge (logits) on top.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.personal: dict[int, dict[str, float]] = {}

    # -- helpers for subclasses
    def sample(self, server_round: int, config: ConfigRecord, grid: Grid) -> tuple[list[int], ConfigRecord]:
        """The nodes FedAvg would sample for training, and a copy of ``config`` with the round set."""
        probe = super().configure_train(server_round, ArrayRecord(), ConfigRecord(dict(config)), grid)
        probe = list(probe)
        conf = ConfigRecord({**dict(config), keys.SERVER_ROUND: server_round})
        return [m.metadata.dst_node_id for m in probe], conf

    def message(self, node_id: int, config: ConfigRecord, arrays: ArrayRecord | None = None, message_type: str = MessageType.TRAIN) -> Message:
        content = RecordDict({self.arrayrecord_key: arrays if arrays is not None else ArrayRecord(), self.configrecord_key: config})
        return Message(content=content, message_type=message_type, dst_node_id=node_id)

    @staticmethod
    def valid(replies: Iterable[Message]) -> list[Message]:
        return [r for r in replies if not r.has_error()]

    # -- Strategy API
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        nodes, conf = self.sample(server_round, config, grid)
        return [self.message(n, conf) for n in nodes]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return None, mean_metrics(self.valid(replies))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return super().configure_evaluate(server_round, ArrayRecord(), config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        stats = personal_stats([dict(r.content[keys.METRICS]) for r in self.valid(replies)])
        self.personal[server_round] = stats
        return MetricRecord(stats) if stats else None

    def evaluate_fn(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """The server's per-round rows: this round's personal statistics (none before round 1)."""
        stats = self.personal.get(server_round)
        return MetricRecord(stats) if stats else None


def client_accuracy(recorder) -> tuple[int, float] | None:
    """(round, unweighted mean over clients of their test-split ``accuracy``) of the last round clients evaluated."""
    rows = [r for r in recorder.rows if r["node"] != "server" and r["split"] == "test" and r["metric"] == keys.ACCURACY]
    if not rows:
        return None
    last = max(r["round"] for r in rows)
    per_node = {r["node"]: r["value"] for r in rows if r["round"] == last}  # one reply per node and round
    return last, float(np.mean(list(per_node.values())))


def metric_summary(cfg, recorder) -> dict:
    """summary.json's ``personal_accuracy`` for every strategy (``accuracy`` comes from the server's rows)."""
    found = client_accuracy(recorder)
    return {"personal_accuracy": found[1] if found else None}


def personal_summary(cfg, recorder) -> dict:
    """summary.json fields: the last round's mean personal accuracies (only for personal strategies)."""
    out: dict = {}
    for _, name in PERSONAL_METRICS:
        rows = [r for r in recorder.rows if r["node"] == "server" and r["metric"] == f"{name}_mean"]
        if rows:
            out[f"{name}_mean"] = max(rows, key=lambda r: r["round"])["value"]
    return out


def _register_hook() -> None:
    from fedkd.server import SUMMARY_HOOKS

    for hook in (metric_summary, personal_summary):
        if hook not in SUMMARY_HOOKS:
            SUMMARY_HOOKS.append(hook)


_register_hook()
