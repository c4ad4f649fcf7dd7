"""Membership-inference metrics as the field reports them (Carlini et al. 2022; ML Privacy Meter).

- ROC and ROC AUC: scikit-learn's ``roc_curve`` (every threshold kept) and ``roc_auc_score``
  (ties count one half).
- TPR at a fixed FPR (1% and 0.1%): the largest TPR among the ROC's points whose FPR is at most the
  target, i.e. the best *single* threshold that respects the FPR budget. No interpolation between
  thresholds (which would describe a randomised attack) and no extrapolation: with fewer than
  1/FPR non-members the only admissible points have FPR = 0, and the row says so
  (``fpr_resolved`` false: the figure is TPR at FPR 0, not a measurement at the target).
- The ROC on log-log axes as a PNG (matplotlib), with the chance diagonal.
- One tidy row per (attack, setting): ``attack, auc, tpr_at_1pct_fpr, tpr_at_0.1pct_fpr,
  fpr_resolved_1pct, fpr_resolved_0.1pct, members, non_members`` plus the caller's labels; pandas
  DataFrame / CSV.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .membership import MembershipError

LOW_FPRS = (0.01, 0.001)


def _check(scores, member) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, np.float64)
    m = np.asarray(member, bool)
    if s.shape != m.shape or s.ndim != 1:
        raise MembershipError(f"scores {s.shape} and membership {m.shape} must be matching 1-D arrays")
    if not m.any() or m.all():
        raise MembershipError("metrics need at least one member and one non-member")
    if np.isnan(s).any():
        raise MembershipError("scores contain NaN")
    return s, m


def roc(scores, member) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds): member predicted when score >= threshold."""
    from sklearn.metrics import roc_curve

    s, m = _check(scores, member)
    return roc_curve(m, s, drop_intermediate=False)


def auc(scores, member) -> float:
    from sklearn.metrics import roc_auc_score

    s, m = _check(scores, member)
    return float(roc_auc_score(m, s))


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """Largest TPR over ROC points with FPR <= target (a single threshold; no interpolation)."""
    ok = fpr <= target + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def summary(scores, member, attack: str, **labels) -> dict:
    """One tidy row of the metrics above, plus ``labels`` (dataset, defence, epsilon, ...)."""
    s, m = _check(scores, member)
    fpr, tpr, _ = roc(s, m)
    negatives = int((~m).sum())
    row = {"attack": attack, "auc": auc(s, m)}
    for f in LOW_FPRS:
        tag = f"{f * 100:g}pct"
        row[f"tpr_at_{tag}_fpr"] = tpr_at_fpr(fpr, tpr, f)
        row[f"fpr_resolved_{tag}"] = negatives * f >= 1  # at least one non-member may be a false positive
    row.update(members=int(m.sum()), non_members=negatives)
    row.update(labels)
    return row


def frame(rows: list[dict]):
    import pandas as pd

    return pd.DataFrame(rows)


def write_csv(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame(rows).to_csv(path, index=False)
    return path


def plot_roc(curves: dict[str, tuple], path: str | Path, log: bool = True, title: str = "") -> Path:
    """ROC curves ``{name: (scores, member)}`` in one PNG; log-log axes by default (the field's way)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    lo = 1.0
    for name, (scores, member) in curves.items():
        fpr, tpr, _ = roc(scores, member)
        lo = min(lo, 1.0 / max((~np.asarray(member, bool)).sum(), 1))
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc(scores, member):.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="chance")
    if log:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo / 2, 1)
        ax.set_ylim(lo / 2, 1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title or ("ROC (log-log)" if log else "ROC"))
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
