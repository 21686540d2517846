"""Training-loop pieces shared by pretraining and fine-tuning.

- ``rank_data_config``: a rank's disjoint share of the shards, the epoch length kept global.
- ``DataStream``: a rank's resampled batches as segments that each start at a
  ``DataPosition``, with a loader seeded from that position, so a resumed run reads exactly
  the batches an uninterrupted one would, without decoding anything twice.
- ``timed``: batches with the time spent waiting for each (the data-wait fraction).
- ``Window``: sums since the last log line and their cross-rank summary.
- ``open_run``: the run folder, its checkpoints and the tag to resume from.
- ``check_model_matches_data``: the clips the loader makes fit the model.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as torch_dist

from data_tools.config import DataConfig
from data_tools.loader import VideoLoader, build_loader, resolve_shards
from runtime.checkpoint import CheckpointConfig, CheckpointManager, DataPosition, segment_seed
from runtime.config import save_resolved_config
from runtime.dist import is_initialized
from runtime.engine import TrainEngine


def check_model_matches_data(model: Any, data: DataConfig) -> None:
    """Raise ValueError when the loader's clips (``data``) do not fit the model config."""
    pairs = (("num_frames", model.num_frames, data.num_frames),
             ("img_size / data.input_size", model.img_size, data.input_size),
             ("patch_size", model.patch_size, data.patch_size),
             ("tubelet_size", model.tubelet_size, data.tubelet_size))
    for name, model_value, data_value in pairs:
        if model_value != data_value:
            raise ValueError(f"model.{name} ({model_value}) and data ({data_value}) disagree")


def open_run(cfg: Any, out_dir: str | Path, checkpoint: CheckpointConfig, is_main: bool
             ) -> tuple[Path, CheckpointManager, str | None]:
    """Set up a training run's folder: ``(out_dir, checkpoints, resume_tag)``.

    ``resume_tag`` is the checkpoint to continue from (None for a fresh start). A folder that
    already holds complete checkpoints is never trained over silently: without
    ``checkpoint.resume`` this raises. The main process writes the resolved ``config.yaml``.
    """
    out_dir = Path(out_dir)
    checkpoints = CheckpointManager(out_dir / "checkpoints", checkpoint.keep_last)
    resume_tag = checkpoints.resolve(checkpoint.resume)
    if resume_tag is None and checkpoints.complete_tags():
        raise FileExistsError(f"{out_dir} already holds checkpoints; pass checkpoint.resume=auto "
                              "to continue that run, or choose another out_dir")
    if is_main:
        save_resolved_config(cfg, out_dir)
    return out_dir, checkpoints, resume_tag


# ---------------------------------------------------------------------------------------
# Data


def rank_data_config(data: DataConfig, rank: int, world_size: int) -> DataConfig:
    """``data`` restricted to this rank's shards (``shards[rank::world_size]``).

    The epoch length stays the one of the whole set, so every rank yields the same number of
    batches per epoch.
    """
    shard_set = resolve_shards(data.shards)
    if len(shard_set.urls) < world_size:
        raise ValueError(f"data.shards ({data.shards}) has {len(shard_set.urls)} shard(s); "
                         f"{world_size} ranks need at least one each (ranks read disjoint shards)")
    epoch_samples = data.epoch_samples or shard_set.total_samples or 0
    return replace(data, shards="::".join(shard_set.urls[rank::world_size]),
                   epoch_samples=epoch_samples)


class DataStream:
    """Batches of one rank in a resampled ``mode`` (``pretrain`` or ``train``), as segments
    that each start at a ``DataPosition`` with a loader seeded from it (``segment_seed``)."""

    def __init__(self, data: DataConfig, seed: int, rank: int, world_size: int,
                 grad_accum_steps: int, mode: str = "pretrain"):
        self.data, self.seed, self.rank, self.world_size = data, seed, rank, world_size
        self.mode = mode
        self.stats: dict[str, int] = {}
        batches = len(self._loader(DataPosition()))
        self.steps_per_epoch = batches // grad_accum_steps
        if self.steps_per_epoch < 1:
            raise ValueError(f"an epoch has {batches} batches per rank, fewer than "
                             f"engine.grad_accum_steps={grad_accum_steps}")
        # whole optimizer steps only, so accumulation never straddles an epoch end
        self.batches_per_epoch = self.steps_per_epoch * grad_accum_steps

    def _loader(self, position: DataPosition) -> VideoLoader:
        seed = segment_seed(self.seed * 1_000_003 + self.data.seed, position.epoch, position.batch)
        return build_loader(replace(self.data, seed=seed), self.mode, self.rank, self.world_size)

    def segment(self, position: DataPosition) -> Iterator[dict]:
        """Batches from ``position`` to the end of its epoch (a fresh loader)."""
        return self._drain(self._loader(position), self.batches_per_epoch - position.batch)

    def _drain(self, loader: VideoLoader, count: int) -> Iterator[dict]:
        try:
            yield from itertools.islice(loader, count)
        finally:
            for key, value in loader.stats.items():
                self.stats[key] = self.stats.get(key, 0) + value


def timed(batches: Iterable[dict]) -> Iterator[tuple[dict, float]]:
    """Yield ``(batch, seconds spent waiting for it)``."""
    iterator = iter(batches)
    while True:
        start = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            return
        yield batch, time.perf_counter() - start


# ---------------------------------------------------------------------------------------
# Metrics


def global_mean(values: list[float], device: torch.device) -> list[float]:
    """Element-wise mean of ``values`` over ranks."""
    if not is_initialized() or torch_dist.get_world_size() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64,
                          device=device if torch_dist.get_backend() == "nccl" else "cpu")
    torch_dist.all_reduce(tensor)
    return (tensor / torch_dist.get_world_size()).tolist()


@dataclass
class Window:
    """Sums over the micro-batches since the last log line."""

    loss: float = 0.0
    finite: int = 0
    clips: int = 0
    data_wait: float = 0.0
    extras: dict[str, float] = field(default_factory=dict)
    start: float = field(default_factory=time.perf_counter)

    def add(self, loss: float | None, clips: int, data_wait: float, **extras: float) -> None:
        """``extras`` are further per-step scalars averaged like the loss (over the steps
        whose loss was finite)."""
        if loss is not None:
            self.loss += loss
            self.finite += 1
            for name, value in extras.items():
                self.extras[name] = self.extras.get(name, 0.0) + value
        self.clips += clips
        self.data_wait += data_wait

    def summary(self, engine: TrainEngine, world_size: int) -> dict[str, float]:
        """Mean loss and data-wait over ranks, clips/s over all ranks, the lr of the last
        step, the non-finite count and (when DeepSpeed computes it) the gradient norm."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        steps = max(self.finite, 1)
        names = sorted(self.extras)
        loss, wait, *extras = global_mean([self.loss / steps, self.data_wait,
                                           *(self.extras[n] / steps for n in names)], engine.device)
        scalars = {"loss": loss, **dict(zip(names, extras)),
                   "lr": engine.schedule.lr_at(engine.global_step - 1),
                   "clips_per_s": self.clips * world_size / elapsed,
                   "data_wait": min(wait / elapsed, 1.0),
                   "nonfinite_total": engine.nonfinite_total}
        if engine.grad_norm is not None:
            scalars["grad_norm"] = engine.grad_norm
        return scalars
