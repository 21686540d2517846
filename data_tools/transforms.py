"""Spatial augmentation of whole clips: one crop box for every frame of a clip.

Frames come from the decoders as uint8 ``(T, H, W, 3)``. A crop is a view of that tensor
(frames of a clip are gathered from the crop only); only the cropped region is resized
(uint8, bilinear with antialiasing, on the channels-last view, which is torch's fast uint8
path); flipping happens on the small resized clip. Clips stay uint8 ``(T, C, S, S)``;
``stack_clips`` gathers a batch of them as uint8 ``(B, C, T, S, S)`` and ``normalize_video``
turns it into float32 on the consumer's device (``normalize_batch`` does both in one pass on
the CPU for ``data.normalize="loader"``).

Crops (boxes are ``(top, left, height, width)`` in the decoded frame):
- ``multiscale_crop_box``: VideoMAE pretraining's multi-scale crop - crop sides drawn from
  ``scales`` x the short side (height and width at most one scale step apart), snapped to the
  output size when within 3 pixels, at one of 13 fixed positions (corners, centre, edge
  centres, quarter points).
- ``random_resized_crop_box``: Inception-style random area / aspect ratio crop (fine-tuning).
- ``center_crop_box`` / ``three_crop_boxes``: the short-side square at the centre, or at the
  start, centre and end of the long side (equivalent to resizing the short side to the
  output size and cropping, as VideoMAE's test transform does, but resizing only the crop).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

Box = tuple[int, int, int, int]  # top, left, height, width

MULTISCALE_SCALES = (1.0, 0.875, 0.75, 0.66)
TRAIN_CROPS = ("multiscale", "random_resized", "center")


def multiscale_crop_box(height: int, width: int, output_size: int, rng: np.random.Generator,
                        scales: Sequence[float] = MULTISCALE_SCALES, max_distort: int = 1) -> Box:
    """VideoMAE's ``GroupMultiScaleCrop`` box (fix_crop and more_fix_crop on)."""
    base = min(height, width)
    sides = [int(base * s) for s in scales]
    sides = [output_size if abs(s - output_size) < 3 else s for s in sides]
    pairs = [(h, w) for i, h in enumerate(sides) for j, w in enumerate(sides)
             if abs(i - j) <= max_distort]
    crop_h, crop_w = pairs[rng.integers(len(pairs))]
    h_step, w_step = (height - crop_h) // 4, (width - crop_w) // 4
    positions = [(0, 0), (0, 4), (4, 0), (4, 4), (2, 2),  # corners and centre (in steps)
                 (2, 0), (2, 4), (4, 2), (0, 2),  # edge centres
                 (1, 1), (1, 3), (3, 1), (3, 3)]  # quarter points
    row, col = positions[rng.integers(len(positions))]
    return row * h_step, col * w_step, crop_h, crop_w


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator,
                            scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Box:
    """Random area fraction in ``scale`` and aspect ratio (w/h, log-uniform) in ``ratio``;
    falls back to the central crop clamped to ``ratio`` after 10 failed draws, like
    torchvision's ``RandomResizedCrop``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            return top, left, crop_h, crop_w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        crop_w, crop_h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        crop_h, crop_w = height, int(round(height * ratio[1]))
    else:
        crop_h, crop_w = height, width
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def three_crop_boxes(height: int, width: int) -> list[Box]:
    """Three short-side squares: start, centre and end of the longer side."""
    side = min(height, width)
    step_h, step_w = (height - side) / 2, (width - side) / 2
    return [(int(round(i * step_h)), int(round(i * step_w)), side, side) for i in range(3)]


def center_crop_box(height: int, width: int) -> Box:
    return three_crop_boxes(height, width)[1]


def crop_resize(frames: torch.Tensor, box: Box, size: int, flip: bool = False,
                indices: torch.Tensor | None = None) -> torch.Tensor:
    """Crop ``box`` out of uint8 ``(T, H, W, C)`` frames and resize it to ``size x size``.

    ``indices`` picks (and may repeat) frames after cropping, so only the crop is copied.
    Returns uint8 ``(T', C, size, size)`` (channels-last memory).
    """
    top, left, crop_h, crop_w = box
    clip = frames[:, top:top + crop_h, left:left + crop_w, :]
    if indices is not None:
        clip = clip[indices]
    clip = clip.permute(0, 3, 1, 2)
    if (crop_h, crop_w) != (size, size):
        clip = TF.resize(clip, [size, size], interpolation=TF.InterpolationMode.BILINEAR,
                         antialias=True)
    if flip:
        clip = clip.flip(-1)
    return clip


def stack_clips(clips: Sequence[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 clips ``(T, C, H, W)`` -> a batch ``(B, C, T, H, W)``, one transposing copy per
    clip into its slot. ``out`` may be a preallocated batch (e.g. in shared memory) of any
    dtype: uint8 keeps the pixels, float32 converts them in the same copy (unnormalised)."""
    first = clips[0]
    shape = (len(clips), first.shape[1], first.shape[0], *first.shape[2:])
    out = torch.empty(shape, dtype=first.dtype, device=first.device) if out is None else out
    for slot, clip in zip(out, clips):
        slot.copy_(clip.permute(1, 0, 2, 3))
    return out


def normalize_video(video: torch.Tensor, mean: Sequence[float],
                    std: Sequence[float]) -> torch.Tensor:
    """uint8 ``(..., C, T, H, W)`` (any strides) -> contiguous float32
    ``(x / 255 - mean) / std`` on the tensor's device.

    Float input is taken as already normalised (a batch from a ``data.normalize="loader"``
    loader) and returned as it is, so a consumer can always call this. The loader's
    ``"loader"`` mode runs the same arithmetic (``_normalize_in_place``), so both modes give
    bit-identical model inputs.
    """
    if video.is_floating_point():
        return video
    if video.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 or already normalised float video, got {video.dtype}")
    as_float = video.to(torch.float32, memory_format=torch.contiguous_format)
    return _normalize_in_place(as_float, mean, std)


def normalize_batch(clips: Sequence[torch.Tensor], mean: Sequence[float], std: Sequence[float],
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 clips ``(T, C, H, W)`` -> normalised float32 batch ``(B, C, T, H, W)``: the
    loader's ``data.normalize="loader"`` path, converting while transposing (one copy per clip
    instead of a uint8 batch and a second conversion pass) into ``out`` (float32, e.g. in
    shared memory) when given."""
    first = clips[0]
    shape = (len(clips), first.shape[1], first.shape[0], *first.shape[2:])
    out = torch.empty(shape, dtype=torch.float32) if out is None else out
    return _normalize_in_place(stack_clips(clips, out), mean, std)


def _normalize_in_place(video: torch.Tensor, mean: Sequence[float],
                        std: Sequence[float]) -> torch.Tensor:
    """float32 pixels 0-255 ``(..., C, T, H, W)`` -> ``x * (1 / (255 std)) + (-mean / std)``,
    in place. The two per-channel constants are computed in float32 on the CPU whatever the
    device, so every device and both loader modes round identically."""
    std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1, 1)
    scale, shift = 1.0 / (255.0 * std_t), -mean_t / std_t
    return video.mul_(scale.to(video.device)).add_(shift.to(video.device))


class ClipTransform:
    """Crops, resizes and flips decoded uint8 frames into uint8 clips ``(T, C, S, S)``.

    Args:
        size: output height and width.
        crop: training crop, ``"multiscale"``, ``"random_resized"`` or ``"center"``.
        flip: random horizontal flip in training (off for direction-sensitive data).
        appearance: applied to each training clip after the crop with the clip RNG
            (``data_tools.augment``: RandAugment, random erasing), or None.
    """

    def __init__(self, size: int = 224, crop: str = "multiscale", flip: bool = False,
                 appearance: Callable[[torch.Tensor, np.random.Generator], torch.Tensor]
                 | None = None):
        if crop not in TRAIN_CROPS:
            raise ValueError(f"unknown training crop {crop!r}; choose one of {list(TRAIN_CROPS)}")
        self.size, self.crop, self.flip = size, crop, flip
        self.appearance = appearance

    def train(self, frames: torch.Tensor, rng: np.random.Generator,
              indices: torch.Tensor | None = None) -> torch.Tensor:
        """One randomly augmented clip of ``frames[indices]`` (uint8 ``(T, H, W, C)``)."""
        _, height, width, _ = frames.shape
        if self.crop == "multiscale":
            box = multiscale_crop_box(height, width, self.size, rng)
        elif self.crop == "random_resized":
            box = random_resized_crop_box(height, width, rng)
        else:
            box = center_crop_box(height, width)
        flip = self.flip and bool(rng.random() < 0.5)
        clip = crop_resize(frames, box, self.size, flip, indices)
        return clip if self.appearance is None else self.appearance(clip, rng)

    def test(self, frames: torch.Tensor, num_crops: int = 1,
             indices: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Centre crop (``num_crops=1``) or three crops along the long side (``3``)."""
        _, height, width, _ = frames.shape
        if num_crops == 1:
            boxes = [center_crop_box(height, width)]
        elif num_crops == 3:
            boxes = three_crop_boxes(height, width)
        else:
            raise ValueError(f"num_crops must be 1 or 3, got {num_crops}")
        return [crop_resize(frames, box, self.size, indices=indices) for box in boxes]
