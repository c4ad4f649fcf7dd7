"""Dataset-distillation building blocks: pure functions on tensors, no Flower, no global RNG.

One file per algorithm, named after its paper; FedLGD (strategies/fedlgd.py and its client) composes them,
and any other strategy or attack may reuse them:

- ``diffaugment.py``: differentiable siamese augmentation (DiffAugment / DSA), one draw for several batches.
- ``distribution_matching.py``: Dataset Condensation with Distribution Matching (Zhao & Bilen).
- ``gradient_matching.py``: Dataset Condensation's layer-wise gradient distance and image update (Zhao et al.).
- ``supcon.py``: the supervised contrastive loss (Khosla et al.), FedLGD's local-global alignment.
- ``class_stats.py``: per-class per-channel image statistics and Gaussian virtual images drawn from them.
- ``grids.py``: PNG grids of virtual images.

Every function that draws random numbers takes a ``torch.Generator``: a client passes its private one.
"""

from .class_stats import ClassStats, average_stats, class_channel_stats, init_from_stats
from .diffaugment import FEDLGD_STRATEGY, DSAParams, siamese_augment
from .distribution_matching import distribution_matching, embedding_mean_distance
from .gradient_matching import gradient_match_distance, gradient_matching, match_distance, pseudo_gradient
from .grids import grid_path, list_grids, save_virtual_grid
from .supcon import alignment_loss, supcon_loss

__all__ = [
    "ClassStats", "DSAParams", "FEDLGD_STRATEGY", "alignment_loss", "average_stats", "class_channel_stats",
    "distribution_matching", "embedding_mean_distance", "gradient_match_distance", "gradient_matching", "grid_path",
    "init_from_stats", "list_grids", "match_distance", "pseudo_gradient", "save_virtual_grid", "siamese_augment", "supcon_loss",
]
