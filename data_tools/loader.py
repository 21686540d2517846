"""WebDataset video loader: shards -> decoded, sampled, augmented, masked batches.

``build_loader(cfg, mode)`` (``cfg`` a ``data_tools.config.DataConfig``) returns a
``VideoLoader``; iterating it gives dict batches: ``video`` float32 ``(B, C, T, H, W)``
(normalised), ``label`` long ``(B,)``, ``key`` list[str], and depending on mode ``mask`` /
``decoder_mask`` bool ``(B, N)`` (True = masked) and ``view`` long ``(B,)``.

Modes:
- ``"pretrain"``: shards resampled with replacement (an infinite stream per worker), shuffle
  buffer, random dense/segment clips, multi-scale crop, encoder (+ decoder) masks. Every rank
  yields the same number of batches per epoch: ``epoch_samples * repeat // (batch_size *
  world_size)``.
- ``"train"``: the same stream with fine-tuning augmentation (random resized crop, optional
  flip) and no masks.
- ``"eval"``: every sample exactly once across ranks x workers: rank ``r`` reads shards
  ``r, r + world_size, ...`` and its worker ``w`` every ``num_workers``-th of those. No
  padding; ranks may yield different numbers of batches (sync metrics once at the end).
  One centred clip, centre crop.
- ``"test_views"``: as ``"eval"``, but each video yields ``num_test_clips x num_test_crops``
  clips with ``view = clip * num_test_crops + crop``, all from the same worker.

Bad data: a sample whose tar member, metadata or video cannot be read is skipped with a
warning naming shard and key and counted by reason in ``VideoLoader.stats`` (counters live
in shared memory, written by the workers). Nothing is substituted for a skipped sample. An
epoch in which more than ``max_failure_fraction`` of the samples failed raises at its end;
a worker whose running failure fraction exceeds it after 100 samples raises at once, so a
broken dataset cannot spin forever in the infinite pretraining stream.
"""
from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import get_worker_info

from data_tools import sampling
from data_tools.config import DataConfig
from data_tools.decode import DecodeError, open_video, resolve_backend
from data_tools.manifest import find_manifest
from data_tools.manifest import resolve_shards as manifest_shard_urls
from data_tools.masking import MaskGenerator, build_decoder_mask_generator, build_mask_generator
from data_tools.transforms import ClipTransform, normalize_batch
from runtime.dist import discover

logger = logging.getLogger(__name__)

MODES = ("pretrain", "train", "eval", "test_views")
RESAMPLED_MODES = ("pretrain", "train")
VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "avi", "mov")
SKIP_REASONS = ("tar_error", "missing_video", "missing_json", "bad_json", "empty_video",
                "decode_error")
WORKER_CHECK_MIN_SAMPLES = 100


# ---------------------------------------------------------------------------------------
# Shard lists


@dataclass
class ShardSet:
    urls: list[str]
    num_samples: list[int] | None = None  # per shard, when a manifest gives it
    classes: list[str] | None = None

    @property
    def total_samples(self) -> int | None:
        return sum(self.num_samples) if self.num_samples is not None else None


def resolve_shards(spec: str) -> ShardSet:
    """Shard URLs (and per-shard counts and classes when a manifest is found) for
    ``data.shards``; see ``data_tools.manifest.resolve_shards`` for the accepted forms."""
    if not spec:
        raise ValueError("data.shards is empty: give a manifest.json, a shard directory or "
                         "a shard pattern")
    try:
        manifest = find_manifest(spec)
        if manifest is not None:
            return ShardSet(manifest.urls(), [s.num_samples for s in manifest.shards],
                            list(manifest.classes))
        return ShardSet(manifest_shard_urls(spec))
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"data.shards={spec!r}: {err}") from err


# ---------------------------------------------------------------------------------------
# Statistics shared between the workers and the main process


class LoaderStats:
    """Per-worker counters in shared memory: column 0 = decoded, then one per skip reason."""

    def __init__(self, num_workers: int):
        self.counts = torch.zeros(max(num_workers, 1), 1 + len(SKIP_REASONS),
                                  dtype=torch.int64).share_memory_()

    def worker_counts(self) -> torch.Tensor:
        """The calling worker's row (the main process uses row 0 without workers)."""
        info = get_worker_info()
        return self.counts[info.id if info is not None else 0]

    def add_decoded(self) -> None:
        self.worker_counts()[0] += 1

    def add_skipped(self, reason: str) -> None:
        self.worker_counts()[1 + SKIP_REASONS.index(reason)] += 1

    def snapshot(self) -> torch.Tensor:
        return self.counts.sum(0).clone()

    @staticmethod
    def as_dict(totals: torch.Tensor) -> dict[str, int]:
        skipped = totals[1:]
        out = {"decoded": int(totals[0]), "skipped": int(skipped.sum())}
        out.update({f"skipped/{r}": int(n) for r, n in zip(SKIP_REASONS, skipped)})
        return out

    def check(self, totals: torch.Tensor, max_fraction: float, where: str) -> None:
        """Raise when the failed fraction of ``totals`` exceeds ``max_fraction``."""
        failed, seen = int(totals[1:].sum()), int(totals.sum())
        if seen and failed / seen > max_fraction:
            reasons = {k: v for k, v in self.as_dict(totals).items()
                       if k.startswith("skipped/") and v}
            raise RuntimeError(
                f"{where}: {failed} of {seen} samples failed ({failed / seen:.1%} > "
                f"data.max_failure_fraction={max_fraction}); by reason: {reasons}. The "
                f"warnings above name each shard and key.")


class _SkipHandler:
    """WebDataset handler for tar-level errors: count, warn, go on with the next shard.

    WebDataset appends the shard to the exception's arguments. A truncated or damaged tar
    usually reports two events (the damaged member, then the broken stream); the samples
    after the damage are lost and cannot be counted.
    """

    def __init__(self, stats: LoaderStats):
        self.stats = stats

    def __call__(self, exn: Exception) -> bool:
        self.stats.add_skipped("tar_error")
        logger.warning("unreadable tar data, skipping the rest of the shard: %s: %s",
                       type(exn).__name__, exn)
        return True


class SampleError(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# ---------------------------------------------------------------------------------------
# Worker-side stages


def _stream_seed(seed: int, rank: int, stage: int, counter: int) -> int:
    """A seed distinct per (seed, rank, DataLoader worker and its base seed, stage, pass)."""
    info = get_worker_info()
    worker_seed = info.seed if info is not None else 0
    entropy = [seed, rank, worker_seed % 2**63, stage, counter]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)


class _WorkerSeed:
    """``ResampledShards(worker_seed=...)``: deterministic per rank and worker."""

    def __init__(self, seed: int, rank: int):
        self.seed, self.rank = seed, rank

    def __call__(self) -> int:
        return _stream_seed(self.seed, self.rank, stage=0, counter=0)


class _Shuffle:
    """``wds.shuffle`` with an RNG seeded per worker and per pass."""

    def __init__(self, bufsize: int, seed: int, rank: int):
        self.bufsize, self.seed, self.rank, self.passes = bufsize, seed, rank, 0

    def __call__(self, src):
        self.passes += 1
        rng = random.Random(_stream_seed(self.seed, self.rank, 1, self.passes))
        return wds.shuffle(self.bufsize, initial=self.bufsize // 2 + 1, rng=rng)(src)


class ClipMaker:
    """Turns raw tar samples into clip dicts; skips and counts samples that fail.

    Each video is decoded once (the union of the frames its clips need); in pretrain/train it
    yields ``repeat`` independently augmented clips (of one frame set, or each at its own
    temporal position with ``repeat_sampling="independent"``), in test_views
    ``num_test_clips x num_test_crops`` views.
    """

    def __init__(self, cfg: DataConfig, mode: str, rank: int, stats: LoaderStats,
                 mask_generator=None, decoder_mask_generator=None):
        self.cfg, self.mode, self.rank, self.stats = cfg, mode, rank, stats
        self.backend = resolve_backend(cfg.backend)
        crop = cfg.crop if cfg.crop != "auto" else (
            "multiscale" if mode == "pretrain" else "random_resized")
        self.transform = ClipTransform(cfg.input_size, crop, cfg.flip)
        self.mask_generator = mask_generator
        self.decoder_mask_generator = decoder_mask_generator
        self.passes = 0

    def __call__(self, samples: Iterator[dict]) -> Iterator[dict]:
        self.passes += 1
        seed = _stream_seed(self.cfg.seed, self.rank, 2, self.passes)
        rng = np.random.default_rng(seed)
        mask_rng = torch.Generator().manual_seed(seed)
        for sample in samples:
            key, url = sample.get("__key__", "?"), sample.get("__url__", "?")
            try:
                clips = self.make_clips(sample, rng)
            except SampleError as err:
                self._skip(err.reason, f"{err}", key, url)
                continue
            self.stats.add_decoded()
            for clip in clips:
                if self.mask_generator is not None:
                    clip["mask"] = _call_mask_generator(self.mask_generator, mask_rng)
                if self.decoder_mask_generator is not None:
                    clip["decoder_mask"] = _call_mask_generator(self.decoder_mask_generator,
                                                                mask_rng)
                yield clip

    def _skip(self, reason: str, message: str, key: str, url: str) -> None:
        self.stats.add_skipped(reason)
        logger.warning("skipping sample %r in shard %s: %s (%s)", key, url, reason, message)
        totals = self.stats.worker_counts()
        if int(totals.sum()) >= WORKER_CHECK_MIN_SAMPLES:
            info = get_worker_info()
            self.stats.check(totals, self.cfg.max_failure_fraction,
                             f"rank {self.rank} worker {info.id if info else 0}")

    def make_clips(self, sample: dict, rng: np.random.Generator) -> list[dict]:
        label, size = _read_meta(sample)
        video_bytes = next((sample[e] for e in VIDEO_EXTENSIONS if e in sample), None)
        if video_bytes is None:
            raise SampleError("missing_video", f"no video member (.{'/.'.join(VIDEO_EXTENSIONS)})")
        cfg = self.cfg
        independent = cfg.repeat_sampling == "independent"
        try:
            reader = open_video(video_bytes, self.backend, cfg.short_side, size, num_threads=1)
            if self.mode in RESAMPLED_MODES:
                clip_indices = [sampling.train_indices(reader.num_frames, cfg.num_frames,
                                                       cfg.sampling_rate, cfg.sampling, rng)
                                for _ in range(cfg.repeat if independent else 1)]
            else:
                num_clips = cfg.num_test_clips if self.mode == "test_views" else 1
                clip_indices = sampling.multi_view_indices(
                    reader.num_frames, cfg.num_frames, cfg.sampling_rate, num_clips, cfg.sampling)
            unique, inverse = np.unique(np.concatenate(clip_indices), return_inverse=True)
            frames = reader.get_frames(unique.tolist())
        except DecodeError as err:
            raise SampleError(err.reason, str(err)) from err
        key = sample["__key__"]
        positions = [torch.from_numpy(p) for p in inverse.reshape(len(clip_indices), -1)]
        if len(positions) == 1 and np.array_equal(inverse, np.arange(len(inverse))):
            positions = [None]  # the decoded frames are the clip: no gather needed
        if self.mode in RESAMPLED_MODES and not independent:
            positions = positions * cfg.repeat
        clips = []
        for clip_idx, pos in enumerate(positions):
            if self.mode in RESAMPLED_MODES:
                video = self.transform.train(frames, rng, pos)
                clips.append({"video": video, "label": label, "key": key})
                continue
            num_crops = cfg.num_test_crops if self.mode == "test_views" else 1
            for crop_idx, video in enumerate(self.transform.test(frames, num_crops, pos)):
                clip = {"video": video, "label": label, "key": key}
                if self.mode == "test_views":
                    clip["view"] = clip_idx * num_crops + crop_idx
                clips.append(clip)
        return clips


def _read_meta(sample: dict) -> tuple[int, tuple[int, int]]:
    """``label`` and stored ``(width, height)`` (0 when absent) from the sample's json."""
    if "json" not in sample:
        raise SampleError("missing_json", "no .json member")
    try:
        meta = json.loads(sample["json"])
        if not isinstance(meta, dict):
            raise ValueError(f"expected an object, got {type(meta).__name__}")
        return int(meta.get("label", -1)), (int(meta.get("width", 0)), int(meta.get("height", 0)))
    except (ValueError, TypeError) as err:
        raise SampleError("bad_json", f"unreadable metadata: {err}") from err


def _call_mask_generator(generator, rng: torch.Generator) -> torch.Tensor:
    """This package's generators take the worker's RNG; other callables take no argument."""
    return generator(rng) if isinstance(generator, MaskGenerator) else generator()


class ClipCollator:
    """Clip dicts -> a batch. The uint8 clips are normalised straight into the batch tensor,
    allocated in shared memory inside a worker (as ``default_collate`` does), so handing the
    batch to the main process copies nothing."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        self.mean, self.std = mean, std

    def __call__(self, clips: list[dict]) -> dict[str, Any]:
        first = clips[0]["video"]  # (T, C, H, W) uint8
        shape = (len(clips), first.shape[1], first.shape[0], *first.shape[2:])
        videos = [c["video"] for c in clips]
        batch: dict[str, Any] = {
            "video": normalize_batch(videos, self.mean, self.std, out=_batch_buffer(shape)),
            "label": torch.tensor([c["label"] for c in clips], dtype=torch.long),
            "key": [c["key"] for c in clips],
        }
        for name in ("mask", "decoder_mask"):
            if name in clips[0]:
                batch[name] = torch.stack([c[name] for c in clips])
        if "view" in clips[0]:
            batch["view"] = torch.tensor([c["view"] for c in clips], dtype=torch.long)
        return batch


def _batch_buffer(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised float32 tensor, in shared memory when called in a worker."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.float32)
    template = torch.empty(0, dtype=torch.float32)
    storage = template._typed_storage()._new_shared(math.prod(shape), device=template.device)
    return template.new(storage).resize_(shape)


# ---------------------------------------------------------------------------------------
# Main-process side


class VideoLoader:
    """Iterable over batches for one rank, with skip statistics and failure checks.

    ``len()`` is the number of batches per epoch in pretrain/train; ``num_samples`` is the
    number of videos this rank reads in eval/test_views when the manifest gives counts.
    """

    def __init__(self, loader: wds.WebLoader, stats: LoaderStats, cfg: DataConfig, mode: str,
                 rank: int, world_size: int, num_batches: int | None = None,
                 num_samples: int | None = None):
        self.loader, self._stats, self.cfg, self.mode = loader, stats, cfg, mode
        self.rank, self.world_size = rank, world_size
        self.num_batches, self.num_samples = num_batches, num_samples
        self.epoch = 0
        self.last_epoch_stats: dict[str, int] = {}

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError(f"mode {self.mode!r} has no fixed length: ranks read disjoint "
                            f"shards and may yield different numbers of batches")
        return self.num_batches

    @property
    def stats(self) -> dict[str, int]:
        """Cumulative counts for this rank: ``decoded``, ``skipped``, ``skipped/<reason>``."""
        return LoaderStats.as_dict(self._stats.snapshot())

    def __iter__(self) -> Iterator[dict[str, Any]]:
        before = self._stats.snapshot()
        yield from self.loader
        epoch_totals = self._stats.snapshot() - before
        self.last_epoch_stats = LoaderStats.as_dict(epoch_totals)
        self.epoch += 1
        if self.last_epoch_stats["skipped"]:
            logger.warning("rank %d epoch %d: %s", self.rank, self.epoch,
                           self.last_epoch_stats)
        self._stats.check(epoch_totals, self.cfg.max_failure_fraction,
                          f"rank {self.rank} epoch {self.epoch} ({self.mode})")


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    env = discover() if rank is None or world_size is None else None
    return (env.rank if rank is None else rank), (env.world_size if world_size is None
                                                  else world_size)


def build_loader(cfg: DataConfig, mode: str, rank: int | None = None,
                 world_size: int | None = None, mask_generator=None) -> VideoLoader:
    """Build the loader of one rank.

    Args:
        cfg: data settings.
        mode: ``"pretrain" | "train" | "eval" | "test_views"`` (see the module docstring).
        rank, world_size: default to the launcher's (``runtime.dist.discover``).
        mask_generator: overrides the encoder mask of ``cfg`` (any mode); by default masks
            are made in pretrain mode only, from ``cfg.mask_type``.
    """
    if mode not in MODES:
        raise ValueError(f"unknown loader mode {mode!r}; choose one of {list(MODES)}")
    cfg.validate()
    rank, world_size = _rank_and_world(rank, world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    shards = resolve_shards(cfg.shards)
    stats = LoaderStats(cfg.num_workers)

    decoder_mask_generator = None
    if mask_generator is None and mode == "pretrain":
        mask_generator = build_mask_generator(cfg.mask_type, cfg.token_grid, cfg.mask_ratio)
    if mask_generator is not None:
        decoder_mask_generator = build_decoder_mask_generator(
            cfg.decoder_mask_type, cfg.token_grid, cfg.decoder_mask_ratio)
    clip_maker = ClipMaker(cfg, mode, rank, stats, mask_generator, decoder_mask_generator)

    num_batches = num_samples = None
    if mode in RESAMPLED_MODES:
        epoch_samples = cfg.epoch_samples or shards.total_samples
        if not epoch_samples:
            raise ValueError(f"data.epoch_samples must be set for mode {mode!r} when "
                             f"data.shards ({cfg.shards}) is not a manifest with counts")
        num_batches = epoch_samples * cfg.repeat // (cfg.batch_size * world_size)
        if num_batches < 1:
            raise ValueError(f"an epoch of {epoch_samples} videos x repeat {cfg.repeat} "
                             f"gives no full batch of {cfg.batch_size} on {world_size} ranks")
        stages = [wds.ResampledShards(shards.urls, seed=cfg.seed, deterministic=True,
                                      worker_seed=_WorkerSeed(cfg.seed, rank)),
                  wds.tarfile_to_samples(handler=_SkipHandler(stats))]
        if cfg.shuffle_buffer > 1:
            stages.append(_Shuffle(cfg.shuffle_buffer, cfg.seed, rank))
    else:
        readers = world_size * max(cfg.num_workers, 1)
        if len(shards.urls) < readers:
            raise ValueError(
                f"mode {mode!r} reads every sample exactly once, so each of the {world_size} "
                f"rank(s) x {max(cfg.num_workers, 1)} worker(s) needs its own shard: at least "
                f"{readers} shards are needed, {cfg.shards} has {len(shards.urls)}. Write "
                f"smaller shards or lower data.num_workers.")
        rank_urls = shards.urls[rank::world_size]
        if shards.num_samples is not None:
            num_samples = sum(shards.num_samples[rank::world_size])
        stages = [wds.SimpleShardList(rank_urls), wds.split_by_worker,
                  wds.tarfile_to_samples(handler=_SkipHandler(stats))]
    stages += [clip_maker, wds.batched(cfg.batch_size, collation_fn=ClipCollator(cfg.mean, cfg.std),
                                       partial=mode not in RESAMPLED_MODES)]
    dataset = wds.DataPipeline(*stages)

    loader = wds.WebLoader(
        dataset, batch_size=None, shuffle=False, num_workers=cfg.num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=cfg.num_workers > 0 and mode in RESAMPLED_MODES,
        generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + rank))
    if num_batches is not None:
        loader = loader.with_epoch(num_batches)
    return VideoLoader(loader, stats, cfg, mode, rank, world_size, num_batches, num_samples)

