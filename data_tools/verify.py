"""Decode-check a shard set: corrupt or truncated shards and undecodable samples.

Each shard is read with WebDataset's own tar iterator and key grouping (so a key the loader
would split differently shows up as a broken sample), every ``<key>.json`` is checked against
``manifest.SAMPLE_FIELDS`` and every video member (``<key>.mp4``, or another of
``decode.VIDEO_EXTENSIONS``) is fully decoded with the loader's decoder (``data_tools.decode``,
backend auto by default); frame count and size must match the json. When the shard set has a
manifest, missing shards and sample counts that differ from it are reported too.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Iterator

from data_tools.manifest import SAMPLE_FIELDS, find_manifest, resolve_shards
from data_tools.parallel import parallel_map, worker_pool

logger = logging.getLogger(__name__)
_DECODE_CHUNK = 32  # frames decoded per call: bounded memory on long videos


@dataclass(frozen=True)
class Problem:
    """``key`` is None for a problem with the shard as a whole."""

    shard: str
    key: str | None
    reason: str

    def __str__(self) -> str:
        return f"{self.shard}: {self.key + ': ' if self.key else ''}{self.reason}"


@dataclass
class ShardCheck:
    shard: str
    num_samples: int = 0
    keys: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


@dataclass
class VerifyReport:
    num_shards: int
    num_samples: int
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def bad_shards(self) -> list[str]:
        return sorted({p.shard for p in self.problems if p.key is None})

    @property
    def bad_samples(self) -> list[tuple[str, str]]:
        return [(p.shard, p.key) for p in self.problems if p.key is not None]

    def summary(self) -> str:
        head = (f"checked {self.num_samples} samples in {self.num_shards} shards: "
                + ("OK" if self.ok else f"{len(self.bad_shards)} bad shards, "
                   f"{len(self.bad_samples)} bad samples"))
        return "\n".join([head] + [f"  {p}" for p in self.problems])


def iter_tar_samples(url: str) -> Iterator[dict]:
    """Samples of one tar (``{"__key__", "__url__", ext: bytes}``), grouped as WebDataset
    does; raises on a corrupt or truncated tar."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    with open(url, "rb") as handle:
        files = ({**f, "__url__": url} for f in tar_file_iterator(handle))
        yield from group_by_keys(files)


def check_sample(sample: dict, decode: bool = True, backend: str = "auto") -> str | None:
    """The reason ``sample`` is unusable, or None when it is fine."""
    from data_tools.decode import VIDEO_EXTENSIONS, video_member

    video = video_member(sample)
    missing = (["/".join(VIDEO_EXTENSIONS)] if video is None else []) + (
        [] if "json" in sample else ["json"])
    if missing:
        others = sorted(k for k in sample if not k.startswith("__"))
        return f"missing .{' .'.join(missing)} (has {others}; a dot in a key splits it)"
    try:
        meta = json.loads(sample["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return f"json does not parse: {err}"
    absent = [name for name in SAMPLE_FIELDS if name not in meta]
    if absent:
        return f"json lacks {absent}"
    if not decode:
        return None
    return _decode_check(video[1], meta, backend)


def _decode_check(data: bytes, meta: dict, backend: str) -> str | None:
    from data_tools.decode import DecodeError, open_video

    try:
        reader = open_video(data, backend)
        height = width = 0
        for start in range(0, reader.num_frames, _DECODE_CHUNK):
            frames = reader.get_frames(range(start, min(start + _DECODE_CHUNK, reader.num_frames)))
            height, width = frames.shape[1:3]
    except DecodeError as err:
        return f"undecodable mp4 ({err.reason}): {err}"
    if reader.num_frames != meta["num_frames"]:
        return f"decodes to {reader.num_frames} frames, json says {meta['num_frames']}"
    if (width, height) != (meta["width"], meta["height"]):
        return f"decodes at {width}x{height}, json says {meta['width']}x{meta['height']}"
    return None


def verify_shard(url: str, decode: bool = True, backend: str = "auto") -> ShardCheck:
    """Check every sample of one shard; a tar that cannot be read to its end is a problem of
    the shard (samples before the damage are still checked)."""
    check = ShardCheck(url)
    try:
        for sample in iter_tar_samples(url):
            check.num_samples += 1
            check.keys.append(sample["__key__"])
            reason = check_sample(sample, decode, backend)
            if reason:
                check.problems.append(Problem(url, sample["__key__"], reason))
    except FileNotFoundError:
        check.problems.append(Problem(url, None, "missing"))
    except Exception as err:  # noqa: BLE001 - tarfile.ReadError, OSError, ValueError, ...
        reason = str(err).split(" @ ")[0]  # webdataset appends the file object's repr
        check.problems.append(Problem(url, None, f"corrupt or truncated tar after "
                                                 f"{check.num_samples} samples: {reason}"))
    return check


def verify_shards(spec, decode: bool = True, backend: str = "auto", workers: int = 1,
                  progress: bool = True) -> VerifyReport:
    """Verify the shards named by ``spec`` (see ``manifest.resolve_shards``), decoding with
    the loader's ``backend`` (``data_tools.decode``: auto, decord, pyav)."""
    manifest = find_manifest(spec) if isinstance(spec, (str, Path)) else None
    urls = resolve_shards(spec)
    with worker_pool(min(workers, len(urls))) as pool:
        check = partial(verify_shard, decode=decode, backend=backend)
        checks = parallel_map(check, urls, pool, "verify", progress)
    problems = [p for c in checks for p in c.problems]
    if manifest is not None:
        for entry, url, check in zip(manifest.shards, urls, checks):
            shard_failed = any(p.key is None for p in check.problems)  # already reported
            if not shard_failed and check.num_samples != entry.num_samples:
                problems.append(Problem(url, None, f"holds {check.num_samples} samples, "
                                                   f"manifest says {entry.num_samples}"))
    duplicates = [k for k, n in Counter(k for c in checks for k in c.keys).items() if n > 1]
    for key in duplicates:
        shards = [c.shard for c in checks if key in c.keys]
        problems.append(Problem(shards[0], key, f"duplicate key (also in {shards[1:]})"))
    report = VerifyReport(len(urls), sum(c.num_samples for c in checks), problems)
    logger.info(report.summary())
    return report
