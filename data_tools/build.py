"""Build WebDataset tar shards from a folder of videos or an annotation list.

Pipeline (``build_shards``):

1. sources are read (``data_tools.sources.read_sources``: a folder, a VideoMAE list
   ``path label`` or a CSV ``path,label[,start,end]``) and given sanitised, unique keys (no
   dots: WebDataset splits a key at its first dot), then shuffled with a fixed seed so that
   every shard mixes classes;
2. every video is probed (optionally re-encoded first) in parallel workers
   (``data_tools.parallel``); unreadable ones go to ``rejects.jsonl`` with the reason and
   are never packed;
3. samples are planned into shards capped by count and by size, and each shard is written by
   a worker under a temporary name and renamed when complete;
4. ``manifest.json`` (shards with sample counts, class map, totals) is written last, atomically.

Each sample is ``<key>.<ext>`` and ``<key>.json`` (``manifest.SAMPLE_FIELDS`` plus optional
``start``/``end``, ``frame_stride`` and task-specific fields). The video member is the
original bytes under the source's own container extension (``mp4``, ``webm``, ``mkv``,
``avi``, ...: one of ``decode.VIDEO_EXTENSIONS``, which the loader reads), or the re-encoded
copy as ``mp4``.
"""
from __future__ import annotations

import json
import logging
import random
import re
import shutil
from concurrent.futures import Executor
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from data_tools.decode import VIDEO_EXTENSIONS
from data_tools.manifest import MANIFEST_NAME, Manifest, ShardInfo, shard_name, write_manifest
from data_tools.parallel import parallel_map, worker_pool
from data_tools.sources import SourceItem, SourceSet
from data_tools.video_io import VideoError, probe_video, reencode_video
from runtime.io import atomic_path, atomic_write_text

logger = logging.getLogger(__name__)

REJECTS_NAME = "rejects.jsonl"
MAX_KEY_LENGTH = 80  # keeps "<key>.json" within the 100-character USTAR name field
_TAR_BLOCK = 512
_TAR_END = 2 * _TAR_BLOCK


# --------------------------------------------------------------------------- keys
def sanitize_keys(sources: Sequence[str]) -> list[str]:
    """WebDataset-safe unique keys from source paths.

    The extension is dropped, every run of characters outside ``[A-Za-z0-9_-]`` (dots and
    slashes included) becomes ``_``, keys are cut to ``MAX_KEY_LENGTH``, and repeats get
    ``_1``, ``_2``, ... (never colliding with another source's key).
    """
    bases = []
    for text in sources:
        stem = re.sub(r"\.[A-Za-z0-9]{1,5}$", "", text)
        base = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_")[:MAX_KEY_LENGTH] or "sample"
        bases.append(base)
    reserved, used, keys = set(bases), set(), []
    for base in bases:
        key, n = base, 0
        while key in used or (key != base and key in reserved):
            n += 1
            key = f"{base[:MAX_KEY_LENGTH - len(str(n)) - 1]}_{n}"
        used.add(key)
        keys.append(key)
    return keys



def _label_name(label: int, classes: Sequence[str]) -> str:
    return classes[label] if 0 <= label < len(classes) else ""



# --------------------------------------------------------------------------- workers
@dataclass(frozen=True)
class ReencodeOptions:
    """``--reencode``: an H.264 copy at ``short_side`` keeping every ``frame_stride``-th frame
    (of the source rate, or of ``fps`` when given) with a keyframe every ``gop`` stored frames.

    The defaults are the fastest pretraining input measured by ``bench/loader.py`` for
    16-frame stride-4 224x224 clips (bench/RESULTS.md, loader section): stored frames at
    the sampling stride (a clip is 16 consecutive stored frames instead of 61), a keyframe
    every 16 stored frames and a 256-pixel short side (multi-scale crops of 256-169 px).
    The loader then needs ``data.sampling_rate`` to be a multiple of ``frame_stride``; pass
    ``frame_stride=1`` for sets read at other strides (e.g. 2, SSv2-style).
    """

    short_side: int = 256
    gop: int = 16
    fps: float | None = None
    crf: int = 23
    preset: str = "veryfast"
    frame_stride: int = 4

    def __post_init__(self):
        for name in ("short_side", "gop", "frame_stride"):
            if getattr(self, name) < 1:
                raise ValueError(f"reencode {name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class _PrepareJob:
    item: SourceItem
    key: str
    label_name: str
    reencode: ReencodeOptions | None
    scratch: Path


@dataclass(frozen=True)
class _Prepared:
    key: str
    payload: Path  # the bytes to store as <key>.<extension>
    extension: str
    meta: bytes  # the <key>.json content
    size: int
    duration: float
    label: int
    width: int
    height: int


@dataclass(frozen=True)
class _Rejected:
    source: str
    reason: str


def _sample_meta(job: _PrepareJob, info) -> dict:
    item = job.item
    meta = {"label": item.label, "label_name": job.label_name, "source": item.source,
            "fps": info.fps, "num_frames": info.num_frames, "width": info.width,
            "height": info.height, "duration": round(info.duration, 6)}
    if item.start is not None or item.end is not None:
        start = item.start if item.start is not None else 0.0
        if job.reencode is not None:  # the stored copy is already cut to the segment
            meta["source_start"], meta["source_end"] = start, item.end
        else:
            meta["start"] = start
            meta["end"] = meta["duration"] if item.end is None else min(item.end, meta["duration"])
    if job.reencode is not None:
        meta["frame_stride"] = job.reencode.frame_stride
    for name, value in item.extra.items():  # task-specific fields never replace the core ones
        meta.setdefault(name, value)
    return meta


def _prepare(job: _PrepareJob) -> _Prepared | _Rejected:
    """Probe (and optionally re-encode) one video; any failure becomes a reject with a reason."""
    item = job.item
    try:
        if not item.path.is_file():
            raise VideoError("file not found")
        payload = item.path
        info = probe_video(item.path)
        extension = _stored_extension(item.path, info.container)
        if item.start is not None and item.start >= info.duration:
            raise VideoError(f"start {item.start}s is past the end ({info.duration:.3f}s)")
        if job.reencode is not None:
            opts = job.reencode
            data = reencode_video(item.path, opts.short_side, opts.gop, opts.fps, item.start,
                                  item.end, opts.crf, opts.preset, opts.frame_stride)
            info = probe_video(data)
            payload, extension = job.scratch / f"{job.key}.mp4", "mp4"
            payload.write_bytes(data)
        meta = _sample_meta(job, info)
        return _Prepared(job.key, payload, extension, json.dumps(meta, sort_keys=True).encode(),
                         payload.stat().st_size, info.duration, item.label, info.width,
                         info.height)
    except (VideoError, OSError) as err:
        return _Rejected(item.source or str(item.path), str(err) or type(err).__name__)


# FFmpeg demuxer names -> the member extension of a source whose suffix is not a known one
_CONTAINER_EXTENSIONS = {"mov,mp4,m4a,3gp,3g2,mj2": "mp4", "matroska,webm": "mkv",
                         "avi": "avi", "flv": "flv", "mpeg": "mpg"}


def _stored_extension(path: Path, container: str) -> str:
    """The tar member extension of a source stored as it is: its own suffix when the loader
    reads it, else the one of its container format."""
    suffix = path.suffix.lower().lstrip(".")
    if suffix in VIDEO_EXTENSIONS:
        return suffix
    if container in _CONTAINER_EXTENSIONS:
        return _CONTAINER_EXTENSIONS[container]
    raise VideoError(f"container {container!r} ({path.suffix or 'no suffix'}) is not one the "
                     f"loader reads ({', '.join(VIDEO_EXTENSIONS)}); build with --reencode")


def _tar_size(num_bytes: int) -> int:
    return _TAR_BLOCK + -(-num_bytes // _TAR_BLOCK) * _TAR_BLOCK


def _sample_tar_size(sample: _Prepared) -> int:
    return _tar_size(sample.size) + _tar_size(len(sample.meta))


def plan_shards(sizes: Sequence[int], max_count: int, max_size: int) -> list[range]:
    """Split consecutive samples (tar bytes each) into shards of at most ``max_count``
    samples and ``max_size`` bytes; a sample larger than ``max_size`` gets a shard alone."""
    if max_count < 1 or max_size < 1:
        raise ValueError("max_count and max_size must be positive")
    shards, start, total = [], 0, _TAR_END
    for i, size in enumerate(sizes):
        if i > start and (i - start >= max_count or total + size > max_size):
            shards.append(range(start, i))
            start, total = i, _TAR_END
        total += size
    if len(sizes) > start:
        shards.append(range(start, len(sizes)))
    return shards


@dataclass(frozen=True)
class _ShardJob:
    path: Path
    samples: tuple[_Prepared, ...]


def _write_shard(job: _ShardJob) -> ShardInfo:
    """Write one tar under a temporary name and rename it into place."""
    import webdataset as wds

    with atomic_path(job.path) as tmp, open(tmp, "wb") as handle:
        writer = wds.TarWriter(handle, encoder=False, mtime=0)  # fixed mtime: reproducible tars
        for sample in job.samples:
            writer.write({"__key__": sample.key, sample.extension: sample.payload.read_bytes(),
                          "json": sample.meta})
        writer.close()
    return ShardInfo(job.path.name, len(job.samples), job.path.stat().st_size)


# --------------------------------------------------------------------------- build
def _clear_previous(out_dir: Path, prefix: str, overwrite: bool) -> None:
    shard_re = re.compile(rf"{re.escape(prefix)}-\d{{6}}\.tar")
    old = sorted(p for p in out_dir.iterdir() if shard_re.fullmatch(p.name))
    old += [p for p in (out_dir / MANIFEST_NAME, out_dir / REJECTS_NAME) if p.exists()]
    if old and not overwrite:
        raise FileExistsError(f"{out_dir} already holds a shard set ({old[0].name}); "
                              f"choose another folder or pass overwrite")
    for path in old:
        path.unlink()


def build_shards(sources: SourceSet, out_dir: str | Path, prefix: str = "train",
                 max_count: int = 1000, max_size: int = 1 << 30,
                 reencode: ReencodeOptions | None = None, shuffle_seed: int | None = 0,
                 workers: int = 1, pool: Executor | None = None, overwrite: bool = False,
                 progress: bool = True) -> Manifest:
    """Pack ``sources`` into ``out_dir/<prefix>-%06d.tar`` + ``manifest.json`` (+ rejects).

    ``shuffle_seed=None`` keeps the input order. ``pool`` (an executor) overrides ``workers``.
    Returns the manifest; rejected sources are listed in ``out_dir/rejects.jsonl``.
    """
    if not re.fullmatch(r"[A-Za-z0-9_-]+", prefix):
        raise ValueError(f"prefix must match [A-Za-z0-9_-]+, got {prefix!r}")
    if max_count < 1 or max_size < 1:
        raise ValueError(f"max_count and max_size must be positive, got {max_count}, {max_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear_previous(out_dir, prefix, overwrite)
    items = sources.items
    keys = sanitize_keys([item.source or str(item.path) for item in items])
    order = list(range(len(items)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    scratch = out_dir / f".{prefix}-scratch"
    scratch.mkdir(exist_ok=True)
    try:
        with (worker_pool(workers) if pool is None else nullcontext(pool)) as executor:
            jobs = [_PrepareJob(items[i], keys[i], _label_name(items[i].label, sources.classes),
                                reencode, scratch) for i in order]
            chunk = max(1, len(jobs) // (8 * max(workers, 2)))
            results = parallel_map(_prepare, jobs, executor, "probe" if reencode is None else
                                   "re-encode", progress, chunksize=chunk)
            accepted = [r for r in results if isinstance(r, _Prepared)]
            rejects = [r for r in results if isinstance(r, _Rejected)]
            plan = plan_shards([_sample_tar_size(s) for s in accepted], max_count, max_size)
            shard_jobs = [_ShardJob(out_dir / shard_name(prefix, i),
                                    tuple(accepted[j] for j in part))
                          for i, part in enumerate(plan)]
            shards = parallel_map(_write_shard, shard_jobs, executor, "shards", progress)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    atomic_write_text(out_dir / REJECTS_NAME,
                      "".join(json.dumps(asdict(r)) + "\n" for r in rejects))
    for r in rejects:
        logger.warning("rejected %s: %s", r.source, r.reason)
    class_counts = [0] * len(sources.classes)
    for s in accepted:
        if 0 <= s.label < len(class_counts):
            class_counts[s.label] += 1
    manifest = Manifest(shards=shards, classes=list(sources.classes), root=out_dir, extra={
        "prefix": prefix,
        "class_counts": class_counts,
        "num_unlabeled": sum(s.label < 0 for s in accepted),
        "total_bytes": sum(s.size_bytes or 0 for s in shards),
        "total_duration": round(sum(s.duration for s in accepted), 3),
        "num_rejects": len(rejects),
        "rejects_file": REJECTS_NAME,
        "reencode": asdict(reencode) if reencode is not None else None,
        # stored frame i is source frame i * frame_stride: the loader's sampling_rate must be
        # a multiple of it (one rate per shard set; each sample's json repeats it)
        "frame_stride": reencode.frame_stride if reencode is not None else 1,
        "source": sources.origin,
    })
    write_manifest(manifest, out_dir)
    logger.info("%s: %d samples in %d shards, %d rejected", out_dir, manifest.num_samples,
                len(shards), len(rejects))
    return manifest


def parse_size(text: str | int) -> int:
    """Bytes from ``"1G"``, ``"500M"``, ``"64k"`` or a plain number (binary units)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)i?[bB]?\s*", text)
    if not match:
        raise ValueError(f"cannot parse size {text!r} (examples: 500M, 1G, 65536)")
    power = " kmgt".index(match.group(2).lower() or " ")
    return int(float(match.group(1)) * 1024 ** power)

