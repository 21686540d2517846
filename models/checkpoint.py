"""This project's side of checkpoint files: reading any supported file into one key layout,
telling the layouts apart, and writing this project's safetensors.

- ``read_state_dict``: a file, an HF model directory or a mapping -> a flat ``StateDict``
  (wrappers such as ``model`` / ``module`` / ``state_dict`` unwrapped, ``_orig_mod.`` /
  ``module.`` / ``backbone.`` prefixes stripped, mmaction2's VideoMAE names renamed). Files
  load with ``weights_only=True``; the only class allowed beyond tensors and containers is
  ``argparse.Namespace`` (``OFFICIAL_CLASSES``: the ``args`` entry of the official VideoMAE /
  V2 ``checkpoint-N.pth``). DeepSpeed's ``mp_rank_00_model_states.pt`` (official fine-tuning
  with DeepSpeed; weights under ``module``) needs none.
- ``detect_format``: which layout a state dict is in (``hf``, ``timm``, ``pretrain``,
  ``encoder``); ``models.loading`` converts each to the VideoMAE layout.
- ``config_metadata`` / ``save_project_checkpoint`` / ``encoder_state_dict``: this project's
  safetensors carry their ``ModelConfig`` as JSON under ``METADATA_KEY``.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from runtime.io import atomic_save_safetensors, load_state_dict

from .config import ModelConfig
from .pos_embed import sincos_1d_table
from .videomae import VideoMAEPretrain

StateDict = dict[str, torch.Tensor]
WRAPPER_KEYS = ("model", "module", "state_dict", "model_state")
STRIPPED_PREFIXES = ("module.", "backbone.")
# the classes a checkpoint file may hold beyond tensors and containers: official VideoMAE /
# V2 / MAE ``save_model`` stores the training script's ``args`` (``argparse.Namespace``)
OFFICIAL_CLASSES: tuple[type, ...] = (argparse.Namespace,)
# mmaction2's VideoMAE backbone (``vit_mae.py``: mmcv ``PatchEmbed`` and ``FFN``) and head
MMACTION_RENAMES = (("patch_embed.projection.", "patch_embed.proj."),
                    (".mlp.layers.0.0.", ".mlp.fc1."), (".mlp.layers.1.", ".mlp.fc2."),
                    ("cls_head.fc_cls.", "head."))
# what a directory holds: HF model files, DeepSpeed's weights (``save_checkpoint`` tag folder)
WEIGHTS_FILES_IN_DIR = ("model.safetensors", "pytorch_model.bin", "mp_rank_00_model_states.pt")
METADATA_KEY = "model_config"
# the encoder-only file a pretraining checkpoint exports, what fine-tuning loads
ENCODER_EXPORT = "encoder.safetensors"


# -- reading --------------------------------------------------------------------------------


def _weights_file(path: Path) -> Path:
    """A checkpoint file, or the weights file inside an HF model directory or a DeepSpeed
    checkpoint tag directory."""
    if path.is_dir():
        for name in WEIGHTS_FILES_IN_DIR:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(
            f"{path} is a directory without {' or '.join(WEIGHTS_FILES_IN_DIR)}")
    return path


def read_state_dict(source: str | Path | Mapping) -> StateDict:
    """Load a checkpoint (file, HF directory or mapping), unwrap ``model`` / ``module`` /
    ``state_dict``, and strip ``_orig_mod.``, ``module.`` and ``backbone.`` prefixes."""
    where = "state dict"
    if isinstance(source, (str, Path)):
        where = str(source)
        obj = load_state_dict(_weights_file(Path(source)), allowed_classes=OFFICIAL_CLASSES)
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
    return _from_mmaction(out)


def _from_mmaction(state: StateDict) -> StateDict:
    """mmaction2's VideoMAE names -> VideoMAE's; its fixed position table (a saved buffer) is
    dropped when it is the VideoMAE sinusoid (a learned one stays, for the loader's hint)."""
    if not any(old in key for key in state for old, _ in MMACTION_RENAMES[:3]):
        return state
    out: StateDict = {}
    for key, value in state.items():
        for old, new in MMACTION_RENAMES:
            key = key.replace(old, new)
        out[key] = value
    table = out.get("pos_embed")
    if table is not None and table.ndim == 3 and torch.allclose(
            table.float(), sincos_1d_table(table.shape[1], table.shape[2]), atol=1e-5):
        del out["pos_embed"]
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
