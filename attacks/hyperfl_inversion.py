"""Gradient inversion against HyperFL (Guo et al., AAAI 2025): the server inverts through the hypernetwork.

What the server of a HyperFL run observes of a client (:class:`HyperFLObservation`): the hypernetwork phi_0 it sent
and the phi_1 it got back, the public architecture (target model, embedding and hidden sizes) and the training
settings it configured (``[hyperfl]``). It never sees the client's embedding v, its head, or the generated weights.
The paper attacks HyperFL with IG (and ROG) and publishes no attack code; we read its threat model as: the attacker
matches the hypernetwork's update, so it must differentiate through h(v; phi) into the target network, without v and
the head. Two adaptations, one per attack of fedkd (both Inverting Gradients' machinery: cosine distance, TV, Adam on
the sign of the image gradient, pixels boxed to [0, 1], lr x0.1 at 3/8, 5/8, 7/8, batched restarts):

- ``hyperfl-ig``: the unknowns are the attacker's best guess, one draw per restart from their public initialisation
  (v ~ N(0, 1), the head U(+-1/sqrt(fan_in))), held fixed; the images (and soft labels) are optimised.
- ``hyperfl-dia``: the Dropout Inversion Attack's principle (optimise what the client drew privately together with
  the data) applied to HyperFL's private parts: v and the head are optimised jointly with the images and labels
  (plain Adam for them, unboxed). HyperFL's CNN has no dropout layer, so there are no masks.

- ``hyperfl-rank1`` (fedkd's own, not in the paper; ``gradient`` setting only): one hypernetwork step gives the
  generated weights away. Every head is linear in the shared hidden code z = mlp(v), so its bias gradient is
  c dL/dtheta_k and its weight gradient c dL/dtheta_k z^T, whatever the batch: z (least squares over the heads), the
  client's private body theta = W z + b and c dL/dtheta follow exactly (:func:`recover_generated`); then IG on the
  target with that body, matching c dL/dtheta, the head still unknown and optimised.

Labels: iDLG's rule needs the classifier's gradient, which HyperFL keeps private, so both attacks optimise soft
labels (logits, DLG's treatment); the reported guess is their argmax (meaningful only up to the unknown head).

Settings, as for the other attacks: ``gradient`` (the attacked client ran one head step and ONE hypernetwork step on
one batch: the target is ``(phi_0 - phi_1) / lr - wd phi_0``, the clipped gradient; cosine ignores the clip's scale)
and ``update`` (its whole stage 2: ``local_epochs`` x ceil(N / batch) steps of SGD with momentum, weight decay and the
grad-norm clip on phi and on v, replayed exactly, v updated along; stage 1 only changes the head, which the attack
treats as unknown anyway).

Deviations from the paper, said plainly: its attack settings (restarts, steps, TV, how it handled the unknown v and
head) are not published; the two variants above bracket them (a guessed vs an optimised embedding and head).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad
from torch.nn import functional as F

from fedkd.hyper_local import hyperfl_local_update
from fedkd.hypernet import HyperFLHypernet, HyperFLModel, classifier_names, run_target, target_shapes
from fedkd.models import build_model

from . import ATTACKS, AttackEntry
from .gradients import Reconstruction, cosine_distance, signed_adam, total_variation
from .observation import OBSERVATION_BUILDERS, OBSERVATION_KINDS, KnownTraining, Observation, ObservationError


@dataclass(frozen=True)
class HyperFLObservation(Observation):
    """What the server sees of one HyperFL client in one round. ``global_state``/``reply_state`` are the
    hypernetwork's parameters (sent / returned); ``model_name`` is the public target architecture."""

    embed_dim: int = 64
    hidden_dim: int = 128
    clip: float = 50.0  # the stage-2 grad-norm clip the server configured

    kind = "hyperfl"

    def build_model(self) -> nn.Module:
        raise ObservationError("a HyperFL observation holds hypernetwork parameters, not a model's weights")

    def target(self) -> nn.Module:
        """The public target architecture (its weights are irrelevant: the attack supplies every tensor)."""
        return build_model(self.model_name, self.input_shape, self.num_classes, hidden=self.model_hidden)

    def require(self, attack: str, *, reply: bool = True, setting: str | None = None) -> None:
        if not attack.startswith("hyperfl"):
            raise ObservationError(f"{attack}: client {self.partition_id} round {self.server_round} is a HyperFL observation (hypernetwork parameters); use hyperfl-ig or hyperfl-dia")
        super().require(attack, reply=reply, setting=setting)


OBSERVATION_KINDS[HyperFLObservation.kind] = HyperFLObservation


class HyperFLReplay:
    """A differentiable re-run of the client's hypernetwork stage on dummy images, labels, embedding and head."""

    def __init__(self, obs: HyperFLObservation, device) -> None:
        self.obs = obs
        self.device = torch.device(device)
        target = obs.target()
        self.head_names = classifier_names(target)
        self.head_shapes = {n: target.get_parameter(n).shape for n in self.head_names}
        self.hnet = HyperFLHypernet(target_shapes(target, exclude=self.head_names), obs.embed_dim, obs.hidden_dim).to(self.device)
        self.skeleton = target.to(self.device)
        self.names = [n for n, _ in self.hnet.named_parameters()]
        if set(self.names) != set(obs.global_state):
            raise ObservationError(f"hypernetwork parameters {sorted(obs.global_state)[:3]}... do not match the architecture {obs.model_name!r}")
        self.phi0 = {n: obs.global_state[n].to(self.device).float() for n in self.names}
        phi1 = {n: obs.reply_state[n].to(self.device).float() for n in self.names}
        t = obs.training
        wd = t.weight_decay if t.setting == "gradient" else 0.0
        self.target = [(self.phi0[n] - phi1[n]) / t.lr - wd * self.phi0[n] for n in self.names]
        n = t.num_examples
        self.batches = [(0, n)] if t.setting == "gradient" else [(s, min(s + t.batch_size, n)) for _ in range(t.local_epochs) for s in range(0, n, t.batch_size)]

    @property
    def num_examples(self) -> int:
        return self.obs.training.num_examples

    def head_dict(self, head: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        return dict(zip(self.head_names, head))

    def _loss(self, phi: dict, v: torch.Tensor, head: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        generated = functional_call(self.hnet, phi, (v,))
        return F.cross_entropy(run_target(self.skeleton, {**generated, **head}, x, False), y)  # y: (b, K) probabilities; dropout off

    def _clip(self, g: dict) -> dict:
        norm = torch.sqrt(sum((t * t).sum() for t in g.values()))
        coef = torch.clamp(self.obs.clip / (norm + 1e-6), max=1.0)  # torch.nn.utils.clip_grad_norm_
        return {k: t * coef for k, t in g.items()}

    def __call__(self, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor, head: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        """The client's hypernetwork gradient (``gradient``) or stage-2 update / lr (``update``) on dummy data."""
        t = self.obs.training
        hd = self.head_dict(head)
        if t.setting == "gradient":
            g = grad(self._loss)(self.phi0, v, hd, x, y)
            return [g[n] for n in self.names]
        p, e, buf, ebuf = dict(self.phi0), v, None, None
        for s, end in self.batches:
            gp, ge = grad(self._loss, argnums=(0, 1))(p, e, hd, x[s:end], y[s:end])
            gp = self._clip(gp)
            ge = ge * torch.clamp(self.obs.clip / (ge.norm() + 1e-6), max=1.0)
            gp = {n: gp[n] + t.weight_decay * p[n] for n in self.names}
            ge = ge + t.weight_decay * e
            if buf is None or t.momentum == 0:
                buf, ebuf = gp, ge
            else:
                buf = {n: t.momentum * buf[n] + gp[n] for n in self.names}
                ebuf = t.momentum * ebuf + ge
            p = {n: p[n] - t.lr * buf[n] for n in self.names}
            e = e - t.lr * ebuf
        return [(self.phi0[n] - p[n]) / t.lr for n in self.names]

    def draw_unknowns(self, restarts: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """(R, E) embeddings ~ N(0, 1) and (R, *shape) head tensors ~ U(+-1/sqrt(fan_in)): the public inits."""
        v = torch.randn((restarts, self.obs.embed_dim), generator=generator)
        fan_in = self.head_shapes[self.head_names[0]][-1]
        bound = 1.0 / math.sqrt(fan_in)
        head = [(torch.rand((restarts, *s), generator=generator) * 2 - 1) * bound for s in self.head_shapes.values()]
        return tuple(t.to(self.device) for t in (v, *head))


@dataclass(frozen=True)
class HyperFLIGParams:
    steps: int = 4800  # as ig
    restarts: int = 4
    lr: float = 0.1
    tv: float = 1e-6  # ig's weight
    batched: bool = True


@dataclass(frozen=True)
class HyperFLDIAParams:
    steps: int = 4800  # as dia
    restarts: int = 4
    lr: float = 0.1
    tv: float = 1e-5  # dia's weight
    batched: bool = True


def _invert(obs: Observation, params, name: str, optimise_unknowns: bool, device, seed: int) -> Reconstruction:
    if not isinstance(obs, HyperFLObservation):
        raise ObservationError(f"{name}: needs a HyperFL observation (the hypernetwork a HyperFL client returned), got {type(obs).__name__}")
    obs.require(name)
    replay = HyperFLReplay(obs, device)
    n, k = replay.num_examples, obs.num_classes
    nh = len(replay.head_names)

    def objective(x, extras):
        v, head, ylog = extras[0], extras[1 : 1 + nh], extras[1 + nh]
        if not optimise_unknowns:  # hyperfl-ig: the guessed embedding and head stay as drawn
            v, head = v.detach(), tuple(h.detach() for h in head)
        y = torch.softmax(ylog, -1)
        return cosine_distance(replay(x, y, v, head), replay.target) + params.tv * total_variation(x)

    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand((params.restarts, n, *obs.input_shape), generator=g).to(replay.device)  # (R, N, C, H, W)
    unknowns = replay.draw_unknowns(params.restarts, g)  # (R, E), (R, K, F), (R, K)
    labels0 = torch.randn((params.restarts, n, k), generator=g).to(replay.device)  # (R, N, K) soft-label logits
    x, extras, losses = signed_adam(objective, x0, (*unknowns, labels0), steps=params.steps, lr=params.lr, batched=params.batched, box_extras=False)
    best = int(torch.argmin(torch.nan_to_num(losses, nan=float("inf"))))
    labels = extras[-1][best].argmax(-1).cpu()
    return Reconstruction(x[best].detach().cpu(), labels, float(losses[best]), [float(v) for v in losses])


def hyperfl_ig(obs: Observation, params: HyperFLIGParams, device="cpu", seed: int = 0) -> Reconstruction:
    return _invert(obs, params, "hyperfl-ig", False, device, seed)


def hyperfl_dia(obs: Observation, params: HyperFLDIAParams, device="cpu", seed: int = 0) -> Reconstruction:
    return _invert(obs, params, "hyperfl-dia", True, device, seed)


def recover_generated(obs: HyperFLObservation, device="cpu") -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """fedkd's own analysis (not in the paper), ``gradient`` setting: the hypernetwork's update gives away the
    client's generated weights and their gradient. Each head k is linear in the shared hidden code z = mlp(v), so its
    clipped gradient is ``c dL/dtheta_k`` for the bias and ``c dL/dtheta_k z^T`` for the weight, whatever the batch:
    z is the least-squares solution over all heads, theta_k = W_k z + b_k with the phi_0 the server sent, and
    ``c dL/dtheta_k`` is read off the bias. Returns (theta, c dL/dtheta), both name -> tensor of the target's body."""
    if obs.training.setting != "gradient":
        raise ObservationError("hyperfl-rank1: needs a 'gradient' observation (one hypernetwork step); over several steps z moves")
    replay = HyperFLReplay(obs, device)
    grads = dict(zip(replay.names, replay.target))  # the clipped gradient c * dL/dphi
    heads = {k: f"heads.linear.{k.replace('.', '_')}" for k in replay.hnet.shapes}  # generated tensor -> its head
    u = {k: grads[f"{h}.bias"] for k, h in heads.items()}  # c dL/dtheta_k, flattened (numel_k,)
    z = sum(grads[f"{h}.weight"].T @ u[k] for k, h in heads.items()) / sum((u[k] ** 2).sum() for k in heads)  # (hidden,)
    theta = {k: (replay.phi0[f"{h}.weight"] @ z + replay.phi0[f"{h}.bias"]).view(replay.hnet.shapes[k]) for k, h in heads.items()}
    return theta, {k: u[k].view(replay.hnet.shapes[k]) for k in heads}


@dataclass(frozen=True)
class HyperFLRank1Params:
    steps: int = 4800  # as ig
    restarts: int = 4
    lr: float = 0.1
    tv: float = 1e-6
    batched: bool = True


def hyperfl_rank1(obs: Observation, params: HyperFLRank1Params, device="cpu", seed: int = 0) -> Reconstruction:
    """IG on the recovered generated body: match ``c dL/dtheta`` (cosine) with the images, soft labels and the
    private head optimised together (the head is still unknown). See :func:`recover_generated`."""
    if not isinstance(obs, HyperFLObservation):
        raise ObservationError(f"hyperfl-rank1: needs a HyperFL observation, got {type(obs).__name__}")
    obs.require("hyperfl-rank1", setting="gradient")
    dev = torch.device(device)
    theta, dtheta = recover_generated(obs, dev)
    names = list(theta)
    target = [dtheta[n] for n in names]
    skeleton = obs.target().to(dev)
    head_names = classifier_names(skeleton)

    def body_grad(th, head, x, y):
        return F.cross_entropy(run_target(skeleton, {**th, **head}, x, False), y)

    n, k = obs.training.num_examples, obs.num_classes

    def objective(x, extras):
        head, ylog = dict(zip(head_names, extras[:-1])), extras[-1]
        g = grad(body_grad)(theta, head, x, torch.softmax(ylog, -1))
        return cosine_distance([g[m] for m in names], target) + params.tv * total_variation(x)

    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand((params.restarts, n, *obs.input_shape), generator=g).to(dev)
    fan_in = skeleton.get_parameter(head_names[0]).shape[-1]
    bound = 1.0 / math.sqrt(fan_in)
    heads = tuple(((torch.rand((params.restarts, *skeleton.get_parameter(h).shape), generator=g) * 2 - 1) * bound).to(dev) for h in head_names)
    labels0 = torch.randn((params.restarts, n, k), generator=g).to(dev)
    x, extras, losses = signed_adam(objective, x0, (*heads, labels0), steps=params.steps, lr=params.lr, batched=params.batched, box_extras=False)
    best = int(torch.argmin(torch.nan_to_num(losses, nan=float("inf"))))
    return Reconstruction(x[best].detach().cpu(), extras[-1][best].argmax(-1).cpu(), float(losses[best]), [float(v) for v in losses])


ATTACKS.add("hyperfl-ig", AttackEntry(hyperfl_ig, HyperFLIGParams, "IG through HyperFL's hypernetwork, embedding and head guessed from their inits"))
ATTACKS.add("hyperfl-dia", AttackEntry(hyperfl_dia, HyperFLDIAParams, "IG through HyperFL's hypernetwork, embedding and head optimised with the images (DIA's principle)"))
ATTACKS.add("hyperfl-rank1", AttackEntry(hyperfl_rank1, HyperFLRank1Params, "fedkd's own: recover the generated weights from the rank-one hypernetwork gradient, then IG with the head unknown"))


# --------------------------------------------------------------------------- observations
def hyperfl_known_training(hp, setting: str, num_examples: int) -> KnownTraining:
    """The hypernetwork stage as the server configured it (``gradient``: one step on all N images)."""
    epochs, batch = (1, max(num_examples, 1)) if setting == "gradient" else (hp.hnet_epochs, hp.batch_size)
    return KnownTraining(setting=setting, lr=hp.hnet_lr, momentum=hp.hnet_momentum, weight_decay=hp.hnet_weight_decay,
                         local_epochs=epochs, batch_size=batch, num_examples=num_examples)


def hyperfl_local_observation(
    model: HyperFLModel,
    data,
    hp,
    *,
    model_name: str,
    setting: str = "gradient",
    generator: torch.Generator,
    server_round: int = 1,
    partition_id: int = 0,
) -> HyperFLObservation:
    """What a HyperFL server would observe if one client ran its local round on ``data`` (an ArrayDataset) from
    ``model`` (not modified): ``gradient``, one head step (none if ``hp.head_epochs`` is 0) and one hypernetwork
    step on all of ``data``; ``update``, the whole two-stage round with ``hp``. For tests and studies without a
    federation; ``generator`` draws the client's shuffles."""
    n = len(data)
    run_hp = dataclasses.replace(hp, head_epochs=min(hp.head_epochs, 1), hnet_epochs=1, batch_size=n) if setting == "gradient" else hp
    client = copy.deepcopy(model)
    before = model.shared_state()
    res = hyperfl_local_update(client, torch.from_numpy(data.x), torch.from_numpy(data.y), run_hp, generator=generator)
    return HyperFLObservation(
        server_round=server_round, partition_id=partition_id, model_name=model_name,
        input_shape=tuple(data.input_shape), num_classes=data.num_classes,
        training=hyperfl_known_training(hp, setting, res.num_examples),
        global_state=before, reply_state=client.shared_state(), defence="hyperfl",
        metrics={"num-examples": float(res.num_examples)},
        embed_dim=hp.embed_dim, hidden_dim=hp.hidden_dim, clip=hp.clip,
    )


def hyperfl_observation(cfg, server_round: int, partition_id: int, model_name: str, sent, reply) -> HyperFLObservation:
    """The recorder's builder for ``strategy.name = "hyperfl"``: the hypernetwork sent and returned."""
    from fedkd import keys
    from fedkd.data import load_federation

    fed = load_federation(cfg.data, cfg.run.seed)  # public shapes only
    metrics = {k: float(v) for rec in reply.content.metric_records.values() for k, v in rec.items() if isinstance(v, (int, float))}
    rec = reply.content.array_records.get(keys.ARRAYS)
    return HyperFLObservation(
        server_round=server_round, partition_id=partition_id, model_name=model_name,
        input_shape=tuple(fed.input_shape), num_classes=fed.num_classes,
        training=hyperfl_known_training(cfg.hyperfl, cfg.attack.setting, int(metrics.get(keys.NUM_EXAMPLES, 0))),
        global_state={k: v.clone() for k, v in sent.content[keys.ARRAYS].to_torch_state_dict().items()},
        reply_state=None if rec is None else {k: v.clone() for k, v in rec.to_torch_state_dict().items()},
        model_hidden=tuple(cfg.model.hidden) if model_name == "mlp" else None,
        defence="hyperfl", metrics=metrics, experiment=cfg.to_json(),
        embed_dim=cfg.hyperfl.embed_dim, hidden_dim=cfg.hyperfl.hidden_dim, clip=cfg.hyperfl.clip,
    )


OBSERVATION_BUILDERS["hyperfl"] = hyperfl_observation
