"""Subject-structured synthetic federations, in the spirit of Suri et al. (arXiv 2206.03317).

Every subject has its own data distribution: a shared class prototype plus a subject-specific shift
(scaled by ``separation``) and a subject-specific label mix. The federation's shape:

- ``num_clients`` clients (silos), each holding ``subjects_per_client`` subjects;
- every *member* subject is spread over ``clients_per_subject`` distinct clients (its records split
  evenly among them), so there are ``members = ceil(num_clients * subjects_per_client /
  clients_per_subject)`` member subjects (:func:`member_count`; when the slots do not divide evenly
  a few members sit on one client fewer);
- the other ``num_subjects - members`` subjects are held by no client (``client == -1``): the
  non-members a subject-level membership inference needs. Which subjects are members is a seeded
  random choice (a data split), returned in ``extras["members"]``.

The adversary's knowledge of a subject's distribution is :class:`SubjectModel` (fresh samples).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .arrays import ArrayDataset

SIDE = 8  # records are (1, 8, 8) "images" so every model (mlp, cnn, lenet) applies
NUM_CLASSES = 10


@dataclass(frozen=True)
class SubjectModel:
    """The generative parameters: what an adversary who 'knows a subject's distribution' knows."""

    prototypes: np.ndarray  # (K, D) class means
    shifts: np.ndarray  # (S, D) per-subject shift
    label_mix: np.ndarray  # (S, K) per-subject label distribution
    noise: float

    @property
    def num_subjects(self) -> int:
        return len(self.shifts)

    def sample(self, subject: int, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        y = rng.choice(self.prototypes.shape[0], size=n, p=self.label_mix[subject])
        z = self.prototypes[y] + self.shifts[subject] + self.noise * rng.standard_normal((n, self.prototypes.shape[1]))
        x = 1.0 / (1.0 + np.exp(-z))  # squash into [0, 1] like pixel intensities
        return x.reshape(n, 1, SIDE, SIDE).astype(np.float32), y.astype(np.int64)


def member_count(num_clients: int, subjects_per_client: int, clients_per_subject: int) -> int:
    """How many subjects the clients hold between them: ceil(clients * per client / clients per subject)."""
    return math.ceil(num_clients * subjects_per_client / clients_per_subject)


def check_shape(num_subjects: int, num_clients: int, subjects_per_client: int, clients_per_subject: int) -> tuple[str, str] | None:
    """None when the federation can be built, else (config key, problem) for a one-line ConfigError."""
    if not 1 <= clients_per_subject <= num_clients:
        return "data.clients_per_subject", f"must be in 1..data.num_clients={num_clients} (got {clients_per_subject})"
    m = member_count(num_clients, subjects_per_client, clients_per_subject)
    if m >= num_subjects:
        return "data.num_subjects", (
            f"{num_clients} clients x {subjects_per_client} subjects / {clients_per_subject} clients per subject need {m} member "
            f"subjects, leaving none of num_subjects={num_subjects} as a non-member (raise data.num_subjects above {m})"
        )
    return None


def assign_subjects(
    num_subjects: int, num_clients: int, subjects_per_client: int, clients_per_subject: int, rng: np.random.Generator
) -> tuple[list[list[int]], np.ndarray]:
    """(subjects held by each client, member mask (num_subjects,)). Slot i of the C * spc slots
    (client i // spc) holds member ``order[i % M]``: a member's slots are M >= spc apart, so they
    fall on distinct clients, and each member gets ``clients_per_subject`` slots (or one fewer)."""
    problem = check_shape(num_subjects, num_clients, subjects_per_client, clients_per_subject)
    if problem:
        raise ValueError(": ".join(problem))
    m = member_count(num_clients, subjects_per_client, clients_per_subject)
    members = np.sort(rng.choice(num_subjects, m, replace=False))
    order = rng.permutation(members)
    holders = [[int(order[(c * subjects_per_client + j) % m]) for j in range(subjects_per_client)] for c in range(num_clients)]
    mask = np.zeros(num_subjects, bool)
    mask[members] = True
    return holders, mask


def generate_subjects(
    *,
    num_subjects: int,
    records_per_subject: int,
    num_clients: int,
    subjects_per_client: int,
    clients_per_subject: int,
    separation: float,
    seed: int,
    noise: float = 1.0,
) -> tuple[ArrayDataset, SubjectModel, list[list[int]], np.ndarray]:
    """(all subjects' records with ``subject`` and ``client`` (-1: nobody's), the generative model,
    holders per client, member mask per subject)."""
    rng = np.random.default_rng(seed)
    d = SIDE * SIDE
    model = SubjectModel(
        prototypes=2.0 * rng.standard_normal((NUM_CLASSES, d)),
        shifts=separation * rng.standard_normal((num_subjects, d)),
        label_mix=rng.dirichlet(np.ones(NUM_CLASSES), size=num_subjects),
        noise=noise,
    )
    holders, members = assign_subjects(num_subjects, num_clients, subjects_per_client, clients_per_subject, rng)
    clients_of: dict[int, list[int]] = {}
    for c, held in enumerate(holders):
        for s in held:
            clients_of.setdefault(s, []).append(c)
    xs, ys, subj, cl = [], [], [], []
    for s in range(num_subjects):
        x, y = model.sample(s, records_per_subject, rng)
        owners = clients_of.get(s, [-1])
        xs.append(x)
        ys.append(y)
        subj.append(np.full(records_per_subject, s))
        cl.append(np.asarray(owners)[np.arange(records_per_subject) % len(owners)])  # spread evenly
    data = ArrayDataset(
        np.concatenate(xs), np.concatenate(ys), NUM_CLASSES,
        subject=np.concatenate(subj).astype(np.int64), client=np.concatenate(cl).astype(np.int64),
    )
    return data, model, holders, members
