"""The HyperFL client (Guo et al., AAAI 2025; strategy ``strategies/hyperfl.py``): only the hypernetwork leaves it.

The client's private parts, its embedding v_i (``nn.Embedding(1, hyperfl.embed_dim)``) and its classifier head (the
last Linear of ``model.name``), live in ``Context.state[keys.STATE_HYPERFL]`` and never leave the client. Per train
message:

1. Load the received hypernetwork phi (exactly its tensors) and the private parts (first time: drawn from OS entropy,
   so the server cannot know them: HyperFL's defence against inversion rests on that).
2. The authors' two-stage round (:func:`fedkd.hyper_local.hyperfl_local_update`): ``hyperfl.head_epochs`` of the head
   on the generated feature extractor, then ``hyperfl.hnet_epochs`` of phi and v_i through the generated weights
   (grad-norm clip ``hyperfl.clip``). Shuffles and dropout masks come from OS entropy (:func:`private_rng`).
3. Reply: phi_i (the hypernetwork's state, nothing else) and metrics (``num-examples`` weights the server's average,
   ``loss``/``accuracy`` of stage 2, ``loss_head`` of stage 1). Keep v_i and the head.

Evaluation: the received (aggregated) hypernetwork with the client's own v_i and head, on the client's test split
(``loss``, ``accuracy``) and on the server test set (``global_loss``, ``global_accuracy``).

Attacks' ``gradient`` threat setting (``attack.rounds``/``attack.clients`` name this client and round): one head step
and ONE hypernetwork step on the attacked batch (``hyperfl.*`` epochs 1, batch = the batch), which is what
``fedkd.attacks.hyperfl_inversion`` assumes the server knows.
"""

from __future__ import annotations

import dataclasses

import torch
from flwr.app import ArrayRecord, Context, Message

from fedkd import keys
from fedkd.hyper_local import hyperfl_local_update, private_rng
from fedkd.hypernet import HyperFLModel, hyperfl_model
from fedkd.models import model_from_config
from fedkd.training import evaluate

from . import CLIENTS
from .base import ClientEnv, ClientLogic, reply


def personal_eval(model: torch.nn.Module, env: ClientEnv) -> dict:
    """The client's personalised model on its own test split and on the server test set (the personal metric keys)."""
    loss, acc = evaluate(model, env.data.test, env.device)
    gloss, gacc = evaluate(model, env.federation.server_test, env.device)
    return {keys.NUM_EXAMPLES: len(env.data.test), keys.LOSS: loss, keys.ACCURACY: acc, keys.GLOBAL_LOSS: gloss, keys.GLOBAL_ACCURACY: gacc}


def attacked_gradient_round(env: ClientEnv) -> bool:
    """Whether the attacks' ``gradient`` threat setting applies to this client's train message this round."""
    attack = getattr(env.cfg, "attack", None)
    return attack is not None and attack.setting == "gradient" and attack.records(env.server_round, env.partition_id)


def round_settings(env: ClientEnv):
    """This round's ``[hyperfl]`` settings: the experiment's, or one step per stage in the attacks' gradient setting."""
    hp = env.cfg.hyperfl
    if attacked_gradient_round(env):
        hp = dataclasses.replace(hp, head_epochs=min(hp.head_epochs, 1), hnet_epochs=1, batch_size=max(len(env.data.train), 1))
    return hp


@CLIENTS.register("hyperfl")
class HyperFLClient(ClientLogic):
    def model(self, msg: Message, context: Context, env: ClientEnv) -> HyperFLModel:
        """The received hypernetwork with this client's private embedding and head (drawn privately the first time)."""
        fed = env.federation
        target = model_from_config(env.cfg.model, env.partition_id, fed.input_shape, fed.num_classes)
        rec = context.state.get(keys.STATE_HYPERFL)
        if rec is None:
            with private_rng() as g:
                model = hyperfl_model(target, env.cfg.hyperfl, g)
            context.state[keys.STATE_HYPERFL] = ArrayRecord(model.private_state())
        else:
            model = hyperfl_model(target, env.cfg.hyperfl)
            private = rec.to_torch_state_dict()
            missing = model.load_state_dict(private, strict=False).missing_keys
            if set(missing) != {k for k in model.state_dict() if k.startswith("hypernet.")}:
                raise ValueError(f"the private HyperFL state does not fit this model (missing {missing[:3]})")
        model.hypernet.load_state_dict(msg.content[keys.ARRAYS].to_torch_state_dict())  # strict: exactly phi
        return model.to(env.device)

    def train(self, msg: Message, context: Context, env: ClientEnv) -> Message:
        model = self.model(msg, context, env)
        d = env.data.train
        with private_rng(env.device) as g:
            res = hyperfl_local_update(model, torch.from_numpy(d.x), torch.from_numpy(d.y), round_settings(env), generator=g)
        context.state[keys.STATE_HYPERFL] = ArrayRecord(model.private_state())
        metrics = {keys.NUM_EXAMPLES: res.num_examples, keys.LOSS: res.loss, keys.ACCURACY: res.accuracy, keys.LOSS_HEAD: res.loss_head}
        return reply(msg, env, metrics, **{keys.ARRAYS: ArrayRecord(model.shared_state())})

    def evaluate(self, msg: Message, context: Context, env: ClientEnv) -> Message:
        return reply(msg, env, personal_eval(self.model(msg, context, env), env))
