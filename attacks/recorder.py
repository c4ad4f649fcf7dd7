"""The server-side recorder: keeps the replies of chosen clients in chosen rounds as observations.

Registered in ``fedkd.server.OBSERVER_FACTORIES``; it is created only when the experiment's
``attack.rounds`` and ``attack.clients`` are set and the run has a directory. It sees exactly what
the server sees (the messages it sent, the replies it got) and writes
``<run_dir>/observations/round0001-client0000.pt`` per recorded reply.
"""

from __future__ import annotations

from pathlib import Path

from fedkd import keys
from fedkd.server import OBSERVER_FACTORIES

from .observation import Observation, decode_reply, describe_defence, known_training, observation_name


class ObservationRecorder:
    def __init__(self, cfg, run_dir: Path) -> None:
        self.cfg = cfg
        self.folder = Path(run_dir) / "observations"
        self.saved: list[Path] = []

    def __call__(self, server_round: int, sent: list, replies: list) -> None:
        a = self.cfg.attack
        if server_round not in a.rounds:
            return
        by_node = {m.metadata.dst_node_id: m for m in sent}
        for r in replies:
            if r.has_error() or not r.metadata.message_type.startswith("train"):
                continue
            node = r.content.config_records.get(keys.NODE)
            if node is None or int(node[keys.PARTITION_ID]) not in a.clients:
                continue
            msg = by_node.get(r.metadata.src_node_id)
            if msg is None or keys.ARRAYS not in msg.content.array_records:
                continue
            self.saved.append(self.observe(server_round, int(node[keys.PARTITION_ID]), str(node[keys.MODEL_NAME]), msg, r).save(
                self.folder / observation_name(server_round, int(node[keys.PARTITION_ID]))
            ))

    def observe(self, server_round: int, pid: int, model_name: str, msg, reply) -> Observation:
        from fedkd.data import load_federation

        from .observation import OBSERVATION_BUILDERS

        cfg = self.cfg
        builder = OBSERVATION_BUILDERS.get(cfg.strategy.name)
        if builder is not None:
            return builder(cfg, server_round, pid, model_name, msg, reply)
        fed = load_federation(cfg.data, cfg.run.seed)  # public shapes only: input shape, classes
        metrics = {k: float(v) for rec in reply.content.metric_records.values() for k, v in rec.items() if isinstance(v, (int, float))}
        conf = msg.content.config_records.get(keys.CONFIG)
        mu = float(conf.get(keys.PROXIMAL_MU, 0.0)) if conf is not None else 0.0
        return Observation(
            server_round=server_round,
            partition_id=pid,
            model_name=model_name,
            input_shape=tuple(fed.input_shape),
            num_classes=fed.num_classes,
            training=known_training(cfg, int(metrics.get(keys.NUM_EXAMPLES, 0)), mu),
            global_state={k: v.clone() for k, v in msg.content[keys.ARRAYS].to_torch_state_dict().items()},
            reply_state=decode_reply(reply.content, cfg, msg.content),
            model_hidden=tuple(cfg.model.hidden) if model_name == "mlp" else None,
            defence=describe_defence(cfg),
            metrics=metrics,
            experiment=cfg.to_json(),
        )


def observer_factory(cfg, run_dir):
    attack = getattr(cfg, "attack", None)
    if attack is None or not attack.active or run_dir is None:
        return None
    return ObservationRecorder(cfg, run_dir)


OBSERVER_FACTORIES.append(observer_factory)
