"""Supervised contrastive loss (Khosla et al., NeurIPS 2020, arXiv 2004.11362) as FedLGD's local-global alignment.

FedLGD's client loss is ``CE + lambda * L_con`` where ``L_con`` is SupCon (one view per sample,
``contrast_mode='all'``) over the union of the client batch's features and the embeddings of *all*
global virtual images, with both label sets (the authors' ``Distance_loss('SupCon')``):

    z = L2-normalise(concat(batch features, global features))      (n = B + S rows)
    for every anchor i:  P(i) = {p != i : y_p = y_i},  A(i) = {a != i}
    l_i = -(T / T_base) * 1/|P(i)| * sum_{p in P(i)} log( exp(z_i.z_p / T) / sum_{a in A(i)} exp(z_i.z_a / T) )
    L_con = mean over all n anchors of l_i      (an anchor without positives contributes 0 but is counted)

with T = T_base = 0.07. Gradients flow into both the batch features and the global features (the
authors recompute the global embeddings with the current model at every step).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def supcon_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07, base_temperature: float = 0.07) -> torch.Tensor:
    """SupCon over ``features`` (n, D) (normalised here) with ``labels`` (n,)."""
    z = F.normalize(features, dim=1)
    n = len(z)
    sim = z @ z.T / temperature  # (n, n)
    logits = sim - sim.max(dim=1, keepdim=True).values.detach()  # row shift: numerically stable, same log-probabilities
    not_self = 1.0 - torch.eye(n, device=z.device, dtype=z.dtype)
    positive = (labels[:, None] == labels[None, :]).to(z.dtype) * not_self
    log_prob = logits - torch.log((torch.exp(logits) * not_self).sum(1, keepdim=True))
    count = positive.sum(1)
    mean_log_prob_pos = (positive * log_prob).sum(1) / torch.where(count > 0, count, torch.ones_like(count))
    return -(temperature / base_temperature) * mean_log_prob_pos.mean()


def alignment_loss(batch_features: torch.Tensor, batch_labels: torch.Tensor, global_features: torch.Tensor, global_labels: torch.Tensor,
                   temperature: float = 0.07, base_temperature: float = 0.07) -> torch.Tensor:
    """FedLGD's L_con: SupCon over the client batch (B, D) and the global virtual embeddings (S, D)."""
    return supcon_loss(torch.cat([batch_features, global_features]), torch.cat([batch_labels, global_labels]), temperature, base_temperature)
