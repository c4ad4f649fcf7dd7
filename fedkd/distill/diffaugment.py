"""Differentiable Siamese Augmentation: DiffAugment's transforms with one draw shared by several batches.

DiffAugment (Zhao, Liu, Lin, Zhu, Han 2020, arXiv 2006.10738) made image augmentations differentiable;
Dataset Condensation with Differentiable Siamese Augmentation (Zhao & Bilen, ICML 2021, arXiv 2102.08259)
applies the *same* random transformation to a real and a synthetic batch before comparing them, so that
the gradient reaches the synthetic images through the augmentation. FedLGD's distribution matching
uses it with the strategy ``'color_crop_cutout_flip_scale_rotate'`` and DSA's parameters
(:class:`DSAParams`: scale 1.2, rotate 15 degrees, crop 0.125, cutout 0.5, flip 0.5, brightness 1.0,
saturation 2.0, contrast 0.5).

Semantics, as in the authors' code (ParamDiffAug's single mode ``'S'`` with a seed, i.e. siamese):

- one call picks *one* group of the strategy uniformly at random (``color`` = brightness, then
  saturation, then contrast; ``crop``; ``cutout``; ``flip``; ``scale``; ``rotate``);
- every random parameter is drawn once and applied to every image of every batch in the call;
- brightness ``x + (b - 0.5) * 1.0``; saturation ``(x - mean_c) * (2.0 * s) + mean_c`` (mean over
  channels per pixel); contrast ``(x - mean) * (c + 0.5) + mean`` (mean over C, H, W per image), with
  b, s, c ~ U(0, 1); crop = translation by integers in [-round(0.125 H), round(0.125 H)] per axis with
  zero fill; cutout = a zeroed (H/2 x W/2) window centred at a uniform position (clipped at the border);
  flip = horizontal flip with probability 0.5; scale = x and y scaled by factors from U(1/1.2, 1.2)
  (bilinear ``grid_sample``, zero padding); rotate = an angle from U(-15, 15) degrees.

The draws come from the ``torch.Generator`` the caller passes (a client passes its private generator,
so the server cannot reproduce them); nothing here touches the global RNG.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

FEDLGD_STRATEGY = "color_crop_cutout_flip_scale_rotate"
GROUPS = ("color", "crop", "cutout", "flip", "scale", "rotate")


@dataclass(frozen=True)
class DSAParams:
    """DSA's augmentation strengths (the authors' ParamDiffAug)."""

    prob_flip: float = 0.5
    ratio_scale: float = 1.2
    ratio_rotate: float = 15.0  # degrees
    ratio_crop_pad: float = 0.125
    ratio_cutout: float = 0.5
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5


@dataclass(frozen=True)
class AugDraw:
    """One siamese draw: the chosen group and its random values (U(0, 1) unless said)."""

    group: str  # "" = identity
    values: tuple[float, ...] = ()


def parse_strategy(strategy: str) -> tuple[str, ...]:
    """``'color_crop'`` -> ``('color', 'crop')``; ``''`` or ``'none'`` -> ``()``. Unknown groups raise ValueError."""
    if strategy.lower() in ("", "none"):
        return ()
    groups = tuple(strategy.split("_"))
    bad = [g for g in groups if g not in GROUPS]
    if bad:
        raise ValueError(f"unknown DSA group(s) {bad} in {strategy!r}; valid: {', '.join(GROUPS)} joined by '_', or 'none'")
    return groups


def _u(generator: torch.Generator) -> float:
    return float(torch.rand((), generator=generator, device=generator.device))


def draw(strategy: str, generator: torch.Generator) -> AugDraw:
    """Pick one group of ``strategy`` and draw its random values from ``generator``."""
    groups = parse_strategy(strategy)
    if not groups:
        return AugDraw("")
    group = groups[int(torch.randint(len(groups), (), generator=generator, device=generator.device))]
    n = {"color": 3, "crop": 2, "cutout": 2, "flip": 1, "scale": 2, "rotate": 1}[group]
    return AugDraw(group, tuple(_u(generator) for _ in range(n)))


def apply(x: torch.Tensor, d: AugDraw, params: DSAParams = DSAParams()) -> torch.Tensor:
    """Apply draw ``d`` to every image of ``x`` (B, C, H, W); differentiable in ``x``."""
    if not d.group or len(x) == 0:
        return x
    b, c, h, w = x.shape
    if d.group == "color":
        rb, rs, rc = d.values
        x = x + (rb - 0.5) * params.brightness
        m = x.mean(dim=1, keepdim=True)
        x = (x - m) * (rs * params.saturation) + m
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - m) * (rc + params.contrast) + m
    if d.group == "crop":
        sh, sw = int(h * params.ratio_crop_pad + 0.5), int(w * params.ratio_crop_pad + 0.5)
        tx = min(int(d.values[0] * (2 * sh + 1)), 2 * sh) - sh  # uniform integer in [-sh, sh]
        ty = min(int(d.values[1] * (2 * sw + 1)), 2 * sw) - sw
        padded = F.pad(x, (sw, sw, sh, sh))  # zeros around: out[i, j] = x[i + tx, j + ty], 0 outside
        return padded[:, :, sh + tx : sh + tx + h, sw + ty : sw + ty + w]
    if d.group == "cutout":
        ch, cw = int(h * params.ratio_cutout + 0.5), int(w * params.ratio_cutout + 0.5)
        nh, nw = h + (1 - ch % 2), w + (1 - cw % 2)  # the authors' range of window centres
        ox, oy = min(int(d.values[0] * nh), nh - 1), min(int(d.values[1] * nw), nw - 1)
        r0, c0 = ox - ch // 2, oy - cw // 2
        mask = torch.ones(h, w, dtype=x.dtype, device=x.device)
        mask[max(r0, 0) : max(min(r0 + ch, h), 0), max(c0, 0) : max(min(c0 + cw, w), 0)] = 0
        return x * mask
    if d.group == "flip":
        return x.flip(3) if d.values[0] < params.prob_flip else x
    if d.group in ("scale", "rotate"):
        if d.group == "scale":
            lo, hi = 1.0 / params.ratio_scale, params.ratio_scale
            sx, sy = (v * (hi - lo) + lo for v in d.values)
            theta = [[sx, 0.0, 0.0], [0.0, sy, 0.0]]
        else:
            a = (d.values[0] - 0.5) * 2 * params.ratio_rotate / 180.0 * math.pi
            theta = [[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]]
        t = torch.tensor(theta, dtype=x.dtype, device=x.device).expand(b, 2, 3)
        grid = F.affine_grid(t, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    raise ValueError(f"unknown DSA group {d.group!r}")


def siamese_augment(*batches: torch.Tensor, generator: torch.Generator, strategy: str = FEDLGD_STRATEGY,
                    params: DSAParams = DSAParams()) -> tuple[torch.Tensor, ...]:
    """The same random transformation (one draw from ``generator``) applied to every batch."""
    d = draw(strategy, generator)
    return tuple(apply(x, d, params) for x in batches)
