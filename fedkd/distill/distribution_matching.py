"""Dataset Condensation with Distribution Matching (Zhao & Bilen, WACV 2023, arXiv 2110.04181), as FedLGD runs it.

Synthetic ("virtual") images S_c of each class c are learnt so that their mean embedding matches the
mean embedding of real images R_c of that class:

    L = sum_c || mean_{x in A(R_c)} e(x) - mean_{s in A(S_c)} e(s) ||^2

with one siamese DSA draw ``A`` per class and iteration (the same transformation for R_c and S_c;
:mod:`fedkd.distill.diffaugment`), ``R_c`` a fresh random sample of at most ``batch_real`` (256) real
images of class c, and one SGD step on the images per iteration (lr 1, momentum 0.5; a fresh optimizer per
call, as the authors create one per warm-up and per refresh).

FedLGD uses two embedders ``e``:

- warm-up: every iteration a *freshly initialised* random network (``net_factory``; the paper's
  ConvNet), whose initialisation is seeded from the caller's generator;
- iterative refresh (every ci_tgap rounds): the current global model (``embedder``), frozen.

Implementation notes. The real and the synthetic images of all classes are embedded in two forward
passes (real without gradient), which equals the authors' per-class passes for per-sample networks
such as the ConvNet (instance norm); embedders are put in ``eval()`` mode, so a network with BatchNorm
would use its running statistics rather than batch statistics. Every random choice (real samples, DSA
draws, random networks) comes from the ``torch.Generator`` passed in; the global RNG is left untouched.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .diffaugment import FEDLGD_STRATEGY, DSAParams, siamese_augment


def embed_fn(net: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The network's embedding: ``net.embed`` when it has one, else its output."""
    return net.embed if hasattr(net, "embed") else net


def frozen(net: nn.Module) -> nn.Module:
    """``net`` in eval mode with no parameter requiring a gradient (in place)."""
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def random_network(net_factory: Callable[[], nn.Module], generator: torch.Generator, device) -> nn.Module:
    """A freshly initialised network whose initialisation is seeded from ``generator`` (global RNG kept)."""
    seed = int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = net_factory()
    return frozen(net.to(device))


class RealSampler:
    """Random real images per class: at most ``n`` of class c without replacement, drawn from ``generator``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, classes: Sequence[int]) -> None:
        self.x = x  # (N, C, H, W), already normalised, on the embedding device
        self.index = {}
        for c in classes:
            idx = torch.nonzero(y == c).flatten()
            if len(idx) == 0:
                raise ValueError(f"no real images of class {c} to match")
            self.index[int(c)] = idx.to(x.device)

    def sample(self, c: int, n: int, generator: torch.Generator) -> torch.Tensor:
        idx = self.index[c]
        pick = torch.randperm(len(idx), generator=generator, device=generator.device)[:n].to(idx.device)
        return self.x[idx[pick]]


def class_slices(labels: torch.Tensor) -> dict[int, torch.Tensor]:
    """``{class: indices}`` of a label vector (synthetic images are usually grouped by class)."""
    return {int(c): torch.nonzero(labels == c).flatten() for c in torch.unique(labels)}


def dm_loss(embed: Callable[[torch.Tensor], torch.Tensor], real: dict[int, torch.Tensor], syn: dict[int, torch.Tensor],
            generator: torch.Generator | None = None, strategy: str = FEDLGD_STRATEGY, params: DSAParams = DSAParams()) -> torch.Tensor:
    """``sum_c ||mean e(A(real_c)) - mean e(A(syn_c))||^2``; no augmentation when ``generator`` is None."""
    reals, syns = [], []
    for c in syn:
        r, s = real[c], syn[c]
        if generator is not None:
            r, s = siamese_augment(r, s, generator=generator, strategy=strategy, params=params)
        reals.append(r)
        syns.append(s)
    with torch.no_grad():
        e_real = embed(torch.cat(reals))  # (sum_c n_c, D)
    e_syn = embed(torch.cat(syns))  # (sum_c m_c, D)
    loss = e_syn.new_zeros(())
    i = j = 0
    for r, s in zip(reals, syns):
        loss = loss + ((e_real[i : i + len(r)].mean(0) - e_syn[j : j + len(s)].mean(0)) ** 2).sum()
        i, j = i + len(r), j + len(s)
    return loss


def distribution_matching(
    images: torch.Tensor,
    labels: torch.Tensor,
    real_x: torch.Tensor,
    real_y: torch.Tensor,
    *,
    iterations: int,
    generator: torch.Generator,
    embedder: nn.Module | None = None,
    net_factory: Callable[[], nn.Module] | None = None,
    batch_real: int = 256,
    lr: float = 1.0,
    momentum: float = 0.5,
    strategy: str = FEDLGD_STRATEGY,
    params: DSAParams = DSAParams(),
    progress: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Update ``images`` (M, C, H, W; a leaf tensor, changed in place) by ``iterations`` DM steps.

    ``labels`` (M,) are the images' classes; every class must occur in ``real_y``. Exactly one of
    ``embedder`` (a network, copied and frozen: the global model) and ``net_factory`` (a fresh random
    network every iteration: warm-up) is given. Returns the loss per iteration divided by the number of
    classes (the figure the authors print). ``progress(iteration, loss)`` is called after each step.
    """
    if (embedder is None) == (net_factory is None):
        raise ValueError("give exactly one of embedder (the global model) and net_factory (random networks)")
    if not images.is_leaf:
        raise ValueError("images must be a leaf tensor (the virtual data being learnt)")
    images.requires_grad_(True)
    device = images.device
    syn_index = class_slices(labels.to(device))
    sampler = RealSampler(real_x.to(device), real_y.to(device), list(syn_index))
    opt = torch.optim.SGD([images], lr=lr, momentum=momentum)
    fixed = frozen(copy.deepcopy(embedder).to(device)) if embedder is not None else None
    losses = []
    for it in range(iterations):
        net = fixed if fixed is not None else random_network(net_factory, generator, device)
        real = {c: sampler.sample(c, batch_real, generator) for c in syn_index}
        syn = {c: images[idx] for c, idx in syn_index.items()}
        loss = dm_loss(embed_fn(net), real, syn, generator, strategy, params)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item() / len(syn_index))
        if progress is not None:
            progress(it, losses[-1])
    images.requires_grad_(False)
    return losses


@torch.no_grad()
def embedding_mean_distance(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, real_x: torch.Tensor, real_y: torch.Tensor) -> float:
    """``sum_c ||mean e(real_c) - mean e(images_c)||^2`` over the images' classes, all real images, no augmentation."""
    net = frozen(copy.deepcopy(net))
    syn = {c: images[idx] for c, idx in class_slices(labels).items()}
    real = {c: real_x[real_y == c] for c in syn}
    return float(dm_loss(embed_fn(net), real, syn))
