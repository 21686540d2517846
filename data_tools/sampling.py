"""Temporal sampling: which frame indices of a video form a clip.

All functions return int64 arrays of frame indices in ``[0, num_video_frames - 1]``.

- ``dense_indices``: ``num_frames`` frames ``stride`` apart from a random start (VideoMAE
  pretraining: 16 frames, stride 4 on Kinetics-style data, stride 2 on SSv2-style data).
- ``segment_indices``: TSN-style, the video cut into ``num_frames`` equal segments and one
  frame taken per segment (random in training, the middle for testing), as VideoMAE's SSv2
  fine-tuning does.
- ``multi_view_indices``: ``num_clips`` clips for multi-view testing, evenly spaced.

Short videos are handled by clamping: a dense clip that would run past the end starts at
frame 0 and repeats the last frame for the missing positions; segment sampling on a video
with fewer frames than segments repeats frames. A clip therefore always has exactly
``num_frames`` frames and never wraps around.
"""
from __future__ import annotations

from typing import Literal, get_args

import numpy as np

Sampling = Literal["dense", "segment"]
SAMPLINGS = get_args(Sampling)


def dense_span(num_frames: int, stride: int) -> int:
    """Number of source frames covered by a dense clip."""
    return (num_frames - 1) * stride + 1


def dense_indices(num_video_frames: int, num_frames: int, stride: int,
                  rng: np.random.Generator | None = None, start: int | None = None) -> np.ndarray:
    """``num_frames`` indices ``stride`` apart; random start when ``rng`` is given.

    With neither ``rng`` nor ``start`` the clip is centred in the video.
    """
    _check(num_video_frames, num_frames)
    last_start = max(num_video_frames - dense_span(num_frames, stride), 0)
    if start is None:
        start = int(rng.integers(0, last_start + 1)) if rng is not None else last_start // 2
    indices = start + stride * np.arange(num_frames, dtype=np.int64)
    return np.minimum(indices, num_video_frames - 1)


def segment_indices(num_video_frames: int, num_segments: int,
                    rng: np.random.Generator | None = None, offset: float = 0.5) -> np.ndarray:
    """One frame per segment of ``num_video_frames`` cut into ``num_segments`` equal parts.

    With ``rng`` the frame is uniform within each segment; otherwise it sits at fraction
    ``offset`` of each segment (0.5 = the middle, as in testing).
    """
    _check(num_video_frames, num_segments)
    bounds = np.linspace(0, num_video_frames, num_segments + 1)
    starts, lengths = bounds[:-1], np.diff(bounds)
    fraction = rng.random(num_segments) if rng is not None else np.full(num_segments, offset)
    indices = np.floor(starts + fraction * lengths).astype(np.int64)
    return np.clip(indices, 0, num_video_frames - 1)


def multi_view_indices(num_video_frames: int, num_frames: int, stride: int, num_clips: int,
                      sampling: str = "dense") -> list[np.ndarray]:
    """``num_clips`` deterministic clips covering the video.

    Dense: clip starts evenly spaced from the first to the last possible start (VideoMAE's
    multi-view test). Segment: clip ``j`` takes the frame at fraction ``(j + 0.5) / num_clips``
    of every segment, so the clips interleave.
    """
    if num_clips < 1:
        raise ValueError(f"num_clips must be >= 1, got {num_clips}")
    if sampling == "segment":
        return [segment_indices(num_video_frames, num_frames, offset=(j + 0.5) / num_clips)
                for j in range(num_clips)]
    if sampling != "dense":
        raise ValueError(f"unknown sampling {sampling!r}; choose one of {list(SAMPLINGS)}")
    if num_clips == 1:
        return [dense_indices(num_video_frames, num_frames, stride)]
    last_start = max(num_video_frames - dense_span(num_frames, stride), 0)
    starts = np.round(np.linspace(0, last_start, num_clips)).astype(np.int64)
    return [dense_indices(num_video_frames, num_frames, stride, start=int(s)) for s in starts]


def train_indices(num_video_frames: int, num_frames: int, stride: int, sampling: str,
                  rng: np.random.Generator) -> np.ndarray:
    """One random training clip with the configured sampling."""
    if sampling == "dense":
        return dense_indices(num_video_frames, num_frames, stride, rng)
    if sampling == "segment":
        return segment_indices(num_video_frames, num_frames, rng)
    raise ValueError(f"unknown sampling {sampling!r}; choose one of {list(SAMPLINGS)}")


def _check(num_video_frames: int, num_frames: int) -> None:
    if num_video_frames < 1:
        raise ValueError(f"video has {num_video_frames} frames")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
