"""Spatio-temporal action detection: fine-tune an encoder + RoI head on AVA-layout data.

``python -m finetune.detect --config configs/finetune/detect_demo.yaml [key=value ...]``

Training classifies ground-truth actor boxes (jittered) with a sigmoid BCE per action;
the encoder and head train together under DeepSpeed (``runtime.engine``) with layer-wise
lr decay over the encoder's blocks (the head is the last layer). Testing classifies the
proposals above the score threshold (or the ground-truth boxes when no proposals file is
given) and reports frame AP at IoU 0.5 per class and its mean (AVA protocol), next to a
trivial baseline that scores every box with the training class frequencies.

Outputs in ``out_dir``: ``config.yaml``, ``metrics.jsonl`` + TensorBoard,
``checkpoints/``, ``detections_val.csv`` (AVA format: ``video_id,timestamp,x1,y1,x2,y2,
action_id,score``) and ``results.json``.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F

from finetune.detection.annotations import (FrameAnnotation, FrameKey, LabelMap,
                                            read_ava_annotations, read_label_map, read_proposals,
                                            write_ava_csv)
from finetune.detection.ava_metric import frame_average_precision
from finetune.detection.data import AVADataConfig, build_keyframe_loader, select_proposals
from finetune.detection.roi_head import ActionDetector, RoIActionHead
from models import ModelConfig, build_encoder, load_encoder_weights
from runtime.checkpoint import CheckpointConfig
from runtime.config import help_text
from runtime.dist import get_rank, get_world_size, init_distributed, is_initialized, is_main_process
from runtime.engine import EngineConfig, create_engine
from runtime.io import atomic_write_text
from runtime.logging import RunLogger, progress
from runtime.optim import OptimConfig
from runtime.seed import seed_everything
from runtime.training import open_run

logger = logging.getLogger(__name__)

# frame key -> (boxes (K, 4), scores (K, num_classes))
ScoredBoxes = dict[FrameKey, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class RoIHeadConfig:
    roi_size: int = field(default=7, metadata=help_text("RoIAlign output bins per side"))
    dropout: float = field(default=0.5, metadata=help_text("dropout before the classifier"))


@dataclass
class DetectConfig:
    out_dir: str = field(default="runs/detect", metadata=help_text("run folder"))
    weights: str = field(default="", metadata=help_text(
        "encoder checkpoint (this project's, official VideoMAE/V2 or HF); '' = random init"))
    model: ModelConfig = field(
        default_factory=lambda: ModelConfig(drop_path_rate=0.2),
        metadata=help_text("encoder (num_classes is ignored: the RoI head classifies)"))
    head: RoIHeadConfig = field(default_factory=RoIHeadConfig, metadata=help_text("RoI head"))
    data: AVADataConfig = field(default_factory=AVADataConfig,
                                metadata=help_text("AVA-layout data"))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        base_lr=5e-4, min_lr=1e-6, warmup_epochs=2.0, epochs=20, betas=(0.9, 0.999),
        layer_decay=0.75),
        metadata=help_text("AdamW with layer decay and warm-up + cosine, as in fine-tuning"))
    engine: EngineConfig = field(default_factory=EngineConfig,
                                 metadata=help_text("DeepSpeed settings"))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig,
                                         metadata=help_text("checkpointing"))
    eval_every_epochs: int = field(
        default=0, metadata=help_text("evaluate every N epochs (0 = only at the end)"))
    log_every_steps: int = field(default=20,
                                 metadata=help_text("log the loss every N optimizer steps"))
    seed: int = field(default=0, metadata=help_text("random seed"))

    def validate(self) -> None:
        if (self.model.num_frames != self.data.num_frames
                or self.model.img_size != self.data.input_size):
            raise ValueError(f"model.num_frames/img_size ({self.model.num_frames}, "
                             f"{self.model.img_size}) must equal data.num_frames/input_size "
                             f"({self.data.num_frames}, {self.data.input_size})")
        for name in ("train_shards", "val_shards", "train_annotations", "val_annotations",
                     "label_map"):
            if not getattr(self.data, name):
                raise ValueError(f"data.{name} is required")
        if self.eval_every_epochs < 0 or self.log_every_steps < 1:
            raise ValueError("eval_every_epochs must be >= 0 and log_every_steps >= 1")


def build_detector(model_cfg: ModelConfig, head_cfg: RoIHeadConfig, num_classes: int,
                   weights: str = "") -> ActionDetector:
    encoder = build_encoder(replace(model_cfg, num_classes=0))
    if weights:
        report = load_encoder_weights(encoder, weights)
        logger.info("encoder weights from %s: %s", weights, report)
    return ActionDetector(
        encoder, RoIActionHead(encoder.embed_dim, num_classes, head_cfg.roi_size, head_cfg.dropout))


def to_rows(scored: ScoredBoxes) -> dict[FrameKey, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per-box class scores -> the metric's one row per (box, class)."""
    rows = {}
    for key, (boxes, scores) in scored.items():
        num_boxes, num_classes = scores.shape
        rows[key] = (boxes.repeat_interleave(num_classes, 0),
                     torch.arange(num_classes).repeat(num_boxes), scores.flatten())
    return rows


def prior_baseline(train_gt: dict[FrameKey, FrameAnnotation],
                   boxes: dict[FrameKey, torch.Tensor]) -> ScoredBoxes:
    """Every box scored with the training frequency of each class (the trivial baseline)."""
    prior = torch.cat([a.labels for a in train_gt.values()]).float().mean(0)
    return {key: (b, prior.expand(b.shape[0], -1)) for key, b in boxes.items()}


@torch.no_grad()
def predict(model: ActionDetector, loader, device: torch.device, autocast) -> ScoredBoxes:
    """Sigmoid scores of every box this rank's loader yields."""
    model.eval()
    out: ScoredBoxes = {}
    for batch in progress(loader, desc="eval"):
        with autocast():
            logits = model(batch["video"].to(device), [b.to(device) for b in batch["boxes"]])
        scores = logits.float().sigmoid().cpu().split([b.shape[0] for b in batch["boxes"]])
        # The DataLoader turns tuples into lists: rebuild the (video_id, timestamp) keys.
        out.update(
            {tuple(key): (boxes, s) for key, boxes, s in zip(batch["key"], batch["boxes"], scores)})
    return out


def gather_to_main(local: dict) -> dict:
    """Union of every rank's dict on the main process (others get an empty dict)."""
    if not is_initialized() or get_world_size() == 1:
        return local
    parts = [None] * get_world_size() if is_main_process() else None
    torch_dist.gather_object(local, parts, dst=0)
    return {k: v for part in parts for k, v in part.items()} if is_main_process() else {}


def evaluate(scored: ScoredBoxes, val_gt: dict[FrameKey, FrameAnnotation],
             label_map: LabelMap) -> dict[str, float]:
    ground_truth = {key: a.to_rows() for key, a in val_gt.items()}
    result = frame_average_precision(ground_truth, to_rows(scored), label_map.num_classes)
    return result.as_dict(list(label_map.names))


def write_detections(path: Path, scored: ScoredBoxes, label_map: LabelMap) -> None:
    rows = []
    for (video_id, ts), (boxes, scores) in sorted(scored.items()):
        for box, box_scores in zip(boxes.tolist(), scores.tolist()):
            rows += [(video_id, _timestamp(ts), *box, action_id, round(s, 5))
                     for action_id, s in zip(label_map.action_ids, box_scores)]
    write_ava_csv(path, rows)


def _timestamp(ts: float) -> int | float:
    return int(ts) if float(ts).is_integer() else ts


def run_ava(cfg: DetectConfig) -> dict[str, float]:
    """Train and evaluate; returns ``{"frame_mAP@0.5", "prior_baseline_frame_mAP@0.5",
    "AP@0.5/<action>", ...}`` (on every rank)."""
    init_distributed()
    rank, world_size = get_rank(), get_world_size()
    seed_everything(cfg.seed, rank)
    out_dir, checkpoints, tag = open_run(cfg, cfg.out_dir, cfg.checkpoint, is_main_process())
    data = cfg.data
    label_map = read_label_map(data.label_map)
    train_gt = read_ava_annotations(data.train_annotations, label_map, data.unknown_actions)
    val_gt = read_ava_annotations(data.val_annotations, label_map, data.unknown_actions)
    test_boxes = (select_proposals(read_proposals(data.val_proposals), data.proposal_threshold)
                  if data.val_proposals
                  else {key: a.boxes for key, a in val_gt.items()})

    model = build_detector(cfg.model, cfg.head, label_map.num_classes, cfg.weights)
    train_loader, batches_per_epoch = build_keyframe_loader(data, data.train_shards, train_gt, True,
                                                            rank, world_size, cfg.seed)
    val_loader, _ = build_keyframe_loader(data, data.val_shards, val_gt, False, rank, world_size,
                                          cfg.seed, test_boxes)
    steps_per_epoch = max(1, batches_per_epoch // cfg.engine.grad_accum_steps)
    engine = create_engine(model, cfg.engine, cfg.optim, data.batch_size, world_size, out_dir,
                           steps_per_epoch)
    state = checkpoints.load(engine, tag) if tag else {}
    epoch, batches_done = int(state.get("epoch", 0)), int(state.get("batches_done", 0))

    def evaluate_now(step: int) -> dict[str, float]:
        scored = gather_to_main(predict(engine.module, val_loader, engine.device, engine.autocast))
        metrics: dict[str, float] = {}
        if is_main_process():
            metrics = evaluate(scored, val_gt, label_map)
            baseline = evaluate(prior_baseline(train_gt, {k: b for k, (b, _) in scored.items()}),
                                val_gt, label_map)
            metrics["prior_baseline_frame_mAP@0.5"] = baseline["frame_mAP@0.5"]
            write_detections(out_dir / "detections_val.csv", scored, label_map)
            run_log.log(step, tag="val", **metrics)
            logger.info("step %d: frame mAP@0.5 %.4f (prior baseline %.4f)", step,
                        metrics["frame_mAP@0.5"], metrics["prior_baseline_frame_mAP@0.5"])
        return _broadcast(metrics)

    device = engine.device
    with RunLogger(out_dir) as run_log:
        while epoch < cfg.optim.epochs:
            engine.train()
            remaining = batches_per_epoch - batches_done
            for batch in progress(train_loader, total=remaining, desc=f"epoch {epoch}"):
                with engine.autocast():
                    logits = engine(batch["video"].to(device),
                                    [b.to(device) for b in batch["boxes"]])
                loss = F.binary_cross_entropy_with_logits(logits.float(),
                                                          batch["labels"].to(device))
                engine.step(loss)
                batches_done += 1
                step = engine.global_step
                if engine.last_step_applied and step % cfg.log_every_steps == 0:
                    run_log.log(step, loss=loss.item(), lr=engine.lr)
                if (engine.last_step_applied and cfg.checkpoint.every_steps
                        and step % cfg.checkpoint.every_steps == 0):
                    checkpoints.save(engine, step, {"epoch": epoch, "batches_done": batches_done})
                if batches_done >= batches_per_epoch:
                    break
            epoch, batches_done = epoch + 1, 0
            if (cfg.eval_every_epochs and epoch % cfg.eval_every_epochs == 0
                    and epoch < cfg.optim.epochs):
                evaluate_now(engine.global_step)
        checkpoints.save(engine, engine.global_step, {"epoch": epoch, "batches_done": 0})
        metrics = evaluate_now(engine.global_step)
    if is_main_process():
        atomic_write_text(out_dir / "results.json", json.dumps(metrics, indent=1) + "\n")
    return metrics


def _broadcast(metrics: dict[str, float]) -> dict[str, float]:
    if not is_initialized() or get_world_size() == 1:
        return metrics
    box = [metrics]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]
