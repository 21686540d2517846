"""WebDataset video loader: shards -> decoded, sampled, augmented, masked batches.

``build_loader(cfg, mode)`` (``cfg`` a ``data_tools.config.DataConfig``) returns a
``VideoLoader``; iterating it gives dict batches: ``video`` ``(B, C, T, H, W)`` (uint8, or
normalised float32 with ``data.normalize="loader"``; ``data_tools.clips.model_input`` gives
the model's float32 input on a device from either), ``label`` long ``(B,)``, ``key``
list[str], and depending on mode ``mask`` / ``decoder_mask`` bool ``(B, N)`` (True =
masked) and ``view`` long ``(B,)``.

Modes:
- ``"pretrain"``: shards resampled with replacement (an infinite stream per worker; with
  several weighted shard sets, one per set mixed by weight: ``data_tools.shard_set``),
  shuffle buffer, random dense/segment clips, multi-scale crop, encoder (+ decoder) masks
  (multiblock masks are added per batch: ``data_tools.masking.MultiblockMasker``). Every
  rank yields the same number of batches per epoch: ``epoch_samples * repeat // (batch_size
  * world_size)``, ``epoch_samples`` defaulting to the videos of all sets.
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

This module assembles the pipeline; its parts live in ``data_tools.shard_set`` (what
``data.shards`` names), ``data_tools.seeding`` (per-worker seeds, seeded shuffle),
``data_tools.clips`` (decode, sample, augment, mask, collate) and
``data_tools.loader_stats`` (skip counters and failure checks).
"""
from __future__ import annotations

import logging
import traceback
from typing import Any, Iterator

import torch
import webdataset as wds

from data_tools.batch_buffers import BatchBuffers
from data_tools.clips import MODES, RESAMPLED_MODES, ClipCollator, ClipMaker
from data_tools.config import DataConfig
from data_tools.loader_stats import LoaderStats, SkipHandler
from data_tools.masking import (MultiblockMasker, build_decoder_mask_generator,
                                build_mask_generator, multiblock_groups)
from data_tools.seeding import Shuffle
from data_tools.shard_set import (resampled_samples, resolve_shards, resolve_sources,
                                  total_samples)
from data_tools.worker_watch import LoaderTimeoutError, WorkerWatch
from runtime.dist import discover
from runtime.errors import InputError

logger = logging.getLogger(__name__)


class VideoLoader:
    """Iterable over batches for one rank, with skip statistics and failure checks.

    ``len()`` is the number of batches per epoch in pretrain/train; ``num_samples`` is the
    number of videos this rank reads in eval/test_views when the manifest gives counts.
    """

    def __init__(self, loader: wds.WebLoader, stats: LoaderStats, cfg: DataConfig, mode: str,
                 rank: int, world_size: int, num_batches: int | None = None,
                 num_samples: int | None = None, watch: WorkerWatch | None = None,
                 batch_buffers: BatchBuffers | None = None):
        self.loader, self._stats, self.cfg, self.mode = loader, stats, cfg, mode
        self.watch = watch
        self.batch_buffers = batch_buffers  # the workers' pooled batch memory (or None)
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
        """Cumulative counts for this rank: ``decoded``, ``skipped``, ``skipped/<reason>``
        (and ``samples/<set>`` for a mixture of shard sets)."""
        return {**LoaderStats.as_dict(self._stats.snapshot()), **self._stats.taken_by_set()}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        before = self._stats.snapshot()
        try:
            yield from self.loader
        except RuntimeError as err:
            if self.watch is None or "timed out" not in str(err):
                raise
            _stop_workers(err, self.loader)
            raise LoaderTimeoutError(
                f"rank {self.rank}: no batch from the DataLoader workers for "
                f"{self.cfg.timeout_s:g} s (data.timeout_s): {self.watch.describe()}. A decoder "
                f"may hang on that sample: check it with 'python -m data_tools verify', take "
                f"it out of the shard set, or raise data.timeout_s") from err
        epoch_totals = self._stats.snapshot() - before
        self.last_epoch_stats = LoaderStats.as_dict(epoch_totals)
        self.epoch += 1
        if self.last_epoch_stats["skipped"]:
            logger.warning("rank %d epoch %d: %s", self.rank, self.epoch,
                           self.last_epoch_stats)
        self._stats.check(epoch_totals, self.cfg.max_failure_fraction,
                          f"rank {self.rank} epoch {self.epoch} ({self.mode})")


def _stop_workers(err: BaseException, loader: wds.WebLoader) -> None:
    """Shut down the DataLoader workers after a timeout, terminating a hung one (what the
    DataLoader iterator does when it is garbage-collected; the exception's frames keep it
    alive here, and a persistent-workers DataLoader keeps it in ``_iterator``)."""
    from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

    for frame, _ in traceback.walk_tb(err.__traceback__):
        iterator = frame.f_locals.get("self")
        if isinstance(iterator, _MultiProcessingDataLoaderIter):
            iterator._shutdown_workers()
            for worker in getattr(iterator, "_workers", []):
                worker.join(timeout=5)  # reap a terminated worker (torch < 2.13 does not)
    data_loader = loader.pipeline[0]
    if getattr(data_loader, "_iterator", None) is not None:
        data_loader._iterator = None


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
    cfg.require_geometry()
    rank, world_size = _rank_and_world(rank, world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    # resampled modes may mix several shard sets; the read-once modes read one
    sets = resolve_sources(cfg.shards) if mode in RESAMPLED_MODES else []
    stats = LoaderStats(cfg.num_workers, tuple(source.name for source, _ in sets if source.name))

    decoder_mask_generator = batch_masker = None
    if mask_generator is None and mode == "pretrain":
        if cfg.mask_type == "multiblock":
            batch_masker = MultiblockMasker(multiblock_groups(
                cfg.token_grid, cfg.block_counts, cfg.block_scales, cfg.block_aspect_ratio,
                cfg.block_temporal_scale), cfg.seed, rank)
        else:
            mask_generator = build_mask_generator(cfg.mask_type, cfg.token_grid, cfg.mask_ratio)
    if mask_generator is not None or batch_masker is not None:
        decoder_mask_generator = build_decoder_mask_generator(
            cfg.decoder_mask_type, cfg.token_grid, cfg.decoder_mask_ratio)
    clip_maker = ClipMaker(cfg, mode, rank, stats, mask_generator, decoder_mask_generator)

    num_batches = num_samples = None
    if mode in RESAMPLED_MODES:
        epoch_samples = cfg.epoch_samples or total_samples(sets)
        if not epoch_samples:
            raise InputError(f"data.epoch_samples must be set for mode {mode!r} when "
                             f"data.shards ({cfg.shards}) is not a manifest with counts")
        num_batches = epoch_samples * cfg.repeat // (cfg.batch_size * world_size)
        if num_batches < 1:
            raise InputError(f"an epoch of {epoch_samples} videos x repeat {cfg.repeat} "
                             f"gives no full batch of {cfg.batch_size} on {world_size} ranks")
        stages = resampled_samples(sets, cfg.seed, rank, stats)
        if cfg.shuffle_buffer > 1:
            stages.append(Shuffle(cfg.shuffle_buffer, cfg.seed, rank))
    else:
        shards = resolve_shards(cfg.shards)
        readers = world_size * max(cfg.num_workers, 1)
        if len(shards.urls) < readers:
            raise InputError(
                f"mode {mode!r} reads every sample exactly once, so each of the {world_size} "
                f"rank(s) x {max(cfg.num_workers, 1)} worker(s) needs its own shard: at least "
                f"{readers} shards are needed, {cfg.shards} has {len(shards.urls)}. Write "
                f"smaller shards or lower data.num_workers.")
        rank_urls = shards.urls[rank::world_size]
        if shards.num_samples is not None:
            num_samples = sum(shards.num_samples[rank::world_size])
        stages = [wds.SimpleShardList(rank_urls), wds.split_by_worker,
                  wds.tarfile_to_samples(handler=SkipHandler(stats))]
    batch_buffers = (BatchBuffers(cfg.num_workers, cfg.batch_buffers)
                     if cfg.num_workers > 0 and cfg.batch_buffers > 0 else None)
    collate = ClipCollator(cfg.mean, cfg.std, cfg.normalize, batch_buffers)
    stages += [clip_maker, wds.batched(cfg.batch_size, collation_fn=collate,
                                       partial=mode not in RESAMPLED_MODES)]
    if batch_masker is not None:
        stages.append(batch_masker)
    dataset = wds.DataPipeline(*stages)

    loader = wds.WebLoader(
        dataset, batch_size=None, shuffle=False, num_workers=cfg.num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=cfg.num_workers > 0 and mode in RESAMPLED_MODES,
        timeout=cfg.timeout_s if cfg.num_workers > 0 else 0,
        generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + rank))
    if num_batches is not None:
        loader = loader.with_epoch(num_batches)
    return VideoLoader(loader, stats, cfg, mode, rank, world_size, num_batches, num_samples,
                       clip_maker.watch, batch_buffers)

