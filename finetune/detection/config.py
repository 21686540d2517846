"""Typed configs of the two detection stages, with the sections of fine-tuning.

- ``DetectConfig`` (AVA-style spatio-temporal detection, ``python -m finetune.detect``):
  ``model``, ``head``, ``data`` (training keyframes), ``val`` (validation keyframes and
  proposals), ``optim``, ``engine``, ``checkpoint``, ``log``.
- ``TADConfig`` (temporal detection on frozen features, ``python -m finetune.tad``):
  ``model``, ``data`` (training videos and windows), ``val``, ``head``, ``decode``, ``optim``,
  ``log``.

The model section owns the clip geometry: ``data.num_frames`` and ``data.input_size`` are
derived from ``model.num_frames`` and ``model.img_size`` by ``resolve()`` (an old YAML may
still state them if they agree).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from data_tools.decode import Backend
from finetune.config import LogConfig
from finetune.detection.tad_head import DecodeConfig
from models import ModelConfig
from runtime.checkpoint import CheckpointConfig
from runtime.config import derived, help_text
from runtime.constants import IMAGENET_MEAN, IMAGENET_STD
from runtime.engine import EngineConfig
from runtime.optim import OptimConfig


def _clip_of(data, model: ModelConfig):
    """``data`` with ``num_frames`` / ``input_size`` taken from the model section."""
    return derived(data, "data", num_frames=("model.num_frames", model.num_frames),
                   input_size=("model.img_size", model.img_size))


def _required(section, where: str, *names: str) -> None:
    for name in names:
        if not getattr(section, name):
            raise ValueError(f"{where}.{name} is required")


# ---------------------------------------------------------------------------------------
# AVA-style detection


@dataclass
class RoIHeadConfig:
    roi_size: int = field(default=7, metadata=help_text("RoIAlign output bins per side"))
    dropout: float = field(default=0.5, metadata=help_text("dropout before the classifier"))


@dataclass
class AVADataConfig:
    shards: str = field(
        default="", metadata=help_text("training shard set (manifest.json, folder or pattern)"))
    annotations: str = field(default="", metadata=help_text(
        "ground-truth CSV video_id,timestamp,x1,y1,x2,y2,action_id,person_id (training)"))
    label_map: str = field(default="",
                           metadata=help_text("AVA label map .pbtxt: the evaluated actions"))
    unknown_actions: Literal["error", "skip"] = field(default="error", metadata=help_text(
        "action ids missing from the label map: 'error' or 'skip' (AVA's 80-class files with the "
        "60-class map)"))
    num_frames: int | None = field(default=None, metadata=help_text(
        "frames per clip: derived from model.num_frames (leave unset)"))
    sampling_rate: int = field(default=4, metadata=help_text("frame stride within a clip"))
    input_size: int | None = field(default=None, metadata=help_text(
        "frames are resized to this height and width: derived from model.img_size (leave unset)"))
    backend: Backend = field(default="auto",
                             metadata=help_text("video decoder: auto, decord or pyav"))
    mean: tuple[float, float, float] = field(default=IMAGENET_MEAN,
                                             metadata=help_text("normalisation mean (0-1 units)"))
    std: tuple[float, float, float] = field(default=IMAGENET_STD,
                                            metadata=help_text("normalisation std (0-1 units)"))
    batch_size: int = field(default=8, metadata=help_text("keyframes per batch per rank"))
    num_workers: int = field(default=2, metadata=help_text("DataLoader workers"))
    shuffle_buffer: int = field(default=64,
                                metadata=help_text("shard samples held for shuffling in training"))
    flip: bool = field(default=False, metadata=help_text(
        "random horizontal flip in training (off for direction labels)"))
    box_jitter: float = field(default=0.05, metadata=help_text(
        "training boxes: each side moves by up to this fraction of the box size"))

    def validate(self) -> None:
        for name in ("num_frames", "sampling_rate", "input_size", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"data.{name} must be >= 1, got {value}")
        if self.num_workers < 0 or self.box_jitter < 0:
            raise ValueError("data.num_workers and data.box_jitter must be >= 0")


@dataclass
class AVAValConfig:
    shards: str = field(default="", metadata=help_text("validation shard set"))
    annotations: str = field(default="",
                             metadata=help_text("ground-truth CSV of the validation keyframes"))
    proposals: str = field(default="", metadata=help_text(
        "person proposals CSV video_id,timestamp,x1,y1,x2,y2,score to classify ('' = the "
        "ground-truth boxes)"))
    proposal_threshold: float = field(default=0.8,
                                      metadata=help_text("keep proposals with score >= this"))
    every_epochs: int = field(default=0, metadata=help_text(
        "validate every N epochs during training (0 = only at the end)"))

    def validate(self) -> None:
        if self.every_epochs < 0:
            raise ValueError(f"val.every_epochs must be >= 0, got {self.every_epochs}")


@dataclass
class DetectConfig:
    out_dir: str = field(default="runs/detect", metadata=help_text(
        "run folder: config.yaml, metrics.jsonl, checkpoints/, detections_val.csv, results.json"))
    weights: str = field(default="", metadata=help_text(
        "encoder weights as for fine-tuning (a file, a pretraining run or checkpoint folder, an "
        "official VideoMAE / V2 .pth or an HF directory); '' = random init"))
    model: ModelConfig = field(
        default_factory=lambda: ModelConfig(drop_path_rate=0.2),
        metadata=help_text("encoder (num_classes is ignored: the RoI head classifies)"))
    head: RoIHeadConfig = field(default_factory=RoIHeadConfig, metadata=help_text("RoI head"))
    data: AVADataConfig = field(default_factory=AVADataConfig,
                                metadata=help_text("training keyframes (AVA layout)"))
    val: AVAValConfig = field(default_factory=AVAValConfig,
                              metadata=help_text("validation keyframes and proposals"))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        base_lr=5e-4, min_lr=1e-6, warmup_epochs=2.0, epochs=20, betas=(0.9, 0.999),
        layer_decay=0.75),
        metadata=help_text("AdamW with layer decay and warm-up + cosine, as in fine-tuning"))
    engine: EngineConfig = field(default_factory=EngineConfig,
                                 metadata=help_text("DeepSpeed settings"))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig, metadata=help_text(
        "checkpoint frequency, retention and resume (exact, as fine-tuning)"))
    log: LogConfig = field(default_factory=LogConfig, metadata=help_text("training logs"))
    seed: int = field(default=0, metadata=help_text(
        "seeds the model init (same on every rank), per-rank RNG and the data stream"))
    max_steps: int = field(default=0, metadata=help_text(
        "stop after this many optimizer steps (0 = the whole schedule); the schedule still "
        "spans optim.epochs, so a stopped run resumes exactly"))

    def resolve(self) -> "DetectConfig":
        return replace(self, data=_clip_of(self.data, self.model))

    def validate(self) -> None:
        _required(self.data, "data", "shards", "annotations", "label_map")
        _required(self.val, "val", "shards", "annotations")
        if self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {self.max_steps}")


# ---------------------------------------------------------------------------------------
# Temporal action detection


@dataclass
class TADDataConfig:
    shards: str = field(
        default="", metadata=help_text("training videos (shard set); json carries `segments`"))
    segments: str = field(default="", metadata=help_text(
        "optional CSV video_id,start_s,end_s,label replacing the json `segments` of the training "
        "videos"))
    classes: list[str] = field(default_factory=list,
                               metadata=help_text("action names (empty = the manifest's classes)"))
    num_frames: int | None = field(default=None, metadata=help_text(
        "frames per window: derived from model.num_frames (leave unset)"))
    sampling_rate: int = field(default=1, metadata=help_text(
        "source frames between the frames of a window"))
    window_stride: int = field(default=4, metadata=help_text(
        "source frames between window starts (the feature step)"))
    input_size: int | None = field(default=None, metadata=help_text(
        "window frames: short-side centre crop resized to this; derived from model.img_size "
        "(leave unset)"))
    backend: Backend = field(default="auto",
                             metadata=help_text("video decoder: auto, decord or pyav"))
    mean: tuple[float, float, float] = field(default=IMAGENET_MEAN,
                                             metadata=help_text("normalisation mean (0-1 units)"))
    std: tuple[float, float, float] = field(default=IMAGENET_STD,
                                            metadata=help_text("normalisation std (0-1 units)"))
    feature_batch_size: int = field(default=16,
                                    metadata=help_text("windows per encoder forward pass"))
    batch_size: int = field(default=2, metadata=help_text("videos per head training batch"))
    max_seq_len: int = field(default=2304, metadata=help_text(
        "training crops longer feature sequences to this many steps"))

    def validate(self) -> None:
        for name in ("num_frames", "sampling_rate", "window_stride", "input_size",
                     "feature_batch_size", "batch_size", "max_seq_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"data.{name} must be >= 1, got {value}")


@dataclass
class TADValConfig:
    shards: str = field(default="", metadata=help_text("validation videos (shard set)"))
    segments: str = field(default="",
                          metadata=help_text("optional segments CSV for the validation videos"))


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
    out_dir: str = field(default="runs/tad", metadata=help_text(
        "run folder: config.yaml, metrics.jsonl, features/, head.safetensors, "
        "detections_val.csv, results.json"))
    weights: str = field(default="", metadata=help_text(
        "encoder weights for the features, as for fine-tuning ('' = random init)"))
    model: ModelConfig = field(default_factory=ModelConfig,
                               metadata=help_text("feature encoder (frozen)"))
    data: TADDataConfig = field(default_factory=TADDataConfig,
                                metadata=help_text("training videos, windows and head batches"))
    val: TADValConfig = field(default_factory=TADValConfig,
                              metadata=help_text("validation videos"))
    head: TADHeadConfig = field(default_factory=TADHeadConfig,
                                metadata=help_text("1-D pyramid head"))
    decode: DecodeConfig = field(default_factory=DecodeConfig,
                                 metadata=help_text("decoding and soft-NMS"))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        base_lr=0.0128, min_lr=0.0, warmup_epochs=5.0, epochs=35, weight_decay=0.05,
        betas=(0.9, 0.999), clip_grad=1.0), metadata=help_text(
        "AdamW and warm-up + cosine for the head; lr per 256 videos as in every stage "
        "(ActionFormer's 1e-4 at 2 videos = base_lr 0.0128); layer_decay is not used"))
    log: LogConfig = field(default_factory=LogConfig, metadata=help_text("training logs"))
    device: Literal["auto", "cpu", "cuda"] = field(
        default="auto", metadata=help_text("auto (cuda when available), cpu or cuda"))
    seed: int = field(default=0, metadata=help_text("random seed"))

    def resolve(self) -> "TADConfig":
        return replace(self, data=_clip_of(self.data, self.model))

    def validate(self) -> None:
        _required(self.data, "data", "shards")
        _required(self.val, "val", "shards")
        stride = 2 ** (self.head.num_levels - 1)
        if self.data.max_seq_len % stride:
            raise ValueError(f"data.max_seq_len={self.data.max_seq_len} must be a multiple of "
                             f"the largest stride {stride}")
