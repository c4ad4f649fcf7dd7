"""The LOSS attack (Yeom, Giacomelli, Fredrikson, Jha 2018, arXiv 1709.01604): the weak baseline.

A record is called a member when the target model's loss on it is low. Score = minus the
cross-entropy of the target model's logits on the record's label. No reference models; a single
global threshold for all records, which is why it fails at low false-positive rates on records
that are easy (or hard) for every model (Carlini et al. 2022).
"""

from __future__ import annotations

import numpy as np

from .membership import TargetOutputs, cross_entropy


def loss_scores(target: TargetOutputs) -> np.ndarray:
    """(N,) scores, higher = more likely a member."""
    return -cross_entropy(target.logits, target.labels)
