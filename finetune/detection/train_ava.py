"""Spatio-temporal action detection: fine-tune an encoder + RoI head on AVA-layout data.

``python -m finetune.detect --config configs/finetune/detect_demo.yaml [key=value ...]``

Training classifies ground-truth actor boxes (jittered) with a sigmoid BCE per action;
the encoder and head train together under DeepSpeed (``runtime.engine``) with layer-wise
lr decay over the encoder's blocks (the head is the last layer), in the loop shape of every
stage: a resumable ``DataStream`` of keyframes, checkpoints with the data position, exact
resume (``checkpoint.resume=auto``). Testing classifies the
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
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from data_tools.clips import Normalization, model_input
from finetune.common import build_model
from finetune.detection.annotations import (FrameAnnotation, FrameKey, LabelMap,
                                            read_ava_annotations, read_label_map, read_proposals,
                                            write_ava_csv)
from finetune.detection.ava_metric import frame_average_precision
from finetune.detection.config import DetectConfig
from finetune.detection.data import build_keyframe_loader, keyframe_stream, select_proposals
from finetune.detection.roi_head import ActionDetector, RoIActionHead
from runtime.dist import broadcast_from_main, gather_objects, init_distributed
from runtime.engine import create_engine
from runtime.io import atomic_write_text
from runtime.logging import progress
from runtime.seed import seed_everything
from runtime.trackers import tracked
from runtime.preemption import Preempted
from runtime.training import (Window, checkpoint_now, close_loop, log_window, next_position,
                              open_loop, open_run, resume_from, timed, validation_due)

logger = logging.getLogger(__name__)

# frame key -> (boxes (K, 4), scores (K, num_classes))
ScoredBoxes = dict[FrameKey, tuple[torch.Tensor, torch.Tensor]]


def build_detector(cfg: DetectConfig, num_classes: int) -> ActionDetector:
    """Encoder (``cfg.weights`` loaded as for fine-tuning, initialised with ``cfg.seed``) with a
    fresh RoI head."""
    encoder = build_model(replace(cfg.model, num_classes=0), cfg.weights, seed=cfg.seed)
    return ActionDetector(encoder, RoIActionHead(encoder.embed_dim, num_classes,
                                                 cfg.head.roi_size, cfg.head.dropout))


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
def predict(model: ActionDetector, loader, device: torch.device, autocast,
            data: Normalization) -> ScoredBoxes:
    """Sigmoid scores of every box this rank's loader yields (clips normalised on ``device``
    with ``data.mean`` / ``data.std``)."""
    model.eval()
    out: ScoredBoxes = {}
    for batch in progress(loader, desc="eval"):
        with autocast():
            logits = model(model_input(batch, device, data),
                           [b.to(device) for b in batch["boxes"]])
        scores = logits.float().sigmoid().cpu().split([b.shape[0] for b in batch["boxes"]])
        # The DataLoader turns tuples into lists: rebuild the (video_id, timestamp) keys.
        out.update(
            {tuple(key): (boxes, s) for key, boxes, s in zip(batch["key"], batch["boxes"], scores)})
    return out


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



def gather_scores(local: ScoredBoxes) -> ScoredBoxes:
    """Every rank's scored boxes on the main process (an empty dict on the others)."""
    parts = gather_objects(local)
    return {k: v for part in parts for k, v in part.items()} if parts is not None else {}


# ---------------------------------------------------------------------------------------
# Loop


@tracked
def run(cfg: DetectConfig) -> dict[str, float]:
    """Train (or resume) and evaluate on this rank; returns ``{"frame_mAP@0.5",
    "prior_baseline_frame_mAP@0.5", "AP@0.5/<action>", ...}`` (the same on every rank)."""
    cfg = cfg.resolve()
    env = init_distributed()
    out_dir, checkpoints, resume_tag = open_run(cfg, cfg.out_dir, cfg.checkpoint, env.is_main)
    data, val = cfg.data, cfg.val
    label_map = read_label_map(data.label_map)
    train_gt = read_ava_annotations(data.annotations, label_map, data.unknown_actions)
    val_gt = read_ava_annotations(val.annotations, label_map, data.unknown_actions)
    test_boxes = (select_proposals(read_proposals(val.proposals), val.proposal_threshold)
                  if val.proposals else {key: a.boxes for key, a in val_gt.items()})

    model = build_detector(cfg, label_map.num_classes)
    seed_everything(cfg.seed, env.rank)
    stream = keyframe_stream(data, train_gt, cfg.seed, env.rank, env.world_size,
                             cfg.engine.grad_accum_steps)
    val_loader, _ = build_keyframe_loader(data, val.shards, val_gt, False, env.rank,
                                          env.world_size, cfg.seed, test_boxes)
    engine = create_engine(model, cfg.engine, cfg.optim, data.batch_size, env.world_size,
                           out_dir, stream.steps_per_epoch)
    _, position, stop_at = resume_from(checkpoints, engine, resume_tag, cfg.max_steps)

    def validate() -> dict[str, float]:
        scored = gather_scores(predict(engine.module, val_loader, engine.device, engine.autocast,
                                             data))
        metrics: dict[str, float] = {}
        if env.is_main:
            metrics = evaluate(scored, val_gt, label_map)
            baseline = evaluate(prior_baseline(train_gt, {k: b for k, (b, _) in scored.items()}),
                                val_gt, label_map)
            metrics["prior_baseline_frame_mAP@0.5"] = baseline["frame_mAP@0.5"]
            write_detections(out_dir / "detections_val.csv", scored, label_map)
            run_log.log(engine.global_step, tag="val", epoch=position.epoch, **metrics)
            logger.info("step %d: frame mAP@0.5 %.4f (prior baseline %.4f)", engine.global_step,
                        metrics["frame_mAP@0.5"], metrics["prior_baseline_frame_mAP@0.5"])
        engine.train()
        return broadcast_from_main(metrics)

    run_log, bar, preemption = open_loop(out_dir, env.is_main, cfg.log.tensorboard, engine,
                                         stop_at, "detect")
    window = Window()
    try:
        while engine.global_step < stop_at:
            position = next_position(position, stream)
            for batch, wait in timed(stream.segment(position)):
                position.batch += 1
                # forward: clip features pooled in every actor box, one logit per action
                with engine.autocast():
                    logits = engine(model_input(batch, engine.device, data),
                                    [b.to(engine.device) for b in batch["boxes"]])
                loss = F.binary_cross_entropy_with_logits(logits.float(),
                                                          batch["labels"].to(engine.device))
                applied = engine.step(loss)
                window.add(loss.item() if applied else None, len(batch["video"]), wait)
                if not engine.last_step_applied:
                    continue
                step = engine.global_step
                bar.update(1)
                if step % cfg.log.every_steps == 0 or step == stop_at:
                    log_window(window, engine, env.world_size, run_log, bar, step,
                               position.epoch)
                    window = Window()
                if validation_due(position, stream, val.every_epochs, step, stop_at):
                    validate()
                save, preempted = checkpoint_now(step, stop_at, cfg.checkpoint.every_steps,
                                                 position, preemption)
                if save:
                    checkpoints.save(engine, step, {"data": asdict(position),
                                                    "schedule": asdict(engine.schedule)})
                if preempted:
                    raise Preempted(step, str(out_dir))
                if save:
                    break  # the next segment's loader starts at the checkpointed position
        bar.close()  # before the evaluation's own progress bar
        metrics = validate()
    finally:
        close_loop(run_log, bar, preemption)
    if env.is_main:
        atomic_write_text(out_dir / "results.json", json.dumps(metrics, indent=1) + "\n")
    return metrics
