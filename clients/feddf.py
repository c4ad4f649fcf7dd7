"""The FedDF client (Lin et al. 2020): local SGD on its group's model, weights back (as FedAvg).

The server sends either this client's group model or, when it does not know the client's
architecture yet, every group's weights packed as ``"<model name>/<parameter>"``
(see strategies/feddf.py); the client keeps the part named after its own ``model.name``.
DP-SGD and FedProx settings are honoured exactly as in the ``weights`` client.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Message

from fedkd import keys
from fedkd.models import model_from_config

from . import CLIENTS
from .base import ClientEnv
from .weights import WeightsClient


def own_arrays(arrays: ArrayRecord, model_name: str) -> ArrayRecord:
    """This architecture's weights from a packed (``name/param``) or a plain record."""
    if not any("/" in k for k in arrays.keys()):
        return arrays
    prefix = f"{model_name}/"
    mine = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
    if not mine:
        raise ValueError(f"the server sent no weights for architecture {model_name!r}")
    return ArrayRecord(mine)


@CLIENTS.register("feddf")
class FedDFClient(WeightsClient):
    def model(self, msg: Message, env: ClientEnv):
        fed = env.federation
        model = model_from_config(env.cfg.model, env.partition_id, fed.input_shape, fed.num_classes)
        model.load_state_dict(own_arrays(msg.content[keys.ARRAYS], env.model_name).to_torch_state_dict())
        return model
