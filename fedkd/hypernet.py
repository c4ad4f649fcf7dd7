"""Hypernetworks that generate a client's weights: HyperFL (Guo et al., AAAI 2025) and pFedHN (Shamsian et al., ICML 2021).

Both generate the parameters of a *target* network from an embedding; the target is any fedkd model (``MODELS``)
without buffers. The papers' targets are registered here:

- ``hyperfl-cnn``: the CNN of HyperFL's code (``cnn/models/cnn.py``), leaky ReLU, 2x2 max-pool after every conv:
  3-channel inputs (CIFAR-10): conv 16 k5 p0, conv 32 k5 p1, conv 64 k3 p1, fc1 576 -> 128, fc2 128 -> K;
  1-channel inputs ((E/F)MNIST, the authors' ``CNN_FMNIST``): conv 16 k5 p0, conv 32 k5 p1, fc1 800 -> 128, fc2.
  Inputs smaller than 28x28 (sklearn's 8x8 digits) keep the channels and kernels but use "same" padding (2, 2[, 1])
  so that the maps do not vanish: 8x8 -> 4x4 -> 2x2, fc1 128 -> 128. fedkd's deviation, only for small inputs.
- ``pfedhn-cnn``: pFedHN's LeNet-style target (``experiments/pfedhn/models.py``): conv 16 k5, pool, conv 32 k5, pool,
  fc 120, fc 84, fc K, ReLU. 32x32 -> 5x5 (800 features), 28x28 -> 4x4 (512). Inputs smaller than 28x28 use "same"
  padding 2 (8x8 -> 2x2, 128 features): fedkd's deviation, only for small inputs.

Neither paper uses dropout; ``model.dropout`` > 0 adds one dropout layer before the last Linear of either target
(as fedkd's ``cnn`` does), off by default.

Split: the *head* of a target is its last ``nn.Linear`` (:func:`classifier_names`); everything before it is the
*body* (HyperFL: the feature extractor, conv layers + fc1; pFedHN-PC: all but the personal final layer).

- :class:`HyperFLHypernet`: embedding (64) -> Linear(64, 128) + ReLU -> one Linear(128, numel) head per generated
  tensor. :class:`HyperFLModel` is a HyperFL client's whole model: private ``nn.Embedding(1, 64)``, the shared
  hypernetwork, the private head; its forward generates the body and runs the target with ``torch.func.functional_call``,
  so autograd flows from the loss through the generated weights into the hypernetwork and the embedding. That
  backward pass *is* the vector-Jacobian product of the paper (the authors' code computes dL/dtheta first and then
  ``autograd.grad(theta, phi, grad_outputs=dL/dtheta)``; same numbers, tested).
- :class:`PFedHNHypernet`: the server's ``nn.Embedding(n_clients, e)`` (e = 1 + n/4) -> Linear(e, 100) + 3 x [ReLU,
  Linear(100, 100)] -> one Linear(100, numel) head per target tensor (no activation after the last hidden layer, no
  chunking, as in the authors' code).
- :func:`hypernet_vjp` and :func:`pfedhn_step`: pFedHN's server update. The client returns
  ``delta = theta_new - theta``; the server's gradient is ``autograd.grad(theta, (phi, v), grad_outputs=-delta)``
  (the authors' ``theta - theta_new``), clipped to norm 50 over all hypernetwork parameters (embeddings included)
  and applied by SGD (lr 1e-2, momentum 0.9, weight decay 1e-3; pFedHN-PC lr 5e-2).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from fedkd.models import MODELS

Shapes = dict[str, torch.Size]


# --------------------------------------------------------------------------- target networks
def _same_or_paper(h: int, w: int, paper: tuple[int, ...], same: tuple[int, ...]) -> tuple[int, ...]:
    """The papers' paddings for inputs of at least 28x28, "same" paddings for smaller ones (8x8 digits)."""
    return paper if min(h, w) >= 28 else same


class _ConvStack(nn.Module):
    """conv -> act -> 2x2 max-pool per layer, flatten, then Linear layers (act between them, none after the last)."""

    def __init__(self, input_shape, convs: list[tuple[int, int, int]], fcs: list[int], act, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None  # before the last Linear (fedkd's option, off by default)
        c, h, w = input_shape
        self.act = act
        self.n_conv = len(convs)
        for i, (out, k, pad) in enumerate(convs, 1):
            setattr(self, f"conv{i}", nn.Conv2d(c, out, k, padding=pad))
            h, w = (h + 2 * pad - k + 1) // 2, (w + 2 * pad - k + 1) // 2
            if h < 1 or w < 1:
                raise ValueError(f"input {tuple(input_shape)} is too small for this network")
            c = out
        width = c * h * w
        self.n_fc = len(fcs)
        for i, out in enumerate(fcs, 1):
            setattr(self, f"fc{i}", nn.Linear(width, out))
            width = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, self.n_conv + 1):
            x = F.max_pool2d(self.act(getattr(self, f"conv{i}")(x)), 2)
        x = x.flatten(1)
        for i in range(1, self.n_fc + 1):
            if i == self.n_fc and self.dropout is not None:
                x = self.dropout(x)
            x = getattr(self, f"fc{i}")(x)
            if i < self.n_fc:
                x = self.act(x)
        return x


@MODELS.register("hyperfl-cnn")
def hyperfl_cnn(input_shape, num_classes: int, hidden=(), dropout: float = 0.0) -> nn.Module:
    """HyperFL's CNN (see the module docstring). ``dropout`` > 0 (not in the paper) adds dropout before fc2."""
    c, h, w = input_shape
    if c == 3:
        pads = _same_or_paper(h, w, (0, 1, 1), (2, 2, 1))
        convs = [(16, 5, pads[0]), (32, 5, pads[1]), (64, 3, pads[2])]
    else:
        pads = _same_or_paper(h, w, (0, 1), (2, 2))
        convs = [(16, 5, pads[0]), (32, 5, pads[1])]
    return _ConvStack(input_shape, convs, [128, num_classes], F.leaky_relu, dropout)


@MODELS.register("pfedhn-cnn")
def pfedhn_cnn(input_shape, num_classes: int, hidden=(), dropout: float = 0.0) -> nn.Module:
    """pFedHN's LeNet-style target (see the module docstring). ``dropout`` > 0 (not in the paper) adds dropout before fc3."""
    c, h, w = input_shape
    pad = _same_or_paper(h, w, (0,), (2,))[0]
    return _ConvStack(input_shape, [(16, 5, pad), (32, 5, pad)], [120, 84, num_classes], F.relu, dropout)


def classifier_names(model: nn.Module) -> tuple[str, ...]:
    """Parameter names of the model's last ``nn.Linear`` (its classifier head)."""
    last = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            last = name
    if last is None:
        raise ValueError(f"{type(model).__name__} has no Linear classifier layer")
    return tuple(n for n, _ in model.named_parameters() if n.rpartition(".")[0] == last)


def target_shapes(model: nn.Module, exclude: Sequence[str] = ()) -> Shapes:
    """Name -> shape of the parameters a hypernetwork generates (all but ``exclude``), in the model's order."""
    buffers = [n for n, _ in model.named_buffers()]
    if buffers:
        raise ValueError(f"a hypernetwork generates parameters only; this model has buffers {buffers[:3]}")
    return {n: p.shape for n, p in model.named_parameters() if n not in exclude}


def _key(name: str) -> str:
    return name.replace(".", "_")  # ModuleDict keys cannot hold dots


class _Heads(nn.Module):
    """One Linear(hidden, numel) per generated tensor; ``forward(z)`` reshapes each to its target shape."""

    def __init__(self, shapes: Shapes, hidden: int) -> None:
        super().__init__()
        self.shapes = dict(shapes)
        self.linear = nn.ModuleDict({_key(n): nn.Linear(hidden, math.prod(s)) for n, s in self.shapes.items()})

    def forward(self, z: torch.Tensor) -> dict[str, torch.Tensor]:  # z: (hidden,)
        return {n: self.linear[_key(n)](z).view(s) for n, s in self.shapes.items()}


# --------------------------------------------------------------------------- HyperFL
class HyperFLHypernet(nn.Module):
    """HyperFL's hypernetwork: embedding (E,) -> Linear(E, hidden) + ReLU -> one Linear head per generated tensor.

    Its ``state_dict`` is everything a HyperFL client uploads (``mlp.0.*``, ``heads.linear.<tensor>.*``)."""

    def __init__(self, shapes: Shapes, embed_dim: int = 64, hidden: int = 128) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(embed_dim, hidden), nn.ReLU())
        self.heads = _Heads(shapes, hidden)

    @property
    def shapes(self) -> Shapes:
        return self.heads.shapes

    def forward(self, embedding: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.heads(self.mlp(embedding.reshape(-1)))  # embedding (E,) -> z (hidden,) -> tensors


class HyperFLModel(nn.Module):
    """A HyperFL client's model: private embedding -> shared hypernetwork -> generated body of ``target``, then the
    private head (``target``'s last Linear). Submodules: ``embedding`` (nn.Embedding(1, E)), ``hypernet``,
    ``head`` (a ParameterDict); only ``hypernet`` ever leaves the client (:meth:`shared_state`)."""

    def __init__(self, target: nn.Module, embed_dim: int = 64, hidden: int = 128) -> None:
        super().__init__()
        self.head_names = classifier_names(target)
        self.embedding = nn.Embedding(1, embed_dim)
        self.hypernet = HyperFLHypernet(target_shapes(target, exclude=self.head_names), embed_dim, hidden)
        self.head = nn.ParameterDict({_key(n): nn.Parameter(target.get_parameter(n).detach().clone()) for n in self.head_names})
        # The target's structure only (on the meta device, not a submodule): every tensor comes from the call.
        self._skeleton = (copy.deepcopy(target).to("meta"),)

    @property
    def skeleton(self) -> nn.Module:
        return self._skeleton[0]

    def head_params(self) -> dict[str, torch.Tensor]:
        return {n: self.head[_key(n)] for n in self.head_names}

    def generate(self) -> dict[str, torch.Tensor]:
        """The body's weights theta = h(v; phi), with autograd to phi and v."""
        return self.hypernet(self.embedding.weight[0])

    def forward(self, x: torch.Tensor, generated: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits (B, K) of ``x`` (B, C, H, W); ``generated`` = :meth:`generate` unless given (e.g. precomputed)."""
        generated = self.generate() if generated is None else generated
        return run_target(self.skeleton, {**generated, **self.head_params()}, x, self.training)

    def shared_state(self) -> dict[str, torch.Tensor]:
        """What a HyperFL client uploads: the hypernetwork's parameters (detached CPU copies)."""
        return {k: v.detach().cpu().clone() for k, v in self.hypernet.state_dict().items()}

    def private_state(self) -> dict[str, torch.Tensor]:
        """What never leaves the client: the embedding and the head."""
        return {k: v.detach().cpu().clone() for k, v in self.state_dict().items() if not k.startswith("hypernet.")}


def init_private(model: HyperFLModel, generator: torch.Generator) -> HyperFLModel:
    """Draw a HyperFL client's embedding (N(0, 1), nn.Embedding's init) and head (U(+-1/sqrt(fan_in)), nn.Linear's
    init) from ``generator``. The attack's difficulty rests on these being unknown to the server: seed the generator
    from private entropy. (The authors deep-copy one model into every client, so all clients start from the same
    embedding and head; fedkd draws them per client.)"""
    with torch.no_grad():
        model.embedding.weight.copy_(torch.randn(model.embedding.weight.shape, generator=generator))
        fan_in = model.head[_key(model.head_names[0])].shape[-1]
        bound = 1.0 / math.sqrt(fan_in)
        for p in model.head.values():
            p.copy_((torch.rand(p.shape, generator=generator) * 2 - 1) * bound)
    return model


def hyperfl_model(target: nn.Module, hp, generator: torch.Generator | None = None) -> HyperFLModel:
    """A HyperFL client's model for ``target`` with the ``[hyperfl]`` sizes; private parts drawn from ``generator``."""
    model = HyperFLModel(target, hp.embed_dim, hp.hidden_dim)
    return init_private(model, generator) if generator is not None else model


def check_state(state: Mapping[str, torch.Tensor], shapes: Mapping[str, torch.Size]) -> str | None:
    """Why ``state`` is not exactly the tensors named in ``shapes`` (same names, shapes, finite floats), or None."""
    if set(state) != set(shapes):
        extra, missing = sorted(set(state) - set(shapes)), sorted(set(shapes) - set(state))
        return f"arrays do not match (unexpected {extra[:3]}, missing {missing[:3]})"
    for k, v in state.items():
        if tuple(v.shape) != tuple(shapes[k]):
            return f"{k} has shape {tuple(v.shape)}, expected {tuple(shapes[k])}"
        if not torch.is_floating_point(v) or not bool(torch.isfinite(v).all()):
            return f"{k} is not a finite float tensor"
    return None


def run_target(skeleton: nn.Module, params: Mapping[str, torch.Tensor], x: torch.Tensor, training: bool = True) -> torch.Tensor:
    """The target network on ``x`` with every parameter taken from ``params`` (torch.func.functional_call)."""
    skeleton.train(training)
    return functional_call(skeleton, dict(params), (x,))


# --------------------------------------------------------------------------- pFedHN
def pfedhn_embed_dim(num_clients: int) -> int:
    """The authors' automatic embedding size, ``int(1 + n / 4)``."""
    return int(1 + num_clients / 4)


class PFedHNHypernet(nn.Module):
    """pFedHN's server hypernetwork: one embedding per client -> MLP -> one Linear head per target tensor."""

    def __init__(self, num_clients: int, shapes: Shapes, embed_dim: int, hidden: int = 100, n_hidden: int = 3) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(num_clients, embed_dim)
        layers: list[nn.Module] = [nn.Linear(embed_dim, hidden)]
        for _ in range(n_hidden):
            layers += [nn.ReLU(), nn.Linear(hidden, hidden)]
        self.mlp = nn.Sequential(*layers)
        self.heads = _Heads(shapes, hidden)

    @property
    def shapes(self) -> Shapes:
        return self.heads.shapes

    def forward(self, row: int) -> dict[str, torch.Tensor]:
        """theta_row = h(v_row; phi): the generated tensors of client ``row``, with autograd to phi and v_row."""
        return self.heads(self.mlp(self.embeddings.weight[row]))

    def optimizer(self, lr: float, momentum: float = 0.9, weight_decay: float = 1e-3, embed_lr: float | None = None) -> torch.optim.SGD:
        """The authors' optimiser: SGD over every parameter, the embedding table in its own group (lr ``embed_lr``)."""
        rest = [p for n, p in self.named_parameters() if not n.startswith("embeddings.")]
        groups = [{"params": rest}, {"params": list(self.embeddings.parameters()), "lr": lr if embed_lr is None else embed_lr}]
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)


def hypernet_vjp(generated: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """pFedHN's hypernetwork gradient: the vector-Jacobian product of the generated ``theta`` with ``-delta``.

    ``delta = theta_new - theta`` (what the client returns). Returns ``autograd.grad(theta, params,
    grad_outputs=theta - theta_new)``, one tensor per parameter (zeros where ``theta`` does not depend on it).
    """
    if set(delta) != set(generated):
        raise ValueError(f"delta names {sorted(delta)[:3]}... do not match the generated tensors {sorted(generated)[:3]}...")
    names = list(generated)
    outs = [generated[n] for n in names]
    grads = torch.autograd.grad(outs, list(params), grad_outputs=[-delta[n].to(outs[i].device, outs[i].dtype) for i, n in enumerate(names)], allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def pfedhn_step(
    hnet: PFedHNHypernet,
    optimizer: torch.optim.Optimizer,
    row: int,
    delta: Mapping[str, torch.Tensor],
    clip: float = 50.0,
    jacobian_at: PFedHNHypernet | None = None,
) -> float:
    """One pFedHN server step for the client in embedding row ``row`` that returned ``delta``.

    The Jacobian is taken at ``jacobian_at`` (a copy of the hypernetwork that generated the client's theta) when
    given, else at ``hnet``; the gradient is written into ``hnet``, clipped to total norm ``clip`` over all its
    parameters and applied by ``optimizer``. Returns the gradient norm before clipping."""
    src = hnet if jacobian_at is None else jacobian_at
    generated = src(row)
    grads = hypernet_vjp(generated, delta, list(src.parameters()))
    optimizer.zero_grad(set_to_none=True)
    for p, g in zip(hnet.parameters(), grads):
        p.grad = g.detach().to(p.device)
    norm = torch.nn.utils.clip_grad_norm_(list(hnet.parameters()), clip)
    optimizer.step()
    return float(norm)


__all__ = [
    "HyperFLHypernet",
    "HyperFLModel",
    "check_state",
    "hyperfl_model",
    "init_private",
    "PFedHNHypernet",
    "classifier_names",
    "hypernet_vjp",
    "pfedhn_embed_dim",
    "pfedhn_step",
    "run_target",
    "target_shapes",
]
