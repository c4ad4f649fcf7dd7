"""Models by name. Inputs are (B, C, H, W) images in [0, 1]; outputs are logits (B, K).

- ``mlp``: Flatten -> hidden layers (``model.hidden``, default 64-64) with ReLU -> K.
- ``cnn``: two 3x3 conv blocks (16, 32 channels, ReLU, 2x2 max-pool) -> FC 64 -> K; works for 8x8,
  28x28 and 32x32 inputs.
- ``lenet``: the sigmoid LeNet of DLG (Zhu et al. 2019): three 5x5 convs (12 channels, strides 2, 2, 1)
  with sigmoid activations and one linear layer. :func:`init_uniform` gives DLG's U(-0.5, 0.5) weights.
- ``convnet``: the ConvNet of Dataset Condensation and FedLGD (:class:`ConvNet`): 3 blocks of
  [3x3 conv, width 128 -> instance norm as GroupNorm(128, 128) -> ReLU -> 2x2 average pooling], then one
  linear layer on the flattened features. ``forward`` returns logits like every fedkd model;
  ``embed(x)`` returns the flattened features (B, 128 * h * w) and ``embed_and_logits(x)`` both, which
  is what the authors' ``forward`` returns. ``convnet-w32``: the same at width 32, for reduced settings.
- ``hyperfl-cnn``, ``pfedhn-cnn``: the target networks of HyperFL and pFedHN (``fedkd/hypernet.py``), usable by
  any strategy (e.g. FedAvg on the same architecture as a hypernetwork run).

Dropout (``model.dropout``) sits before each hidden linear layer's activation output.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from fedkd.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


@MODELS.register("mlp")
def mlp(input_shape, num_classes: int, hidden=(64, 64), dropout: float = 0.0) -> nn.Module:
    c, h, w = input_shape
    layers: list[nn.Module] = [nn.Flatten()]
    width = c * h * w
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = size
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


@MODELS.register("cnn")
def cnn(input_shape, num_classes: int, hidden=(64,), dropout: float = 0.0) -> nn.Module:
    c, h, w = input_shape
    fc = hidden[0] if hidden else 64
    layers: list[nn.Module] = [
        nn.Conv2d(c, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 16, H/2, W/2)
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 32, H/4, W/4)
        nn.Flatten(),
        nn.Linear(32 * (h // 4) * (w // 4), fc), nn.ReLU(),
    ]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(fc, num_classes))
    return nn.Sequential(*layers)


@MODELS.register("lenet")
def lenet(input_shape, num_classes: int, hidden=(), dropout: float = 0.0) -> nn.Module:
    c, h, w = input_shape
    layers: list[nn.Module] = [
        nn.Conv2d(c, 12, 5, padding=2, stride=2), nn.Sigmoid(),  # (B, 12, ceil(H/2), ceil(W/2))
        nn.Conv2d(12, 12, 5, padding=2, stride=2), nn.Sigmoid(),  # (B, 12, ceil(H/4), ceil(W/4))
        nn.Conv2d(12, 12, 5, padding=2, stride=1), nn.Sigmoid(),
        nn.Flatten(),
    ]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(12 * (-(-h // 4)) * (-(-w // 4)), num_classes))
    return nn.Sequential(*layers)


class ConvNet(nn.Module):
    """The ConvNet of Dataset Condensation (Zhao et al. 2021) as FedLGD configures it.

    Defaults: width 128, depth 3, ReLU, "instancenorm" implemented as ``GroupNorm(C, C)`` (affine),
    2x2 average pooling. As in the authors' code, a 1-channel input gets padding 3 in the first conv
    (28x28 -> 32x32 before pooling); otherwise padding 1. For 3x28x28 inputs the embedding is 128*3*3.
    """

    def __init__(self, input_shape, num_classes: int, width: int = 128, depth: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        c, h, w = input_shape
        layers: list[nn.Module] = []
        for d in range(depth):
            pad = 3 if c == 1 and d == 0 else 1
            layers += [nn.Conv2d(c if d == 0 else width, width, 3, padding=pad), nn.GroupNorm(width, width, affine=True), nn.ReLU(), nn.AvgPool2d(2)]
            h, w = (h + 2 * pad - 2) // 2, (w + 2 * pad - 2) // 2
            if h < 1 or w < 1:
                raise ValueError(f"convnet: inputs of {tuple(input_shape)} are too small for depth {depth}")
        self.features = nn.Sequential(*layers, nn.Flatten())  # (B, width * h * w)
        self.embedding_dim = width * h * w
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(self.embedding_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> the flattened features (B, embedding_dim)."""
        return self.features(x)

    def embed_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(embedding (B, D), logits (B, K)): the authors' ``forward``."""
        e = self.features(x)
        return e, self.classifier(self.dropout(e))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed_and_logits(x)[1]


@MODELS.register("convnet")
def convnet(input_shape, num_classes: int, hidden=(), dropout: float = 0.0) -> nn.Module:
    return ConvNet(input_shape, num_classes, dropout=dropout)


@MODELS.register("convnet-w32")
def convnet_w32(input_shape, num_classes: int, hidden=(), dropout: float = 0.0) -> nn.Module:
    """The same ConvNet at width 32 (about 1/13 of the compute): for reduced FedLGD settings on CPUs."""
    return ConvNet(input_shape, num_classes, width=32, dropout=dropout)


def build_model(name: str, input_shape, num_classes: int, hidden=None, dropout: float = 0.0) -> nn.Module:
    """The model ``name`` for inputs of ``input_shape`` (C, H, W). ``hidden=None`` = the model's default."""
    fn = MODELS.get(name)
    kwargs = {"dropout": dropout}
    if hidden is not None and name in ("mlp", "cnn"):
        kwargs["hidden"] = tuple(hidden) if name == "mlp" else tuple(hidden[:1])
    return fn(tuple(input_shape), num_classes, **kwargs)


def model_from_config(model_cfg, partition_id: int, input_shape, num_classes: int) -> nn.Module:
    name = model_cfg.for_partition(partition_id)
    return build_model(name, input_shape, num_classes, hidden=model_cfg.hidden if name == "mlp" else None, dropout=model_cfg.dropout)


def init_uniform(model: nn.Module, bound: float = 0.5, seed: int | None = None) -> nn.Module:
    """DLG's initialisation: every weight and bias uniform in [-bound, bound]."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.rand(p.shape, generator=g) * 2 * bound - bound)
    return model


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


from fedkd import hypernet as _hypernet  # noqa: E402,F401  (registers "hyperfl-cnn" and "pfedhn-cnn")
