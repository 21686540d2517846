"""Sliding-window clip features of untrimmed videos, and the seconds <-> feature-step map.

Window ``k`` samples ``num_frames`` frames ``sampling_rate`` apart starting at source frame
``k * window_stride``; it covers frames ``[k * window_stride, k * window_stride + span)`` with
``span = (num_frames - 1) * sampling_rate + 1`` and its feature is placed at the window's
centre, ``(k * window_stride + span / 2) / fps`` seconds (ActionFormer's ``feat_offset`` for
THUMOS I3D features: 16 frames, stride 4). Windows continue until one reaches the last
frame; indices past the end repeat the last frame.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
from torch import Tensor, nn

from data_tools.transforms import center_crop_box, crop_resize, normalize_video, stack_clips
from runtime.constants import IMAGENET_MEAN, IMAGENET_STD


class FrameSource(Protocol):
    """What ``data_tools.decode.open_video`` returns."""

    num_frames: int

    def get_frames(self, indices: Sequence[int]) -> Tensor: ...


@dataclass(frozen=True)
class FeatureGrid:
    """Times of the feature steps of one video."""

    fps: float
    window_stride: int  # source frames between window starts
    span: int  # source frames covered by one window
    num_steps: int

    @property
    def step_seconds(self) -> float:
        return self.window_stride / self.fps

    @property
    def offset_seconds(self) -> float:
        """Time of step 0 (the centre of the first window)."""
        return 0.5 * self.span / self.fps

    def to_seconds(self, steps: Tensor) -> Tensor:
        return self.offset_seconds + steps * self.step_seconds

    def to_steps(self, seconds: Tensor) -> Tensor:
        return (seconds - self.offset_seconds) / self.step_seconds

    @classmethod
    def for_video(cls, num_video_frames: int, fps: float, num_frames: int, sampling_rate: int,
                  window_stride: int) -> "FeatureGrid":
        if min(num_frames, sampling_rate, window_stride) < 1:
            raise ValueError(
                f"num_frames, sampling_rate and window_stride must be >= 1, got {num_frames}, "
                f"{sampling_rate}, {window_stride}")
        span = (num_frames - 1) * sampling_rate + 1
        num_steps = max(1, math.ceil((num_video_frames - span) / window_stride) + 1)
        return cls(fps=float(fps), window_stride=window_stride, span=span, num_steps=num_steps)

    def window_indices(self, step: int, num_frames: int, sampling_rate: int,
                       num_video_frames: int) -> list[int]:
        start = step * self.window_stride
        return [min(start + i * sampling_rate, num_video_frames - 1) for i in range(num_frames)]


class _TensorFrames:
    def __init__(self, frames: Tensor):
        self.frames = frames
        self.num_frames = frames.shape[0]

    def get_frames(self, indices: Sequence[int]) -> Tensor:
        return self.frames[list(indices)]


@torch.no_grad()
def sliding_window_features(
    encoder: nn.Module,
    video: Tensor | FrameSource,
    fps: float,
    num_frames: int = 16,
    sampling_rate: int = 1,
    window_stride: int = 4,
    size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, FeatureGrid]:
    """Mean-pooled encoder tokens of every window of a video.

    Args:
        encoder: ``forward_features(x (B, C, T, H, W)) -> (B, N, D)``, e.g. ``models.VideoViT``.
        video: uint8 frames ``(N, H, W, 3)`` or a decoder reader (frames decoded per batch of
            windows, so long videos never sit in memory whole).
        fps: frame rate of ``video``.
        num_frames, sampling_rate: frames per window and their spacing (the encoder's clip).
        window_stride: source frames between window starts.
        size: the short-side centre crop is resized to ``size x size``.
    Returns:
        ``features (num_steps, D)`` float32 on CPU and the video's :class:`FeatureGrid`.
    """
    source = _TensorFrames(video) if isinstance(video, Tensor) else video
    grid = FeatureGrid.for_video(source.num_frames, fps, num_frames, sampling_rate, window_stride)
    encoder.eval()
    chunks = []
    for first in range(0, grid.num_steps, batch_size):
        steps = range(first, min(first + batch_size, grid.num_steps))
        windows = [grid.window_indices(k, num_frames, sampling_rate, source.num_frames)
                   for k in steps]
        needed = sorted({i for window in windows for i in window})
        decoded = source.get_frames(needed)
        where = {index: row for row, index in enumerate(needed)}
        box = center_crop_box(decoded.shape[1], decoded.shape[2])
        clips = stack_clips([crop_resize(decoded[[where[i] for i in w]], box, size)
                             for w in windows])  # uint8, normalised on the device
        tokens = encoder.forward_features(normalize_video(clips.to(device), mean, std))
        chunks.append(tokens.float().mean(dim=1).cpu())
    return torch.cat(chunks), grid
