"""Subject-level DP in a cross-silo federation: the mechanism step and its accountant (pure functions).

From Marathe, Kanani, Peterson, Steele, "Subject Granular Differential Privacy in Federated
Learning" (arXiv 2206.03617), the HiGradAvgDP algorithm as we read it (their LocalGroupDP, item-level
DP-SGD converted by group privacy, is not implemented). We could read only the paper's abstract and
summaries of it here, not its algorithm boxes or proofs: the four steps below and the composition
rule are our reading of "hierarchical gradient averaging" and "horizontal composition"; check them
against the full text. A subject's records may sit in several
silos (clients). Each silo trains locally with DP-SGD whose unit is the subject:

1. per local step, sample the silo's subjects independently with probability q (Poisson);
2. a sampled subject's gradient is the *average* of the per-example gradients of its records in the
   step (hierarchical averaging: the number of records a subject has does not matter);
3. clip each subject's gradient to L2 norm C;
4. sum over the sampled subjects, add N(0, sigma^2 C^2 I), divide by the expected number of sampled
   subjects q * S (not the realised count, which would leak it; like Opacus' expected batch size,
   q and q * S come from the silo's subject count S, which the accounting treats as public).

:func:`subject_dp_gradient` is that step on per-example gradients (the integrator wires it into the
client's training loop; per-example gradients from Opacus' GradSampleModule or ``torch.func``).

Accounting. One step at one silo is the sampled Gaussian mechanism with sensitivity C when one
subject is added or removed: Renyi DP from Opacus' analysis (``compute_rdp``, Mironov et al. 2019),
composed by addition over

- the silo's local steps in a round and the rounds the silo takes part in;
- **the silos that hold the subject** ("horizontal composition", the paper's observation): every one
  of them releases an update computed from the subject's records, and the server sees each update.

The epsilon of the federation is the maximum over subjects of their composed RDP, converted to
(epsilon, delta) with Opacus' conversion. When the holders are not known, every silo is assumed to
hold every subject (the worst case). No amplification from client sampling is claimed: a silo is
counted in every round it could take part in.

- Unit: "subject" (all of a person's records, wherever they are).
- Neighbouring relation: the federation's data with or without every record of one subject (add/remove).
- Trust model: each silo is trusted with its own records and runs the mechanism with private
  randomness; the server and anyone who sees the silos' updates or the global models is not trusted
  (the guarantee covers every update each silo sends).

Randomness. Subject sampling and the noise must come from entropy the adversary cannot know:
:func:`private_generator` seeds from the OS (``secrets``) unless a debug seed is given explicitly.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedkd.config import ConfigError

UNIT = "subject"
NEIGHBOURING = "add/remove all records of one subject, across every silo that holds it"
TRUST_MODEL = "silo-local DP: each silo runs the mechanism; the server and whoever sees updates or global models are untrusted"
# RDP orders: the integers 2..63 of Opacus' list plus a few large ones. Opacus' fractional orders
# (1.1 .. 10.9) cost ~20 ms each per sampled-Gaussian evaluation (a series), which made calibrating one
# sigma take seconds; any set of orders gives a valid bound, and integers lose little at the epsilons
# fedkd reports (the optimum sits at an integer or between two of them).
ORDERS: tuple[float, ...] = tuple(float(a) for a in list(range(2, 64)) + [80, 128, 256])


@dataclass(frozen=True)
class SiloSchedule:
    """One silo's mechanism: subject sampling rate q, noise multiplier sigma, local steps per round."""

    sample_rate: float
    noise_multiplier: float
    steps_per_round: int

    def __post_init__(self) -> None:
        if not 0 < self.sample_rate <= 1:
            raise ConfigError("subject_dp.subjects_per_step", f"gives a subject sample rate outside (0, 1] (got {self.sample_rate})")
        if not self.noise_multiplier >= 0:
            raise ConfigError("privacy.noise_multiplier", f"must be >= 0 (got {self.noise_multiplier})")
        if int(self.steps_per_round) != self.steps_per_round or self.steps_per_round < 1:
            raise ConfigError("train.local_epochs", f"steps per round must be an integer >= 1 (got {self.steps_per_round})")


def subject_sample_rate(expected_subjects_per_step: float, subjects_at_silo: int) -> float:
    """q = expected sampled subjects / subjects the silo holds (capped at 1)."""
    if subjects_at_silo < 1 or expected_subjects_per_step <= 0:
        raise ConfigError("subject_dp.subjects_per_step", f"needs >= 1 subject and a positive batch (got {subjects_at_silo}, {expected_subjects_per_step})")
    return min(1.0, expected_subjects_per_step / subjects_at_silo)


# ---------------------------------------------------------------- accountant
def step_rdp(sample_rate: float, noise_multiplier: float, orders=ORDERS) -> np.ndarray:
    """RDP (len(orders),) of one sampled-Gaussian step (Opacus' analysis); inf without noise."""
    if noise_multiplier <= 0:
        return np.full(len(orders), math.inf)
    return np.array(_step_rdp(float(sample_rate), float(noise_multiplier), tuple(float(a) for a in orders)))


@functools.lru_cache(maxsize=4096)
def _step_rdp(sample_rate: float, noise_multiplier: float, orders: tuple[float, ...]) -> tuple[float, ...]:
    from opacus.accountants.analysis.rdp import compute_rdp

    return tuple(np.asarray(compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(orders)), float))


def subject_rdp(silos: Sequence[SiloSchedule], rounds: int | Sequence[int], orders=ORDERS) -> np.ndarray:
    """Composed RDP of one subject held by ``silos``; ``rounds``: per silo (or one for all)."""
    per = [rounds] * len(silos) if isinstance(rounds, (int, np.integer)) else list(rounds)
    if len(per) != len(silos):
        raise ValueError(f"{len(silos)} silos but {len(per)} round counts")
    total = np.zeros(len(orders))
    for s, r in zip(silos, per):
        total = total + step_rdp(s.sample_rate, s.noise_multiplier, orders) * s.steps_per_round * r
    return total


def _eps(rdp: np.ndarray, delta: float, orders) -> float:
    from fedkd.privacy.rqm import eps_from_rdp

    return eps_from_rdp(orders, rdp, delta)[0]


def subject_epsilon(silos: Sequence[SiloSchedule], rounds: int | Sequence[int], delta: float, orders=ORDERS) -> float:
    """(epsilon, delta)-DP of one subject held by ``silos`` after ``rounds`` rounds."""
    if not silos:
        return 0.0
    return _eps(subject_rdp(silos, rounds, orders), delta, orders)


def federation_epsilon(
    schedules: Sequence[SiloSchedule], rounds: int | Sequence[int], delta: float, holders: Sequence[Sequence[int]] | None = None, orders=ORDERS
) -> tuple[float, np.ndarray]:
    """(max over subjects, per-subject epsilons): ``schedules[c]`` is silo c's mechanism, ``rounds``
    the rounds each silo takes part in, ``holders[s]`` the silos holding subject s (None: every
    silo holds every subject, one worst-case subject)."""
    per_round = [rounds] * len(schedules) if isinstance(rounds, (int, np.integer)) else list(rounds)
    if holders is None:
        holders = [range(len(schedules))]
    eps = np.array([subject_epsilon([schedules[c] for c in h], [per_round[c] for c in h], delta, orders) for h in holders])
    return float(eps.max()) if len(eps) else 0.0, eps


def calibrate_noise(target_epsilon: float, sample_rate: float, steps_per_round: int, rounds: int, silos_per_subject: int, delta: float, rel_tol: float = 1e-4) -> float:
    """The smallest sigma whose subject epsilon (same schedule at ``silos_per_subject`` silos) is at most the target."""
    if target_epsilon <= 0:
        raise ConfigError("privacy.target_epsilon", f"must be > 0 (got {target_epsilon})")
    eps = lambda s: subject_epsilon([SiloSchedule(sample_rate, s, steps_per_round)] * silos_per_subject, rounds, delta)  # noqa: E731
    lo, hi = 1e-2, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise ConfigError("privacy.target_epsilon", f"{target_epsilon} is out of reach")
    while hi / lo > 1 + rel_tol:
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if eps(mid) > target_epsilon else (lo, mid)
    return hi


# ---------------------------------------------------------------- mechanism step
def private_generator(device: str | torch.device = "cpu", debug_seed: int | None = None) -> torch.Generator:
    """A generator seeded from OS entropy (the adversary cannot know it); ``debug_seed`` only for
    reproducible debugging, never in a run whose privacy is reported."""
    from fedkd.privacy.entropy import torch_generator

    return torch_generator(device, debug_seed)


def poisson_sample_subjects(subjects: torch.Tensor, rate: float, generator: torch.Generator) -> torch.Tensor:
    """The subjects (a 1-D tensor of ids) kept this step, each independently with probability ``rate``."""
    keep = torch.rand(len(subjects), generator=generator, device=generator.device) < rate
    return subjects[keep.to(subjects.device)]


def clip_per_subject(per_example: Sequence[torch.Tensor], subject_ids: torch.Tensor, clip: float) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Average each subject's per-example gradients, then clip every subject's gradient to L2 norm
    ``clip`` (jointly over all parameters).

    per_example: tensors (B, *param_shape), one per parameter; subject_ids (B,).
    Returns (subjects (S,), clipped [(S, *param_shape)], norms before clipping (S,))."""
    if clip <= 0:
        raise ConfigError("privacy.max_grad_norm", f"must be > 0 (got {clip})")
    if not per_example or any(g.shape[0] != len(subject_ids) for g in per_example):
        raise ValueError("per-example gradients must all have the batch size of subject_ids as first dimension")
    subjects, idx = torch.unique(subject_ids, return_inverse=True)
    idx = idx.to(per_example[0].device)
    count = torch.zeros(len(subjects), device=per_example[0].device).index_add_(0, idx, torch.ones(len(idx), device=idx.device))  # (S,)
    means = []
    for g in per_example:
        flat = g.reshape(g.shape[0], -1)  # (B, P)
        summed = torch.zeros(len(subjects), flat.shape[1], dtype=flat.dtype, device=flat.device).index_add_(0, idx, flat)
        means.append(summed / count[:, None].to(flat.dtype))  # (S, P)
    norms = torch.sqrt(sum((m.double() ** 2).sum(1) for m in means))  # (S,)
    factor = torch.clamp(clip / (norms + 1e-12), max=1.0)  # (S,)
    clipped = [(m * factor[:, None].to(m.dtype)).reshape((len(subjects),) + g.shape[1:]) for m, g in zip(means, per_example)]
    return subjects, clipped, norms


def subject_dp_gradient(
    per_example: Sequence[torch.Tensor],
    subject_ids: torch.Tensor,
    *,
    clip: float,
    noise_multiplier: float,
    expected_subjects: float,
    generator: torch.Generator,
) -> list[torch.Tensor]:
    """One step of the mechanism: (sum of clipped per-subject gradients + N(0, sigma^2 C^2)) / (q S).

    The batch must hold only the records of this step's Poisson-sampled subjects
    (:func:`poisson_sample_subjects`); ``expected_subjects`` = q * (subjects at the silo)."""
    if expected_subjects <= 0:
        raise ValueError(f"expected_subjects must be > 0 (got {expected_subjects})")
    if noise_multiplier < 0:
        raise ConfigError("privacy.noise_multiplier", f"must be >= 0 (got {noise_multiplier})")
    if len(subject_ids) == 0:  # an empty Poisson draw is still a step: noise only
        return [torch.randn(g.shape[1:], generator=generator, device=generator.device).to(g) * (noise_multiplier * clip) / expected_subjects for g in per_example]
    _, clipped, _ = clip_per_subject(per_example, subject_ids, clip)
    out = []
    for c in clipped:
        noise = torch.randn(c.shape[1:], generator=generator, device=generator.device).to(c) * (noise_multiplier * clip)
        out.append((c.sum(0) + noise) / expected_subjects)
    return out


def summary_fields(schedules: Sequence[SiloSchedule], rounds: int | Sequence[int], delta: float, clip: float, holders: Sequence[Sequence[int]] | None = None) -> dict:
    """summary.json fields of a subject-level DP run (what ``fedkd.privacy.report`` should add)."""
    eps, per = federation_epsilon(schedules, rounds, delta, holders)
    return {
        "privacy_mechanism": "subject-dp",
        "epsilon": eps if math.isfinite(eps) else None,
        "delta": delta,
        "privacy_unit": UNIT,
        "privacy_neighbouring": NEIGHBOURING,
        "privacy_guarantee": TRUST_MODEL + "; RDP of the subject-sampled Gaussian composed over local steps, rounds and the silos holding the subject (max over subjects)",
        "clipping_norm": clip,
        "noise_multiplier": max(s.noise_multiplier for s in schedules) if schedules else None,
        "subjects_accounted": len(per) if holders is not None else "worst case (every silo holds the subject)",
    }
