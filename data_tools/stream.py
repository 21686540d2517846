"""A rank's resampled video clips as a resumable ``runtime.training.DataStream``.

The shards are dealt to ``streams`` data streams (``shards[s::streams]``, disjoint; for a
mixture of weighted shard sets, each set's shards are dealt that way), a number fixed for the
whole run (by default the world size when it starts). Each stream resamples
from its own shards with its own loader of ``data.batch_size`` clips per batch; rank ``r`` of
``W`` reads streams ``r, r + W, ...`` and concatenates their batches into one micro-batch.
Every global batch is therefore the same set of clips on any rank count that divides
``streams``, which is what lets a run resume on another number of ranks. A stream's loader is
rebuilt at every epoch start and after every scheduled checkpoint with a seed derived from
``(seed, data.seed, epoch, batch)``; the epoch length stays the one of the whole set.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Iterator

import torch

from data_tools.config import DataConfig
from data_tools.loader import VideoLoader, build_loader
from data_tools.shard_set import (ShardSource, is_mixture, mixture_spec, resolve_sources,
                                  total_samples)
from runtime.errors import InputError
from runtime.training import DataStream


def rank_data_config(data: DataConfig, stream: int, streams: int) -> DataConfig:
    """``data`` restricted to one stream's shards (``shards[stream::streams]`` of each shard
    set), with the epoch length of the whole data."""
    sets = resolve_sources(data.shards)
    for source, shard_set in sets:
        if len(shard_set.urls) < streams:
            raise InputError(f"{source.where} ({source.path}) has {len(shard_set.urls)} "
                             f"shard(s); {streams} data streams need at least one each (streams "
                             "read disjoint shards): write smaller shards or lower data.streams")
    parts = ["::".join(shard_set.urls[stream::streams]) for _, shard_set in sets]
    shards = (mixture_spec([ShardSource(source.name, part, source.weight)
                            for (source, _), part in zip(sets, parts)])
              if is_mixture(data.shards) else parts[0])
    epoch_samples = data.epoch_samples or total_samples(sets) or 0
    return replace(data, shards=shards, epoch_samples=epoch_samples)


def resolve_streams(configured: int, recorded: int | None, world_size: int) -> int:
    """The run's number of data streams: the checkpoint's (``recorded``), else
    ``data.streams``, else the world size; it must be a multiple of the world size."""
    if recorded and configured and configured != recorded:
        raise InputError(f"data.streams={configured} but the checkpoint was written with "
                         f"{recorded} streams: leave data.streams at 0 to keep the run's")
    streams = recorded or configured or world_size
    if streams % world_size:
        raise InputError(f"the run reads {streams} data streams, which {world_size} ranks cannot "
                         f"share evenly: resume on a number of ranks that divides {streams}")
    return streams


def rank_streams(rank: int, world_size: int, streams: int) -> range:
    """The streams rank ``rank`` of ``world_size`` reads."""
    return range(rank, streams, world_size)


class MergedLoader:
    """Batches of several stream loaders concatenated along the batch (tensors) or extended
    (lists); ``stats`` sums theirs."""

    def __init__(self, loaders: list[VideoLoader]):
        self.loaders = loaders

    def __len__(self) -> int:
        return min(len(loader) for loader in self.loaders)

    def __iter__(self) -> Iterator[dict]:
        for parts in zip(*self.loaders):
            yield {key: torch.cat([p[key] for p in parts]) if torch.is_tensor(parts[0][key])
                   else [item for p in parts for item in p[key]] for key in parts[0]}

    @property
    def stats(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for loader in self.loaders:
            for key, value in loader.stats.items():
                total[key] = total.get(key, 0) + value
        return total


def video_stream(data: DataConfig, seed: int, rank: int, world_size: int,
                 grad_accum_steps: int, mode: str = "pretrain", streams: int = 0) -> DataStream:
    """This rank's clips in a resampled loader ``mode`` (``pretrain`` or ``train``): its share
    of ``streams`` (0 = one per rank), ``data.batch_size * streams / world_size`` clips per
    micro-batch."""
    streams = resolve_streams(streams, None, world_size)
    configs = {s: rank_data_config(data, s, streams)
               for s in rank_streams(rank, world_size, streams)}

    def make_loader(segment_seed: int) -> VideoLoader | MergedLoader:
        loaders = [build_loader(replace(c, seed=segment_seed), mode, s, streams)
                   for s, c in configs.items()]
        return loaders[0] if len(loaders) == 1 else MergedLoader(loaders)

    return DataStream(make_loader, seed * 1_000_003 + data.seed, len(make_loader(data.seed)),
                      grad_accum_steps)
