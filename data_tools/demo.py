"""Demo action dataset: handwritten digits moving over real photographs seen by a panning
camera.

A class is a *motion*, and every class has a time-reversed twin::

    move_right / move_left    move_down / move_up    grow / shrink (approach / recede)
    rotate_cw / rotate_ccw    orbit_cw / orbit_ccw

A clip of the reversed class is rendered exactly like a clip of its forward class (same
parameter distribution, same nuisance) and then played backwards. So the two classes of a
pair have the same distribution over *unordered sets of frames*: one frame, or a bag of
frames, cannot tell them apart; only the order can. Digit identity and colour, position,
speed/extent, per-frame jitter, the background (which photograph, where, zoom, camera pan)
and drifting digit-fragment distractors are nuisance factors. Everything is deterministic
given the seed (each clip has its own generator seeded by ``(seed, split, index)``),
independent of the number of workers. Rendering pieces: ``data_tools.demo_render``;
backgrounds: ``data_tools.demo_backgrounds``; ``write_mp4`` lives in ``data_tools.video_io``.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from data_tools.demo_backgrounds import Background, make_background, photo_frames
from data_tools.demo_render import (
    DEMO_CLASSES,
    MOTIONS,
    Track,
    distractor_tracks,
    load_digit_sprites,
    random_color,
    render_clip,
    sprite_pool,
)
from data_tools.video_io import write_mp4
from runtime.config import check_choices, help_text

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- action clips
@dataclass
class DemoConfig:
    """Size and look of the demo action dataset."""

    seed: int = field(default=0, metadata=help_text("seed; same seed, same dataset"))
    canvas_size: int = field(default=64, metadata=help_text("frame height and width (even)"))
    num_frames: int = field(default=32, metadata=help_text("frames per clip"))
    fps: float = field(default=16.0, metadata=help_text("frame rate written in the mp4"))
    gop: int = field(default=8, metadata=help_text("keyframe interval of the H.264 encoding"))
    crf: int = field(default=18, metadata=help_text("x264 constant rate factor (lower = better)"))
    train_per_class: int = field(default=48, metadata=help_text("training clips per class"))
    val_per_class: int = field(default=16, metadata=help_text("validation clips per class"))
    jitter: float = field(default=0.03, metadata=help_text(
        "per-frame pose noise of the digit: std of its position (fraction of the "
        "canvas) and log-scale; the angle's std is jitter * 300 degrees"))
    grain: float = field(default=0.0, metadata=help_text(
        "amplitude of static per-pixel background noise; VideoMAE's per-patch "
        "normalised target turns any grain on an empty patch into unpredictable "
        "unit-variance noise, so the default is no grain"))
    background: Background = field(default="flat", metadata=help_text(
        "photo (a panning camera over a bundled photograph: texture everywhere) | "
        "flat (one random colour per clip) | smooth (a random colour field); see "
        "data_tools.demo_backgrounds for why the synthetic fields leave VideoMAE's "
        "per-patch normalised target nothing to learn beyond the digit"))
    pan: float = field(default=0.5, metadata=help_text(
        "photo background: the camera travels up to this fraction of the canvas side "
        "over a clip, in a random direction"))
    zoom: float = field(default=2.75, metadata=help_text(
        "photo background: photograph pixels per canvas pixel (each clip draws "
        "0.75x to 1.25x of it); lower = smoother frames, higher = finer texture"))
    digit_scale: float = field(default=1.0, metadata=help_text(
        "multiplies the digit's size (each motion draws its own size range)"))
    max_distractors: int = field(default=3, metadata=help_text(
        "up to this many drifting digit-fragment distractors per clip"))
    shard_max_count: int = field(default=32, metadata=help_text("samples per shard"))
    classes: tuple[str, ...] = field(default=DEMO_CLASSES, metadata=help_text(
        "motion classes (names in data_tools.demo_render.MOTIONS)"))

    @classmethod
    def tiny(cls, **overrides) -> DemoConfig:
        """A few-second version for tests: 32x32, 16 frames, 3 + 2 clips per class."""
        base = dict(canvas_size=32, num_frames=16, fps=8.0, train_per_class=3, val_per_class=2,
                    shard_max_count=8)
        return cls(**{**base, **overrides})

    def validate(self) -> None:
        unknown = [c for c in self.classes if c not in MOTIONS]
        if unknown:
            raise ValueError(f"unknown motion classes {unknown}; known: {sorted(MOTIONS)}")
        if self.canvas_size < 8 or self.canvas_size % 2:
            raise ValueError(f"canvas_size must be even and >= 8, got {self.canvas_size}")
        check_choices(self)
        if self.num_frames < 2:
            raise ValueError(f"num_frames must be >= 2, got {self.num_frames}")
        if min(self.train_per_class, self.val_per_class) < 0:
            raise ValueError("clips per class must be >= 0")


SPLITS = ("train", "val")


def render_demo_clip(class_name: str, rng: np.random.Generator, cfg: DemoConfig,
                     split: str = "train") -> tuple[np.ndarray, dict]:
    """One clip of ``class_name``: frames uint8 (T, H, W, 3) and json extras (``digit``,
    ``sprite_index``, ``num_distractors``).

    A reversed class is rendered as its forward class and then played backwards, so the pair
    shares one distribution over unordered frame sets.
    """
    sprites, digits = load_digit_sprites()
    pool = sprite_pool(split)
    motion = MOTIONS[class_name]
    forward = MOTIONS[motion.reverse_of] if motion.reverse_of else motion
    sprite_index = int(rng.choice(pool))
    params = forward.sample_params(rng)
    digit = Track(sprites[sprite_index], forward.name, params, random_color(rng))
    distractors = distractor_tracks(rng, int(rng.integers(0, cfg.max_distractors + 1)),
                                    sprites, pool)
    if cfg.background == "photo":
        background = photo_frames(rng, cfg.canvas_size, cfg.num_frames, pan=cfg.pan,
                                  zoom=(0.75 * cfg.zoom, 1.25 * cfg.zoom))
    else:
        background = make_background(rng, cfg.canvas_size, grain=cfg.grain, kind=cfg.background)
    noise = rng.normal(0.0, cfg.jitter, (cfg.num_frames, 1, 4)) * [1.0, 1.0, 1.0, 300.0]
    noise[..., 2] += math.log(cfg.digit_scale)
    frames, _ = render_clip(cfg.canvas_size, [digit], cfg.num_frames, background, distractors,
                            noise)
    if motion.reverse_of:
        frames = frames[::-1]
    return np.ascontiguousarray(frames), {"digit": int(digits[sprite_index]),
                                          "sprite_index": sprite_index,
                                          "num_distractors": len(distractors)}


def clip_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split), index])


@dataclass(frozen=True)
class _ClipJob:
    cfg: DemoConfig
    split: str
    index: int
    path: Path


def _make_clip(job: _ClipJob) -> dict:
    """Render, encode and write one clip; returns its record (label, digit, ...)."""
    from runtime.io import atomic_write_bytes  # imports torch: keep `--help` and renders light

    cfg = job.cfg
    label = job.index % len(cfg.classes)  # round robin: classes exactly balanced
    frames, extra = render_demo_clip(cfg.classes[label], clip_rng(cfg.seed, job.split, job.index),
                                     cfg, job.split)
    atomic_write_bytes(job.path, write_mp4(frames, cfg.fps, cfg.gop, cfg.crf))
    return {"label": label, **extra}


def prepare_demo_dir(out_dir: str | Path, overwrite: bool) -> Path:
    """Create ``out_dir`` for a demo dataset; an earlier one there (marked by ``demo.json``) is
    refused, or with ``overwrite`` its ``videos/`` and split folders are removed first."""
    out = Path(out_dir)
    if (out / "demo.json").exists():
        if not overwrite:
            raise FileExistsError(f"{out} already holds a demo dataset; pass overwrite")
        for name in ("videos", *SPLITS):
            shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def generate_demo(out_dir: str | Path, cfg: DemoConfig | None = None, workers: int = 1,
                  overwrite: bool = False, progress: bool = True) -> dict:
    """Write the demo dataset under ``out_dir``::

        classes.txt                    one class name per line (line i = label i)
        videos/{train,val}/<key>.mp4   H.264 clips
        train.txt, val.txt             VideoMAE lists: "videos/<split>/<key>.mp4 <label>"
        train/, val/                   shard sets (train-000000.tar ..., manifest.json)
        demo.json                      the config used

    Returns ``{"train": Manifest, "val": Manifest}``.
    """
    from data_tools.build import build_shards
    from data_tools.parallel import parallel_map, worker_pool
    from data_tools.sources import SourceItem, SourceSet
    from runtime.io import atomic_write_text

    cfg = cfg or DemoConfig()
    cfg.validate()
    out = prepare_demo_dir(out_dir, overwrite)
    counts = {"train": cfg.train_per_class, "val": cfg.val_per_class}
    jobs = []
    for split in SPLITS:
        (out / "videos" / split).mkdir(parents=True, exist_ok=True)
        jobs += [_ClipJob(cfg, split, i, out / "videos" / split / f"{split}_{i:05d}.mp4")
                 for i in range(counts[split] * len(cfg.classes))]
    atomic_write_text(out / "classes.txt", "".join(c + "\n" for c in cfg.classes))
    manifests = {}
    with worker_pool(workers) as pool:
        records = parallel_map(_make_clip, jobs, pool, "render", progress,
                               chunksize=max(1, len(jobs) // (8 * max(workers, 1))))
        for split in SPLITS:
            pairs = [(job, rec) for job, rec in zip(jobs, records) if job.split == split]
            sources = [job.path.relative_to(out).as_posix() for job, _ in pairs]
            atomic_write_text(out / f"{split}.txt", "".join(
                f"{source} {rec['label']}\n" for source, (_, rec) in zip(sources, pairs)))
            items = [SourceItem(job.path, rec["label"], source,
                                extra={k: v for k, v in rec.items() if k != "label"})
                     for source, (job, rec) in zip(sources, pairs)]
            manifests[split] = build_shards(
                SourceSet(items, list(cfg.classes), str(out / f"{split}.txt")), out / split,
                prefix=split, max_count=cfg.shard_max_count, shuffle_seed=cfg.seed, pool=pool,
                workers=workers, overwrite=True, progress=progress)
    atomic_write_text(out / "demo.json", json.dumps(asdict(cfg), indent=1) + "\n")
    return manifests
