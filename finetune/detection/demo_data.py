"""Demo detection sets built from the digits-motion primitives of ``data_tools.demo``.

``generate_ava_demo``: AVA-layout spatio-temporal detection. Each video shows several digits
("actors"), each doing one base motion (move_*, grow/shrink) and, with some probability,
spinning at the same time (rotate_cw/ccw): an actor that moves and spins has two labels, as
an AVA person who "stands" and "talks". Keyframes are at whole seconds; every keyframe has
one CSV row per actor and action with the actor's box in that frame. A simulated person
detector gives proposals: the true boxes slightly perturbed (high scores) plus boxes around
the distractor fragments (lower scores, some above the usual 0.8 threshold).

``generate_tad_demo``: untrimmed videos for temporal action detection. One digit alternates
between actions (any demo motion, over 2-4 s) and idle gaps in which it stands still;
the json of each shard sample lists ``segments`` ``[start_s, end_s, label_name]``.

Both write shards with ``data_tools.build.build_shards`` and are deterministic for a seed.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from data_tools.build import build_shards
from data_tools.demo import SPLITS, prepare_demo_dir
from data_tools.demo_backgrounds import make_background
from data_tools.demo_render import (MOTIONS, Actor, Clutter, Pose, distractor_tracks,
                                    load_digit_sprites, random_color, render_frame, sprite_pool)
from data_tools.sources import SourceItem, SourceSet
from data_tools.video_io import write_mp4
from finetune.detection.annotations import LabelMap, write_ava_csv
from runtime.config import help_text
from runtime.io import atomic_write_text

LABEL_MAP_NAME = "label_map.pbtxt"


@dataclass
class AVADemoConfig:
    seed: int = field(default=0, metadata=help_text("seed; same seed, same dataset"))
    canvas_size: int = field(default=64, metadata=help_text("frame height and width (even)"))
    fps: float = field(default=8.0, metadata=help_text("frame rate"))
    duration_s: int = field(default=3,
                            metadata=help_text("video length; keyframes at 1 .. duration_s - 1 s"))
    min_actors: int = field(default=2, metadata=help_text("fewest actors per video"))
    max_actors: int = field(default=3, metadata=help_text("most actors per video"))
    actor_scale: float = field(
        default=0.7, metadata=help_text("actor size relative to the recognition demo's digits"))
    base_motions: tuple[str, ...] = field(
        default=("move_right", "move_left", "move_down", "move_up"),
        metadata=help_text(
            "motions that set an actor's position and size (one per actor; grow/shrink also work)"))
    spin_motions: tuple[str, ...] = field(
        default=("rotate_cw",),
        metadata=help_text("motions that set the angle (a second label; rotate_ccw also works)"))
    spin_probability: float = field(default=0.4,
                                    metadata=help_text("chance that an actor also spins"))
    jitter: float = field(default=0.01,
                          metadata=help_text("std of per-frame position jitter (canvas fraction)"))
    max_distractors: int = field(
        default=2, metadata=help_text("drifting digit fragments per video (no labels)"))
    train_videos: int = field(default=64, metadata=help_text("training videos"))
    val_videos: int = field(default=16, metadata=help_text("validation videos"))
    gop: int = field(default=8, metadata=help_text("keyframe interval of the H.264 encoding"))
    crf: int = field(default=18, metadata=help_text("x264 constant rate factor"))
    shard_max_count: int = field(default=16, metadata=help_text("videos per shard"))

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.base_motions) + tuple(self.spin_motions)

    def validate(self) -> None:
        unknown = [m for m in self.classes if m not in MOTIONS]
        if unknown:
            raise ValueError(f"unknown motions {unknown}; known: {sorted(MOTIONS)}")
        if not 1 <= self.min_actors <= self.max_actors:
            raise ValueError(
                f"need 1 <= min_actors <= max_actors, got {self.min_actors}, {self.max_actors}")
        if self.duration_s < 2 or self.canvas_size % 2:
            raise ValueError("duration_s must be >= 2 and canvas_size even")


@dataclass
class TADDemoConfig:
    seed: int = field(default=0, metadata=help_text("seed; same seed, same dataset"))
    canvas_size: int = field(default=64, metadata=help_text("frame height and width (even)"))
    fps: float = field(default=8.0, metadata=help_text("frame rate"))
    duration_s: float = field(default=16.0, metadata=help_text("video length in seconds"))
    classes: tuple[str, ...] = field(
        default=("move_right", "move_left", "grow", "rotate_cw"),
        metadata=help_text("action classes (names in data_tools.demo_render.MOTIONS)"))
    action_s: tuple[float, float] = field(default=(2.0, 4.0),
                                          metadata=help_text("range of action lengths (s)"))
    gap_s: tuple[float, float] = field(default=(1.0, 3.0),
                                       metadata=help_text("range of idle gaps (s)"))
    jitter: float = field(default=0.01,
                          metadata=help_text("std of per-frame position jitter (canvas fraction)"))
    max_distractors: int = field(default=2,
                                 metadata=help_text("drifting digit fragments per video"))
    train_videos: int = field(default=12, metadata=help_text("training videos"))
    val_videos: int = field(default=4, metadata=help_text("validation videos"))
    gop: int = field(default=8, metadata=help_text("keyframe interval of the H.264 encoding"))
    crf: int = field(default=18, metadata=help_text("x264 constant rate factor"))
    shard_max_count: int = field(default=16, metadata=help_text("videos per shard"))

    def validate(self) -> None:
        unknown = [m for m in self.classes if m not in MOTIONS]
        if unknown:
            raise ValueError(f"unknown motions {unknown}; known: {sorted(MOTIONS)}")
        if self.duration_s < self.action_s[1] + 2 * self.gap_s[0] or self.canvas_size % 2:
            raise ValueError(
                "duration_s must hold at least one action and two gaps; canvas_size even")


@dataclass(frozen=True)
class AVADemoPaths:
    """Where ``generate_ava_demo`` put things (shard sets, CSVs, label map)."""

    root: Path
    label_map: Path
    shards: dict[str, Path]
    annotations: dict[str, Path]
    proposals: dict[str, Path]


@dataclass(frozen=True)
class _ActorPlan:
    sprite: np.ndarray
    color: tuple[float, float, float]
    base: str
    base_params: dict
    spin: str | None
    spin_params: dict | None
    scale: float

    def pose(self, t: float) -> Pose:
        pose = MOTIONS[self.base].pose(t, self.base_params)
        angle = MOTIONS[self.spin].pose(t, self.spin_params).angle if self.spin else 0.0
        return replace(pose, scale=pose.scale * self.scale, angle=angle)

    def labels(self) -> list[str]:
        return [self.base] + ([self.spin] if self.spin else [])


def _plan_actors(rng: np.random.Generator, cfg: AVADemoConfig, pool: np.ndarray,
                 sprites: np.ndarray) -> list[_ActorPlan]:
    """Actors whose centres stay apart (>= 0.25 canvas) at every sampled time."""
    count = int(rng.integers(cfg.min_actors, cfg.max_actors + 1))
    plans: list[_ActorPlan] = []
    times = np.linspace(0, 1, 9)
    for _ in range(50 * count):
        if len(plans) == count:
            break
        base = cfg.base_motions[int(rng.integers(len(cfg.base_motions)))]
        forward = MOTIONS[base].reverse_of or base
        spin = cfg.spin_motions[int(rng.integers(len(cfg.spin_motions)))] if (
            cfg.spin_motions and rng.random() < cfg.spin_probability) else None
        spin_params = MOTIONS[MOTIONS[spin].reverse_of or spin].sample_params(rng) if spin else None
        plan = _ActorPlan(sprites[int(rng.choice(pool))], random_color(rng), base,
                          MOTIONS[forward].sample_params(rng), spin, spin_params, cfg.actor_scale)
        if all(min(math.hypot(plan.pose(t).x - other.pose(t).x, plan.pose(t).y - other.pose(t).y)
                   for t in times) >= 0.25 for other in plans):
            plans.append(plan)
    return plans


def render_ava_video(rng: np.random.Generator, cfg: AVADemoConfig, split: str):
    """Frames uint8 ``(N, H, W, 3)``, per-frame actor boxes ``(N, A, 4)`` normalised (NaN when
    invisible), distractor boxes ``(N, D, 4)``, and each actor's label names."""
    sprites, _ = load_digit_sprites()
    pool = sprite_pool(split)
    plans = _plan_actors(rng, cfg, pool, sprites)
    distractors = distractor_tracks(rng, int(rng.integers(0, cfg.max_distractors + 1)),
                                    sprites, pool)
    size = cfg.canvas_size
    background = make_background(rng, size)
    num_frames = int(round(cfg.duration_s * cfg.fps))
    jitter = rng.normal(0.0, cfg.jitter, (num_frames, len(plans), 2))
    frames, actor_boxes, distractor_boxes = [], [], []
    for i in range(num_frames):
        t = i / (num_frames - 1)
        actors = [Actor(p.sprite, replace(p.pose(t), x=p.pose(t).x + jitter[i, k, 0],
                                          y=p.pose(t).y + jitter[i, k, 1]), p.color)
                  for k, p in enumerate(plans)]
        clutter_actors = [d.actor(t) for d in distractors]
        frame, boxes = render_frame(size, actors, Clutter(background, tuple(clutter_actors)))
        # where the detector's false alarms go
        _, fragment_boxes = render_frame(size, clutter_actors)
        frames.append(frame)
        actor_boxes.append(boxes / size)
        distractor_boxes.append(fragment_boxes / size)
    return np.stack(frames), np.stack(actor_boxes), np.stack(distractor_boxes), [p.labels()
                                                                                 for p in plans]


def ava_demo_paths(root: str | Path) -> AVADemoPaths:
    """The file layout ``generate_ava_demo`` writes under ``root``."""
    root = Path(root)
    return AVADemoPaths(root, root / LABEL_MAP_NAME, {s: root / s for s in SPLITS},
                        {s: root / f"{s}.csv" for s in SPLITS},
                        {s: root / f"{s}_proposals.csv" for s in SPLITS})


def _perturb(box: np.ndarray, rng: np.random.Generator, amount: float) -> list[float]:
    size = np.array([box[2] - box[0], box[3] - box[1]] * 2)
    moved = np.clip(box + rng.uniform(-amount, amount, 4) * size, 0, 1)
    x1, x2 = sorted(moved[[0, 2]])
    y1, y2 = sorted(moved[[1, 3]])
    return [float(x1), float(y1), float(max(x2, x1 + 0.01)), float(max(y2, y1 + 0.01))]


def generate_ava_demo(out_dir: str | Path, cfg: AVADemoConfig | None = None,
                      overwrite: bool = False) -> AVADemoPaths:
    """Write the AVA-style demo under ``out_dir``::

        label_map.pbtxt                    action ids 1..K
        videos/<split>/<video_id>.mp4      the videos
        <split>/                           shards (json: video_id, timestamps) + manifest.json
        <split>.csv                        ground truth:
                                           video_id,timestamp,x1,y1,x2,y2,action_id,person_id
        <split>_proposals.csv              person proposals: video_id,timestamp,x1,y1,x2,y2,score
    """
    cfg = cfg or AVADemoConfig()
    cfg.validate()
    out = prepare_demo_dir(out_dir, overwrite)
    label_map = LabelMap(tuple(range(1, len(cfg.classes) + 1)), cfg.classes)
    atomic_write_text(out / LABEL_MAP_NAME, label_map.to_pbtxt())
    counts = {"train": cfg.train_videos, "val": cfg.val_videos}
    paths = ava_demo_paths(out)
    for split in SPLITS:
        (out / "videos" / split).mkdir(parents=True, exist_ok=True)
        gt_rows, proposal_rows, items = [], [], []
        for index in range(counts[split]):
            rng = np.random.default_rng([cfg.seed, SPLITS.index(split), index, 1])
            video_id = f"{split}{index:05d}"
            frames, boxes, fragments, labels = render_ava_video(rng, cfg, split)
            path = out / "videos" / split / f"{video_id}.mp4"
            path.write_bytes(write_mp4(frames, cfg.fps, cfg.gop, cfg.crf))
            timestamps = list(range(1, cfg.duration_s))
            for ts in timestamps:
                frame = min(int(round(ts * cfg.fps)), len(frames) - 1)
                for person, (box, names) in enumerate(zip(boxes[frame], labels)):
                    if np.isnan(box).any():
                        continue
                    gt_rows += [(video_id, ts, *map(float, box),
                                 label_map.action_ids[cfg.classes.index(n)], person)
                                for n in names]
                    proposal_rows.append(
                        (video_id, ts, *_perturb(box, rng, 0.05), float(rng.uniform(0.85, 1.0))))
                for box in fragments[frame]:
                    if not np.isnan(box).any():
                        proposal_rows.append(
                            (video_id, ts, *_perturb(box, rng, 0.1), float(rng.uniform(0.3, 0.9))))
            items.append(SourceItem(path, -1, path.relative_to(out).as_posix(),
                                    extra={"video_id": video_id, "timestamps": timestamps}))
        write_ava_csv(paths.annotations[split], gt_rows)
        write_ava_csv(paths.proposals[split], proposal_rows)
        build_shards(SourceSet(items, list(cfg.classes), str(paths.annotations[split])),
                     paths.shards[split], prefix=split, max_count=cfg.shard_max_count,
                     shuffle_seed=cfg.seed, overwrite=True, progress=False)
    atomic_write_text(out / "demo.json", json.dumps(asdict(cfg), indent=1) + "\n")
    return paths


def _segment_plan(rng: np.random.Generator, cfg: TADDemoConfig) -> list[tuple[float, float, str]]:
    """Alternating gaps and actions on the frame grid: ``[(start_s, end_s, class), ...]``."""
    def on_grid(seconds: float) -> float:
        return round(seconds * cfg.fps) / cfg.fps

    segments, t = [], on_grid(rng.uniform(*cfg.gap_s))
    while True:
        length = on_grid(rng.uniform(*cfg.action_s))
        if t + length > cfg.duration_s - cfg.gap_s[0]:
            return segments
        segments.append((t, t + length, cfg.classes[int(rng.integers(len(cfg.classes)))]))
        t = on_grid(t + length + rng.uniform(*cfg.gap_s))


def render_tad_video(rng: np.random.Generator, cfg: TADDemoConfig, split: str):
    """Frames uint8 ``(N, H, W, 3)`` and segments ``[(start_s, end_s, class), ...]``.

    Between actions the digit stands still at the pose where the last action ended (or
    where the next one starts, before the first)."""
    sprites, _ = load_digit_sprites()
    pool = sprite_pool(split)
    segments = _segment_plan(rng, cfg)
    sprite, color = sprites[int(rng.choice(pool))], random_color(rng)
    params = [MOTIONS[MOTIONS[name].reverse_of or name].sample_params(rng)
              for _, _, name in segments]
    distractors = distractor_tracks(rng, int(rng.integers(0, cfg.max_distractors + 1)),
                                    sprites, pool)
    background = make_background(rng, cfg.canvas_size)
    num_frames = int(round(cfg.duration_s * cfg.fps))
    jitter = rng.normal(0.0, cfg.jitter, (num_frames, 2))
    frames = []
    for i in range(num_frames):
        now = i / cfg.fps
        pose = _pose_at(now, segments, params)
        actor = Actor(sprite,
                      replace(pose, x=pose.x + jitter[i, 0], y=pose.y + jitter[i, 1]), color)
        clutter = Clutter(background, tuple(d.actor(now / cfg.duration_s) for d in distractors))
        frames.append(render_frame(cfg.canvas_size, [actor], clutter)[0])
    return np.stack(frames), segments


def _pose_at(now: float, segments: Sequence[tuple[float, float, str]],
             params: Sequence[dict]) -> Pose:
    previous = None
    for (start, end, name), p in zip(segments, params):
        if now < start:
            return previous or MOTIONS[name].pose(0.0, p)
        if now < end:
            return MOTIONS[name].pose((now - start) / (end - start), p)
        previous = MOTIONS[name].pose(1.0, p)
    return previous or Pose(0.5, 0.5, 0.3)


def generate_tad_demo(out_dir: str | Path, cfg: TADDemoConfig | None = None,
                      overwrite: bool = False) -> dict[str, Path]:
    """Write the untrimmed demo under ``out_dir``: ``classes.txt``, ``videos/<split>/*.mp4``,
    shard sets ``<split>/`` whose json carries ``segments`` and ``<split>_segments.csv``
    (``video_id,start_s,end_s,label``). Returns the shard folders by split."""
    cfg = cfg or TADDemoConfig()
    cfg.validate()
    out = prepare_demo_dir(out_dir, overwrite)
    atomic_write_text(out / "classes.txt", "".join(c + "\n" for c in cfg.classes))
    counts = {"train": cfg.train_videos, "val": cfg.val_videos}
    shards = {}
    for split in SPLITS:
        (out / "videos" / split).mkdir(parents=True, exist_ok=True)
        items, rows = [], []
        for index in range(counts[split]):
            rng = np.random.default_rng([cfg.seed, SPLITS.index(split), index, 2])
            video_id = f"{split}{index:05d}"
            frames, segments = render_tad_video(rng, cfg, split)
            path = out / "videos" / split / f"{video_id}.mp4"
            path.write_bytes(write_mp4(frames, cfg.fps, cfg.gop, cfg.crf))
            rows += [(video_id, start, end, name) for start, end, name in segments]
            items.append(SourceItem(path, -1, path.relative_to(out).as_posix(), extra={
                "video_id": video_id,
                "segments": [[start, end, name] for start, end, name in segments]}))
        write_ava_csv(out / f"{split}_segments.csv", rows)
        build_shards(SourceSet(items, list(cfg.classes), f"{split}_segments.csv"), out / split,
                     prefix=split, max_count=cfg.shard_max_count, shuffle_seed=cfg.seed,
                     overwrite=True, progress=False)
        shards[split] = out / split
    atomic_write_text(out / "demo.json", json.dumps(asdict(cfg), indent=1) + "\n")
    return shards



def main(argv: Sequence[str] | None = None) -> None:
    """``python -m finetune.detection.demo_data {ava,tad} --out DIR [--overwrite]
    [field=value ...]``"""
    import argparse

    from runtime.config import load_config

    parser = argparse.ArgumentParser(prog="python -m finetune.detection.demo_data",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=("ava", "tad"), help="which demo set to write")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing demo set")
    parser.add_argument("overrides", nargs="*",
                        help="config fields, e.g. train_videos=8 canvas_size=32")
    args = parser.parse_intermixed_args(argv)
    if args.task == "ava":
        generate_ava_demo(args.out, load_config(AVADemoConfig, None, args.overrides),
                          args.overwrite)
    else:
        generate_tad_demo(args.out, load_config(TADDemoConfig, None, args.overrides),
                          args.overwrite)


if __name__ == "__main__":
    main()
