"""This project's side of checkpoint files: reading any supported file into one key layout,
telling the layouts apart, and writing this project's safetensors.

- ``read_state_dict``: a file, an HF model directory or a mapping -> a flat ``StateDict``
  (wrappers such as ``model`` / ``module`` unwrapped, ``_orig_mod.`` / ``module.`` /
  ``backbone.`` prefixes stripped).
- ``detect_format``: which layout a state dict is in (``hf``, ``timm``, ``pretrain``,
  ``encoder``); ``models.loading`` converts each to the VideoMAE layout.
- ``config_metadata`` / ``save_project_checkpoint`` / ``encoder_state_dict``: this project's
  safetensors carry their ``ModelConfig`` as JSON under ``METADATA_KEY``.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from runtime.io import atomic_save_safetensors, load_state_dict

from .config import ModelConfig
from .videomae import VideoMAEPretrain

StateDict = dict[str, torch.Tensor]
WRAPPER_KEYS = ("model", "module", "state_dict", "model_state")
STRIPPED_PREFIXES = ("module.", "backbone.")
METADATA_KEY = "model_config"
# the encoder-only file a pretraining checkpoint exports, what fine-tuning loads
ENCODER_EXPORT = "encoder.safetensors"


# -- reading --------------------------------------------------------------------------------


def _weights_file(path: Path) -> Path:
    """A checkpoint file, or the weights file inside an HF model directory."""
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(
            f"{path} is a directory without model.safetensors or pytorch_model.bin")
    return path


def read_state_dict(source: str | Path | Mapping) -> StateDict:
    """Load a checkpoint (file, HF directory or mapping), unwrap ``model`` / ``module`` /
    ``state_dict``, and strip ``_orig_mod.``, ``module.`` and ``backbone.`` prefixes."""
    where = "state dict"
    if isinstance(source, (str, Path)):
        where = str(source)
        obj = load_state_dict(_weights_file(Path(source)))
    else:
        obj = source
    while isinstance(obj, Mapping):
        wrapper = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if wrapper is None:
            break
        obj = obj[wrapper]
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"{where}: no state dict found (expected a mapping of tensors, possibly "
                         f"under one of {WRAPPER_KEYS})")
    out: StateDict = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{where}: entry {key!r} is a {type(value).__name__}, not a tensor")
        key = key.replace("_orig_mod.", "")
        while key.startswith(STRIPPED_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def detect_format(state: StateDict) -> str:
    """``hf`` | ``timm`` | ``pretrain`` (VideoMAE / this project's pretraining model) |
    ``encoder``."""
    keys = list(state)
    if any("patch_embeddings.projection" in k or ".encoder.layer." in k
           or k.startswith("encoder.layer.")
           for k in keys):
        return "hf"
    proj = state.get("patch_embed.proj.weight")
    if "cls_token" in state or "reg_token" in state or (proj is not None and proj.ndim == 4):
        return "timm"
    if any(k.startswith(("encoder.", "decoder.", "encoder_to_decoder.", "mask_token"))
           for k in keys):
        return "pretrain"
    return "encoder"


# -- saving ---------------------------------------------------------------------------------


def encoder_state_dict(pretrain_model: VideoMAEPretrain) -> StateDict:
    """The encoder of a pretraining model as a standalone ``VideoViT`` state dict."""
    return {k: v.detach().clone() for k, v in pretrain_model.encoder.state_dict().items()}


def config_metadata(cfg: ModelConfig) -> dict[str, str]:
    return {METADATA_KEY: json.dumps(asdict(cfg))}


def save_project_checkpoint(model: nn.Module, path: str | Path) -> Path:
    """``model``'s state dict as safetensors, with its ModelConfig in the metadata."""
    return atomic_save_safetensors(model.state_dict(), path, metadata=config_metadata(model.cfg))
