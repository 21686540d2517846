"""Supervised fine-tuning of a video ViT for recognition, on DeepSpeed.

``run(cfg)`` runs one rank: a pretrained encoder (converted to ``model.attention`` and the
clip size by ``models.loading``) gets a fresh classification head and is trained with
VideoMAE's recipe - AdamW (0.9, 0.999), layer-wise lr decay, warm-up + cosine, drop path,
mixup / cutmix with label smoothing (soft-target cross-entropy), optional weight EMA - by the
same ``runtime.engine`` / ``runtime.checkpoint`` code as pretraining (checkpoints, exact resume,
non-finite losses). Validation runs every ``val.every_epochs`` epochs on one centred view; the
final test scores ``num_test_clips x num_test_crops`` views per video and writes ``eval/``
(metrics.json, predictions.csv, confusion_matrix.png).
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn

from data_tools.clips import model_input
from data_tools.config import DataConfig
from data_tools.loader import build_loader
from data_tools.shard_set import resolve_shards
from data_tools.stream import resolve_streams, video_stream
from finetune.config import FinetuneConfig, MixupConfig, eval_data_config
from finetune.common import build_model
from finetune.evaluate import EvalResult, evaluate
from models import VideoViT
from models.checkpoint import config_metadata
from runtime.dist import broadcast_from_main, init_distributed
from runtime.engine import TrainEngine, create_engine
from runtime.io import atomic_save_safetensors, atomic_write_text
from runtime.seed import seed_everything
from runtime.trackers import tracked
from runtime.preemption import Preempted
from runtime.training import (Window, checkpoint_now, close_loop, log_window, next_position,
                              open_loop, open_run, resume_from, timed, validation_due)

logger = logging.getLogger(__name__)

MODEL_EXPORT = "model.safetensors"
EMA_EXPORT = "model_ema.safetensors"
EVAL_DIR = "eval"


# ---------------------------------------------------------------------------------------
# Data and loss


class VideoMixup:
    """timm's ``Mixup`` on video: frames are folded into channels, so a cutmix box is cut
    in ``H x W`` and spans every frame. Returns soft targets ``(B, K)``."""

    def __init__(self, cfg: MixupConfig, num_classes: int):
        self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix,
                           cutmix_minmax=cfg.cutmix_minmax or None, prob=cfg.prob,
                           switch_prob=cfg.switch_prob, mode=cfg.mode,
                           label_smoothing=cfg.label_smoothing, num_classes=num_classes)

    def __call__(self, video: torch.Tensor,
                 label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """video ``(B, C, T, H, W)``, label ``(B,)`` -> mixed video, soft targets ``(B, K)``."""
        folded = video.contiguous().flatten(1, 2)  # (B, C*T, H, W), a view: mixed in place
        mixed, target = self.mixup(folded, label)
        return mixed.view_as(video), target


def build_criterion(
        cfg: MixupConfig, num_classes: int,
) -> tuple[VideoMixup | None, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """Mixup (or None) and the loss: soft-target cross-entropy after mixup, else
    cross-entropy with label smoothing."""
    if cfg.active:
        return VideoMixup(cfg, num_classes), SoftTargetCrossEntropy()
    return None, nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)


def num_classes_of(cfg: FinetuneConfig) -> tuple[int, list[str] | None]:
    """``model.num_classes`` or the class count of the training manifest."""
    classes = resolve_shards(cfg.data.shards).classes
    if cfg.model.num_classes:
        if classes and len(classes) != cfg.model.num_classes:
            raise ValueError(f"model.num_classes={cfg.model.num_classes} but the manifest of "
                             f"{cfg.data.shards} lists {len(classes)} classes")
        return cfg.model.num_classes, classes
    if not classes:
        raise ValueError(f"{cfg.data.shards} has no manifest with classes: set model.num_classes")
    return len(classes), list(classes)


# ---------------------------------------------------------------------------------------
# Evaluation


def evaluate_split(model: nn.Module, data: DataConfig, shards: str, mode: str, cfg: FinetuneConfig,
                   engine: TrainEngine, num_classes: int, class_names, rank: int, world_size: int,
                   out_dir: Path | None = None) -> EvalResult:
    """Video-level metrics of ``model`` over ``shards`` (``eval`` or ``test_views`` mode)."""
    eval_cfg = eval_data_config(data, shards, world_size, cfg.val.batch_size, cfg.val.num_workers)
    loader = build_loader(eval_cfg, mode, rank, world_size)
    return evaluate(model, loader, num_classes, data=eval_cfg, device=engine.device,
                    autocast=engine.autocast, out_dir=out_dir, class_names=class_names)


def export_model(module: VideoViT, path: Path) -> None:
    """The classifier as fp32 safetensors with its ModelConfig as metadata (bf16 runs: the
    bf16 weights the evaluation used, widened)."""
    state = {k: v.detach().float() for k, v in module.state_dict().items()}
    atomic_save_safetensors(state, path, metadata=config_metadata(module.cfg))


# ---------------------------------------------------------------------------------------
# Loop


@tracked
def run(cfg: FinetuneConfig) -> dict:
    """Fine-tune (or resume) on this rank; returns the final test metrics (same on all ranks):
    ``top1``, ``top5``, ``mean_class_acc`` (fractions), ``num_videos``, ``step``,
    ``out_dir`` and, with EMA, the same metrics of the EMA weights prefixed ``ema_``."""
    cfg = cfg.resolve()
    env = init_distributed()
    out_dir, checkpoints, resume_tag = open_run(cfg, cfg.out_dir, cfg.checkpoint, env.is_main)

    num_classes, class_names = num_classes_of(cfg)
    model_cfg = replace(cfg.model, num_classes=num_classes)
    model = build_model(model_cfg, cfg.pretrained, cfg.pretrained_strict, cfg.seed,
                        cfg.head_init_scale)
    seed_everything(cfg.seed, env.rank)
    streams = resolve_streams(cfg.data.streams, checkpoints.recorded(resume_tag, "streams"),
                              env.world_size)
    stream = video_stream(cfg.data, cfg.seed, env.rank, env.world_size,
                          cfg.engine.grad_accum_steps, mode="train", streams=streams)
    # fp32 copy of the weights before DeepSpeed casts or hooks the module
    ema = ModelEmaV3(model, decay=cfg.ema.decay, use_warmup=cfg.ema.warmup,
                     dtype=torch.float32) if cfg.ema.enabled else None
    engine = create_engine(model, cfg.engine, cfg.optim,
                           cfg.data.batch_size * streams // env.world_size, env.world_size,
                           out_dir, stream.steps_per_epoch)
    if ema is not None:
        ema.to(engine.device)
    client, position, stop_at = resume_from(checkpoints, engine, resume_tag, cfg.max_steps)
    if ema is not None and "ema" in client:
        ema.module.load_state_dict(client["ema"])
    mixup, criterion = build_criterion(cfg.mixup, num_classes)

    def client_state() -> dict:
        state = {"data": asdict(position), "schedule": asdict(engine.schedule)}
        if ema is not None:
            state["ema"] = {k: v.detach().cpu() for k, v in ema.module.state_dict().items()}
        return state

    def validate(epoch: int) -> None:
        result = evaluate_split(engine.module, cfg.data, cfg.val.shards, "eval", cfg, engine,
                                num_classes, class_names, env.rank, env.world_size)
        scalars = {k: v for k, v in result.metrics.items()
                   if k in ("top1", "top5", "mean_class_acc")}
        if ema is not None:
            ema_result = evaluate_split(ema.module, cfg.data, cfg.val.shards, "eval", cfg, engine,
                                        num_classes, class_names, env.rank, env.world_size)
            scalars["ema_top1"] = ema_result.metrics["top1"]
        run_log.log(engine.global_step, tag="val", epoch=epoch, **scalars)
        logger.info("epoch %d step %d: val %s", epoch, engine.global_step,
                    {k: round(v, 4) for k, v in scalars.items()})

    run_log, bar, preemption = open_loop(out_dir, env.is_main, cfg.log.tensorboard, engine,
                                         stop_at, "finetune")
    window = Window()
    try:
        while engine.global_step < stop_at:
            position = next_position(position, stream)
            for batch, wait in timed(stream.segment(position)):
                position.batch += 1
                video = model_input(batch, engine.device, cfg.data)
                target = batch["label"].to(engine.device, non_blocking=True)
                if mixup is not None:
                    video, target = mixup(video, target)  # soft targets (B, K)
                with engine.autocast():
                    logits = engine(video)
                loss = criterion(logits.float(), target)
                applied = engine.step(loss)
                window.add(loss.item() if applied else None, video.shape[0], wait)
                if not engine.last_step_applied:
                    continue
                step = engine.global_step
                if ema is not None:
                    ema.update(engine.module, step=step)
                bar.update(1)
                if step % cfg.log.every_steps == 0 or step == stop_at:
                    log_window(window, engine, env.world_size, run_log, bar, step,
                               position.epoch)
                    window = Window()
                if validation_due(position, stream, cfg.val.every_epochs, step, stop_at):
                    validate(position.epoch)
                save, preempted = checkpoint_now(step, stop_at, cfg.checkpoint.every_steps,
                                                 position, preemption)
                if save:
                    checkpoints.save(engine, step, client_state(), meta={"streams": streams})
                if preempted:
                    raise Preempted(step, str(out_dir))
                if save:
                    break  # the next segment's loader starts at the checkpointed position
        bar.close()  # before the test's own progress bar
        metrics = final_test(cfg, engine, ema, num_classes, class_names, env.rank,
                             env.world_size, out_dir)
        metrics.update(step=engine.global_step, out_dir=str(out_dir))
        run_log.log(engine.global_step, tag="test", **{k: v for k, v in metrics.items()
                                                       if isinstance(v, float)})
    finally:
        close_loop(run_log, bar, preemption)
    return metrics


def final_test(cfg: FinetuneConfig, engine: TrainEngine, ema: ModelEmaV3 | None, num_classes: int,
               class_names, rank: int, world_size: int, out_dir: Path) -> dict:
    """Multi-view test of the final (and EMA) weights; rank 0 writes ``eval/`` and exports."""
    mode = "test_views" if cfg.val.test_views else "eval"
    result = evaluate_split(engine.module, cfg.data, cfg.val.shards, mode, cfg, engine,
                            num_classes, class_names, rank, world_size, out_dir / EVAL_DIR)
    metrics = dict(result.metrics)
    if ema is not None:
        ema_result = evaluate_split(ema.module, cfg.data, cfg.val.shards, mode, cfg, engine,
                                    num_classes, class_names, rank, world_size,
                                    out_dir / EVAL_DIR / "ema")
        metrics.update({f"ema_{k}": v for k, v in ema_result.metrics.items()})
    if rank == 0:
        export_model(engine.module, out_dir / MODEL_EXPORT)
        if ema is not None:
            export_model(ema.module, out_dir / EMA_EXPORT)
        atomic_write_text(out_dir / EVAL_DIR / "metrics.json",
                          json.dumps({"mode": mode, "views_per_video": _views(cfg, mode),
                                      **metrics}, indent=2) + "\n")
    logger.info("test (%s): %s", mode, {k: round(v, 4) for k, v in metrics.items()})
    return broadcast_from_main(metrics)


def _views(cfg: FinetuneConfig, mode: str) -> int:
    return cfg.data.num_test_clips * cfg.data.num_test_crops if mode == "test_views" else 1
