"""Build WebDataset tar shards from a folder of videos or an annotation list.

Pipeline (``build_shards``):

1. sources are read (``read_sources``: a folder, a VideoMAE list ``path label`` or a CSV
   ``path,label[,start,end]``) and given sanitised, unique keys (no dots: WebDataset splits a
   key at its first dot), then shuffled with a fixed seed so that every shard mixes classes;
2. every video is probed (optionally re-encoded first) in parallel workers; unreadable ones go
   to ``rejects.jsonl`` with the reason and are never packed;
3. samples are planned into shards capped by count and by size, and each shard is written by
   a worker under a temporary name and renamed when complete;
4. ``manifest.json`` (shards with sample counts, class map, totals) is written last, atomically.

Each sample is ``<key>.mp4`` (the original bytes, or the re-encoded copy) and ``<key>.json``
(``manifest.SAMPLE_FIELDS`` plus optional ``start``/``end`` and task-specific fields).
"""
from __future__ import annotations

import csv
import json
import logging
import random
import re
import shutil
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence, TypeVar

from data_tools.manifest import MANIFEST_NAME, Manifest, ShardInfo, shard_name, write_manifest
from data_tools.video_io import VideoError, probe_video, reencode_video
from runtime.io import atomic_path, atomic_write_text
from runtime.logging import progress as progress_bar

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".flv")
REJECTS_NAME = "rejects.jsonl"
MAX_KEY_LENGTH = 80  # keeps "<key>.json" within the 100-character USTAR name field
_TAR_BLOCK = 512
_TAR_END = 2 * _TAR_BLOCK

T = TypeVar("T")
R = TypeVar("R")


# --------------------------------------------------------------------------- parallel map
@contextmanager
def worker_pool(workers: int) -> Iterator[Executor | None]:
    """A process pool of ``workers`` (spawned, so no state is inherited), or None for 1."""
    if workers <= 1:
        yield None
        return
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        yield pool


def parallel_map(fn: Callable[[T], R], items: Sequence[T], pool: Executor | None = None,
                 desc: str = "", progress: bool = True, chunksize: int = 1) -> list[R]:
    """``[fn(x) for x in items]`` in input order, on ``pool`` when given, with a progress bar."""
    results = map(fn, items) if pool is None else pool.map(fn, items, chunksize=chunksize)
    return list(progress_bar(results, total=len(items), desc=desc, enabled=progress))


# --------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class SourceItem:
    """One video to pack. ``source`` is the path as written in the input (kept in the json);
    ``extra`` holds task-specific json fields."""

    path: Path
    label: int = -1
    source: str = ""
    start: float | None = None
    end: float | None = None
    extra: Mapping = field(default_factory=dict)


@dataclass
class SourceSet:
    items: list[SourceItem]
    classes: list[str]
    origin: str = ""


def read_classes(path: str | Path) -> list[str]:
    """Class names, one per line (line i is label i)."""
    names = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    names = [n for n in names if n]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: class names must be unique")
    return names


def _labels_from_text(raw: list[str], classes: list[str] | None, origin: str,
                      allow_indices: bool = True) -> tuple[list[int], list[str]]:
    """Map label strings to indices and a class list. All-integer labels are indices
    (unless ``allow_indices`` is False), otherwise names; '' = unlabeled (-1)."""
    given = [r for r in raw if r != ""]
    if allow_indices and all(re.fullmatch(r"-?\d+", r) for r in given):
        labels = [int(r) if r != "" else -1 for r in raw]
        if any(label < -1 for label in labels):
            raise ValueError(f"{origin}: label indices must be >= 0 (or -1 for unlabeled)")
        top = max(labels, default=-1)
        if classes is None:
            classes = [str(i) for i in range(top + 1)]
        elif top >= len(classes):
            raise ValueError(f"{origin}: label {top} but only {len(classes)} classes given")
        return labels, classes
    if classes is None:
        classes = sorted(set(given))
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(given) - set(index))
    if unknown:
        raise ValueError(f"{origin}: labels not in the class list: {unknown[:5]}")
    return [index[r] if r != "" else -1 for r in raw], classes


def _label_name(label: int, classes: Sequence[str]) -> str:
    return classes[label] if 0 <= label < len(classes) else ""


def _resolve(root: Path, text: str) -> Path:
    path = Path(text)
    return path if path.is_absolute() else root / path


def read_video_list(path: str | Path, root: str | Path | None = None,
                    classes: list[str] | None = None) -> SourceSet:
    """VideoMAE list: one ``path label`` per line (label an int index; the path may contain
    spaces, the label is the last field). Relative paths are relative to ``root`` (default:
    the list's folder)."""
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    paths, raw = [], []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.strip().rsplit(None, 1)
        if len(parts) != 2 or not re.fullmatch(r"-?\d+", parts[1]):
            raise ValueError(f"{path}:{lineno}: expected 'path label' with an integer label, "
                             f"got {line.strip()!r}")
        paths.append(parts[0])
        raw.append(parts[1])
    labels, classes = _labels_from_text(raw, classes, str(path))
    items = [SourceItem(_resolve(root, p), label, p) for p, label in zip(paths, labels)]
    return SourceSet(items, classes, str(path))


def _optional_seconds(text: str | None, origin: str) -> float | None:
    if text is None or text.strip() == "":
        return None
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{origin}: expected seconds, got {text!r}") from None


def read_csv_list(path: str | Path, root: str | Path | None = None,
                  classes: list[str] | None = None) -> SourceSet:
    """CSV with a header: ``path`` (required), ``label`` (index or name, empty = unlabeled),
    ``start``/``end`` (seconds, optional). Other columns are ignored."""
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or "path" not in reader.fieldnames:
            raise ValueError(f"{path}: the CSV header must have a 'path' column, "
                             f"got {reader.fieldnames}")
        rows = [(reader.line_num, row) for row in reader]
    raw = [(row.get("label") or "").strip() for _, row in rows]
    labels, classes = _labels_from_text(raw, classes, str(path))
    items = []
    for (lineno, row), label in zip(rows, labels):
        where = f"{path}:{lineno}"
        if not (row["path"] or "").strip():
            raise ValueError(f"{where}: empty path")
        start = _optional_seconds(row.get("start"), where)
        end = _optional_seconds(row.get("end"), where)
        if start is not None and end is not None and end <= start:
            raise ValueError(f"{where}: end ({end}) must be after start ({start})")
        items.append(SourceItem(_resolve(root, row["path"].strip()), label, row["path"].strip(),
                                start, end))
    return SourceSet(items, classes, str(path))


def scan_folder(root: str | Path, classes: list[str] | None = None) -> SourceSet:
    """Videos under ``root`` (recursive, sorted). When every video sits in a subfolder, the
    first folder level is the class (``root/<class>/.../video.mp4``); otherwise unlabeled."""
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a folder")
    files = sorted(p for p in root.rglob("*")
                   if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"no video files ({', '.join(VIDEO_EXTENSIONS)}) under {root}")
    rel = [p.relative_to(root) for p in files]
    if all(len(r.parts) > 1 for r in rel):
        labels, classes = _labels_from_text([r.parts[0] for r in rel], classes, str(root),
                                            allow_indices=False)
    else:
        logger.info("%s: videos at the top level, building an unlabeled set", root)
        labels, classes = [-1] * len(files), list(classes or [])
    items = [SourceItem(p, label, r.as_posix()) for p, r, label in zip(files, rel, labels)]
    return SourceSet(items, classes, str(root))


def read_sources(source: str | Path, fmt: str = "auto", root: str | Path | None = None,
                 classes: list[str] | None = None) -> SourceSet:
    """Dispatch on ``fmt`` (``folder``, ``list``, ``csv``; ``auto``: folder if a directory,
    csv for ``.csv``, else list)."""
    source = Path(source)
    if fmt == "auto":
        fmt = "folder" if source.is_dir() else "csv" if source.suffix.lower() == ".csv" else "list"
    if fmt != "folder" and not source.is_file():
        raise FileNotFoundError(f"annotation file {source} does not exist")
    if fmt == "folder":
        return scan_folder(source, classes)
    if fmt == "csv":
        return read_csv_list(source, root, classes)
    if fmt == "list":
        return read_video_list(source, root, classes)
    raise ValueError(f"unknown source format {fmt!r} (folder, list, csv)")


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


# --------------------------------------------------------------------------- workers
@dataclass(frozen=True)
class ReencodeOptions:
    """``--reencode``: H.264 copy at ``short_side`` with a keyframe every ``gop`` frames."""

    short_side: int = 320
    gop: int = 16
    fps: float | None = None
    crf: int = 23
    preset: str = "veryfast"


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
    payload: Path  # the bytes to store as <key>.mp4
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
        if item.start is not None and item.start >= info.duration:
            raise VideoError(f"start {item.start}s is past the end ({info.duration:.3f}s)")
        if job.reencode is not None:
            opts = job.reencode
            data = reencode_video(item.path, opts.short_side, opts.gop, opts.fps, item.start,
                                  item.end, opts.crf, opts.preset)
            info = probe_video(data)
            payload = job.scratch / f"{job.key}.mp4"
            payload.write_bytes(data)
        meta = _sample_meta(job, info)
        return _Prepared(job.key, payload, json.dumps(meta, sort_keys=True).encode(),
                         payload.stat().st_size, info.duration, item.label, info.width,
                         info.height)
    except (VideoError, OSError) as err:
        return _Rejected(item.source or str(item.path), str(err) or type(err).__name__)


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
            writer.write({"__key__": sample.key, "mp4": sample.payload.read_bytes(),
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

