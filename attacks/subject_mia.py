"""Subject membership inference: Suri, Kanani, Marathe, Peterson, "Subject Membership Inference
Attacks in Federated Learning" (arXiv 2206.03317).

Question: were *any* of a subject's records in the federation's training data (spread over any of
the silos)? The adversary holds samples from each subject's distribution, not the subject's
training records, and knows the membership of a handful of subjects. Two black-box attacks:

- **Loss threshold** (:func:`loss_threshold`): the mean cross-entropy of the final global model
  on the adversary's samples of the subject; member when the loss is below a threshold.
- **Loss across rounds** (:func:`loss_across_rounds`): with the global model after every round,
  count the rounds whose model lowered the subject's mean loss compared with the previous round's
  model; member when the count is above a threshold. A member's data pulls the model toward its
  distribution in (almost) every round it is trained on; a non-member's loss only moves with what
  it shares with the members.

We could read only the paper's abstract and the project's notes on it here (no public code exists):
the two scores follow those descriptions. Calibration (our reading; the threshold comes from the
subjects of known membership): :func:`fedkd.attacks.membership.calibrate_threshold`, the cut that maximises the
balanced accuracy on the known subjects (midpoint between the two scores it separates). Every
subject gets a score as well (higher = more likely member: minus the loss, or the count), so AUC
and TPR at low FPR can be computed over all subjects without any threshold. Report the metrics on
the subjects the adversary did *not* know (:func:`unknown_subjects`), as the calibration saw the
others.

Deviation, said plainly: ties of the round count between subjects are left as ties (the score is
the integer count, as in the paper); the metrics treat ties as sklearn's ROC does (one point).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .membership import (
    KnownMembership,
    MembershipError,
    ModelObservation,
    RoundsObservation,
    SubjectSamples,
    calibrate_threshold,
    cross_entropy,
    logits_of,
)


@dataclass(frozen=True)
class SubjectMIAResult:
    attack: str
    subjects: np.ndarray  # (S,) subject ids, sorted
    scores: np.ndarray  # (S,) higher = more likely a member
    threshold: float  # calibrated on the known subjects
    predicted_member: np.ndarray  # (S,) bool: scores >= threshold

    def score_of(self, ids) -> np.ndarray:
        idx = np.searchsorted(self.subjects, np.asarray(ids))
        if np.any(idx >= len(self.subjects)) or np.any(self.subjects[np.minimum(idx, len(self.subjects) - 1)] != np.asarray(ids)):
            raise MembershipError("some ids were not scored")
        return self.scores[idx]


def subject_losses(model: ModelObservation, samples: SubjectSamples, device="cpu") -> tuple[np.ndarray, np.ndarray]:
    """(subject ids (S,), mean cross-entropy of ``model`` on each subject's samples (S,))."""
    loss = cross_entropy(logits_of(model, samples.x, device), samples.y)  # (N,)
    subjects, inverse = np.unique(samples.subject, return_inverse=True)
    mean = np.bincount(inverse, weights=loss) / np.bincount(inverse)
    return subjects, mean


def _finish(attack: str, subjects: np.ndarray, scores: np.ndarray, known: KnownMembership) -> SubjectMIAResult:
    pos = np.searchsorted(subjects, known.ids)
    if np.any(pos >= len(subjects)) or np.any(subjects[np.minimum(pos, len(subjects) - 1)] != known.ids):
        raise MembershipError(f"{attack}: the adversary has no samples of some known subjects")
    threshold = calibrate_threshold(scores[pos], known.member)
    return SubjectMIAResult(attack, subjects, scores, threshold, scores >= threshold)


def loss_threshold(final_model: ModelObservation, samples: SubjectSamples, known: KnownMembership, device="cpu") -> SubjectMIAResult:
    """Suri et al.'s loss-threshold attack on the final global model. Score = minus the mean loss."""
    subjects, loss = subject_losses(final_model, samples, device)
    return _finish("subject-loss-threshold", subjects, -loss, known)


def round_losses(rounds: RoundsObservation, samples: SubjectSamples, device="cpu") -> tuple[np.ndarray, np.ndarray]:
    """(subject ids (S,), mean loss of every round's model on every subject (R, S))."""
    if len(rounds.models) < 2:
        raise MembershipError(f"loss across rounds needs the global model of at least 2 rounds, got {len(rounds.models)}")
    per_round = []
    subjects = None
    for m in rounds.models:
        subjects, loss = subject_losses(m, samples, device)
        per_round.append(loss)
    return subjects, np.stack(per_round)


def loss_across_rounds(rounds: RoundsObservation, samples: SubjectSamples, known: KnownMembership, device="cpu") -> SubjectMIAResult:
    """Suri et al.'s loss-across-rounds attack: score = number of rounds whose global model lowered
    the subject's mean loss relative to the previous round's model (0 .. R-1)."""
    subjects, loss = round_losses(rounds, samples, device)  # (R, S)
    decreases = (np.diff(loss, axis=0) < 0).sum(axis=0).astype(np.float64)  # (S,)
    return _finish("subject-loss-across-rounds", subjects, decreases, known)


def unknown_subjects(result: SubjectMIAResult, known: KnownMembership) -> np.ndarray:
    """Mask (S,) of the subjects whose membership the adversary did not know (where to measure)."""
    return ~np.isin(result.subjects, known.ids)


def adversary_view(subject_model, members: np.ndarray, per_subject: int, known_per_side: int, rng: np.random.Generator
                   ) -> tuple[SubjectSamples, KnownMembership]:
    """What the adversary holds for a synthetic-subjects federation: ``per_subject`` fresh samples of every
    subject's distribution (drawn with ``rng``) and the membership of the first ``known_per_side`` members and
    non-members (its calibration set)."""
    xs, ys, ss = [], [], []
    for subj in range(subject_model.num_subjects):
        x, y = subject_model.sample(subj, per_subject, rng)
        xs.append(x), ys.append(y), ss.append(np.full(per_subject, subj))
    samples = SubjectSamples(np.concatenate(xs), np.concatenate(ys), np.concatenate(ss))
    known_ids = np.r_[np.flatnonzero(members)[:known_per_side], np.flatnonzero(~members)[:known_per_side]]
    return samples, KnownMembership(known_ids, members[known_ids])
