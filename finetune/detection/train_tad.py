"""Temporal action detection on frozen sliding-window features (ActionFormer-style head).

``python -m finetune.tad --config configs/finetune/tad_demo.yaml [key=value ...]``

1. The frozen encoder embeds every video of the training and validation shard sets with
   ``finetune.extract.extract_windows`` (windows of ``finetune.detection.features``);
   features are cached in ``<out_dir>/features/<split>.safetensors`` (the feature-file
   format of ``finetune.extract``) and reused while the encoder, its weights and the window
   settings are unchanged.
2. The 1-D pyramid head trains on the cached features with plain torch AdamW from the
   ``optim`` section (no weight decay on norms and biases, warm-up + cosine, gradient
   clipping): the model is small and the features fit in memory, as in ActionFormer.
3. Validation detections (soft-NMS, converted to seconds) are scored with segment mAP at
   tIoU 0.3:0.1:0.7 next to a trivial baseline: one segment covering each whole video per
   class, scored with the class's training frequency.

Single process: feature extraction and the head run on one device. Outputs in ``out_dir``:
``config.yaml``, ``metrics.jsonl``, ``features/``, ``head.safetensors``,
``detections_val.csv`` (``video_id,start_s,end_s,label,score``) and ``results.json``.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import random
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from data_tools.shard_set import resolve_shards
from finetune.common import build_model
from finetune.detection.annotations import (AnnotationError, parse_segments, read_segments_csv,
                                            write_ava_csv)
from finetune.detection.config import TADConfig
from finetune.detection.features import FeatureGrid
from finetune.detection.tad_head import (DecodeConfig, TemporalDetectionHead, assign_targets,
                                         decode, detection_loss)
from finetune.detection.tad_metric import segment_mean_average_precision
from finetune.extract import FeatureSet, cached_feature_set, extract_windows
from runtime.config import save_resolved_config, to_dict
from runtime.errors import InputError
from runtime.io import (atomic_save_safetensors, atomic_torch_save, atomic_write_text,
                        load_state_dict)
from runtime.logging import RunLogger, progress
from runtime.optim import build_adamw, lr_schedule, set_lr
from runtime.preemption import Preempted, PreemptionSignal
from runtime.seed import seed_everything
from runtime.trackers import tracked

logger = logging.getLogger(__name__)


@dataclass
class VideoFeatures:
    """One video: ``features (T, D)``, its grid, duration and ground truth in seconds."""

    video_id: str
    features: torch.Tensor
    grid: FeatureGrid
    duration: float
    segments: torch.Tensor  # (M, 2) seconds
    labels: torch.Tensor  # (M,)


# ------------------------------------------------------------------------------ features
def _fingerprint(cfg: TADConfig, shards: str) -> str:
    data = cfg.data
    relevant = {"model": to_dict(cfg.model), "weights": cfg.weights, "shards": shards,
                "window": [data.num_frames, data.sampling_rate, data.window_stride,
                           data.input_size, list(data.mean), list(data.std)]}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def cached_features(encoder: torch.nn.Module | None, cfg: TADConfig, split: str, shards: str,
                    device: torch.device | str) -> FeatureSet:
    """Window features of every video of ``shards`` from ``<out_dir>/features/<split>.safetensors``
    (``finetune.extract``'s format), extracted first when missing or made with other settings."""
    data = cfg.data

    def extract() -> FeatureSet:
        return extract_windows(encoder, shards, num_frames=data.num_frames,
                               sampling_rate=data.sampling_rate, window_stride=data.window_stride,
                               input_size=data.input_size, mean=data.mean, std=data.std,
                               batch_size=data.feature_batch_size, backend=data.backend,
                               device=torch.device(device))

    path = Path(cfg.out_dir) / "features" / f"{split}.safetensors"
    return cached_feature_set(path, _fingerprint(cfg, shards), extract)


def video_features(rows: FeatureSet, classes: list[str], segments_csv: str) -> list[VideoFeatures]:
    """One ``VideoFeatures`` per video of ``rows`` (in file order), with its ground truth from
    ``segments_csv`` or else from the json's ``segments``."""
    table = read_segments_csv(segments_csv, classes) if segments_csv else None
    out, start = [], 0
    for key, group in itertools.groupby(rows.keys):  # a video's windows are consecutive rows
        count = sum(1 for _ in group)
        features, start = rows.features[start:start + count], start + count
        video = rows.videos[key]
        video_id = str(video["json"].get("video_id", key))
        if table is not None:
            segments, labels = table.get(video_id,
                                         (torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)))
        elif "segments" in video["json"]:
            segments, labels = parse_segments(video["json"]["segments"], classes, video["where"],
                                              video["duration"])
        else:
            raise AnnotationError(video["where"],
                                  "json has no `segments` and no segments CSV was given")
        grid = FeatureGrid(video["fps"], video["window_stride"], video["span"], len(features))
        out.append(VideoFeatures(video_id, features, grid, video["duration"], segments, labels))
    return out


# ------------------------------------------------------------------------------ training
def make_batch(videos: list[VideoFeatures], head: TemporalDetectionHead, num_classes: int,
               max_seq_len: int, center_radius: float, rng: random.Random | None):
    """Pad (or, with ``rng``, randomly crop to ``max_seq_len``) and build targets.

    Returns ``features (B, D, T)``, ``mask (B, T)``, per-video per-level targets and the
    step offset of each crop.
    """
    multiple = head.max_stride
    crops = []
    for video in videos:
        length = video.features.shape[0]
        cropped = rng is not None and length > max_seq_len
        start = rng.randint(0, length - max_seq_len) if cropped else 0
        crops.append((start, min(length, start + max_seq_len) if rng is not None else length))
    padded = max(math.ceil((end - start) / multiple) * multiple for start, end in crops)
    features = torch.zeros(len(videos), videos[0].features.shape[1], padded)
    mask = torch.zeros(len(videos), padded, dtype=torch.bool)
    targets = []
    lengths = [padded // 2**level for level in range(head.num_levels)]
    for i, (video, (start, end)) in enumerate(zip(videos, crops)):
        features[i, :, : end - start] = video.features[start:end].T
        mask[i, : end - start] = True
        steps = video.grid.to_steps(video.segments) - start
        targets.append(assign_targets(steps, video.labels, num_classes, lengths, center_radius))
    return features, mask, targets


HEAD_CHECKPOINT = "head_checkpoint.pt"  # written on a stop signal, removed when training ends


def train_head(train: list[VideoFeatures], cfg: TADConfig, num_classes: int, device: torch.device,
               run_log: RunLogger) -> TemporalDetectionHead:
    """AdamW + warm-up/cosine on the cached features. On SIGUSR1 / SIGTERM it finishes the
    step, writes ``<out_dir>/head_checkpoint.pt`` (head, optimizer, step, the epoch's order and
    the random states) and raises ``Preempted``; the next run continues from there exactly."""
    in_dim = train[0].features.shape[1]
    head = TemporalDetectionHead(in_dim, num_classes, cfg.head.dim, cfg.head.num_levels).to(device)
    batch_size = cfg.data.batch_size
    steps_per_epoch = math.ceil(len(train) / batch_size)
    schedule = lr_schedule(cfg.optim, batch_size, steps_per_epoch)
    optimizer = build_adamw(head, cfg.optim, schedule.lr_at(0))
    rng = random.Random(cfg.seed)
    checkpoint = Path(cfg.out_dir) / HEAD_CHECKPOINT
    step, epoch, first, order = 0, 0, 0, None
    if checkpoint.is_file():  # stopped by a signal last time
        state = load_state_dict(checkpoint)
        if state["config"] != to_dict(cfg):
            raise InputError(f"{checkpoint} was written by a run with other settings: delete it "
                             "to train the head from the start, or restore those settings")
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        step, epoch, first, order = state["step"], state["epoch"], state["first"], state["order"]
        rng.setstate((state["rng"][0], tuple(state["rng"][1]), state["rng"][2]))
        torch.set_rng_state(state["torch_rng"])
        logger.info("continuing the head from %s at step %d", checkpoint, step)
    with PreemptionSignal() as preemption:
        for epoch in progress(range(epoch, cfg.optim.epochs), desc="head epochs"):
            if order is None:
                order = list(range(len(train)))
                rng.shuffle(order)
            head.train()
            for first in range(first, len(order), batch_size):
                videos = [train[i] for i in order[first:first + batch_size]]
                features, mask, targets = make_batch(videos, head, num_classes,
                                                     cfg.data.max_seq_len, cfg.head.center_radius,
                                                     rng)
                targets = [[(c.to(device), r.to(device)) for c, r in video] for video in targets]
                losses = detection_loss(head(features.to(device), mask.to(device)), targets,
                                        cfg.head.label_smoothing)
                set_lr(optimizer, schedule.lr_at(step))
                optimizer.zero_grad(set_to_none=True)
                losses["loss"].backward()
                if cfg.optim.clip_grad > 0:
                    torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.optim.clip_grad)
                optimizer.step()
                step += 1
                if step % cfg.log.every_steps == 0:
                    run_log.log(step, loss=losses["loss"].item(),
                                cls_loss=losses["cls_loss"].item(),
                                reg_loss=losses["reg_loss"].item(), lr=schedule.lr_at(step))
                if preemption.requested():
                    version, internal, gauss = rng.getstate()
                    atomic_torch_save({"head": head.state_dict(),
                                       "optimizer": optimizer.state_dict(), "step": step,
                                       "epoch": epoch, "first": first + batch_size,
                                       "order": order, "rng": [version, list(internal), gauss],
                                       "torch_rng": torch.get_rng_state(),
                                       "config": to_dict(cfg)}, checkpoint)
                    raise Preempted(step, cfg.out_dir, "run the same command again")
            order, first = None, 0
    checkpoint.unlink(missing_ok=True)
    return head


@torch.no_grad()
def predict(head: TemporalDetectionHead, videos: list[VideoFeatures], num_classes: int,
            decode_cfg: DecodeConfig, device: torch.device
            ) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Detections per video: ``segments (K, 2)`` seconds (clipped to the video), labels, scores."""
    head.eval()
    out = {}
    for video in videos:
        features, mask, _ = make_batch([video], head, num_classes,
                                       video.features.shape[0], 0.0, None)
        outputs = head(features.to(device), mask.to(device))
        steps, scores, labels = decode([_to_cpu(o) for o in outputs], 0, decode_cfg)
        seconds = video.grid.to_seconds(steps).clamp(0, video.duration)
        keep = seconds[:, 1] > seconds[:, 0]
        out[video.video_id] = (seconds[keep], labels[keep], scores[keep])
    return out


def _to_cpu(level):
    return type(level)(level.logits.cpu(), level.offsets.cpu(), level.mask.cpu(), level.stride)


def whole_video_baseline(train: list[VideoFeatures], val: list[VideoFeatures], num_classes: int):
    """One segment per class covering each whole video, scored with the class frequency."""
    counts = torch.bincount(torch.cat([v.labels for v in train]), minlength=num_classes).float()
    prior = counts / counts.sum().clamp(min=1)
    return {v.video_id: (torch.tensor([[0.0, v.duration]]).repeat(num_classes, 1),
                         torch.arange(num_classes), prior)
            for v in val}


# ------------------------------------------------------------------------------ entry
@tracked
def run(cfg: TADConfig) -> dict[str, float]:
    """Extract (or reuse) features, train the head, evaluate; returns ``{"mAP@0.3", ...,
    "average_mAP", "whole_video_baseline_average_mAP"}``."""
    cfg = cfg.resolve()
    seed_everything(cfg.seed)
    out_dir = Path(cfg.out_dir)
    save_resolved_config(cfg, out_dir)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    classes = list(cfg.data.classes) or (resolve_shards(cfg.data.shards).classes or [])
    if not classes:
        raise ValueError("data.classes is empty and the training manifest lists no classes")
    encoder = build_model(replace(cfg.model, num_classes=0), cfg.weights, seed=cfg.seed)
    encoder.to(device)
    train = video_features(cached_features(encoder, cfg, "train", cfg.data.shards, device),
                           classes, cfg.data.segments)
    val = video_features(cached_features(encoder, cfg, "val", cfg.val.shards, device), classes,
                         cfg.val.segments)
    del encoder
    with RunLogger(out_dir, tensorboard=cfg.log.tensorboard) as run_log:
        head = train_head(train, cfg, len(classes), device, run_log)
        atomic_save_safetensors(head.state_dict(), out_dir / "head.safetensors")
        predictions = predict(head, val, len(classes), cfg.decode, device)
        ground_truth = {v.video_id: (v.segments, v.labels) for v in val}
        metrics = segment_mean_average_precision(ground_truth, predictions, len(classes)).as_dict()
        baseline = segment_mean_average_precision(ground_truth,
                                                  whole_video_baseline(train, val, len(classes)),
                                                  len(classes))
        metrics["whole_video_baseline_average_mAP"] = baseline.average
        run_log.log(cfg.optim.epochs, tag="val", **metrics)
    write_ava_csv(out_dir / "detections_val.csv", [
        (video_id, *segment, classes[label], round(score, 5))
        for video_id, (segments, labels, scores) in sorted(predictions.items())
        for segment, label, score in zip(segments.tolist(), labels.tolist(), scores.tolist())])
    atomic_write_text(out_dir / "results.json", json.dumps(metrics, indent=1) + "\n")
    logger.info("average mAP %.4f (whole-video baseline %.4f)", metrics["average_mAP"],
                metrics["whole_video_baseline_average_mAP"])
    return metrics
