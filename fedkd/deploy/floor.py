"""Flower's own floor for a deployed round: the exchange pattern of a fedkd round with apps that do nothing.

The ServerApp runs Flower's ``FedAvg`` over every connected SuperNode, one train and one evaluate exchange per
round (what a fedkd FedAvg round with client evaluation does, before one-exchange rounds), on a 10-float
model; the ClientApp sends the received arrays back and reports one example. What a round costs here is
what Flower's deployment runtime costs by itself: polling, one ClientApp process per message, the wire.
``benchmarks/deploy_speed.py`` compares fedkd's deployed rounds against it.

This module imports only Flower and numpy (``fedkd`` and ``fedkd.deploy`` import nothing heavy), so its
ClientApp process pays no more start-up than Flower's. Run config: ``rounds``, ``nodes`` (how many SuperNodes
to wait for) and ``out`` (a JSON file the ServerApp writes its round times to).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "fedkd-floor"
version = "0.1.0"
description = "Flower's deployment floor: fedkd's exchange pattern with apps that do nothing"
dependencies = []

[tool.flwr.app]
publisher = "fedkd"

[tool.flwr.app.components]
serverapp = "fedkd.deploy.floor:server_app"
clientapp = "fedkd.deploy.floor:client_app"

[tool.flwr.app.config]
rounds = 3
nodes = 2
out = ""
"""


def stage(dest: Path) -> Path:
    """A folder holding the floor app's pyproject.toml, for ``flwr run`` (the code is the installed fedkd)."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "pyproject.toml").write_text(PYPROJECT)
    return dest


client_app = ClientApp()


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    content = RecordDict({"arrays": msg.content["arrays"], "metrics": MetricRecord({"num-examples": 1})})
    return Message(content=content, reply_to=msg)


@client_app.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    content = RecordDict({"metrics": MetricRecord({"num-examples": 1, "loss": 0.0})})
    return Message(content=content, reply_to=msg)


server_app = ServerApp()


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
    rounds, nodes = int(context.run_config["rounds"]), int(context.run_config["nodes"])
    out = str(context.run_config.get("out", "") or "")
    strategy = FedAvg(
        fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=nodes, min_evaluate_nodes=nodes,
        min_available_nodes=nodes,
    )  # fmt: skip
    marks: list[float] = []

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> None:  # called before round 1 and after each round
        marks.append(time.perf_counter())
        if server_round > 0:
            print(f"fedkd floor: round {server_round} {marks[-1] - marks[-2]:.3f} s", flush=True)
        return None

    strategy.start(
        grid=grid, initial_arrays=ArrayRecord([np.zeros(10, dtype=np.float32)]), num_rounds=rounds,
        evaluate_fn=evaluate_fn,
    )  # fmt: skip
    round_s = [b - a for a, b in zip(marks, marks[1:])]
    if out:
        Path(out).write_text(json.dumps({"rounds": rounds, "nodes": nodes, "round_s": round_s}) + "\n")
