"""The pFedHN and pFedHN-PC clients (Shamsian et al., ICML 2021; strategy ``strategies/pfedhn.py``).

Per train message: load the generated model theta_i the server sent (``model.name``), train it for
``pfedhn.inner_steps`` SGD steps, each on a fresh random batch of ``pfedhn.batch_size``
(:func:`fedkd.hyper_local.pfedhn_inner_update`, the authors' inner loop), and reply ``theta_new - theta_i`` of exactly
the tensors received. Batches and dropout masks come from OS entropy (:func:`fedkd.hyper_local.private_rng`).

pFedHN-PC: the server generates all but the target's last Linear; the client keeps that layer (its personal classifier)
and the momentum of its optimiser in ``Context.state[keys.STATE_PFEDHN_HEAD]`` (``momentum/<name>`` entries), trains
it in the same inner steps and never sends it. Its first value is drawn privately (nn.Linear's init, OS entropy).

Evaluation: the received theta_i (pFedHN-PC with the own last layer) on the client's own test split (``loss``,
``accuracy``) and on the server test set (``global_loss``, ``global_accuracy``).
"""

from __future__ import annotations

import math

import torch
from flwr.app import ArrayRecord, Context, Message
from torch import nn

from fedkd import keys
from fedkd.hyper_local import pfedhn_inner_update, private_rng
from fedkd.hypernet import classifier_names
from fedkd.models import model_from_config

from . import CLIENTS
from .base import ClientEnv, ClientLogic, reply
from .hyperfl import personal_eval

MOMENTUM = "momentum/"  # prefix of the personal layer's momentum buffers in STATE_PFEDHN_HEAD


def init_linear(params: dict[str, torch.Tensor], generator: torch.Generator) -> None:
    """nn.Linear's default initialisation (U(+-1/sqrt(fan_in)) for weight and bias), drawn from ``generator``."""
    fan_in = next(p for n, p in params.items() if n.endswith("weight")).shape[-1]
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        for p in params.values():
            p.copy_((torch.rand(p.shape, generator=generator) * 2 - 1) * bound)


@CLIENTS.register("pfedhn")
class PFedHNClient(ClientLogic):
    personal_head = False

    def model(self, msg: Message, context: Context, env: ClientEnv) -> tuple[nn.Module, dict[str, torch.Tensor] | None]:
        """The target with the received theta_i (pFedHN-PC: and the own last layer), and pFedHN-PC's momentum."""
        fed = env.federation
        model = model_from_config(env.cfg.model, env.partition_id, fed.input_shape, fed.num_classes)
        theta = msg.content[keys.ARRAYS].to_torch_state_dict()
        head = set(classifier_names(model)) if self.personal_head else set()
        expected = {k for k in model.state_dict() if k not in head}
        if set(theta) != expected:
            raise ValueError(f"received arrays {sorted(set(theta) ^ expected)[:3]} do not match the generated tensors")
        moms = None
        if head:
            rec = context.state.get(keys.STATE_PFEDHN_HEAD)
            if rec is None:
                named = dict(model.named_parameters())
                with private_rng() as g:
                    init_linear({k: named[k] for k in head}, g)
                own = {k: named[k].detach().clone() for k in head}
                context.state[keys.STATE_PFEDHN_HEAD] = ArrayRecord(own)
            else:
                saved = rec.to_torch_state_dict()
                own = {k: v for k, v in saved.items() if not k.startswith(MOMENTUM)}
                moms = {k.removeprefix(MOMENTUM): v for k, v in saved.items() if k.startswith(MOMENTUM)} or None
            theta.update(own)
        model.load_state_dict(theta)  # strict: every parameter accounted for
        return model.to(env.device), moms

    def train(self, msg: Message, context: Context, env: ClientEnv) -> Message:
        model, moms = self.model(msg, context, env)
        d = env.data.train
        with private_rng(env.device) as g:
            res = pfedhn_inner_update(model, torch.from_numpy(d.x), torch.from_numpy(d.y), env.cfg.pfedhn, generator=g,
                                      personal_head=self.personal_head, head_momentum=moms)
        if self.personal_head:
            own = {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k not in res.delta}
            context.state[keys.STATE_PFEDHN_HEAD] = ArrayRecord({**own, **{MOMENTUM + k: v for k, v in (res.head_momentum or {}).items()}})
        metrics = {keys.NUM_EXAMPLES: res.num_examples, keys.LOSS: res.loss, keys.ACCURACY: res.accuracy}
        return reply(msg, env, metrics, **{keys.ARRAYS: ArrayRecord(res.delta)})

    def evaluate(self, msg: Message, context: Context, env: ClientEnv) -> Message:
        return reply(msg, env, personal_eval(self.model(msg, context, env)[0], env))


@CLIENTS.register("pfedhn-pc")
class PFedHNPCClient(PFedHNClient):
    personal_head = True
