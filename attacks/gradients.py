"""Shared machinery of the gradient-inversion attacks (dlg, idlg, ig, dia).

- :func:`observed_target`: what the attack matches, from an observation alone. ``gradient``
  setting: the client took one SGD step, so ``grad = (w_old - w_new) / lr - weight_decay * w_old``
  (SGD's first momentum step equals the gradient). ``update`` setting: ``(w_old - w_new) / lr``.
- :class:`Replay`: a differentiable re-run of the client's local training on dummy data
  (``torch.func``): the gradient at the global weights, or the known number of SGD steps with the
  known lr, momentum, weight decay and proximal term (Geiping et al.'s FedAvg attack). The client
  reshuffles its data every epoch and the server never sees the order: without it (the default) the
  replay assumes the same consecutive mini-batches every epoch, which is wrong from the second epoch
  on whenever a batch holds fewer than all the images; an oracle attacker is given the order
  (``KnownTraining.batch_order``; :func:`find_batch_order` recovers it for the evaluation side).
- :func:`infer_labels`: iDLG's analytic label (rows of the last layer's weight gradient with a
  negative sum); exact for one image, a heuristic for several.
- loss terms (cosine distance, Euclidean distance, total variation) and :func:`signed_adam`, the
  batched optimiser of Inverting Gradients (restarts vmapped into one optimisation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, grad_and_value, vmap
from torch.nn import functional as F

from .observation import Observation


@dataclass
class Reconstruction:
    images: torch.Tensor  # (N, C, H, W) in [0, 1], CPU
    labels: torch.Tensor  # (N,) int64, the attack's label guess
    loss: float  # the attack's final objective (best restart)
    restart_losses: list[float]


class MaskedDropout(nn.Module):
    """Dropout with an explicit mask (a buffer replaced per call through ``functional_call``)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.register_buffer("mask", torch.ones(1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask / (1.0 - self.p)


def observed_target(obs: Observation, names: list[str], device) -> list[torch.Tensor]:
    t = obs.training
    w0 = {n: obs.global_state[n].to(device).float() for n in names}
    w1 = {n: obs.reply_state[n].to(device).float() for n in names}
    if t.setting == "gradient":
        return [(w0[n] - w1[n]) / t.lr - t.weight_decay * w0[n] for n in names]
    return [(w0[n] - w1[n]) / t.lr for n in names]


def last_weight_index(params: list[torch.Tensor]) -> int:
    """Index of the classifier's weight: the last 2-D parameter (K, F)."""
    idx = [i for i, p in enumerate(params) if p.ndim == 2]
    if not idx:
        raise ValueError("the model has no linear classifier layer")
    return idx[-1]


def infer_labels(target: list[torch.Tensor], n: int) -> torch.Tensor:
    """Labels from the sign of the last layer's weight-gradient row sums (iDLG; Zhao et al. 2020).

    With cross-entropy and non-negative features (sigmoid/ReLU outputs), the row of a present class
    sums negative. One image: argmin of the row sums (exact). Several: the negative rows, most
    negative first, repeated cyclically when fewer classes than images are negative.
    """
    sums = target[last_weight_index(target)].sum(dim=1).detach().cpu()  # (K,)
    order = torch.argsort(sums)
    neg = [int(k) for k in order if sums[k] < 0] or [int(order[0])]
    return torch.tensor([neg[i % len(neg)] for i in range(n)], dtype=torch.long)


class Replay:
    """Re-runs what the client did, differentiably in the dummy inputs (and dropout masks)."""

    def __init__(self, obs: Observation, device, masked_dropout: bool = False) -> None:
        self.obs = obs
        self.device = torch.device(device)
        model = obs.build_model()
        self.dropout_layers: dict[str, float] = {}
        if masked_dropout:
            for name, mod in list(model.named_modules()):
                if isinstance(mod, nn.Dropout):
                    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
                    setattr(parent, name.rpartition(".")[2], MaskedDropout(mod.p))
                    self.dropout_layers[f"{name}.mask"] = mod.p
        self.model = model.to(self.device).eval()  # eval: plain nn.Dropout is the identity
        self.params = {n: p.detach() for n, p in self.model.named_parameters()}
        self.names = list(self.params)
        self.target = observed_target(obs, self.names, self.device)
        self.set_order(obs.training.batch_order)
        self.mask_shapes = self._mask_shapes() if self.dropout_layers else {}

    def set_order(self, orders) -> None:
        """The dummy images of each local step: ``orders`` (one permutation per epoch) split into mini-batches;
        ``None`` = unknown order: the same consecutive chunks every epoch."""
        t = self.obs.training
        n = t.num_examples
        if t.setting == "gradient":
            self.batches = [torch.arange(n, device=self.device)]
            return
        if orders is None:
            orders = [tuple(range(n))] * t.local_epochs
        if len(orders) != t.local_epochs or any(sorted(o) != list(range(n)) for o in orders):
            raise ValueError(f"batch order must be {t.local_epochs} permutations of range({n})")
        self.batches = [torch.tensor(o[s : s + t.batch_size], device=self.device) for o in orders for s in range(0, n, t.batch_size)]

    def _mask_shapes(self) -> dict[str, tuple]:
        shapes: dict[str, tuple] = {}
        hooks = []
        for key in self.dropout_layers:
            mod = self.model.get_submodule(key.rpartition(".")[0])
            hooks.append(mod.register_forward_pre_hook(lambda m, inp, key=key: shapes.__setitem__(key, tuple(inp[0].shape[1:]))))
        with torch.no_grad():
            self.model(torch.zeros(1, *self.obs.input_shape, device=self.device))
        for h in hooks:
            h.remove()
        return shapes

    @property
    def num_examples(self) -> int:
        return self.obs.training.num_examples

    def init_masks(self, restarts: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """One mask per dropout layer per local step, Bernoulli(1 - p): (R, N_step, *features) each."""
        out = []
        for idx in self.batches:
            for key, p in self.dropout_layers.items():
                shape = (restarts, len(idx), *self.mask_shapes[key])
                out.append(torch.bernoulli(torch.full(shape, 1.0 - p), generator=generator).to(self.device))
        return tuple(out)

    def _masks_of_step(self, masks: tuple, step: int) -> dict:
        k = len(self.dropout_layers)
        return dict(zip(self.dropout_layers, masks[step * k : (step + 1) * k])) if k else {}

    def _loss(self, params: dict, x: torch.Tensor, y: torch.Tensor, masks: dict) -> torch.Tensor:
        out = functional_call(self.model, {**params, **masks}, (x,))
        return F.cross_entropy(out, y)  # y: (b, K) probabilities (soft or one-hot)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, masks: tuple = ()) -> list[torch.Tensor]:
        """The client's gradient (``gradient``) or update / lr (``update``) on dummy ``x`` (N, C, H, W), ``y`` (N, K)."""
        t = self.obs.training
        if t.setting == "gradient":
            g = grad(self._loss)(self.params, x, y, self._masks_of_step(masks, 0))
            return [g[n] for n in self.names]
        p, buf = dict(self.params), None
        for step, idx in enumerate(self.batches):
            g = grad(self._loss)(p, x[idx], y[idx], self._masks_of_step(masks, step))
            g = {n: g[n] + t.weight_decay * p[n] + t.proximal_mu * (p[n] - self.params[n]) for n in self.names}
            buf = g if buf is None or t.momentum == 0 else {n: t.momentum * buf[n] + g[n] for n in self.names}
            p = {n: p[n] - t.lr * buf[n] for n in self.names}
        return [(self.params[n] - p[n]) / t.lr for n in self.names]


def epoch_orders(n: int, batch_size: int) -> list[tuple[int, ...]]:
    """Every distinct way one epoch can split ``range(n)`` into ordered mini-batches (order inside a batch is irrelevant)."""
    import itertools

    seen, out = set(), []
    for perm in itertools.permutations(range(n)):
        key = tuple(tuple(sorted(perm[s : s + batch_size])) for s in range(0, n, batch_size))
        if key not in seen:
            seen.add(key)
            out.append(tuple(i for chunk in key for i in chunk))
    return out


def find_batch_order(obs: Observation, true_x, true_y, device="cpu", limit: int = 20_000) -> tuple[tuple[int, ...], ...]:
    """The client's per-epoch mini-batch order: the one whose replay on the TRUE images comes closest
    (Euclidean) to the observed update. Evaluation side only (it needs the true data): it hands an
    oracle attacker the order a real server never sees. Exhaustive; refuses more than ``limit`` candidates."""
    import itertools

    from .observation import ObservationError

    t = obs.training
    if t.setting != "update" or t.local_epochs * -(-t.num_examples // t.batch_size) <= 1:
        return tuple(tuple(range(t.num_examples)) for _ in range(max(t.local_epochs, 1)))
    per_epoch = epoch_orders(t.num_examples, t.batch_size) if t.num_examples <= 8 else None
    if per_epoch is None or len(per_epoch) ** t.local_epochs > limit:
        raise ObservationError(f"order search: too many mini-batch orders for {t.num_examples} images, batch {t.batch_size}, {t.local_epochs} epochs")
    replay = Replay(obs, device)
    x = torch.as_tensor(true_x, dtype=torch.float32, device=replay.device)
    y = one_hot(torch.as_tensor(true_y, dtype=torch.long), obs.num_classes, replay.device)
    best, best_d = None, float("inf")
    with torch.no_grad():
        for combo in itertools.product(per_epoch, repeat=t.local_epochs):
            replay.set_order(combo)
            d = float(euclidean(replay(x, y), replay.target))
            if d < best_d:
                best, best_d = combo, d
    return tuple(best)


def cosine_distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """1 - <a, b> / (|a| |b|) over all layers at once (Inverting Gradients' similarity)."""
    dot = sum((x * y).sum() for x, y in zip(a, b))
    na = sum((x * x).sum() for x in a)
    nb = sum((y * y).sum() for y in b)
    return 1.0 - dot / (na.sqrt() * nb.sqrt() + 1e-12)


def euclidean(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """DLG's squared Euclidean distance between gradients."""
    return sum(((x - y) ** 2).sum() for x, y in zip(a, b))


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of neighbouring pixels, (..., H, W)."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def one_hot(labels: torch.Tensor, num_classes: int, device) -> torch.Tensor:
    return F.one_hot(labels, num_classes).float().to(device)


def signed_adam(objective, x0: torch.Tensor, extras0: tuple, *, steps: int, lr: float, batched: bool = True, box_extras: bool = True):
    """Inverting Gradients' optimiser over R independent restarts: Adam on the sign of the gradient
    of the images (plain gradient for ``extras`` such as dropout masks), images and extras boxed to
    [0, 1] (extras only when ``box_extras``; unknown weights are not), lr x0.1 at 3/8, 5/8 and 7/8 of the steps.

    ``objective(x (N, C, H, W), extras) -> scalar`` is one restart's loss. ``x0`` is (R, N, C, H, W)
    and each extra (R, ...). ``batched=True`` runs all restarts as one vmapped optimisation (Adam is
    elementwise, so this equals R separate runs); ``False`` runs them one after another.
    Returns (x (R, N, C, H, W), extras, final losses (R,)).
    """
    if not batched:
        outs = [signed_adam(objective, x0[r : r + 1], tuple(e[r : r + 1] for e in extras0), steps=steps, lr=lr, box_extras=box_extras) for r in range(len(x0))]
        x = torch.cat([o[0] for o in outs])
        extras = tuple(torch.cat([o[1][i] for o in outs]) for i in range(len(extras0)))
        return x, extras, torch.cat([o[2] for o in outs])
    x = x0.clone()
    extras = tuple(e.clone() for e in extras0)
    opt = torch.optim.Adam([x, *extras], lr=lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[steps * 3 // 8, steps * 5 // 8, steps * 7 // 8], gamma=0.1)
    step_fn = vmap(grad_and_value(objective, argnums=(0, 1)))
    for _ in range(steps):
        (gx, gext), _loss = step_fn(x, extras)
        x.grad = gx.sign()
        for e, g in zip(extras, gext):
            e.grad = g
        opt.step()
        sched.step()
        with torch.no_grad():
            x.clamp_(0.0, 1.0)
            for e in extras if box_extras else ():
                e.clamp_(0.0, 1.0)
    with torch.no_grad():
        losses = vmap(objective)(x, extras)
    return x, extras, losses
