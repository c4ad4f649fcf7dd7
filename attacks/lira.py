"""LiRA: Carlini, Chien, Nasr, Song, Terzis, Tramer, "Membership Inference Attacks From First
Principles" (arXiv 2112.03570).

Per record (x, y):

1. the *logit-scaled confidence* phi = log(p_y / (1 - p_y)) of a model's softmax p, computed
   stably as z_y - logsumexp_{y' != y} z_y' from the logits z (:func:`logit_scaled_confidence`);
2. from the reference (shadow) models that trained on x ("IN") and those that did not ("OUT"),
   fit Gaussians N(mu_in, s_in^2) and N(mu_out, s_out^2) of phi, *per record*;
3. **online**: score = log N(phi_target; mu_in, s_in^2) - log N(phi_target; mu_out, s_out^2),
   the likelihood ratio of the two hypotheses;
   **offline** (no IN models needed): a one-sided test against the OUT distribution,
   score = log P[Z <= phi_target] for Z ~ N(mu_out, s_out^2): how unusually confident the target is.

Variances. The paper uses per-record variances when there are many shadow models and a *global*
variance (one for all records) when there are few (fewer than 64 in its experiments), and the
offline attack with a fixed (global) variance. ``fix_variance=None`` follows that rule: global
when the smallest number of IN or OUT models of any record is below 64. The global variance is
the pooled within-record variance (the mean of the per-record variances over the records with at
least two models), not the spread of all values across records.

Deviations, said plainly: the means are sample means (the authors' code uses medians); no test-time
augmentations (the attack queries each record once). A record with no IN model (online) or no OUT
model cannot be scored: :class:`MembershipError`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

from .membership import MembershipError, ReferenceOutputs, TargetOutputs

PER_RECORD_MIN_MODELS = 64  # the paper's threshold for per-example variances


def logit_scaled_confidence(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """phi = log p_y - log sum_{y' != y} p_y' for logits (..., K) and labels broadcast to (...)."""
    z = np.asarray(logits, np.float64)
    lab = np.broadcast_to(np.asarray(labels)[..., None], z.shape[:-1] + (1,))
    zy = np.take_along_axis(z, lab, axis=-1)[..., 0]
    others = z.copy()
    np.put_along_axis(others, lab, -np.inf, axis=-1)
    return zy - np.logaddexp.reduce(others, axis=-1)


@dataclass(frozen=True)
class LiRAParams:
    online: bool = True
    fix_variance: bool | None = None  # None: the paper's rule (global below 64 models per record)
    min_std: float = 1e-6  # floor on standard deviations (a record every model fits identically)


def _gauss_fit(phi: np.ndarray, mask: np.ndarray, fix_variance: bool, min_std: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-record mean (N,) and std (N,) of phi (M, N) over the models where mask (M, N) holds."""
    n = mask.sum(0)  # (N,)
    if np.any(n == 0):
        raise MembershipError(f"{int((n == 0).sum())} records have no reference model on this side (IN/OUT)")
    mean = np.where(mask, phi, 0.0).sum(0) / n
    sq = np.where(mask, (phi - mean) ** 2, 0.0).sum(0)
    if fix_variance:
        ok = n >= 2
        if ok.any():
            var = np.full_like(mean, (sq[ok] / (n[ok] - 1)).mean())
        else:  # one model per record: only the spread across records is available
            var = np.full_like(mean, phi[mask].var())
    else:
        if np.any(n < 2):
            raise MembershipError("per-record variances need at least 2 reference models per record and side")
        var = sq / (n - 1)
    return mean, np.maximum(np.sqrt(var), min_std)


def lira_scores_from_phi(target_phi: np.ndarray, ref_phi: np.ndarray, ref_in: np.ndarray, params: LiRAParams = LiRAParams()) -> np.ndarray:
    """LiRA scores (N,) from the target's phi (N,), the references' phi (M, N) and in-masks (M, N)."""
    ref_in = np.asarray(ref_in, bool)
    if ref_phi.shape != ref_in.shape or ref_phi.shape[1] != len(target_phi):
        raise MembershipError(f"shapes disagree: target {target_phi.shape}, references {ref_phi.shape}, in-mask {ref_in.shape}")
    out = ~ref_in
    if params.fix_variance is not None:
        fix = params.fix_variance
    elif params.online:
        fix = bool(min(out.sum(0).min(), ref_in.sum(0).min()) < PER_RECORD_MIN_MODELS)
    else:
        fix = True  # offline: the paper's fixed variance
    mu_out, sd_out = _gauss_fit(ref_phi, out, fix, params.min_std)
    if not params.online:
        return stats.norm.logcdf(target_phi, mu_out, sd_out)
    mu_in, sd_in = _gauss_fit(ref_phi, ref_in, fix, params.min_std)
    return stats.norm.logpdf(target_phi, mu_in, sd_in) - stats.norm.logpdf(target_phi, mu_out, sd_out)


def lira_scores(target: TargetOutputs, refs: ReferenceOutputs, params: LiRAParams = LiRAParams()) -> np.ndarray:
    """LiRA scores (N,), higher = more likely a member."""
    if refs.logits.shape[1:] != target.logits.shape:
        raise MembershipError(f"reference logits {refs.logits.shape} do not match the target's {target.logits.shape}")
    phi_t = logit_scaled_confidence(target.logits, target.labels)  # (N,)
    phi_r = logit_scaled_confidence(refs.logits, target.labels[None, :])  # (M, N)
    return lira_scores_from_phi(phi_t, phi_r, refs.in_mask, params)
