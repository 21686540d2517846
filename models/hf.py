"""HF transformers VideoMAE interop: key renaming both ways, ``config.json`` both ways, and an
exporter (``export_hf``) whose folder ``VideoMAEForPreTraining`` /
``VideoMAEForVideoClassification`` / ``VideoMAEModel`` load and the video-classification
pipeline runs (its processor configs: ``models.hf_processor``, which also states what they
reproduce of this project's evaluation).

HF splits the attention input projection into ``query`` / ``key`` / ``value`` (ours is one
``qkv``) and names the q/v biases ``query.bias`` / ``value.bias`` (transformers 5) or
``q_bias`` / ``v_bias`` (transformers 4 and the files it wrote); both are read, either is
written. transformers 5 renames ``q_bias`` / ``v_bias`` to ``query.bias`` / ``value.bias``
when it loads a file (its ``conversion_mapping``), so both namings load there.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from runtime.constants import IMAGENET_MEAN, IMAGENET_STD
from runtime.errors import InputError
from runtime.io import atomic_save_safetensors, atomic_write_text

from .checkpoint import StateDict
from .config import ModelConfig
from .hf_processor import processor_configs
from .videomae import VideoMAEPretrain

# HF layer-internal names -> ours; order matters ("attention.output.dense" before "output.dense").
HF_LAYER_RENAMES = (
    ("attention.output.dense.", "attn.proj."),
    ("intermediate.dense.", "mlp.fc1."),
    ("output.dense.", "mlp.fc2."),
    ("layernorm_before.", "norm1."),
    ("layernorm_after.", "norm2."),
)
HF_TOP_RENAMES = (
    ("embeddings.patch_embeddings.projection.", "patch_embed.proj."),
    ("layernorm.", "norm."),
    ("fc_norm.", "fc_norm."),
    ("classifier.", "head."),
)
HF_HEAD_PREFIXES = ("fc_norm.", "classifier.")  # outside the "videomae." base model
HF_QKV = {"query": 0, "key": 1, "value": 2}


def _rename(name: str, table: tuple[tuple[str, str], ...], reverse: bool = False) -> str | None:
    for theirs, ours in table:
        src, dst = (ours, theirs) if reverse else (theirs, ours)
        if name.startswith(src):
            return dst + name[len(src):]
    return None


def hf_to_project(state: StateDict) -> tuple[StateDict, str, list[str]]:
    """HF VideoMAE keys (old ``q_bias`` or new ``query.bias`` naming) -> ours.

    Returns ``(state, kind, notes)`` with kind ``pretrain`` or ``encoder``.
    """
    has_decoder = any(k.startswith(("decoder.", "encoder_to_decoder", "mask_token")) for k in state)
    kind = "pretrain" if has_decoder else "encoder"
    enc_prefix = "encoder." if kind == "pretrain" else ""
    out: StateDict = {}
    qkv: dict[str, list] = {}
    notes = []
    for key, value in state.items():
        name = key.removeprefix("videomae.")
        layer = re.match(r"(encoder\.layer|decoder\.decoder_layers)\.(\d+)\.(.*)", name)
        if layer:
            block = (f"{enc_prefix}blocks.{layer[2]}" if layer[1] == "encoder.layer"
                     else f"decoder.blocks.{layer[2]}")
            rest = layer[3]
            attn = re.match(
                r"attention\.attention\.(?:(query|key|value)\.(weight|bias)|([qv])_bias)$", rest)
            if attn and attn[2] == "weight":
                qkv.setdefault(f"{block}.attn.qkv.weight", [None] * 3)[HF_QKV[attn[1]]] = value
            elif attn and attn[1] == "key":
                notes.append(
                    f"dropped {key} (a key bias adds a per-query constant: softmax ignores it)")
            elif attn:
                out[f"{block}.attn.{(attn[1] or attn[3])[0]}_bias"] = value
            else:
                renamed = _rename(rest, HF_LAYER_RENAMES)
                out[f"{block}.{renamed}" if renamed else key] = value
        elif name.startswith(("decoder.", "encoder_to_decoder.", "mask_token")):
            out[name] = value
        else:
            renamed = _rename(name, HF_TOP_RENAMES)
            out[enc_prefix + renamed if renamed else key] = value
    for key, parts in qkv.items():
        if any(p is None for p in parts):
            raise ValueError(f"HF checkpoint lacks one of query/key/value weights for {key}")
        out[key] = torch.cat(parts, dim=0)
    notes.append(f"HF transformers {kind} layout -> VideoMAE layout")
    return out, kind, notes


def project_to_hf(state: StateDict, kind: str, bias_naming: str = "new") -> StateDict:
    """Our keys -> HF VideoMAE keys (``bias_naming`` ``new``: ``query.bias``; ``old``:
    ``q_bias``)."""
    out: StateDict = {}
    enc_prefix = "encoder." if kind == "pretrain" else ""
    for key, value in state.items():
        name = key
        if kind == "pretrain" and not key.startswith("encoder."):
            block = re.match(r"decoder\.blocks\.(\d+)\.(.*)", key)
            if block is None:
                out[key] = value
                continue
            hf_block, rest = f"decoder.decoder_layers.{block[1]}", block[2]
        else:
            name = key.removeprefix(enc_prefix)
            block = re.match(r"blocks\.(\d+)\.(.*)", name)
            if block is None:
                renamed = _rename(name, HF_TOP_RENAMES, reverse=True)
                if renamed is None:
                    raise ValueError(f"no HF equivalent for {key!r}")
                top_level = renamed.startswith(HF_HEAD_PREFIXES)
                out[renamed if top_level else "videomae." + renamed] = value
                continue
            hf_block, rest = f"videomae.encoder.layer.{block[1]}", block[2]
        if rest == "attn.qkv.weight":
            for name_, part in zip(HF_QKV, value.chunk(3, dim=0)):
                out[f"{hf_block}.attention.attention.{name_}.weight"] = part.clone()
        elif rest in ("attn.q_bias", "attn.v_bias"):
            which = rest[5]
            suffix = (f"{'query' if which == 'q' else 'value'}.bias" if bias_naming == "new"
                      else f"{which}_bias")
            out[f"{hf_block}.attention.attention.{suffix}"] = value
        else:
            renamed = _rename(rest, HF_LAYER_RENAMES, reverse=True)
            if renamed is None:
                raise ValueError(f"no HF equivalent for {key!r} (HF VideoMAE has no layer scale, "
                                 "only joint attention)")
            out[f"{hf_block}.{renamed}"] = value
    return out


def hf_unsupported(cfg: ModelConfig, kind: str) -> list[str]:
    """What of ``cfg`` HF transformers' VideoMAE cannot express, each with the way out."""
    unsupported = []
    if cfg.attention != "joint":
        unsupported.append(f"attention={cfg.attention!r} (HF has joint only)")
    if cfg.pos_embed != "sincos_1d" or cfg.pos_embed_grid:
        unsupported.append(f"pos_embed={cfg.pos_embed!r} (HF computes the fixed 1-D sinusoid "
                           "table of its grid itself: train with model.pos_embed=sincos_1d)")
    if cfg.layer_scale_init:
        unsupported.append("layer scale")
    if kind == "pretrain" and cfg.norm_target == "patch":
        unsupported.append("norm_target='patch' (HF has per-patch-and-channel or none)")
    imagenet = (list(cfg.pixel_mean) == list(IMAGENET_MEAN)
                and list(cfg.pixel_std) == list(IMAGENET_STD))
    if kind == "pretrain" and not imagenet:
        unsupported.append("pixel_mean/pixel_std other than ImageNet's (HF hard-codes them)")
    if kind == "encoder" and cfg.num_classes and not cfg.uses_fc_norm:
        unsupported.append("a classifier without fc_norm (HF would pool the first token)")
    return unsupported


def label_maps(num_classes: int, class_names: Sequence[str] | None = None) -> dict:
    """``id2label`` / ``label2id`` of an HF classifier config: ``class_names`` (one per class,
    unique) or ``LABEL_i``."""
    names = list(class_names) if class_names else [f"LABEL_{i}" for i in range(num_classes)]
    if len(names) != num_classes:
        raise InputError(f"{len(names)} class names for a classifier of {num_classes} classes: "
                         "give one name per class, in class-index order")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InputError(f"class names must be unique (HF's label2id maps each name to one "
                         f"index); repeated: {repeated}")
    return {"id2label": {str(i): name for i, name in enumerate(names)},
            "label2id": {name: i for i, name in enumerate(names)}}


def hf_config(cfg: ModelConfig, kind: str, class_names: Sequence[str] | None = None) -> dict:
    """``config.json`` for HF ``VideoMAEForPreTraining`` / ``ForVideoClassification`` /
    ``Model``; a classifier's labels are ``class_names`` (else ``LABEL_i``). Raises
    ``InputError`` naming everything HF cannot express."""
    unsupported = hf_unsupported(cfg, kind)
    if unsupported:
        raise InputError("cannot export to HF transformers VideoMAE: " + "; ".join(unsupported))
    enc, dec = cfg.encoder_dims(), cfg.decoder_dims()
    if kind == "pretrain":
        arch = "VideoMAEForPreTraining"
    else:
        arch = "VideoMAEForVideoClassification" if cfg.num_classes else "VideoMAEModel"
    out = {
        "architectures": [arch], "model_type": "videomae",
        "image_size": cfg.img_size, "patch_size": cfg.patch_size, "num_channels": cfg.in_chans,
        "num_frames": cfg.num_frames, "tubelet_size": cfg.tubelet_size,
        "hidden_size": enc.embed_dim, "num_hidden_layers": enc.depth,
        "num_attention_heads": enc.num_heads,
        "intermediate_size": int(enc.embed_dim * enc.mlp_ratio), "hidden_act": "gelu",
        "layer_norm_eps": 1e-6, "qv_bias": True,
        "use_mean_pooling": kind == "encoder" and cfg.uses_fc_norm,
        "decoder_hidden_size": dec.embed_dim, "decoder_num_hidden_layers": dec.depth,
        "decoder_num_attention_heads": dec.num_heads,
        "decoder_intermediate_size": int(dec.embed_dim * dec.mlp_ratio),
        "norm_pix_loss": cfg.norm_target == "patch_channel",
    }
    if kind == "encoder" and cfg.num_classes:
        out.update(label_maps(cfg.num_classes, class_names))
    elif class_names:
        raise InputError("class names given for a model without a classification head")
    return out


def config_from_hf(hf: Mapping) -> dict:
    """ModelConfig fields from an HF VideoMAE ``config.json``."""
    hidden = hf.get("hidden_size", 768)
    is_classifier = "VideoMAEForVideoClassification" in (hf.get("architectures") or [])
    dec_hidden = hf.get("decoder_hidden_size", 384)
    out = {
        "size": "custom", "embed_dim": hidden, "depth": hf.get("num_hidden_layers", 12),
        "num_heads": hf.get("num_attention_heads", 12),
        "mlp_ratio": hf.get("intermediate_size", 4 * hidden) / hidden,
        "img_size": hf.get("image_size", 224), "patch_size": hf.get("patch_size", 16),
        "num_frames": hf.get("num_frames", 16), "tubelet_size": hf.get("tubelet_size", 2),
        "in_chans": hf.get("num_channels", 3),
        "decoder_embed_dim": dec_hidden, "decoder_depth": hf.get("decoder_num_hidden_layers", 4),
        "decoder_num_heads": hf.get("decoder_num_attention_heads", 6),
        "norm_target": "patch_channel" if hf.get("norm_pix_loss", True) else "none",
        "num_classes": len(hf.get("id2label") or {}) if is_classifier else 0,
        "final_norm": "fc_norm" if hf.get("use_mean_pooling", True) else "norm",
    }
    if hf.get("decoder_intermediate_size", 4 * dec_hidden) != 4 * dec_hidden:
        raise ValueError(
            "HF config has a decoder MLP ratio other than 4, which ModelConfig cannot express")
    return out


def export_hf(model: nn.Module, out_dir: str | Path, bias_naming: str = "new",
              class_names: Sequence[str] | None = None, mean: Sequence[float] | None = None,
              std: Sequence[float] | None = None) -> Path:
    """Write ``model`` (a ``VideoViT`` or ``VideoMAEPretrain``) into ``out_dir``:
    ``config.json``, ``model.safetensors`` and the processor configs. ``class_names`` name a
    classifier's classes in index order (else ``LABEL_i``); ``mean`` / ``std`` are the
    processor's normalisation in 0-1 pixel units (default the model's ``pixel_mean`` /
    ``pixel_std``). Raises ``InputError`` naming what HF cannot express."""
    kind = "pretrain" if isinstance(model, VideoMAEPretrain) else "encoder"
    cfg: ModelConfig = model.cfg
    config = hf_config(cfg, kind, class_names)
    state = project_to_hf(model.state_dict(), kind, bias_naming)
    processors = processor_configs(cfg, cfg.pixel_mean if mean is None else mean,
                                   cfg.pixel_std if std is None else std)
    out_dir = Path(out_dir)
    atomic_save_safetensors(state, out_dir / "model.safetensors", metadata={"format": "pt"})
    for name, content in processors.items():
        atomic_write_text(out_dir / name, json.dumps(content, indent=2) + "\n")
    atomic_write_text(out_dir / "config.json", json.dumps(config, indent=2) + "\n")
    return out_dir
