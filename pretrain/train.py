"""VideoMAE pretraining loop on DeepSpeed.

``run(cfg)`` runs one rank of a run: the loader (tube, random or multiblock masks, repeated
augmentation, one shard set or several mixed by weight) feeds
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
import json
import logging
import math
from dataclasses import asdict
from pathlib import Path

import torch

from data_tools.clips import model_input
from data_tools.shard_set import shard_urls
from data_tools.config import DataConfig
from data_tools.stream import rank_data_config, rank_streams, resolve_streams, video_stream
from models import VideoMAEPretrain, build_pretrain_model, encoder_state_dict
from models.checkpoint import ENCODER_EXPORT, config_metadata
from pretrain.config import PretrainConfig
from pretrain.visualize import save_loss_curve, save_reconstruction_grid
from runtime.checkpoint import CheckpointManager, DataPosition
from runtime.dist import init_distributed
from runtime.engine import TrainEngine, create_engine
from runtime.io import atomic_save_safetensors, atomic_write_text
from runtime.logging import METRICS_FILE, RunLogger
from runtime.seed import seed_everything
from runtime.trackers import tracked
from runtime.preemption import Preempted
from runtime.training import (DataStream, Window, checkpoint_now, close_loop, global_mean,
                              log_window, next_position, open_loop, open_run, resume_from, timed)

logger = logging.getLogger(__name__)

def pretrain_step(engine: TrainEngine, batch: dict, data: DataConfig,
                  ) -> tuple[float | None, float]:
    """Forward and ``engine.step`` on one micro-batch: ``(loss, zero_loss)``, the loss None
    when the step was skipped as non-finite. ``zero_loss`` is the loss of predicting zeros -
    each patch's mean, for a normalised target - the floor a model that learnt nothing
    reaches (with a decoder mask it also counts the few encoder-visible tokens)."""
    video = model_input(batch, engine.device, data)
    # the masks stay on the host: the model turns them into token indices there (no device
    # sync) and copies only the indices over
    extra = {"decoder_mask": batch["decoder_mask"]} if "decoder_mask" in batch else {}
    with engine.autocast():
        loss, _, target = engine(video, batch["mask"], **extra)
    zero_loss = target.detach().float().pow(2).mean()
    applied = engine.step(loss)
    loss_value, zero_value = torch.stack((loss.detach().float(), zero_loss)).tolist()
    return (loss_value if applied else None), zero_value


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
    video = model_input({"video": batch["video"][:k]}, engine.device, cfg.data)
    mask = batch["mask"][:k].to(engine.device)
    module.eval()
    with engine.autocast():
        prediction, target = module.reconstruct(video, mask, stats="visible")
    module.train()
    m = cfg.model
    save_reconstruction_grid(video, mask, prediction,
                             out_dir / "figures" / f"reconstruction_{step:08d}.png",
                             m.grid, m.tubelet_size, m.patch_size, cfg.data.mean, cfg.data.std,
                             title=f"step {step}: hidden tubelets mapped to pixels with the "
                                   "visible tubelets' colour statistics (a model that learnt "
                                   "nothing draws flat patches)", target=target)


def save_checkpoint(checkpoints: CheckpointManager, engine: TrainEngine, step: int,
                    position: DataPosition, streams: int) -> None:
    """Checkpoint ``step_<step>`` with the data position and schedule, the run's number of
    data streams, and the encoder export (all ranks)."""
    master = engine.master_state_dict()
    checkpoints.save(engine, step, {"data": asdict(position), "schedule": asdict(engine.schedule)},
                     exports={
                         ENCODER_EXPORT: lambda path: export_encoder(engine.module, master, path)},
                     meta={"streams": streams})


def check_schedule(saved: dict | None, engine: TrainEngine) -> None:
    if saved and saved != asdict(engine.schedule):
        logger.warning("the lr schedule differs from the checkpoint's (%s now, %s then): the "
                       "resumed run will not match an uninterrupted one", asdict(engine.schedule),
                       saved)


# ---------------------------------------------------------------------------------------
# Loop


@tracked
def run(cfg: PretrainConfig) -> dict:
    """Run (or resume) pretraining on this rank; returns ``{"step", "loss", "zero_pred_loss",
    "out_dir"}`` (the losses of the last log window)."""
    cfg = cfg.resolve()
    env = init_distributed()
    out_dir, checkpoints, resume_tag = open_run(cfg, cfg.out_dir, cfg.checkpoint, env.is_main)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_pretrain_model(cfg.model)
    seed_everything(cfg.seed, env.rank)
    # a resumed run keeps its data streams, on any rank count that divides them
    streams = resolve_streams(cfg.data.streams, checkpoints.recorded(resume_tag, "streams"),
                              env.world_size)
    stream = video_stream(cfg.data, cfg.seed, env.rank, env.world_size,
                          cfg.engine.grad_accum_steps, streams=streams)
    engine = create_engine(model, cfg.engine, cfg.optim,
                           cfg.data.batch_size * streams // env.world_size, env.world_size,
                           out_dir, stream.steps_per_epoch)
    client, position, stop_at = resume_from(checkpoints, engine, resume_tag, cfg.max_steps)
    check_schedule(client.get("schedule"), engine)

    run_log, bar, preemption = open_loop(out_dir, env.is_main, cfg.log.tensorboard, engine,
                                         stop_at, "pretrain")
    window, last = Window(), {}
    try:
        while engine.global_step < stop_at:
            position = next_position(position, stream)
            for batch, wait in timed(stream.segment(position)):
                position.batch += 1
                loss, zero_loss = pretrain_step(engine, batch, cfg.data)
                window.add(loss, len(batch["video"]), wait, zero_pred_loss=zero_loss)
                if not engine.last_step_applied:
                    continue
                step = engine.global_step
                bar.update(1)
                if step % cfg.log.every_steps == 0 or step == stop_at:
                    last = log_window(window, engine, env.world_size, run_log, bar, step,
                                      position.epoch, shown=("loss", "zero_pred_loss", "lr",
                                                             "clips_per_s", "data_wait"))
                    window = Window()
                vis = cfg.log.vis_every_steps
                if env.is_main and vis >= 0 and ((vis and step % vis == 0) or step == stop_at):
                    save_reconstruction(engine, cfg, batch, step, out_dir)
                save, preempted = checkpoint_now(step, stop_at, cfg.checkpoint.every_steps,
                                                 position, preemption)
                if save:
                    save_checkpoint(checkpoints, engine, step, position, streams)
                if preempted:
                    raise Preempted(step, str(out_dir))
                if save:
                    break  # the next segment's loader starts at the checkpointed position
            log_samples_by_set(run_log, stream, engine, env.world_size)
    finally:
        close_loop(run_log, bar, preemption)
    shards = [url for s in rank_streams(env.rank, env.world_size, streams)
              for url in shard_urls(rank_data_config(cfg.data, s, streams).shards)]
    _write_rank_summary(out_dir, shards, env.rank, env.world_size, stream, engine)
    if env.is_main and (out_dir / METRICS_FILE).is_file() and last:
        save_loss_curve(out_dir / METRICS_FILE, out_dir / "figures" / "loss_curve.png")
    return {"step": engine.global_step, "loss": last.get("loss", math.nan),
            "zero_pred_loss": last.get("zero_pred_loss", math.nan), "out_dir": str(out_dir)}


def log_samples_by_set(run_log: RunLogger, stream: DataStream, engine: TrainEngine,
                       world_size: int) -> None:
    """After a loader segment (every rank at once): a ``data`` record in metrics.jsonl with
    the samples taken from each shard set of a mixture, summed over ranks, since this
    process started (``samples/<set>``; nothing for a single shard set)."""
    names = sorted(key for key in stream.stats if key.startswith("samples/"))
    if names:
        totals = global_mean([float(stream.stats[n]) for n in names], engine.device)
        run_log.log(engine.global_step, tag="data",
                    **{name: round(total * world_size) for name, total in zip(names, totals)})


def _write_rank_summary(out_dir: Path, shards: list[str], rank: int, world_size: int,
                        stream: DataStream, engine: TrainEngine) -> None:
    """``ranks/rank_<r>.json``: this rank's shards, loader counts and final weight hash."""
    summary = {"rank": rank, "world_size": world_size, "step": engine.global_step,
               "shards": shards, "loader": stream.stats,
               "nonfinite_total": engine.nonfinite_total,
               "weights_sha256": weights_fingerprint(engine.module)}
    atomic_write_text(out_dir / "ranks" / f"rank_{rank:05d}.json", json.dumps(summary, indent=2))
