"""VideoMAE pretraining loop on DeepSpeed.

``train(cfg)`` runs one rank of a run: the loader (tube masking, repeated augmentation) feeds
``VideoMAEPretrain`` wrapped by ``runtime.engine``; checkpoints every N steps carry the data
position, RNG states and the step (which fixes the lr schedule) and export the encoder as
``encoder.safetensors`` for fine-tuning.

Exact resume: each rank resamples from its own shards (``shards[rank::world]``, so ranks read
disjoint shards), and its loader is rebuilt at every epoch start and after every checkpoint
with a seed derived from ``(seed, data.seed, epoch, batch)``. A resumed run therefore reads
the same batches as an uninterrupted one without decoding anything twice.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.distributed as torch_dist

from data_tools.loader import DataConfig, VideoLoader, build_loader, resolve_shards
from models import VideoMAEPretrain, build_pretrain_model, encoder_state_dict
from models.convert import config_metadata
from pretrain.config import PretrainConfig
from pretrain.visualize import save_loss_curve, save_reconstruction_grid
from runtime.config import save_resolved_config
from runtime.dist import init_distributed, is_initialized
from runtime.engine import (CheckpointManager, DataPosition, TrainEngine, create_engine,
                            segment_seed)
from runtime.io import atomic_save_safetensors, atomic_write_text
from runtime.logging import METRICS_FILE, RunLogger, progress
from runtime.seed import seed_everything

logger = logging.getLogger(__name__)

ENCODER_EXPORT = "encoder.safetensors"


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
    start: float = field(default_factory=time.perf_counter)

    def add(self, loss: float | None, clips: int, data_wait: float) -> None:
        if loss is not None:
            self.loss += loss
            self.finite += 1
        self.clips += clips
        self.data_wait += data_wait

    def summary(self, engine: TrainEngine, world_size: int) -> dict[str, float]:
        """Mean loss and data-wait over ranks, clips/s over all ranks, the lr of the last
        step, the non-finite count and (when DeepSpeed computes it) the gradient norm."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        loss, wait = global_mean([self.loss / max(self.finite, 1), self.data_wait], engine.device)
        scalars = {"loss": loss, "lr": engine.schedule.lr_at(engine.global_step - 1),
                   "clips_per_s": self.clips * world_size / elapsed,
                   "data_wait": min(wait / elapsed, 1.0),
                   "nonfinite_total": engine.nonfinite_total}
        if engine.grad_norm is not None:
            scalars["grad_norm"] = engine.grad_norm
        return scalars


def pretrain_step(engine: TrainEngine, batch: dict) -> float | None:
    """Forward and ``engine.step`` on one micro-batch; the loss, or None when it was skipped
    as non-finite."""
    device = engine.device
    video = batch["video"].to(device, non_blocking=True)
    extra = {"decoder_mask": batch["decoder_mask"].to(device)} if "decoder_mask" in batch else {}
    with engine.autocast():
        loss, _, _ = engine(video, batch["mask"].to(device), **extra)
    return loss.item() if engine.step(loss) else None


# ---------------------------------------------------------------------------------------
# Checkpoint exports


def export_encoder(module: VideoMAEPretrain, master: dict[str, torch.Tensor], path: Path) -> None:
    """Encoder-only safetensors for fine-tuning, from the fp32 ``master`` state dict of the
    pretraining model (``TrainEngine.master_state_dict``), with the ModelConfig as metadata."""
    state = {k: master[f"encoder.{k}"] for k in encoder_state_dict(module)}
    atomic_save_safetensors(state, path, metadata=config_metadata(module.encoder.cfg))


def weights_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 of every parameter's bytes in name order (ranks must agree)."""
    digest = hashlib.sha256()
    for name, param in sorted(module.named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def save_reconstruction(engine: TrainEngine, cfg: PretrainConfig, batch: dict, step: int,
                        out_dir: Path) -> None:
    """Reconstruction grid of the first ``log.vis_clips`` clips of ``batch`` (main process)."""
    module: VideoMAEPretrain = engine.module
    k = cfg.log.vis_clips
    video = batch["video"][:k].to(engine.device)
    mask = batch["mask"][:k].to(engine.device)
    module.eval()
    with engine.autocast():
        recon = module.reconstruct(video, mask)
    module.train()
    m = cfg.model
    save_reconstruction_grid(video, mask, recon, out_dir / "figures" / f"reconstruction_{step:08d}.png",
                             m.grid, m.tubelet_size, m.patch_size, cfg.data.mean, cfg.data.std,
                             title=f"step {step}")


def save_checkpoint(checkpoints: CheckpointManager, engine: TrainEngine, step: int,
                    position: DataPosition) -> None:
    """Checkpoint ``step_<step>`` with the data position and schedule, and the encoder
    export (all ranks)."""
    master = engine.master_state_dict()
    checkpoints.save(engine, step, {"data": asdict(position), "schedule": asdict(engine.schedule)},
                     exports={ENCODER_EXPORT: lambda path: export_encoder(engine.module, master, path)})


def check_schedule(saved: dict | None, engine: TrainEngine) -> None:
    if saved and saved != asdict(engine.schedule):
        logger.warning("the lr schedule differs from the checkpoint's (%s now, %s then): the "
                       "resumed run will not match an uninterrupted one", asdict(engine.schedule),
                       saved)


# ---------------------------------------------------------------------------------------
# Loop


def train(cfg: PretrainConfig) -> dict:
    """Run (or resume) pretraining on this rank; returns ``{"step", "loss", "out_dir"}``."""
    env = init_distributed()
    out_dir = Path(cfg.out_dir)
    checkpoints = CheckpointManager(out_dir / "checkpoints", cfg.checkpoint.keep_last)
    resume_tag = checkpoints.resolve(cfg.checkpoint.resume)
    if resume_tag is None and checkpoints.complete_tags():
        raise FileExistsError(f"{out_dir} already holds checkpoints; pass checkpoint.resume=auto "
                              "to continue that run, or choose another out_dir")
    if env.is_main:
        save_resolved_config(cfg, out_dir)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_pretrain_model(cfg.model)
    seed_everything(cfg.seed, env.rank)
    stream = DataStream(rank_data_config(cfg.data, env.rank, env.world_size), cfg.seed,
                        env.rank, env.world_size, cfg.engine.grad_accum_steps)
    engine = create_engine(model, cfg.engine, cfg.optim, cfg.data.batch_size, env.world_size,
                           out_dir, stream.steps_per_epoch)
    client = checkpoints.load(engine, resume_tag) if resume_tag else {}
    position = DataPosition(**client.get("data", {}))
    check_schedule(client.get("schedule"), engine)
    stop_at = min(cfg.max_steps or engine.schedule.total_steps, engine.schedule.total_steps)

    run_log = RunLogger(out_dir, enabled=env.is_main, tensorboard=cfg.log.tensorboard)
    bar = progress(None, total=stop_at, initial=engine.global_step, desc="pretrain",
                   enabled=env.is_main)
    window, last = Window(), {}
    engine.train()
    try:
        while engine.global_step < stop_at:
            if position.batch >= stream.batches_per_epoch:
                position = DataPosition(position.epoch + 1, 0)
            for batch, wait in timed(stream.segment(position)):
                position.batch += 1
                window.add(pretrain_step(engine, batch), len(batch["video"]), wait)
                if not engine.last_step_applied:
                    continue
                step = engine.global_step
                bar.update(1)
                if step % cfg.log.every_steps == 0 or step == stop_at:
                    last = window.summary(engine, env.world_size)
                    run_log.log(step, epoch=position.epoch, **last)
                    bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}",
                                    clips_s=f"{last['clips_per_s']:.1f}",
                                    wait=f"{last['data_wait']:.0%}", refresh=False)
                    window = Window()
                vis = cfg.log.vis_every_steps
                if env.is_main and vis >= 0 and ((vis and step % vis == 0) or step == stop_at):
                    save_reconstruction(engine, cfg, batch, step, out_dir)
                every = cfg.checkpoint.every_steps
                if step == stop_at or (every and step % every == 0):
                    save_checkpoint(checkpoints, engine, step, position)
                    break  # the next segment's loader starts at the checkpointed position
    finally:
        bar.close()
        run_log.close()
    _write_rank_summary(out_dir, env.rank, env.world_size, stream, engine)
    if env.is_main and (out_dir / METRICS_FILE).is_file() and last:
        save_loss_curve(out_dir / METRICS_FILE, out_dir / "figures" / "loss_curve.png")
    return {"step": engine.global_step, "loss": last.get("loss", math.nan), "out_dir": str(out_dir)}


def _write_rank_summary(out_dir: Path, rank: int, world_size: int, stream: DataStream,
                        engine: TrainEngine) -> None:
    """``ranks/rank_<r>.json``: this rank's shards, loader counts and final weight hash."""
    summary = {"rank": rank, "world_size": world_size, "step": engine.global_step,
               "shards": stream.data.shards.split("::"), "loader": stream.stats,
               "nonfinite_total": engine.nonfinite_total,
               "weights_sha256": weights_fingerprint(engine.module)}
    atomic_write_text(out_dir / "ranks" / f"rank_{rank:05d}.json", json.dumps(summary, indent=2))
