"""Rendering pieces of the demo datasets: digit sprites, poses, motions, frames and clips.

The sprites are scikit-learn's bundled 8x8 handwritten digits (``sklearn.datasets.load_digits``,
real data shipped with the package, nothing downloaded). Reusable for recognition and
detection-style datasets with several actors: ``load_digit_sprites``, ``Pose``, ``Actor``,
``Clutter``, the ``MOTIONS`` registry (``Motion.pose(t, params) -> Pose`` for ``t`` in
[0, 1]; every class motion has a time-reversed twin), ``Track``, ``render_frame`` (returns the
frame and per-actor boxes), ``render_clip``, and the digit-fragment distractors. Backgrounds
live in ``data_tools.demo_backgrounds``.
"""
from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Callable, Mapping, Sequence

import numpy as np

CanvasSize = int | tuple[int, int]
BOX_ALPHA = 0.2  # an actor's box covers its pixels with at least this much ink


# --------------------------------------------------------------------------- sprites
@lru_cache(maxsize=1)
def load_digit_sprites() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 handwritten digits as ink masks.

    Returns ``sprites`` float32 (N, 8, 8) in [0, 1] (1 = full ink) and ``digits`` int64 (N,).
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    sprites = (data.images / 16.0).astype(np.float32)
    sprites.setflags(write=False)
    return sprites, data.target.astype(np.int64)


def sprite_pool(split: str) -> np.ndarray:
    """Indices of the sprites a split draws from: every 5th digit image is held out for
    ``val`` so validation digits are unseen handwriting."""
    n = len(load_digit_sprites()[0])
    held_out = np.arange(n) % 5 == 0
    return np.flatnonzero(held_out if split == "val" else ~held_out)


# --------------------------------------------------------------------------- rendering
@dataclass(frozen=True)
class Pose:
    """Where a sprite is drawn: centre ``(x, y)`` as fractions of the canvas width/height
    (x right, y down), ``scale`` = sprite height as a fraction of the canvas height,
    ``angle`` in degrees, clockwise on screen."""

    x: float
    y: float
    scale: float
    angle: float = 0.0


@dataclass(frozen=True)
class Actor:
    """A sprite (float (h, w) ink in [0, 1]) drawn at ``pose`` in ``color`` (RGB in [0, 1])."""

    sprite: np.ndarray
    pose: Pose
    color: tuple[float, float, float]


@dataclass(frozen=True)
class Clutter:
    """What is drawn under the actors: a background (float32 (H, W, 3) in [0, 1]) and
    distractor sprites (no boxes are reported for them)."""

    background: np.ndarray
    distractors: tuple[Actor, ...] = ()


def canvas_hw(canvas_size: CanvasSize) -> tuple[int, int]:
    return (canvas_size, canvas_size) if isinstance(canvas_size, int) else tuple(canvas_size)


def _draw(canvas: np.ndarray, actor: Actor) -> np.ndarray:
    """Alpha-blend ``actor`` onto ``canvas`` (float (H, W, 3), in place); returns its box
    ``[x1, y1, x2, y2]`` in pixels (x2, y2 exclusive), NaN when no pixel is inked."""
    from scipy.ndimage import map_coordinates

    height, width = canvas.shape[:2]
    sprite = np.pad(np.asarray(actor.sprite, np.float32), 1)  # zero border: no ink outside
    sh, sw = sprite.shape[0] - 2, sprite.shape[1] - 2
    pose = actor.pose
    texel = pose.scale * height / sh  # pixels per sprite texel
    cx, cy = pose.x * width, pose.y * height
    reach = 0.5 * texel * math.hypot(sh, sw) + 1
    x0, x1 = max(0, math.floor(cx - reach)), min(width, math.ceil(cx + reach))
    y0, y1 = max(0, math.floor(cy - reach)), min(height, math.ceil(cy + reach))
    if x0 >= x1 or y0 >= y1 or texel <= 0:
        return np.full(4, np.nan, np.float32)
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5  # pixel centres
    dx, dy = xs - cx, ys - cy
    cos, sin = math.cos(math.radians(pose.angle)), math.sin(math.radians(pose.angle))
    # Inverse of the clockwise (y-down) rotation maps each pixel back into the sprite;
    # +0.5 texel offsets turn continuous sprite coordinates into array indices (+1 for the pad).
    u = (cos * dx + sin * dy) / texel + sw / 2 + 0.5
    v = (-sin * dx + cos * dy) / texel + sh / 2 + 0.5
    alpha = map_coordinates(sprite, [v, u], order=1, mode="nearest")
    region = canvas[y0:y1, x0:x1]
    region += alpha[..., None] * (np.asarray(actor.color, np.float32) - region)
    rows, cols = np.nonzero(alpha >= BOX_ALPHA)
    if rows.size == 0:
        return np.full(4, np.nan, np.float32)
    return np.array([x0 + cols.min(), y0 + rows.min(), x0 + cols.max() + 1, y0 + rows.max() + 1],
                    np.float32)


def render_frame(canvas_size: CanvasSize, actors: Sequence[Actor], clutter: Clutter | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Draw one frame: the clutter's background and distractors, then ``actors`` in order.

    Returns ``frame`` uint8 (H, W, 3) RGB and ``boxes`` float32 (len(actors), 4) as
    ``[x1, y1, x2, y2]`` pixels around each actor's visible ink (NaN rows for invisible ones).
    """
    height, width = canvas_hw(canvas_size)
    if clutter is None:
        canvas = np.zeros((height, width, 3), np.float32)
    else:
        if clutter.background.shape != (height, width, 3):
            raise ValueError(f"background is {clutter.background.shape}, "
                             f"the canvas is {(height, width, 3)}")
        canvas = clutter.background.astype(np.float32, copy=True)
        for distractor in clutter.distractors:
            _draw(canvas, distractor)
    boxes = np.stack([_draw(canvas, a) for a in actors]) if actors else np.zeros((0, 4), np.float32)
    return (np.clip(canvas, 0, 1) * 255 + 0.5).astype(np.uint8), boxes


def random_color(rng: np.random.Generator, value: tuple[float, float] = (0.75, 1.0)
                 ) -> tuple[float, float, float]:
    """A saturated colour with brightness in ``value`` (RGB in [0, 1])."""
    return colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.3, 0.9), rng.uniform(*value))


# --------------------------------------------------------------------------- motions
PoseFn = Callable[[float, Mapping[str, float]], Pose]
ParamSampler = Callable[[np.random.Generator], dict]


@dataclass(frozen=True)
class Motion:
    """A named trajectory. ``pose(t, params)`` for ``t`` in [0, 1]; ``sample_params(rng)``
    draws the nuisance parameters (position, extent/speed, size, ...). ``reverse_of`` names
    the forward motion of a time-reversed twin (its pose at ``t`` is the forward's at
    ``1 - t``, with the same parameter distribution)."""

    name: str
    pose: PoseFn
    sample_params: ParamSampler
    reverse_of: str | None = None


MOTIONS: dict[str, Motion] = {}


def _time_reversed(pose: PoseFn, t: float, params: Mapping[str, float]) -> Pose:
    return pose(1.0 - t, params)


def register_motion(name: str, sample_params: ParamSampler, reversed_name: str | None = None):
    """Decorator registering a pose function as ``name`` (and its time reversal as
    ``reversed_name``) in ``MOTIONS``."""
    def register(pose: PoseFn) -> PoseFn:
        for registered in (name, reversed_name):
            if registered in MOTIONS:
                raise ValueError(f"motion {registered!r} is already registered")
        MOTIONS[name] = Motion(name, pose, sample_params)
        if reversed_name:
            MOTIONS[reversed_name] = Motion(reversed_name, partial(_time_reversed, pose),
                                            sample_params, reverse_of=name)
        return pose
    return register


def _sample_translation(rng: np.random.Generator) -> dict:
    scale = rng.uniform(0.26, 0.36)
    span = rng.uniform(0.30, 0.50)  # distance travelled over the clip: the speed nuisance
    margin = scale / 2 + 0.02
    return {"scale": scale, "span": span, "start": rng.uniform(margin, 1 - margin - span),
            "across": rng.uniform(margin, 1 - margin)}


@register_motion("move_right", _sample_translation, reversed_name="move_left")
def _move_right(t: float, p: Mapping[str, float]) -> Pose:
    return Pose(p["start"] + p["span"] * t, p["across"], p["scale"])


@register_motion("move_down", _sample_translation, reversed_name="move_up")
def _move_down(t: float, p: Mapping[str, float]) -> Pose:
    return Pose(p["across"], p["start"] + p["span"] * t, p["scale"])


def _sample_zoom(rng: np.random.Generator) -> dict:
    small, ratio = rng.uniform(0.16, 0.22), rng.uniform(1.8, 2.4)
    margin = small * ratio / 2 + 0.02
    return {"small": small, "ratio": ratio, "x": rng.uniform(margin, 1 - margin),
            "y": rng.uniform(margin, 1 - margin)}


@register_motion("grow", _sample_zoom, reversed_name="shrink")
def _grow(t: float, p: Mapping[str, float]) -> Pose:
    # Geometric growth: the same relative size change per frame, like an approaching object.
    return Pose(p["x"], p["y"], p["small"] * p["ratio"] ** t)


def _sample_spin(rng: np.random.Generator) -> dict:
    scale = rng.uniform(0.30, 0.40)
    margin = scale * math.sqrt(0.5) + 0.02  # room for the rotated square sprite
    return {"scale": scale, "sweep": rng.uniform(180, 300), "angle0": rng.uniform(0, 360),
            "x": rng.uniform(margin, 1 - margin), "y": rng.uniform(margin, 1 - margin)}


@register_motion("rotate_cw", _sample_spin, reversed_name="rotate_ccw")
def _rotate_cw(t: float, p: Mapping[str, float]) -> Pose:
    return Pose(p["x"], p["y"], p["scale"], p["angle0"] + p["sweep"] * t)


def _sample_orbit(rng: np.random.Generator) -> dict:
    scale, radius = rng.uniform(0.22, 0.30), rng.uniform(0.15, 0.24)
    margin = radius + scale / 2 + 0.02
    return {"scale": scale, "radius": radius, "sweep": rng.uniform(240, 330),
            "phase": rng.uniform(0, 360), "cx": rng.uniform(margin, 1 - margin),
            "cy": rng.uniform(margin, 1 - margin)}


@register_motion("orbit_cw", _sample_orbit, reversed_name="orbit_ccw")
def _orbit_cw(t: float, p: Mapping[str, float]) -> Pose:
    # With y pointing down, an increasing angle runs clockwise on screen.
    theta = math.radians(p["phase"] + p["sweep"] * t)
    return Pose(p["cx"] + p["radius"] * math.cos(theta), p["cy"] + p["radius"] * math.sin(theta),
                p["scale"])


def _sample_drift(rng: np.random.Generator) -> dict:
    direction, distance = rng.uniform(0, 2 * math.pi), rng.uniform(0.0, 0.4)
    return {"x": rng.uniform(0.05, 0.95), "y": rng.uniform(0.05, 0.95),
            "dx": distance * math.cos(direction), "dy": distance * math.sin(direction),
            "scale": rng.uniform(0.10, 0.16)}


@register_motion("drift", _sample_drift)
def _drift(t: float, p: Mapping[str, float]) -> Pose:
    """Slow straight drift in a random direction (distractors); its reversal is itself in
    distribution."""
    return Pose(p["x"] + p["dx"] * t, p["y"] + p["dy"] * t, p["scale"])


def _sample_still(rng: np.random.Generator) -> dict:
    margin = 0.2
    return {"x": rng.uniform(margin, 1 - margin), "y": rng.uniform(margin, 1 - margin),
            "scale": rng.uniform(0.22, 0.34)}


@register_motion("still", _sample_still)
def _still(t: float, p: Mapping[str, float]) -> Pose:
    """No motion (an idle actor)."""
    return Pose(p["x"], p["y"], p["scale"])


DEMO_CLASSES = ("move_right", "move_left", "move_down", "move_up", "grow", "shrink",
                "rotate_cw", "rotate_ccw", "orbit_cw", "orbit_ccw")


@dataclass(frozen=True)
class Track:
    """An actor over time: ``sprite`` and ``color`` fixed, pose from ``MOTIONS[motion]``."""

    sprite: np.ndarray
    motion: str
    params: Mapping[str, float]
    color: tuple[float, float, float]

    def actor(self, t: float, noise: Sequence[float] | None = None) -> Actor:
        """The actor at time ``t``; ``noise`` = (dx, dy, dlog_scale, dangle_degrees) perturbs
        the pose."""
        pose = MOTIONS[self.motion].pose(t, self.params)
        if noise is not None:
            dx, dy, dlog_scale, dangle = noise
            pose = Pose(pose.x + dx, pose.y + dy, pose.scale * math.exp(dlog_scale),
                        pose.angle + dangle)
        return Actor(self.sprite, pose, self.color)


def render_clip(canvas_size: CanvasSize, tracks: Sequence[Track], num_frames: int,
                background: np.ndarray | None = None, distractors: Sequence[Track] = (),
                pose_noise: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Render ``num_frames`` frames at ``t = i / (num_frames - 1)`` over ``background``
    float (H, W, 3), or (T, H, W, 3) for a moving one.

    ``pose_noise`` float (T, len(tracks), 4) perturbs each track's pose per frame by
    (dx, dy, dlog_scale, dangle_degrees), see ``Track.actor``. Returns ``frames`` uint8
    (T, H, W, 3) and ``boxes`` float32 (T, len(tracks), 4).
    """
    height, width = canvas_hw(canvas_size)
    if background is None:
        background = np.zeros((height, width, 3), np.float32)
    times = np.linspace(0.0, 1.0, num_frames) if num_frames > 1 else np.zeros(1)
    frames, boxes = [], []
    for i, t in enumerate(times):
        frame_background = background[i] if background.ndim == 4 else background
        clutter = Clutter(frame_background, tuple(d.actor(t) for d in distractors))
        actors = [track.actor(t, None if pose_noise is None else pose_noise[i, k])
                  for k, track in enumerate(tracks)]
        frame, frame_boxes = render_frame((height, width), actors, clutter)
        frames.append(frame)
        boxes.append(frame_boxes)
    return np.stack(frames), np.stack(boxes)


def digit_fragment(rng: np.random.Generator, sprites: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """A 4x4 crop of a random digit (from ``sprites[pool]``) with some ink: distractors look
    like digit strokes."""
    for _ in range(20):
        sprite = sprites[rng.choice(pool)]
        r, c = rng.integers(0, 5, 2)
        crop = sprite[r:r + 4, c:c + 4]
        if crop.sum() > 2.0:
            return crop
    return crop


def distractor_tracks(rng: np.random.Generator, count: int, sprites: np.ndarray,
                      pool: np.ndarray) -> list[Track]:
    """``count`` dim digit fragments drifting slowly across the canvas (clutter)."""
    return [Track(digit_fragment(rng, sprites, pool), "drift", MOTIONS["drift"].sample_params(rng),
                  random_color(rng, value=(0.35, 0.7)))
            for _ in range(count)]
