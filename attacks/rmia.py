"""RMIA: Zarifzadeh, Liu, Lee, Shokri, "Low-Cost High-Power Membership Inference Attacks" (ICML 2024,
arXiv 2312.03262).

A likelihood ratio of the record x against population records z, each normalised by reference models:

    ratio(x) = Pr(x | target) / Pr(x),     Pr(x) = mean over reference models of Pr(x | ref)
    LR(x, z) = ratio(x) / ratio(z)
    score(x) = fraction of population records z with LR(x, z) >= gamma

Pr(x | model) is the model's softmax probability of x's label. **Online**: Pr(x) averages all
reference models (about half trained on x). **Offline** (only OUT reference models): Pr(x) is
extrapolated from the OUT average with the paper's linear approximation
Pr(x) = ((1 + a) Pr_OUT(x) + (1 - a)) / 2, and the same for every z (population records are OUT for
every reference model). ``a`` is dataset-specific; :func:`tune_offline_a` picks it the authors' way,
by attacking one reference model with the others.

Defaults: gamma = 2 and a = 0.33, the values in the authors' CIFAR-10 attack configurations
(ml_privacy_meter, research/2023_rmia). Deviation, said plainly: Pr(x | model) is the plain softmax
(temperature 1); those configurations use a temperature-2 "soft-margin Taylor softmax" signal,
a tuning we do not reproduce; no augmentations and no trimmed means.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .membership import MembershipError, ReferenceOutputs, TargetOutputs


@dataclass(frozen=True)
class RMIAParams:
    online: bool = True
    gamma: float = 2.0
    offline_a: float = 0.33

    def __post_init__(self) -> None:
        if not self.gamma > 0:
            raise MembershipError(f"rmia: gamma must be > 0 (got {self.gamma})")
        if not 0 <= self.offline_a <= 1:
            raise MembershipError(f"rmia: offline_a must be in [0, 1] (got {self.offline_a})")


def label_probability(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Softmax probability of the label, (...) from logits (..., K)."""
    z = np.asarray(logits, np.float64)
    lab = np.broadcast_to(np.asarray(labels)[..., None], z.shape[:-1] + (1,))
    return np.exp(np.take_along_axis(z, lab, axis=-1)[..., 0] - np.logaddexp.reduce(z, axis=-1))


def _marginal(ref_p: np.ndarray, ref_in: np.ndarray, params: RMIAParams) -> np.ndarray:
    """Pr(record) (N,) from the references' probabilities (M, N)."""
    if params.online:
        return ref_p.mean(0)
    out = ~np.asarray(ref_in, bool)
    n = out.sum(0)
    if np.any(n == 0):
        raise MembershipError(f"rmia offline: {int((n == 0).sum())} records have no OUT reference model")
    p_out = np.where(out, ref_p, 0.0).sum(0) / n
    return 0.5 * ((1 + params.offline_a) * p_out + (1 - params.offline_a))


def rmia_scores_from_probs(
    target_px: np.ndarray, ref_px: np.ndarray, ref_in_x: np.ndarray, target_pz: np.ndarray, ref_pz: np.ndarray, params: RMIAParams = RMIAParams()
) -> np.ndarray:
    """Scores (N,) from label probabilities: target on x (N,), references on x (M, N) with in-mask
    (M, N), target on the population z (Z,), references on z (M, Z)."""
    if ref_px.shape != np.shape(ref_in_x) or ref_px.shape[1] != len(target_px) or ref_pz.shape != (ref_px.shape[0], len(target_pz)):
        raise MembershipError(f"rmia: shapes disagree: x {np.shape(target_px)}/{ref_px.shape}, z {np.shape(target_pz)}/{ref_pz.shape}")
    if len(target_pz) == 0:
        raise MembershipError("rmia: needs population records z")
    tiny = 1e-300
    ratio_x = target_px / np.maximum(_marginal(ref_px, ref_in_x, params), tiny)  # (N,)
    ratio_z = target_pz / np.maximum(_marginal(ref_pz, np.zeros_like(ref_pz, bool), params), tiny)  # (Z,)
    # LR(x, z) >= gamma  <=>  ratio_z <= ratio_x / gamma: count with one sort instead of N x Z
    sorted_z = np.sort(ratio_z)
    return np.searchsorted(sorted_z, ratio_x / params.gamma, side="right") / len(sorted_z)


def rmia_scores(target: TargetOutputs, refs: ReferenceOutputs, population: TargetOutputs, population_refs: np.ndarray, params: RMIAParams = RMIAParams()) -> np.ndarray:
    """RMIA scores (N,), higher = more likely a member. ``population`` holds the target's logits on
    the Z population records, ``population_refs`` (M, Z, K) the reference models' logits on them."""
    if refs.logits.shape[1:] != target.logits.shape:
        raise MembershipError(f"reference logits {refs.logits.shape} do not match the target's {target.logits.shape}")
    return rmia_scores_from_probs(
        label_probability(target.logits, target.labels),
        label_probability(refs.logits, target.labels[None, :]),
        refs.in_mask,
        label_probability(population.logits, population.labels),
        label_probability(population_refs, population.labels[None, :]),
        params,
    )


def tune_offline_a(ref_px: np.ndarray, ref_in_x: np.ndarray, ref_pz: np.ndarray, gamma: float = 2.0, grid=np.linspace(0.0, 1.0, 11)) -> float:
    """The authors' way to pick ``a``: each reference model in turn plays the target, attacked
    offline with the remaining ones; keep the ``a`` with the best mean ROC AUC (needs M >= 2)."""
    from sklearn.metrics import roc_auc_score

    m = ref_px.shape[0]
    if m < 2:
        raise MembershipError("rmia: tuning offline_a needs at least 2 reference models")
    best, best_auc = float(grid[0]), -1.0
    for a in grid:
        aucs = []
        for t in range(m):
            rest = np.arange(m) != t
            if ref_in_x[t].all() or not ref_in_x[t].any() or (~ref_in_x[rest]).sum(0).min() == 0:
                continue
            s = rmia_scores_from_probs(ref_px[t], ref_px[rest], ref_in_x[rest], ref_pz[t], ref_pz[rest], RMIAParams(False, gamma, float(a)))
            aucs.append(roc_auc_score(ref_in_x[t], s))
        if aucs and np.mean(aucs) > best_auc:
            best, best_auc = float(a), float(np.mean(aucs))
    return best
