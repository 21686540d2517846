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
from runtime.checkpoint import LATEST_FILE
from runtime.dist import discover
from runtime.errors import InputError, MissingInputError

logger = logging.getLogger(__name__)

# DeepSpeed's save_checkpoint writes a tag folder's module weights here (ZeRO 0-2, no model
# parallelism); models.checkpoint reads the same file
DEEPSPEED_WEIGHTS = "mp_rank_00_model_states.pt"
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def init_head(model: VideoViT, scale: float) -> None:
    """Fresh classification head: weights trunc_normal(std .02) x ``scale``, zero bias."""
    trunc_normal_(model.head.weight, std=0.02)
    with torch.no_grad():
        model.head.weight.mul_(scale)
    nn.init.zeros_(model.head.bias)


def resolve_weights(source: str | Path) -> Path:
    """The weights file behind ``source``: a file; a folder holding ``encoder.safetensors``
    (a pretraining checkpoint ``…/checkpoints/step_N``); a DeepSpeed checkpoint tag folder
    (its ``mp_rank_00_model_states.pt``, weights under ``module``: this project's fine-tuning
    and detection checkpoints, official VideoMAE ``--enable_deepspeed`` ``checkpoint-N``
    folders); an HF model directory (returned itself); a folder with DeepSpeed's ``latest``
    file (the official fine-tuning ``output_dir``, this project's ``checkpoints/``) or a run
    folder (its ``checkpoints/latest``): the checkpoint ``latest`` names."""
    path = Path(source)
    if path.is_file():
        return path
    if not path.is_dir():
        raise MissingInputError(f"pretrained weights {path} do not exist: check the weights / "
                                "pretrained field")
    found = _weights_in_checkpoint(path)
    if found is not None:
        return found
    for latest in (path / LATEST_FILE, path / "checkpoints" / LATEST_FILE):
        if latest.is_file():
            tag_dir = latest.parent / latest.read_text().strip()
            found = _weights_in_checkpoint(tag_dir) if tag_dir.is_dir() else None
            if found is None:
                raise MissingInputError(
                    f"{latest} names checkpoint {tag_dir.name}, but {tag_dir} holds neither "
                    f"{ENCODER_EXPORT} nor {DEEPSPEED_WEIGHTS}: pass a checkpoint folder or "
                    "weights file")
            return found
    raise MissingInputError(
        f"{path} is a folder without {ENCODER_EXPORT}, {DEEPSPEED_WEIGHTS}, a DeepSpeed "
        f"'latest' file, checkpoints/latest or an HF model.safetensors / pytorch_model.bin: "
        "pass the weights file or a checkpoint folder")


def _weights_in_checkpoint(folder: Path) -> Path | None:
    """The weights of one checkpoint folder: the encoder export, DeepSpeed's model states or
    (an HF model directory) the folder itself; None when it has none."""
    for name in (ENCODER_EXPORT, DEEPSPEED_WEIGHTS):
        if (folder / name).is_file():
            return folder / name
    if any((folder / name).is_file() for name in HF_WEIGHTS):
        return folder
    return None


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
