"""Fine-tuning's appearance augmentations of whole uint8 clips: RandAugment and random erasing.

VideoMAE fine-tunes with RandAugment (m7, n4) and random erasing (p 0.25) on top of the random
resized crop and flip (``data_tools.transforms``); both are off by default here
(``data.rand_augment_ops`` / ``data.random_erasing``), and apply in loader mode ``train`` only.

- ``ClipRandAugment``: torchvision's ``RandAugment`` on the clip ``(T, C, H, W)`` as one
  tensor, so every frame gets the same operations at the same magnitude (as VideoMAE applies
  one draw to all frames of a clip). Magnitude on timm's 0-10 scale (``m7`` = 7/10 of each
  operation's range: torchvision with 11 bins). torchvision draws from torch's global RNG, so
  each clip runs under a seed drawn from the worker's clip RNG (``fork_rng``): the clips stay a
  function of ``data.seed``, as the crops are.
- ``erase_frames``: VideoMAE's random erasing (timm ``RandomErasing``, mode ``pixel``,
  applied to the ``(T, C, H, W)`` clip as a batch): each frame independently, with
  probability ``p``, gets one box (area 2-33% of the frame, aspect ratio 0.3-3.3,
  log-uniform; a box that fits in none of 10 draws is skipped, as in timm) of per-pixel
  noise. timm draws the noise as N(0, 1) in normalised units; the clip is still uint8 here
  (normalised on the consumer's device), so the noise is ``255 * (mean + std * z)`` per
  channel, rounded and clipped to 0-255.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torchvision.transforms.v2 as T

from data_tools.config import DataConfig

ERASE_AREA = (0.02, 1 / 3)
ERASE_LOG_RATIO = (math.log(0.3), math.log(1 / 0.3))


class ClipRandAugment:
    """``num_ops`` RandAugment operations at ``magnitude`` (0-10) on a uint8 clip
    ``(T, C, H, W)``, the same for every frame, seeded from ``rng``."""

    def __init__(self, num_ops: int, magnitude: int):
        self.transform = T.RandAugment(num_ops=num_ops, magnitude=magnitude,
                                       num_magnitude_bins=11)

    def __call__(self, clip: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(rng.integers(2 ** 62)))
            return self.transform(clip)


def erase_box(height: int, width: int,
              rng: np.random.Generator) -> tuple[int, int, int, int] | None:
    """timm's box: ``(top, left, h, w)`` from up to 10 draws, or None when none fits."""
    for _ in range(10):
        area = height * width * rng.uniform(*ERASE_AREA)
        ratio = math.exp(rng.uniform(*ERASE_LOG_RATIO))
        box_h, box_w = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
        if box_w < width and box_h < height:
            return (int(rng.integers(0, height - box_h + 1)),
                    int(rng.integers(0, width - box_w + 1)), box_h, box_w)
    return None


def erase_frames(clip: torch.Tensor, probability: float, mean: Sequence[float],
                 std: Sequence[float], rng: np.random.Generator) -> torch.Tensor:
    """Random erasing of a uint8 clip ``(T, C, H, W)``, each frame on its own (see the module
    docstring). Returns the clip itself when no frame is drawn, else an erased copy (the
    clip may be a view of frames that other clips of the same video share)."""
    frames, channels, height, width = clip.shape
    drawn = np.flatnonzero(rng.random(frames) < probability)
    if len(drawn) == 0:
        return clip
    clip = clip.clone()
    scale = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1) * 255
    shift = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1) * 255
    for index in drawn:
        box = erase_box(height, width, rng)
        if box is None:
            continue
        top, left, box_h, box_w = box
        noise = torch.from_numpy(rng.standard_normal((channels, box_h, box_w)).astype(np.float32))
        values = (noise * scale + shift).round_().clamp_(0, 255).to(torch.uint8)
        clip[index, :, top:top + box_h, left:left + box_w] = values
    return clip


class ClipAppearance:
    """RandAugment then random erasing of a training clip (either may be off)."""

    def __init__(self, rand_augment_ops: int, rand_augment_magnitude: int,
                 erase_probability: float, mean: Sequence[float], std: Sequence[float]):
        self.rand_augment = (ClipRandAugment(rand_augment_ops, rand_augment_magnitude)
                             if rand_augment_ops else None)
        self.erase_probability, self.mean, self.std = erase_probability, mean, std

    def __call__(self, clip: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        if self.rand_augment is not None:
            clip = self.rand_augment(clip, rng)
        if self.erase_probability > 0:
            clip = erase_frames(clip, self.erase_probability, self.mean, self.std, rng)
        return clip


def clip_appearance(cfg: DataConfig) -> ClipAppearance | None:
    """The training clips' appearance augmentation of ``cfg`` (None when both are off)."""
    if not cfg.rand_augment_ops and not cfg.random_erasing:
        return None
    return ClipAppearance(cfg.rand_augment_ops, cfg.rand_augment_magnitude,
                          cfg.random_erasing, cfg.mean, cfg.std)
