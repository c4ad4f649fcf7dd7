"""What a membership-inference adversary observes, as typed values, and the helpers every MIA shares.

Attacks take these and nothing else; the ground truth (who really was a member) goes only to the
metrics (:mod:`fedkd.attacks.mia_metrics`) and the audits (:mod:`fedkd.privacy.audit`).

- :class:`ModelObservation`: one released model (a state dict and the architecture to load it
  into), e.g. the final global model, or the global model the server sent in some round.
- :class:`RoundsObservation`: the global model after each round, in order (the sequence every
  participant of a FedAvg federation receives). The loss-across-rounds attack needs it.
- :class:`SubjectSamples`: records the adversary drew from each subject's *distribution*: never the
  subject's training records (Suri et al.'s threat model).
- :class:`KnownMembership`: the handful of subjects (or records) whose membership the adversary
  knows, used only to calibrate a threshold.
- :class:`TargetOutputs` / :class:`ReferenceOutputs`: a record-level attack's view: the target
  model's logits on the candidate records, and the logits of reference (shadow) models the adversary
  trained itself, with which records each reference model trained on (the adversary's own choice,
  not the target's ground truth).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedkd.models import build_model


class MembershipError(ValueError):
    """An attack was given inputs it cannot use (one line)."""


@dataclass(frozen=True)
class ModelObservation:
    model_name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    state: dict[str, torch.Tensor]
    model_hidden: tuple[int, ...] | None = None
    dropout: float = 0.0
    server_round: int = 0  # 0 = the initial model (before round 1)

    def build_model(self) -> nn.Module:
        m = build_model(self.model_name, self.input_shape, self.num_classes, hidden=self.model_hidden, dropout=self.dropout)
        m.load_state_dict(self.state)
        return m.eval()

    @classmethod
    def of(cls, model: nn.Module, model_name: str, input_shape, num_classes: int, server_round: int = 0) -> "ModelObservation":
        """Snapshot a live module (a copy of its weights on CPU)."""
        hidden = tuple(m.out_features for m in model.modules() if isinstance(m, nn.Linear))[:-1] if model_name == "mlp" else None
        dropout = max((m.p for m in model.modules() if isinstance(m, nn.Dropout)), default=0.0)
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        return cls(model_name, tuple(input_shape), num_classes, state, hidden, float(dropout), server_round)


@dataclass(frozen=True)
class RoundsObservation:
    """Global models in round order; ``models[0]`` may be the initial model (round 0)."""

    models: tuple[ModelObservation, ...]

    def __post_init__(self) -> None:
        rounds = [m.server_round for m in self.models]
        if rounds != sorted(rounds) or len(set(rounds)) != len(rounds):
            raise MembershipError(f"rounds must be strictly increasing, got {rounds}")


@dataclass(frozen=True)
class SubjectSamples:
    """The adversary's samples from each subject's distribution: x (N, C, H, W), y (N,), subject (N,)."""

    x: np.ndarray
    y: np.ndarray
    subject: np.ndarray

    def __post_init__(self) -> None:
        if not (len(self.x) == len(self.y) == len(self.subject)):
            raise MembershipError(f"x, y, subject lengths differ: {len(self.x)}, {len(self.y)}, {len(self.subject)}")
        if len(self.x) == 0:
            raise MembershipError("no samples")

    @property
    def subjects(self) -> np.ndarray:
        return np.unique(self.subject)


@dataclass(frozen=True)
class KnownMembership:
    """Ids (subjects or record indices) whose membership the adversary knows, and that membership."""

    ids: np.ndarray
    member: np.ndarray  # bool, same length

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.member):
            raise MembershipError(f"{len(self.ids)} ids but {len(self.member)} membership bits")
        m = np.asarray(self.member, bool)
        if not m.any() or m.all():
            raise MembershipError("calibration needs at least one known member and one known non-member")


@dataclass(frozen=True)
class TargetOutputs:
    """The target model's logits (N, K) on N candidate records with their labels (N,)."""

    logits: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.logits.ndim != 2 or len(self.logits) != len(self.labels):
            raise MembershipError(f"logits must be (N, K) for N labels; got {self.logits.shape} and {len(self.labels)} labels")


@dataclass(frozen=True)
class ReferenceOutputs:
    """M reference models' logits (M, N, K) on the same N records, and in_mask (M, N): record n
    was in reference model m's training set (the adversary built the reference training sets)."""

    logits: np.ndarray
    in_mask: np.ndarray

    def __post_init__(self) -> None:
        if self.logits.ndim != 3 or self.in_mask.shape != self.logits.shape[:2]:
            raise MembershipError(f"reference logits must be (M, N, K) with in_mask (M, N); got {self.logits.shape}, {self.in_mask.shape}")


# ---------------------------------------------------------------- shared helpers
@torch.no_grad()
def logits_of(model: nn.Module | ModelObservation, x: np.ndarray, device: str | torch.device = "cpu", batch_size: int = 2048) -> np.ndarray:
    """Logits (N, K) of a model on inputs x (N, C, H, W), as float64 numpy."""
    m = model.build_model() if isinstance(model, ModelObservation) else model
    m = m.to(device).eval()
    xt = torch.as_tensor(np.asarray(x, np.float32))
    out = [m(xt[i : i + batch_size].to(device)).double().cpu() for i in range(0, len(xt), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, 0))


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-record cross-entropy loss (...,) from logits (..., K) and labels broadcast over the leading axes."""
    z = np.asarray(logits, np.float64)
    lse = np.logaddexp.reduce(z, axis=-1)
    picked = np.take_along_axis(z, np.broadcast_to(np.asarray(labels)[..., None], z.shape[:-1] + (1,)), axis=-1)[..., 0]
    return lse - picked


def calibrate_threshold(scores: np.ndarray, member: np.ndarray) -> float:
    """The threshold t that best separates known members (predicted when score >= t) from known
    non-members: maximum balanced accuracy (TPR + TNR) / 2 over every cut between consecutive known
    scores; among equally good cuts the middle one, placed halfway between the two scores it
    separates."""
    s = np.asarray(scores, np.float64)
    m = np.asarray(member, bool)
    if len(s) != len(m) or not m.any() or m.all():
        raise MembershipError("calibration needs scores of at least one known member and one known non-member")
    values = np.unique(s)
    # candidate cuts: below everything, between consecutive distinct values, above everything
    cuts = np.concatenate([[values[0] - 1.0], (values[:-1] + values[1:]) / 2, [values[-1] + 1.0]])
    tpr = np.array([(s[m] >= c).mean() for c in cuts])
    tnr = np.array([(s[~m] < c).mean() for c in cuts])
    bal = (tpr + tnr) / 2
    best = np.flatnonzero(np.isclose(bal, bal.max()))
    return float(cuts[best[len(best) // 2]])


def balanced_in_mask(models: int, records: int, rng: np.random.Generator) -> np.ndarray:
    """(models, records) bool: every record is IN exactly ``models // 2`` reference models, chosen at
    random (LiRA's shadow design: every record has IN and OUT models to fit both Gaussians). The
    adversary trains its reference models on these sets; it reveals nothing about the target."""
    if models < 2:
        raise MembershipError(f"need at least 2 reference models for IN and OUT sides (got {models})")
    order = np.argsort(rng.random((models, records)), axis=0)  # a random permutation of the models per record
    return order < models // 2
