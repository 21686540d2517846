"""A rank's resampled video clips as a resumable ``runtime.training.DataStream``.

Each rank resamples from its own shards (``shards[rank::world_size]``, so ranks read disjoint
shards) and its loader is rebuilt at every epoch start and after every checkpoint with a seed
derived from ``(seed, data.seed, epoch, batch)``; the epoch length stays the one of the whole
set, so every rank yields the same number of batches per epoch.
"""
from __future__ import annotations

from dataclasses import replace

from data_tools.config import DataConfig
from data_tools.loader import VideoLoader, build_loader
from data_tools.shard_set import resolve_shards
from runtime.errors import InputError
from runtime.training import DataStream


def rank_data_config(data: DataConfig, rank: int, world_size: int) -> DataConfig:
    """``data`` restricted to this rank's shards (``shards[rank::world_size]``), with the
    epoch length of the whole set."""
    shard_set = resolve_shards(data.shards)
    if len(shard_set.urls) < world_size:
        raise InputError(f"data.shards ({data.shards}) has {len(shard_set.urls)} shard(s); "
                         f"{world_size} ranks need at least one each (ranks read disjoint shards)")
    epoch_samples = data.epoch_samples or shard_set.total_samples or 0
    return replace(data, shards="::".join(shard_set.urls[rank::world_size]),
                   epoch_samples=epoch_samples)


def video_stream(data: DataConfig, seed: int, rank: int, world_size: int,
                 grad_accum_steps: int, mode: str = "pretrain") -> DataStream:
    """This rank's clips in a resampled loader ``mode`` (``pretrain`` or ``train``)."""
    rank_data = rank_data_config(data, rank, world_size)

    def make_loader(segment_seed: int) -> VideoLoader:
        return build_loader(replace(rank_data, seed=segment_seed), mode, rank, world_size)

    return DataStream(make_loader, seed * 1_000_003 + data.seed, len(make_loader(data.seed)),
                      grad_accum_steps)
