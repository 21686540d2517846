"""Synthetic videos for the GPU suite's loader part, packed into shards on the machine it
runs on (nothing is downloaded or shipped): a camera panning over a random texture, encoded
as ``data_tools build --reencode --short-side 320 --gop 16`` writes real videos.

Kept apart from ``bench.gpu_parts`` so the spawned encoder processes import little.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

FPS = 30
GOP = 16


class VideoSizes(Protocol):
    videos: int
    frames: int
    width: int
    height: int
    per_shard: int
    build_workers: int


@dataclass(frozen=True)
class VideoJob:
    path: Path
    seed: int
    frames: int
    width: int
    height: int


def panning_frames(job: VideoJob) -> np.ndarray:
    """``(T, H, W, 3)`` uint8: smooth random shapes plus fine grain, panned 0.5-3 px a frame."""
    rng = np.random.default_rng(job.seed)
    velocity = rng.uniform(0.5, 3.0, size=2)
    margin = int(np.ceil(velocity.max() * job.frames)) + 1
    height, width = job.height + margin, job.width + margin
    coarse = torch.from_numpy(rng.random((1, 3, height // 16 + 2, width // 16 + 2),
                                         dtype=np.float32))
    smooth = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic")[0]
    grain = torch.from_numpy(rng.random((3, height, width), dtype=np.float32))
    texture = (smooth * 235 + grain * 20).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    offsets = [(int(i * velocity[0]), int(i * velocity[1])) for i in range(job.frames)]
    return np.stack([texture[y:y + job.height, x:x + job.width] for y, x in offsets])


def write_synthetic_video(job: VideoJob) -> int:
    """Encode :func:`panning_frames` to ``job.path`` (H.264, no B-frames); returns its bytes."""
    from data_tools.video_io import write_mp4
    from runtime.io import atomic_write_bytes

    data = write_mp4(panning_frames(job), fps=FPS, gop=GOP, crf=23, preset="veryfast")
    atomic_write_bytes(job.path, data)
    return len(data)


def synthetic_shards(out: Path, sizes: VideoSizes) -> tuple[Path, dict]:
    """Write ``sizes.videos`` synthetic videos under ``out/videos`` and pack them with
    ``data_tools.build`` into ``out/shards`` (``sizes.per_shard`` a shard); returns the shard
    folder and what the videos are like."""
    from data_tools.build import build_shards
    from data_tools.parallel import parallel_map, worker_pool
    from data_tools.sources import SourceItem, SourceSet

    jobs = [VideoJob(out / "videos" / f"synthetic_{i:04d}.mp4", i, sizes.frames, sizes.width,
                     sizes.height) for i in range(sizes.videos)]
    (out / "videos").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with worker_pool(sizes.build_workers) as pool:
        encoded = parallel_map(write_synthetic_video, jobs, pool, progress=False)
        items = [SourceItem(job.path, 0, job.path.name) for job in jobs]
        build_shards(SourceSet(items, ["synthetic"], "gpu_suite synthetic"), out / "shards",
                     max_count=sizes.per_shard, pool=pool, overwrite=True, progress=False)
    mbit_s = sum(encoded) / len(encoded) * 8 / (sizes.frames / FPS) / 1e6
    return out / "shards", {"count": sizes.videos, "frames": sizes.frames, "fps": FPS,
                            "size": f"{sizes.width}x{sizes.height}", "gop": GOP,
                            "mean_mbit_s": round(mbit_s, 3),
                            "build_s": round(time.perf_counter() - start, 1),
                            "shards": -(-sizes.videos // sizes.per_shard)}
