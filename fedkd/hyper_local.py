"""Reference local updates of HyperFL and pFedHN as plain functions on tensors (no Flower).

The client logics (``clients/hyperfl.py``, ``clients/pfedhn.py``) run exactly these procedures, so the attack tests'
HyperFL observations and a federated client's replies come from the same code. Both follow the authors' code:

- :func:`hyperfl_local_update` (HyperFL ``cnn/methods/hyperfl.py``): stage 1, ``head_epochs`` epochs training only
  the head (SGD lr 0.1, momentum 0.5, wd 5e-4) on the generated body; stage 2, ``hnet_epochs`` epochs training the
  hypernetwork and the embedding through the generated weights (SGD lr 0.02, momentum 0.5, wd 5e-4), their gradients
  clipped to norm ``clip`` = 50 separately (hypernetwork, then embedding). Fresh optimisers every round; a fresh
  shuffle every epoch; the last batch of an epoch may be smaller (a DataLoader with ``shuffle=True``).
- :func:`pfedhn_inner_update` (pFedHN ``experiments/pfedhn*/trainer.py``): ``inner_steps`` steps, each on a fresh
  random batch of ``batch_size`` (``next(iter(loader))`` with shuffling), SGD lr 5e-3, momentum 0.9, wd 5e-5, fresh
  every round, body gradients clipped to norm 50. pFedHN-PC: the personal last layer is trained in the same steps by
  its own SGD (same lr, momentum and wd, not clipped) whose momentum persists across rounds (pass it back in).

The ``generator`` draws the shuffles / batches: a client's privacy against the inversion attacks rests on them, so a
client logic seeds it from private entropy (:func:`private_rng`; tests may seed it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from fedkd.hypernet import HyperFLModel, classifier_names


@contextlib.contextmanager
def private_rng(device: torch.device | str = "cpu") -> Iterator[torch.Generator]:
    """A client's private randomness: yields a CPU ``torch.Generator`` for shuffles and private initialisations, and
    reseeds torch's global RNG (dropout masks; CUDA's too on a CUDA ``device``) for the duration, all from OS entropy
    (``secrets``) that the server cannot know. The global RNG state is restored afterwards (``torch.random.fork_rng``),
    so seeded code elsewhere in the process is unaffected."""
    from fedkd.privacy.entropy import private_global_rng, torch_generator

    with private_global_rng(device):
        yield torch_generator()


@dataclass(frozen=True)
class HyperFLLocalResult:
    loss_head: float  # mean CE over stage 1's steps
    loss: float  # mean CE over stage 2's steps
    accuracy: float  # training accuracy over stage 2's steps
    num_examples: int
    steps: int  # stage-2 (hypernetwork) steps


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    perm = torch.randperm(n, generator=generator)
    return [perm[s : s + batch_size] for s in range(0, n, batch_size)]


def hyperfl_local_update(model: HyperFLModel, x: torch.Tensor, y: torch.Tensor, hp, *, generator: torch.Generator) -> HyperFLLocalResult:
    """HyperFL's two-stage local round on ``x`` (N, C, H, W), ``y`` (N,), in place on ``model``.

    ``hp`` has the ``[hyperfl]`` fields (``HyperFLConfig``): head_epochs, head_lr, head_momentum,
    head_weight_decay, hnet_epochs, hnet_lr, hnet_momentum, hnet_weight_decay, clip, batch_size."""
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    n = len(y)
    model.train()
    # Stage 1: the head only; the generated body is constant here, so generate it once.
    head = list(model.head.parameters())
    opt = torch.optim.SGD(head, lr=hp.head_lr, momentum=hp.head_momentum, weight_decay=hp.head_weight_decay)
    with torch.no_grad():
        body = model.generate()
    head_losses = []
    for _ in range(hp.head_epochs):
        for idx in _batches(n, hp.batch_size, generator):
            loss = F.cross_entropy(model(x[idx], body), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            head_losses.append(loss.item())
    # Stage 2: hypernetwork + embedding through the generated weights (backward = the paper's VJP).
    hnet, emb = list(model.hypernet.parameters()), list(model.embedding.parameters())
    opt = torch.optim.SGD([{"params": hnet}, {"params": emb}], lr=hp.hnet_lr, momentum=hp.hnet_momentum, weight_decay=hp.hnet_weight_decay)
    losses, correct, seen = [], 0, 0
    for _ in range(hp.hnet_epochs):
        for idx in _batches(n, hp.batch_size, generator):
            out = model(x[idx])
            loss = F.cross_entropy(out, y[idx])
            grads = torch.autograd.grad(loss, hnet + emb)  # the head is fixed in this stage
            for p, g in zip(hnet + emb, grads):
                p.grad = g
            torch.nn.utils.clip_grad_norm_(hnet, hp.clip)
            torch.nn.utils.clip_grad_norm_(emb, hp.clip)
            opt.step()
            losses.append(loss.item())
            correct += int((out.argmax(1) == y[idx]).sum())
            seen += len(idx)
    mean = lambda v: sum(v) / max(len(v), 1)  # noqa: E731
    return HyperFLLocalResult(mean(head_losses), mean(losses), correct / max(seen, 1), n, len(losses))


@dataclass(frozen=True)
class PFedHNLocalResult:
    delta: dict[str, torch.Tensor]  # theta_new - theta of the generated tensors (CPU)
    loss: float  # mean CE over the inner steps
    accuracy: float
    num_examples: int
    head_momentum: dict[str, torch.Tensor] | None  # pFedHN-PC: the personal layer's momentum buffers, to keep


def pfedhn_inner_update(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    hp,
    *,
    generator: torch.Generator,
    personal_head: bool = False,
    head_momentum: Mapping[str, torch.Tensor] | None = None,
) -> PFedHNLocalResult:
    """pFedHN's client update on ``model`` (the target with the received theta, and for pFedHN-PC the client's own
    last layer loaded), in place. ``hp`` has the ``[pfedhn]`` fields: inner_steps, inner_lr, inner_momentum,
    inner_weight_decay, inner_clip, batch_size. Returns ``theta_new - theta`` of the generated tensors (all of them;
    pFedHN-PC: all but the personal last layer)."""
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    n = len(y)
    head_names = set(classifier_names(model)) if personal_head else set()
    named = dict(model.named_parameters())
    body = [p for k, p in named.items() if k not in head_names]
    head = [named[k] for k in named if k in head_names]
    theta = {k: p.detach().clone() for k, p in named.items() if k not in head_names}
    opt = torch.optim.SGD(body, lr=hp.inner_lr, momentum=hp.inner_momentum, weight_decay=hp.inner_weight_decay)
    head_opt = None
    if head:
        head_opt = torch.optim.SGD(head, lr=hp.inner_lr, momentum=hp.inner_momentum, weight_decay=hp.inner_weight_decay)
        if head_momentum:
            for k in sorted(head_names):
                if k in head_momentum:
                    head_opt.state[named[k]]["momentum_buffer"] = head_momentum[k].to(device).clone()
    model.train()
    losses, correct, seen = [], 0, 0
    for _ in range(hp.inner_steps):
        idx = torch.randperm(n, generator=generator)[: hp.batch_size]  # a fresh shuffled loader's first batch
        out = model(x[idx])
        loss = F.cross_entropy(out, y[idx])
        opt.zero_grad(set_to_none=True)
        if head_opt is not None:
            head_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(body, hp.inner_clip)
        opt.step()
        if head_opt is not None:
            head_opt.step()
        losses.append(loss.item())
        correct += int((out.argmax(1) == y[idx]).sum())
        seen += len(idx)
    delta = {k: (named[k].detach() - theta[k]).cpu() for k in theta}
    moms = None
    if head_opt is not None:
        moms = {k: head_opt.state[named[k]]["momentum_buffer"].detach().cpu().clone() for k in sorted(head_names) if "momentum_buffer" in head_opt.state[named[k]]}
    return PFedHNLocalResult(delta, sum(losses) / max(len(losses), 1), correct / max(seen, 1), n, moms)


__all__ = ["HyperFLLocalResult", "PFedHNLocalResult", "hyperfl_local_update", "pfedhn_inner_update", "private_rng"]
