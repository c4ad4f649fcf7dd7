"""Subject-structured synthetic federations, in the spirit of Suri et al. (arXiv 2206.03317).

Every subject has its own data distribution: a shared class prototype plus a subject-specific shift
(scaled by ``separation``) and a subject-specific label mix. A subject's records are spread over all
the clients that hold it; each client holds ``subjects_per_client`` subjects. Subjects that no
client holds are generated too (``client == -1``): they are the non-members a subject-level
membership inference needs, and their distribution is known through :class:`SubjectModel`.
"""

from __future__ import annotations

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

    def sample(self, subject: int, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        y = rng.choice(self.prototypes.shape[0], size=n, p=self.label_mix[subject])
        z = self.prototypes[y] + self.shifts[subject] + self.noise * rng.standard_normal((n, self.prototypes.shape[1]))
        x = 1.0 / (1.0 + np.exp(-z))  # squash into [0, 1] like pixel intensities
        return x.reshape(n, 1, SIDE, SIDE).astype(np.float32), y.astype(np.int64)


def assign_subjects(num_subjects: int, num_clients: int, subjects_per_client: int, rng: np.random.Generator) -> list[list[int]]:
    """Subjects held by each client; subjects are reused only when there are more slots than subjects."""
    if subjects_per_client > num_subjects:
        raise ValueError(f"subjects_per_client={subjects_per_client} > num_subjects={num_subjects}")
    order = rng.permutation(num_subjects)
    holders: list[list[int]] = []
    k = 0
    for _ in range(num_clients):
        held: list[int] = []
        while len(held) < subjects_per_client:
            s = int(order[k % num_subjects])
            k += 1
            if s not in held:
                held.append(s)
        holders.append(held)
    return holders


def generate_subjects(
    *,
    num_subjects: int,
    records_per_subject: int,
    num_clients: int,
    subjects_per_client: int,
    separation: float,
    seed: int,
    noise: float = 1.0,
) -> tuple[ArrayDataset, SubjectModel, list[list[int]]]:
    rng = np.random.default_rng(seed)
    d = SIDE * SIDE
    model = SubjectModel(
        prototypes=2.0 * rng.standard_normal((NUM_CLASSES, d)),
        shifts=separation * rng.standard_normal((num_subjects, d)),
        label_mix=rng.dirichlet(np.ones(NUM_CLASSES), size=num_subjects),
        noise=noise,
    )
    holders = assign_subjects(num_subjects, num_clients, subjects_per_client, rng)
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
    return data, model, holders
