"""Dataset Condensation with Gradient Matching (Zhao, Mopuri, Bilen, ICLR 2021, arXiv 2006.05929), as FedLGD's server uses it.

Layer-wise distance between two lists of gradients (one tensor per parameter, same order and shapes):

    D(A, B) = sum over layers l of  sum over output rows i of  (1 - <A_l[i], B_l[i]> / (|A_l[i]| |B_l[i]| + 1e-6))

where a conv weight (out, in, h, w) and a 3-D tensor are reshaped to (out, rest), a linear weight is
used as it is, and 1-D tensors (biases, normalisation scales and shifts) contribute nothing, as in the
paper's and FedLGD's code.

FedLGD's federated gradient matching (every si_tgap rounds, after aggregation): the target is the
round's pseudo-gradient ``(w_old - w_new) / lr`` (:func:`pseudo_gradient`), the synthetic gradient is
that of the cross-entropy of the *previous* global model ``w_old`` on all global virtual images
(no augmentation), and the images take ``iterations`` (500) SGD steps (lr 1, momentum 0.5, a fresh
optimizer per refresh) on D.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


def layer_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Sum over output rows of 1 - cosine between ``a`` and ``b`` (same shape); 0 for 1-D tensors."""
    if a.shape != b.shape:
        raise ValueError(f"gradient shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.dim() == 1:
        return a.new_zeros(())
    if a.dim() > 2:
        a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + 1e-6)
    return (1 - cos).sum()


def match_distance(grads_a: Sequence[torch.Tensor], grads_b: Sequence[torch.Tensor]) -> torch.Tensor:
    """Dataset Condensation's layer-wise distance: the sum of :func:`layer_distance` over the layers."""
    if len(grads_a) != len(grads_b):
        raise ValueError(f"{len(grads_a)} gradients vs {len(grads_b)}")
    return torch.stack([layer_distance(a, b) for a, b in zip(grads_a, grads_b)]).sum()


def pseudo_gradient(model: nn.Module, old: Mapping[str, np.ndarray | torch.Tensor], new: Mapping[str, np.ndarray | torch.Tensor],
                    lr: float) -> list[torch.Tensor]:
    """``(w_old - w_new) / lr`` for each of ``model``'s parameters, in ``model.parameters()`` order."""
    out = []
    for name, p in model.named_parameters():
        if name not in old or name not in new:
            raise KeyError(f"parameter {name!r} missing from the old or the new weights")
        w_old = torch.as_tensor(np.asarray(old[name]), dtype=p.dtype)
        w_new = torch.as_tensor(np.asarray(new[name]), dtype=p.dtype)
        if w_old.shape != p.shape or w_new.shape != p.shape:
            raise ValueError(f"parameter {name!r}: shapes {tuple(w_old.shape)}, {tuple(w_new.shape)} vs the model's {tuple(p.shape)}")
        out.append(((w_old - w_new) / lr).to(p.device))
    return out


def synthetic_gradient(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, create_graph: bool = False,
                       matrices_only: bool = False) -> list[torch.Tensor]:
    """The gradient of the mean cross-entropy of ``model`` on (images, labels), one tensor per parameter
    (``matrices_only``: only for parameters of 2 or more dimensions, the ones the distance uses)."""
    params = [p for p in model.parameters() if p.dim() > 1 or not matrices_only]
    loss = F.cross_entropy(model(images), labels)
    return list(torch.autograd.grad(loss, params, create_graph=create_graph))


def gradient_matching(
    images: torch.Tensor,
    labels: torch.Tensor,
    model: nn.Module,
    target: Sequence[torch.Tensor],
    *,
    iterations: int = 500,
    lr: float = 1.0,
    momentum: float = 0.5,
    progress: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Update ``images`` (a leaf tensor, in place) so that ``model``'s CE gradient on them matches ``target``.

    ``model`` is not changed (its parameters get no ``.grad``). Returns the distance D before each step.
    """
    if not images.is_leaf:
        raise ValueError("images must be a leaf tensor (the global virtual data being learnt)")
    for p in model.parameters():
        p.requires_grad_(True)  # needed to differentiate the CE gradient; nothing is stepped on the model
    model.eval()
    params = list(model.parameters())
    if len(params) != len(target):
        raise ValueError(f"{len(target)} target gradients for {len(params)} parameters")
    target = [t.detach() for p, t in zip(params, target) if p.dim() > 1]  # 1-D tensors add nothing to D: skip their second-order terms
    images.requires_grad_(True)
    opt = torch.optim.SGD([images], lr=lr, momentum=momentum)
    losses = []
    for it in range(iterations):
        d = match_distance(synthetic_gradient(model, images, labels, create_graph=True, matrices_only=True), target)
        opt.zero_grad(set_to_none=True)
        (images.grad,) = torch.autograd.grad(d, [images])
        opt.step()
        losses.append(d.item())
        if progress is not None:
            progress(it, losses[-1])
    images.requires_grad_(False)
    return losses


def gradient_match_distance(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, target: Sequence[torch.Tensor]) -> float:
    """D between ``model``'s CE gradient on (images, labels) and ``target`` (no update)."""
    with torch.enable_grad():
        return float(match_distance(synthetic_gradient(model, images.detach(), labels), [t.detach() for t in target]))
