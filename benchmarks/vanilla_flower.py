"""A plain Flower app, written the way Flower's quickstart writes one, for benchmarks/throughput.py.

ClientApp: read the partition id from the node config, load the partition, build the model, load
the received weights, train, reply with the weights. ServerApp: FedAvg.start on the Grid Flower's
run_simulation provides. The local training is fedkd.training.train, the same function fedkd's
clients use, so the comparison measures the runtimes, not two training loops.

As a whole command (``python benchmarks/vanilla_flower.py``, what ``throughput.py --whole`` times) it runs
the default experiment as ``fedkd run`` does: train and evaluate every client every round, and
evaluate the global model on the server's test set.
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
from fedkd.training import evaluate, train

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


@app.evaluate()
def evaluate_fn(msg: Message, context: Context) -> Message:
    cfg = config_from_json(str(msg.content["config"]["experiment"]))
    pid = int(context.node_config["partition-id"])
    fed = load_federation(cfg.data, cfg.run.seed)
    model = model_from_config(cfg.model, pid, fed.input_shape, fed.num_classes)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    loss, acc = evaluate(model, fed.clients[pid].test)
    content = RecordDict({"metrics": MetricRecord({"loss": loss, "accuracy": acc, "num-examples": len(fed.clients[pid].test)})})
    return Message(content=content, reply_to=msg)


def make_server_app(cfg, timings: dict, central_eval: bool = False) -> ServerApp:
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        fed = load_federation(cfg.data, cfg.run.seed)
        model = model_from_config(cfg.model, 0, fed.input_shape, fed.num_classes)
        n, fe = cfg.data.num_clients, cfg.strategy.fraction_evaluate
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=fe, min_available_nodes=n, min_train_nodes=n, min_evaluate_nodes=n if fe > 0 else 0)

        def mark(server_round: int, arrays: ArrayRecord):
            timings.setdefault("marks", []).append(time.perf_counter())
            if not central_eval:
                return None
            m = model_from_config(cfg.model, 0, fed.input_shape, fed.num_classes)
            m.load_state_dict(arrays.to_torch_state_dict())
            loss, acc = evaluate(m, fed.server_test)
            timings["accuracy"] = acc
            return MetricRecord({"loss": loss, "accuracy": acc})

        conf = ConfigRecord({"experiment": cfg.to_json()})
        strategy.start(
            grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=cfg.run.rounds,
            train_config=conf, evaluate_config=conf, evaluate_fn=mark,
        )

    return server


def run(cfg, central_eval: bool = False, timings: dict | None = None) -> float:
    """Seconds from the end of round 0's evaluation to the end of the last round."""
    import logging

    from flwr.simulation import run_simulation

    logging.getLogger("flwr").setLevel(logging.WARNING)
    timings = {} if timings is None else timings
    run_simulation(
        server_app=make_server_app(cfg, timings, central_eval), client_app=app, num_supernodes=cfg.data.num_clients,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"logging_level": "ERROR"}},
    )
    marks = timings.get("marks", [])
    if len(marks) != cfg.run.rounds + 1:
        raise RuntimeError(f"vanilla Flower run finished {max(len(marks) - 1, 0)} of {cfg.run.rounds} rounds")
    return marks[-1] - marks[0]


if __name__ == "__main__":  # the whole command, for throughput.py --whole
    import sys

    from fedkd.config import load_config

    paths = [a for a in sys.argv[1:] if "=" not in a]
    cfg = load_config(paths[0] if paths else None, [a for a in sys.argv[1:] if "=" in a])
    info: dict = {}
    rounds_s = run(cfg, central_eval=True, timings=info)
    print(f"vanilla flower: {cfg.run.rounds} rounds in {rounds_s:.2f}s, accuracy {info.get('accuracy', float('nan')):.4f}")
