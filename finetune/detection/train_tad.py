"""Temporal action detection on frozen sliding-window features (ActionFormer-style head).

``python -m finetune.tad --config configs/finetune/tad_demo.yaml [key=value ...]``

1. The frozen encoder embeds every video of the training and validation shard sets with
   :func:`finetune.detection.features.sliding_window_features`; features are cached in
   ``<out_dir>/features/<split>.safetensors`` and reused while the encoder, its weights and
   the window settings are unchanged.
2. The 1-D pyramid head trains on the cached features with plain torch AdamW (no weight
   decay on norms and biases, warm-up + cosine, gradient clipping): the model is small and
   the features fit in memory, as in ActionFormer.
3. Validation detections (soft-NMS, converted to seconds) are scored with segment mAP at
   tIoU 0.3:0.1:0.7 next to a trivial baseline: one segment covering each whole video per
   class, scored with the class's training frequency.

Single process: feature extraction and the head run on one device. Outputs in ``out_dir``:
``config.yaml``, ``metrics.jsonl``, ``features/``, ``head.safetensors``,
``detections_val.csv`` (``video_id,start_s,end_s,label,score``) and ``results.json``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
import webdataset as wds

from data_tools.decode import BACKENDS, open_video
from data_tools.loader import resolve_shards
from data_tools.transforms import IMAGENET_MEAN, IMAGENET_STD
from finetune.detection.annotations import (AnnotationError, parse_segments, read_segments_csv,
                                            write_ava_csv)
from finetune.detection.features import FeatureGrid, sliding_window_features
from finetune.detection.tad_head import (DecodeConfig, TemporalDetectionHead, assign_targets,
                                         decode, detection_loss)
from finetune.detection.tad_metric import segment_mean_average_precision
from models import ModelConfig, build_encoder, load_encoder_weights
from runtime.config import help_text, save_resolved_config, to_dict
from runtime.io import atomic_save_safetensors, atomic_write_text
from runtime.logging import RunLogger, progress
from runtime.optim import WarmupCosine, param_groups
from runtime.seed import seed_everything

logger = logging.getLogger(__name__)


@dataclass
class TADDataConfig:
    train_shards: str = field(
        default="", metadata=help_text("training videos (shard set); json carries `segments`"))
    val_shards: str = field(default="", metadata=help_text("validation videos (shard set)"))
    train_segments: str = field(default="", metadata=help_text(
        "optional CSV video_id,start_s,end_s,label replacing the json `segments` of the training "
        "videos"))
    val_segments: str = field(default="",
                              metadata=help_text("optional segments CSV for the validation videos"))
    classes: list[str] = field(default_factory=list,
                               metadata=help_text("action names (empty = the manifest's classes)"))
    num_frames: int = field(default=16,
                            metadata=help_text("frames per window (the encoder's clip)"))
    frame_step: int = field(default=1,
                            metadata=help_text("source frames between the frames of a window"))
    stride: int = field(
        default=4, metadata=help_text("source frames between window starts (the feature step)"))
    input_size: int = field(
        default=224, metadata=help_text("window frames: short-side centre crop resized to this"))
    backend: str = field(default="auto", metadata=help_text("video decoder: auto, decord or pyav"))
    mean: tuple[float, float, float] = field(default=IMAGENET_MEAN,
                                             metadata=help_text("normalisation mean (0-1 units)"))
    std: tuple[float, float, float] = field(default=IMAGENET_STD,
                                            metadata=help_text("normalisation std (0-1 units)"))
    feature_batch_size: int = field(default=16,
                                    metadata=help_text("windows per encoder forward pass"))

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"data.backend={self.backend!r} is not one of {list(BACKENDS)}")
        for name in ("num_frames", "frame_step", "stride", "input_size", "feature_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class TADHeadConfig:
    dim: int = field(default=256, metadata=help_text("pyramid width"))
    num_levels: int = field(default=6, metadata=help_text("pyramid levels (strides 1, 2, 4, ...)"))
    center_radius: float = field(default=1.5,
                                 metadata=help_text("centre sampling radius in strides"))
    label_smoothing: float = field(default=0.0,
                                   metadata=help_text("label smoothing of the focal loss targets"))


@dataclass
class TADConfig:
    out_dir: str = field(default="runs/tad", metadata=help_text("run folder"))
    weights: str = field(
        default="", metadata=help_text("encoder checkpoint for the features ('' = random init)"))
    model: ModelConfig = field(default_factory=ModelConfig,
                               metadata=help_text("feature encoder (frozen)"))
    data: TADDataConfig = field(default_factory=TADDataConfig,
                                metadata=help_text("untrimmed videos and windows"))
    head: TADHeadConfig = field(default_factory=TADHeadConfig,
                                metadata=help_text("1-D pyramid head"))
    decode: DecodeConfig = field(default_factory=DecodeConfig,
                                 metadata=help_text("decoding and soft-NMS"))
    epochs: int = field(default=35, metadata=help_text("training epochs over the videos"))
    warmup_epochs: float = field(default=5.0, metadata=help_text("linear warm-up epochs"))
    batch_size: int = field(default=2, metadata=help_text("videos per batch"))
    lr: float = field(default=1e-4, metadata=help_text("peak AdamW learning rate"))
    weight_decay: float = field(default=0.05,
                                metadata=help_text("AdamW weight decay (not on norms and biases)"))
    clip_grad: float = field(default=1.0, metadata=help_text("gradient norm clipping (0 = off)"))
    max_seq_len: int = field(default=2304,
                             metadata=help_text(
                                 "training crops longer feature sequences to this many steps"))
    device: str = field(default="auto",
                        metadata=help_text("auto (cuda when available), cpu or cuda"))
    log_every_steps: int = field(default=20, metadata=help_text("log the loss every N steps"))
    seed: int = field(default=0, metadata=help_text("random seed"))

    def validate(self) -> None:
        if (self.model.num_frames != self.data.num_frames
                or self.model.img_size != self.data.input_size):
            raise ValueError(f"model.num_frames/img_size ({self.model.num_frames}, "
                             f"{self.model.img_size}) must equal data.num_frames/input_size "
                             f"({self.data.num_frames}, {self.data.input_size})")
        if not self.data.train_shards or not self.data.val_shards:
            raise ValueError("data.train_shards and data.val_shards are required")
        stride = 2 ** (self.head.num_levels - 1)
        if self.max_seq_len % stride:
            raise ValueError(
                f"max_seq_len={self.max_seq_len} must be a multiple of the largest stride {stride}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs, batch_size and lr must be positive")


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
                "window": [data.num_frames, data.frame_step, data.stride, data.input_size,
                           list(data.mean), list(data.std)]}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def extract_split(encoder: torch.nn.Module, cfg: TADConfig, shards: str,
                  device: torch.device) -> list[dict]:
    """Features of every video of a shard set: dicts with ``video_id``, ``features``, grid
    fields, ``duration`` and the raw json (for the segments)."""
    data = cfg.data
    out = []
    samples = wds.DataPipeline(wds.SimpleShardList(resolve_shards(shards).urls),
                               wds.tarfile_to_samples())
    for sample in progress(samples, desc=f"features {Path(shards).name}"):
        where = f"{sample.get('__url__', '?')}:{sample['__key__']}"
        meta = json.loads(sample["json"])
        reader = open_video(sample["mp4"], data.backend, num_threads=1)
        features, grid = sliding_window_features(
            encoder, reader, reader.fps, data.num_frames, data.frame_step, data.stride,
            data.input_size, data.mean, data.std, data.feature_batch_size, device)
        out.append({"video_id": str(meta.get("video_id", sample["__key__"])), "where": where,
                    "features": features, "fps": grid.fps, "stride": grid.stride, "span": grid.span,
                    "num_steps": grid.num_steps, "duration": reader.num_frames / reader.fps,
                    "meta": meta})
    return out


def cached_features(encoder, cfg: TADConfig, split: str, shards: str,
                    device: torch.device) -> list[dict]:
    """Load ``features/<split>.safetensors`` if it was made with these settings, else extract."""
    from safetensors import safe_open

    path = Path(cfg.out_dir) / "features" / f"{split}.safetensors"
    fingerprint = _fingerprint(cfg, shards)
    if path.is_file():
        with safe_open(str(path), framework="pt") as handle:
            info = json.loads((handle.metadata() or {}).get("videos", "null") or "null")
            if (handle.metadata() or {}).get("fingerprint") == fingerprint and info is not None:
                features = handle.get_tensor("features")
                logger.info("reusing cached features %s", path)
                return [{**v, "features": f}
                        for v, f in zip(info, features.split([v["num_steps"] for v in info]))]
    videos = extract_split(encoder, cfg, shards, device)
    info = [{k: v for k, v in video.items() if k != "features"} for video in videos]
    atomic_save_safetensors({"features": torch.cat([v["features"] for v in videos])}, path,
                            metadata={"fingerprint": fingerprint, "videos": json.dumps(info)})
    return videos


def attach_ground_truth(videos: list[dict], classes: list[str],
                        segments_csv: str) -> list[VideoFeatures]:
    table = read_segments_csv(segments_csv, classes) if segments_csv else None
    out = []
    for video in videos:
        if table is not None:
            segments, labels = table.get(video["video_id"],
                                         (torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)))
        elif "segments" in video["meta"]:
            segments, labels = parse_segments(video["meta"]["segments"], classes, video["where"],
                                              video["duration"])
        else:
            raise AnnotationError(video["where"],
                                  "json has no `segments` and no segments CSV was given")
        grid = FeatureGrid(video["fps"], video["stride"], video["span"], video["num_steps"])
        out.append(VideoFeatures(video["video_id"], video["features"], grid, video["duration"],
                                 segments, labels))
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


def train_head(train: list[VideoFeatures], cfg: TADConfig, num_classes: int, device: torch.device,
               run_log: RunLogger) -> TemporalDetectionHead:
    in_dim = train[0].features.shape[1]
    head = TemporalDetectionHead(in_dim, num_classes, cfg.head.dim, cfg.head.num_levels).to(device)
    optimizer = torch.optim.AdamW(param_groups(head, cfg.weight_decay), lr=cfg.lr)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    schedule = WarmupCosine(cfg.lr, 0.0, round(cfg.warmup_epochs * steps_per_epoch),
                            cfg.epochs * steps_per_epoch)
    rng = random.Random(cfg.seed)
    step = 0
    for _ in progress(range(cfg.epochs), desc="head epochs"):
        order = list(range(len(train)))
        rng.shuffle(order)
        head.train()
        for first in range(0, len(order), cfg.batch_size):
            videos = [train[i] for i in order[first:first + cfg.batch_size]]
            features, mask, targets = make_batch(videos, head, num_classes, cfg.max_seq_len,
                                                 cfg.head.center_radius, rng)
            targets = [[(c.to(device), r.to(device)) for c, r in video] for video in targets]
            losses = detection_loss(head(features.to(device), mask.to(device)), targets,
                                    cfg.head.label_smoothing)
            for group in optimizer.param_groups:
                group["lr"] = schedule.lr_at(step)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            if cfg.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.clip_grad)
            optimizer.step()
            step += 1
            if step % cfg.log_every_steps == 0:
                run_log.log(step, loss=losses["loss"].item(), cls_loss=losses["cls_loss"].item(),
                            reg_loss=losses["reg_loss"].item(), lr=schedule.lr_at(step))
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
def run_tad(cfg: TADConfig) -> dict[str, float]:
    """Extract (or reuse) features, train the head, evaluate; returns ``{"mAP@0.3", ...,
    "average_mAP", "whole_video_baseline_average_mAP"}``."""
    seed_everything(cfg.seed)
    out_dir = Path(cfg.out_dir)
    save_resolved_config(cfg, out_dir)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    classes = list(cfg.data.classes) or (resolve_shards(cfg.data.train_shards).classes or [])
    if not classes:
        raise ValueError("data.classes is empty and the training manifest lists no classes")
    encoder = build_encoder(cfg.model)
    if cfg.weights:
        logger.info("encoder weights from %s: %s", cfg.weights,
                    load_encoder_weights(encoder, cfg.weights))
    encoder.to(device)
    train = attach_ground_truth(
        cached_features(encoder, cfg, "train", cfg.data.train_shards, device), classes,
        cfg.data.train_segments)
    val = attach_ground_truth(cached_features(encoder, cfg, "val", cfg.data.val_shards, device),
                              classes, cfg.data.val_segments)
    del encoder
    with RunLogger(out_dir) as run_log:
        head = train_head(train, cfg, len(classes), device, run_log)
        atomic_save_safetensors(head.state_dict(), out_dir / "head.safetensors")
        predictions = predict(head, val, len(classes), cfg.decode, device)
        ground_truth = {v.video_id: (v.segments, v.labels) for v in val}
        metrics = segment_mean_average_precision(ground_truth, predictions, len(classes)).as_dict()
        baseline = segment_mean_average_precision(ground_truth,
                                                  whole_video_baseline(train, val, len(classes)),
                                                  len(classes))
        metrics["whole_video_baseline_average_mAP"] = baseline.average
        run_log.log(cfg.epochs, tag="val", **metrics)
    write_ava_csv(out_dir / "detections_val.csv", [
        (video_id, *segment, classes[label], round(score, 5))
        for video_id, (segments, labels, scores) in sorted(predictions.items())
        for segment, label, score in zip(segments.tolist(), labels.tolist(), scores.tolist())])
    atomic_write_text(out_dir / "results.json", json.dumps(metrics, indent=1) + "\n")
    logger.info("average mAP %.4f (whole-video baseline %.4f)", metrics["average_mAP"],
                metrics["whole_video_baseline_average_mAP"])
    return metrics

