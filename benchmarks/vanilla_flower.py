"""A plain Flower app, written the way Flower's quickstart writes one, for benchmarks/throughput.py.

ClientApp: read the partition id from the node config, load the partition, build the model, load
the received weights, train, reply with the weights. ServerApp: FedAvg.start on the Grid Flower's
run_simulation provides. The local training is fedkd.training.train, the same function fedkd's
clients use, so the comparison measures the runtimes, not two training loops.
"""

from __future__ import annotations

import json
import time

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedkd.config import config_from_json
from fedkd.data import load_federation
from fedkd.models import model_from_config
from fedkd.training import train

app = ClientApp()


@app.train()
def train_fn(msg: Message, context: Context) -> Message:
    cfg = config_from_json(str(msg.content["config"]["experiment"]))
    pid = int(context.node_config["partition-id"])
    fed = load_federation(cfg.data, cfg.run.seed)
    model = model_from_config(cfg.model, pid, fed.input_shape, fed.num_classes)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    t = cfg.train
    res = train(model, fed.clients[pid].train, epochs=t.local_epochs, batch_size=t.batch_size, lr=t.lr, momentum=t.momentum, seed=pid)
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord({"train_loss": res.loss, "num-examples": res.num_examples})})
    return Message(content=content, reply_to=msg)


def make_server_app(cfg, timings: dict) -> ServerApp:
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        fed = load_federation(cfg.data, cfg.run.seed)
        model = model_from_config(cfg.model, 0, fed.input_shape, fed.num_classes)
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=cfg.data.num_clients, min_train_nodes=cfg.data.num_clients)

        def mark(server_round: int, arrays: ArrayRecord):
            timings.setdefault("marks", []).append(time.perf_counter())
            return None

        strategy.start(
            grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=cfg.run.rounds,
            train_config=ConfigRecord({"experiment": cfg.to_json()}), evaluate_fn=mark,
        )

    return server


def run(cfg) -> float:
    """Seconds from the end of round 0's (empty) evaluation to the end of the last round."""
    import logging

    from flwr.simulation import run_simulation

    logging.getLogger("flwr").setLevel(logging.WARNING)
    timings: dict = {}
    run_simulation(
        server_app=make_server_app(cfg, timings), client_app=app, num_supernodes=cfg.data.num_clients,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"logging_level": "ERROR"}},
    )
    marks = timings.get("marks", [])
    if len(marks) != cfg.run.rounds + 1:
        raise RuntimeError(f"vanilla Flower run finished {max(len(marks) - 1, 0)} of {cfg.run.rounds} rounds")
    return marks[-1] - marks[0]
