"""Backgrounds for the demo datasets: real photographs seen by a panning camera, or flat /
smooth synthetic colour fields.

The photographs are scikit-learn's two bundled sample images (``load_sample_images``: a
Chinese temple and a flower, 427x640 JPEGs shipped inside the wheel; nothing is downloaded).
A clip sees a random window of one of them at a random zoom, and the window moves at a
constant velocity (a camera pan), so every frame is textured everywhere and what a tube mask
hides at one position in one frame is visible at another position in another frame - the
redundancy across space and time that masked video modelling relies on.

Why not the synthetic fields as the default (see docs/finetune.md, "Demo study"): VideoMAE
normalises each target patch per channel; a smooth colour field normalises to a ramp whose
direction the few visible patches rarely reveal, and a flat field to exactly zero, so neither
gives the objective anything learnable beyond the moving digit.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Literal, get_args

import numpy as np

from data_tools.demo_render import canvas_hw

Background = Literal["photo", "flat", "smooth"]
BACKGROUNDS = get_args(Background)


@lru_cache(maxsize=1)
def load_photos() -> tuple[np.ndarray, ...]:
    """scikit-learn's bundled photographs as float32 ``(427, 640, 3)`` arrays in [0, 1]."""
    from sklearn.datasets import load_sample_images

    photos = tuple((np.asarray(image, np.float32) / 255.0) for image in load_sample_images().images)
    for photo in photos:
        photo.setflags(write=False)
    return photos


def photo_frames(rng: np.random.Generator, canvas_size, num_frames: int,
                 zoom: tuple[float, float] = (2.0, 3.5), pan: float = 0.5,
                 level: float = 0.6, min_textured: float = 0.75, tries: int = 20) -> np.ndarray:
    """A panning camera over one bundled photograph: float32 ``(T, H, W, 3)`` in [0, 1].

    ``zoom`` = photo pixels per canvas pixel (drawn uniformly; larger = wider view, finer
    texture); ``pan`` = distance the window travels over the clip as a fraction of the canvas
    side (drawn uniformly in [0, pan], random direction); ``level`` scales the brightness so
    the bright digits stay the most visible thing in the frame. Each frame is sampled with
    bilinear interpolation from the photograph pre-blurred for its zoom (no aliasing).
    Windows where fewer than ``min_textured`` of the 8x8 cells of the first frame have texture
    (out-of-focus background, sky) are redrawn, up to ``tries`` times: a normalised target
    turns a near-flat patch into unpredictable noise.
    """
    for _ in range(tries - 1):
        frames = _pan_over_photo(rng, canvas_size, num_frames, zoom, pan)
        if textured_fraction(frames[0]) >= min_textured:
            break
    else:
        frames = _pan_over_photo(rng, canvas_size, num_frames, zoom, pan)
    return np.clip(frames * level, 0, 1)


def textured_fraction(frame: np.ndarray, cell: int = 8, min_std: float = 0.03) -> float:
    """Fraction of the ``cell`` x ``cell`` cells of ``frame`` (H, W, C) in [0, 1] whose pixel
    standard deviation (over the cell, mean over channels) is at least ``min_std``."""
    h, w = (frame.shape[0] // cell) * cell, (frame.shape[1] // cell) * cell
    cells = frame[:h, :w].reshape(h // cell, cell, w // cell, cell, -1)
    return float((cells.std(axis=(1, 3)).mean(-1) >= min_std).mean())


def _pan_over_photo(rng: np.random.Generator, canvas_size, num_frames: int,
                    zoom: tuple[float, float], pan: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter, map_coordinates

    height, width = canvas_hw(canvas_size)
    photo = load_photos()[int(rng.integers(len(load_photos())))]
    scale = rng.uniform(*zoom)
    travel = rng.uniform(0.0, pan) * max(height, width) * scale  # photo pixels over the clip
    direction = rng.uniform(0.0, 2 * math.pi)
    dx, dy = travel * math.cos(direction), travel * math.sin(direction)
    ph, pw = photo.shape[:2]
    room_x, room_y = pw - 1 - width * scale, ph - 1 - height * scale
    if room_x <= 0 or room_y <= 0:
        raise ValueError(f"a {height}x{width} canvas at zoom {scale:.2f} does not fit in the "
                         f"{ph}x{pw} photograph; lower the zoom")
    # a pan that would leave the photograph is shortened (same direction)
    shrink = min(1.0, room_x / max(abs(dx), 1e-9), room_y / max(abs(dy), 1e-9))
    dx, dy = dx * shrink, dy * shrink
    span_x, span_y = width * scale + abs(dx), height * scale + abs(dy)
    x0 = rng.uniform(0, pw - span_x) + max(0.0, -dx)
    y0 = rng.uniform(0, ph - span_y) + max(0.0, -dy)
    blurred = gaussian_filter(photo, sigma=(0.4 * scale, 0.4 * scale, 0))
    grid_y, grid_x = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    times = np.linspace(0.0, 1.0, num_frames) if num_frames > 1 else np.zeros(1)
    frames = np.empty((num_frames, height, width, 3), np.float32)
    for i, t in enumerate(times):
        ys = y0 + dy * t + grid_y * scale
        xs = x0 + dx * t + grid_x * scale
        for c in range(3):
            frames[i, ..., c] = map_coordinates(blurred[..., c], [ys, xs], order=1, mode="nearest")
    return frames


def make_background(rng: np.random.Generator, canvas_size, level: float = 0.35,
                    grain: float = 0.04, kind: str = "smooth") -> np.ndarray:
    """A dark random colour - a smooth field (``kind="smooth"``: a 4x4 grid of colours,
    bilinearly interpolated) or one colour (``"flat"``) - plus static grain: float32
    (H, W, 3) in [0, 1]. (For ``"photo"`` use :func:`photo_frames`, which moves.)"""
    from scipy.ndimage import zoom

    if kind not in ("smooth", "flat"):
        raise ValueError(f"background kind must be 'smooth' or 'flat' here, got {kind!r}")
    height, width = canvas_hw(canvas_size)
    if kind == "flat":
        smooth = np.broadcast_to(rng.uniform(0, level, 3).astype(np.float32), (height, width, 3))
    else:
        coarse = rng.uniform(0, level, (4, 4, 3)).astype(np.float32)
        smooth = zoom(coarse, (height / 4, width / 4, 1), order=1, mode="nearest", grid_mode=True)
    noise = rng.uniform(-grain, grain, (height, width, 1)).astype(np.float32)
    return np.clip(smooth + noise, 0, 1)
