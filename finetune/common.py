"""Pieces every fine-tuning and evaluation stage shares (recognition, probes, feature
extraction, both detection stages): where pretrained weights live, how an encoder is built
and loaded, which device and autocast a frozen-encoder stage uses.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable, ContextManager

import torch
from timm.layers import trunc_normal_
from torch import nn

from models import ModelConfig, VideoViT, build_encoder, load_encoder_weights
from models.checkpoint import ENCODER_EXPORT
from runtime.dist import discover
from runtime.errors import InputError, MissingInputError

logger = logging.getLogger(__name__)


def init_head(model: VideoViT, scale: float) -> None:
    """Fresh classification head: weights trunc_normal(std .02) x ``scale``, zero bias."""
    trunc_normal_(model.head.weight, std=0.02)
    with torch.no_grad():
        model.head.weight.mul_(scale)
    nn.init.zeros_(model.head.bias)


def resolve_weights(source: str | Path) -> Path:
    """The weights file behind ``source``: a file, an HF model directory, a pretraining
    checkpoint folder (``…/checkpoints/step_N`` holding ``encoder.safetensors``) or a run
    folder (its ``checkpoints/latest``)."""
    path = Path(source)
    if path.is_file():
        return path
    if path.is_dir():
        if (path / ENCODER_EXPORT).is_file():
            return path / ENCODER_EXPORT
        latest = path / "checkpoints" / "latest"
        if latest.is_file():
            tag_dir = latest.parent / latest.read_text().strip()
            if (tag_dir / ENCODER_EXPORT).is_file():
                return tag_dir / ENCODER_EXPORT
        if any((path / name).is_file() for name in ("model.safetensors", "pytorch_model.bin")):
            return path  # HF model directory
        raise MissingInputError(
            f"{path} is a folder without {ENCODER_EXPORT}, checkpoints/latest or an HF "
            "model.safetensors / pytorch_model.bin: pass the weights file")
    raise MissingInputError(f"pretrained weights {path} do not exist: check the weights / "
                            "pretrained field")


def build_model(cfg: ModelConfig, weights: str, strict: bool = True, seed: int = 0,
                head_init_scale: float | None = None) -> VideoViT:
    """``VideoViT(cfg)`` initialised with ``seed`` (identical on every rank), then loaded
    from ``weights`` when given. A checkpoint of another attention type, frame count or
    resolution is converted as ``models.loading`` documents, or rejected with the list of
    what does not fit. ``head_init_scale`` re-draws the head before loading (a checkpoint
    with a head of the same shape still replaces it)."""
    torch.manual_seed(seed)
    model = build_encoder(cfg)
    if head_init_scale is not None and cfg.num_classes:
        init_head(model, head_init_scale)
    if weights:
        path = resolve_weights(weights)
        try:
            report = load_encoder_weights(model, path, strict=strict)
        except ValueError as err:
            raise InputError(f"cannot load {path} into a {cfg.attention}-attention model with "
                             f"{cfg.num_frames} frames at {cfg.img_size}px: {err}") from err
        logger.info("loaded %s into the %s model:\n%s", path, cfg.attention, report)
    return model


def default_device() -> torch.device:
    """This rank's accelerator (``cuda:<local rank>``) or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", discover().local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def autocast_for(precision: str, device: torch.device) -> Callable[[], ContextManager]:
    """A context factory: autocast to bf16/fp16, or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)
