"""Checkpoint interop: official VideoMAE / V2, HF transformers, timm image ViTs, this project.

Every source is first turned into this project's key layout (the official VideoMAE one), then
adapted to the target model (attention type, position-table size, head / final-norm layout)
and loaded strictly, with a readable report of what was converted, dropped or is missing.

Command line: ``python -m models.convert --help``.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from runtime.io import atomic_save_safetensors, atomic_write_text, load_state_dict

from .config import IMAGENET_MEAN, IMAGENET_STD, SIZES, ModelConfig
from .pos_embed import resize_separable_state
from .videomae import VideoMAEPretrain
from .vit import VideoViT

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
WRAPPER_KEYS = ("model", "module", "state_dict", "model_state")
STRIPPED_PREFIXES = ("module.", "backbone.")
METADATA_KEY = "model_config"

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


@dataclass
class LoadReport:
    """What happened when a checkpoint was loaded into a model."""

    source_format: str
    notes: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    hints: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        lines = [f"source format: {self.source_format}"]
        lines += [f"  converted: {note}" for note in self.notes]
        for title, keys in (("missing in checkpoint", self.missing),
                            ("unexpected in checkpoint", self.unexpected),
                            ("shape mismatch", self.mismatched)):
            if keys:
                lines.append(f"  {title} ({len(keys)}): " + ", ".join(_compress(keys)))
        lines += [f"  hint: {hint}" for hint in self.hints]
        return "\n".join(lines)


def _compress(keys: list[str]) -> list[str]:
    """Fold ``blocks.{i}.x`` over i so a report of a 24-block mismatch stays readable."""
    groups: dict[str, list[str]] = {}
    for key in sorted(keys):
        groups.setdefault(re.sub(r"\.(\d+)\.", ".{i}.", key, count=1), []).append(key)
    return [pattern if len(members) > 1 else members[0] for pattern, members in groups.items()]


# -- reading --------------------------------------------------------------------------------


def _weights_file(path: Path) -> Path:
    """A checkpoint file, or the weights file inside an HF model directory."""
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path} is a directory without model.safetensors or pytorch_model.bin")
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
    """``hf`` | ``timm`` | ``pretrain`` (VideoMAE / this project's pretraining model) | ``encoder``."""
    keys = list(state)
    if any("patch_embeddings.projection" in k or ".encoder.layer." in k or k.startswith("encoder.layer.")
           for k in keys):
        return "hf"
    proj = state.get("patch_embed.proj.weight")
    if "cls_token" in state or "reg_token" in state or (proj is not None and proj.ndim == 4):
        return "timm"
    if any(k.startswith(("encoder.", "decoder.", "encoder_to_decoder.", "mask_token")) for k in keys):
        return "pretrain"
    return "encoder"


# -- HF transformers <-> ours ---------------------------------------------------------------


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
            block = f"{enc_prefix}blocks.{layer[2]}" if layer[1] == "encoder.layer" else f"decoder.blocks.{layer[2]}"
            rest = layer[3]
            attn = re.match(r"attention\.attention\.(?:(query|key|value)\.(weight|bias)|([qv])_bias)$", rest)
            if attn and attn[2] == "weight":
                qkv.setdefault(f"{block}.attn.qkv.weight", [None] * 3)[HF_QKV[attn[1]]] = value
            elif attn and attn[1] == "key":
                notes.append(f"dropped {key} (a key bias adds a per-query constant: softmax ignores it)")
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
    """Our keys -> HF VideoMAE keys (``bias_naming`` ``new``: ``query.bias``; ``old``: ``q_bias``)."""
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
            suffix = f"{'query' if which == 'q' else 'value'}.bias" if bias_naming == "new" else f"{which}_bias"
            out[f"{hf_block}.attention.attention.{suffix}"] = value
        else:
            renamed = _rename(rest, HF_LAYER_RENAMES, reverse=True)
            if renamed is None:
                raise ValueError(f"no HF equivalent for {key!r} (HF VideoMAE has no layer scale or "
                                 "divided attention)")
            out[f"{hf_block}.{renamed}"] = value
    return out


def hf_config(cfg: ModelConfig, kind: str) -> dict:
    """``config.json`` for HF ``VideoMAEForPreTraining`` / ``ForVideoClassification`` / ``Model``."""
    unsupported = []
    if cfg.attention != "joint":
        unsupported.append(f"attention={cfg.attention!r} (HF has joint only)")
    if cfg.pos_embed != "sincos_1d" or cfg.pos_embed_grid:
        unsupported.append("a position table other than the fixed sincos_1d of this grid")
    if cfg.layer_scale_init:
        unsupported.append("layer scale")
    if kind == "pretrain" and cfg.norm_target == "patch":
        unsupported.append("norm_target='patch' (HF has per-patch-and-channel or none)")
    imagenet = list(cfg.pixel_mean) == list(IMAGENET_MEAN) and list(cfg.pixel_std) == list(IMAGENET_STD)
    if kind == "pretrain" and not imagenet:
        unsupported.append("pixel_mean/pixel_std other than ImageNet's (HF hard-codes them)")
    if kind == "encoder" and cfg.num_classes and not cfg.uses_fc_norm:
        unsupported.append("a classifier without fc_norm (HF would pool the first token)")
    if unsupported:
        raise ValueError("cannot export to HF transformers VideoMAE: " + "; ".join(unsupported))
    enc, dec = cfg.encoder_dims(), cfg.decoder_dims()
    if kind == "pretrain":
        arch = "VideoMAEForPreTraining"
    else:
        arch = "VideoMAEForVideoClassification" if cfg.num_classes else "VideoMAEModel"
    out = {
        "architectures": [arch], "model_type": "videomae",
        "image_size": cfg.img_size, "patch_size": cfg.patch_size, "num_channels": cfg.in_chans,
        "num_frames": cfg.num_frames, "tubelet_size": cfg.tubelet_size,
        "hidden_size": enc.embed_dim, "num_hidden_layers": enc.depth, "num_attention_heads": enc.num_heads,
        "intermediate_size": int(enc.embed_dim * enc.mlp_ratio), "hidden_act": "gelu",
        "layer_norm_eps": 1e-6, "qv_bias": True, "use_mean_pooling": kind == "encoder" and cfg.uses_fc_norm,
        "decoder_hidden_size": dec.embed_dim, "decoder_num_hidden_layers": dec.depth,
        "decoder_num_attention_heads": dec.num_heads, "decoder_intermediate_size": int(dec.embed_dim * dec.mlp_ratio),
        "norm_pix_loss": cfg.norm_target == "patch_channel",
    }
    if cfg.num_classes:
        out["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.num_classes)}
        out["label2id"] = {f"LABEL_{i}": i for i in range(cfg.num_classes)}
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
        raise ValueError("HF config has a decoder MLP ratio other than 4, which ModelConfig cannot express")
    return out


# -- timm image ViT -> video encoder ----------------------------------------------------------


def inflate_timm(state: StateDict, grid: tuple[int, int, int], tubelet: int) -> tuple[StateDict, list[str]]:
    """timm image ViT keys -> video encoder keys (I3D inflation of the patch kernel).

    The 2-D kernel is repeated over the tubelet and divided by its length, so a static clip
    embeds like the image; timm's position table becomes ``pos_embed.spatial`` with a zero
    ``pos_embed.temporal``; ``qkv.bias`` is split into ``q_bias`` / ``v_bias`` (dropping the key
    bias is exact); ``ls1`` / ``ls2`` become ``gamma_1`` / ``gamma_2``; prefix tokens are dropped.
    """
    out: StateDict = {}
    notes = []
    num_prefix = int("cls_token" in state) + (state["reg_token"].shape[1] if "reg_token" in state else 0)
    for key, value in state.items():
        if key in ("cls_token", "reg_token"):
            notes.append(f"dropped {key} (this encoder has no prefix tokens)")
        elif key == "patch_embed.proj.weight":
            out[key] = value.unsqueeze(2).repeat(1, 1, tubelet, 1, 1) / tubelet
            notes.append(f"inflated patch_embed.proj.weight over {tubelet} frames (repeated, divided by {tubelet})")
        elif key == "pos_embed":
            n = value.shape[1]
            prefix = num_prefix if math.isqrt(n - num_prefix) ** 2 == n - num_prefix else 0
            out["pos_embed.spatial"] = value[:, prefix:]
            out["pos_embed.temporal"] = torch.zeros(1, grid[0], value.shape[-1], dtype=value.dtype)
            notes.append("timm pos_embed -> pos_embed.spatial (+ zero pos_embed.temporal)")
        elif key.endswith("attn.qkv.bias"):
            q, _, v = value.chunk(3)
            out[key.replace("qkv.bias", "q_bias")] = q
            out[key.replace("qkv.bias", "v_bias")] = v
        elif re.search(r"\.ls[12]\.gamma$", key):
            out[re.sub(r"\.ls([12])\.gamma$", r".gamma_\1", key)] = value
        else:
            out[key] = value
    if any(k.endswith("attn.qkv.bias") for k in state):
        notes.append("split attn.qkv.bias into q_bias / v_bias (key bias dropped: softmax is invariant to it)")
    return out, notes


# -- adapting a VideoMAE-layout encoder state to a model ------------------------------------


def adapt_encoder_state(state: StateDict, model: VideoViT, report: LoadReport) -> StateDict:
    """Convert attention type, resize learned position tables, reconcile head / final norm."""
    cfg = model.cfg
    state = dict(state)
    if model.pos_embed.learned:
        report.notes += resize_separable_state(state, "pos_embed.", model.grid)
    source_divided = any(".temporal_attn." in k for k in state)
    if cfg.attention == "divided" and not source_divided:
        for i in range(model.depth):
            for name in [k for k in state if k.startswith((f"blocks.{i}.norm1.", f"blocks.{i}.attn."))]:
                temporal = name.replace(".norm1.", ".temporal_norm1.").replace(".attn.", ".temporal_attn.")
                state[temporal] = state[name].clone()
            block = model.blocks[i]
            state[f"blocks.{i}.temporal_fc.weight"] = torch.zeros_like(block.temporal_fc.weight)
            state[f"blocks.{i}.temporal_fc.bias"] = torch.zeros_like(block.temporal_fc.bias)
        report.notes.append("single-attention blocks -> divided: temporal_norm1/temporal_attn copied "
                            "from norm1/attn, temporal_fc zero")
    elif source_divided and cfg.attention != "divided":
        report.hints.append("the checkpoint has divided-attention temporal branches: load it into "
                            "attention='divided'")
    model_keys = set(model.state_dict())
    if cfg.uses_fc_norm and "fc_norm.weight" not in state and "norm.weight" in state:
        for name in ("norm.weight", "norm.bias"):
            state.pop(name, None)
        report.notes.append("dropped norm.* (per-token norm of a pretraining encoder); fc_norm starts "
                            "fresh, as in official fine-tuning")
    elif cfg.uses_fc_norm and "fc_norm.weight" not in state:
        report.notes.append("fc_norm initialised fresh")
    if not cfg.uses_fc_norm and "fc_norm.weight" in state and "norm.weight" not in state:
        report.hints.append("the checkpoint normalises after pooling (fc_norm): build the model with "
                            "final_norm='fc_norm'")
    head_keys = [k for k in state if k.startswith("head.")]
    if head_keys and ("head.weight" not in model_keys
                      or state["head.weight"].shape != model.head.weight.shape):
        for name in head_keys:
            state.pop(name)
        report.notes.append("dropped the checkpoint's head (no head or a different number of classes "
                            "in the model)")
    if "head.weight" in model_keys and "head.weight" not in state:
        report.notes.append("head initialised fresh")
    if "pos_embed" in state:
        report.hints.append("the checkpoint has a learned table over the flattened token index "
                            "(use_learnable_pos_emb); this project keeps VideoMAE's fixed table or "
                            "separable tables")
    if any(k.startswith("pos_embed.") for k in state) and not model.pos_embed.learned:
        report.hints.append("the checkpoint has a learned position table: build the model with "
                            "pos_embed='separable_learned' to use it")
    return state


def _fresh_ok(model_key: str) -> bool:
    """Keys a fine-tuning model may legitimately initialise itself."""
    return model_key.startswith(("head.", "fc_norm."))


def _load(model: nn.Module, state: StateDict, report: LoadReport, strict: bool, fresh_ok=_fresh_ok) -> LoadReport:
    own = model.state_dict()
    for key in list(state):
        if key in own and own[key].shape != state[key].shape:
            report.mismatched.append(f"{key} {tuple(state[key].shape)} vs model {tuple(own[key].shape)}")
            state.pop(key)
    result = model.load_state_dict(state, strict=False)
    report.missing = [k for k in result.missing_keys if not fresh_ok(k)]
    report.unexpected = list(result.unexpected_keys)
    if strict and not report.ok:
        raise ValueError(f"checkpoint does not match the model:\n{report}")
    log.info("loaded checkpoint:\n%s", report)
    return report


def _to_encoder_state(state: StateDict, model: VideoViT, report: LoadReport) -> StateDict:
    fmt = detect_format(state)
    report.source_format = fmt
    if fmt == "hf":
        state, kind, notes = hf_to_project(state)
        report.notes += notes
        fmt = kind
    if fmt == "timm":
        state, notes = inflate_timm(state, model.grid, model.cfg.tubelet_size)
        report.notes += notes
    if fmt == "pretrain":
        dropped = [k for k in state if not k.startswith("encoder.")]
        state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
        if dropped:
            report.notes.append(f"dropped {len(dropped)} decoder tensors (decoder, encoder_to_decoder, mask_token)")
    return state


def load_encoder_weights(model: VideoViT, source: str | Path | Mapping, strict: bool = True) -> LoadReport:
    """Load an encoder from any supported checkpoint into ``model``.

    Accepts this project's encoder or pretraining files, official VideoMAE / V2 pretraining or
    fine-tuned checkpoints (``model`` / ``module`` wrappers; ``encoder.``, ``backbone.``,
    ``_orig_mod.`` prefixes), HF transformers VideoMAE checkpoints (file or directory) and timm
    image ViTs (inflated). ``strict`` raises ValueError listing missing / unexpected /
    mismatched keys; a fresh classification head or ``fc_norm`` is never an error.
    """
    if isinstance(model, VideoMAEPretrain):
        model = model.encoder
    report = LoadReport(source_format="?")
    state = _to_encoder_state(read_state_dict(source), model, report)
    return _load(model, adapt_encoder_state(state, model, report), report, strict)


def load_pretrain_weights(model: VideoMAEPretrain, source: str | Path | Mapping, strict: bool = True) -> LoadReport:
    """Load a full pretraining model (encoder and decoder) from this project's, official
    VideoMAE / V2 or HF ``VideoMAEForPreTraining`` checkpoints."""
    state = read_state_dict(source)
    report = LoadReport(source_format=detect_format(state))
    if report.source_format == "hf":
        state, kind, notes = hf_to_project(state)
        report.notes += notes
    elif report.source_format != "pretrain":
        raise ValueError(f"expected a pretraining checkpoint (encoder + decoder), got a "
                         f"{report.source_format} checkpoint: use load_encoder_weights")
    encoder = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    rest = {k: v for k, v in state.items() if not k.startswith("encoder.")}
    encoder = adapt_encoder_state(encoder, model.encoder, report)
    if model.decoder_pos_embed.learned:
        report.notes += resize_separable_state(rest, "decoder_pos_embed.", model.cfg.grid)
    merged = {**{f"encoder.{k}": v for k, v in encoder.items()}, **rest}
    return _load(model, merged, report, strict, fresh_ok=lambda key: False)


def encoder_state_dict(pretrain_model: VideoMAEPretrain) -> StateDict:
    """The encoder of a pretraining model as a standalone ``VideoViT`` state dict."""
    return {k: v.detach().clone() for k, v in pretrain_model.encoder.state_dict().items()}


# -- saving ---------------------------------------------------------------------------------


def config_metadata(cfg: ModelConfig) -> dict[str, str]:
    return {METADATA_KEY: json.dumps(asdict(cfg))}


def save_project_checkpoint(model: nn.Module, path: str | Path) -> Path:
    """``model``'s state dict as safetensors, with its ModelConfig in the metadata."""
    return atomic_save_safetensors(model.state_dict(), path, metadata=config_metadata(model.cfg))


def export_hf(model: nn.Module, out_dir: str | Path, bias_naming: str = "new") -> Path:
    """Write ``config.json`` + ``model.safetensors`` loadable by HF transformers'
    ``VideoMAEForPreTraining`` / ``VideoMAEForVideoClassification`` / ``VideoMAEModel``."""
    kind = "pretrain" if isinstance(model, VideoMAEPretrain) else "encoder"
    config = hf_config(model.cfg, kind)
    state = project_to_hf(model.state_dict(), kind, bias_naming)
    out_dir = Path(out_dir)
    atomic_save_safetensors(state, out_dir / "model.safetensors", metadata={"format": "pt"})
    atomic_write_text(out_dir / "config.json", json.dumps(config, indent=2) + "\n")
    return out_dir


# -- config inference for the command line ----------------------------------------------------


def read_config_hints(source: Path) -> dict:
    """ModelConfig fields stored beside or inside a checkpoint (HF config.json, our metadata)."""
    if source.is_dir() and (source / "config.json").is_file():
        return config_from_hf(json.loads((source / "config.json").read_text()))
    if source.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(source), framework="pt") as handle:
            meta = handle.metadata() or {}
        if METADATA_KEY in meta:
            return json.loads(meta[METADATA_KEY])
    return {}


def infer_config_fields(state: StateDict) -> dict:
    """Best-effort ModelConfig fields from tensor shapes (VideoMAE layout). Frames and image
    size cannot be read from a fixed-table checkpoint: they keep their defaults."""
    prefix = "encoder." if any(k.startswith("encoder.") for k in state) else ""
    proj = state[f"{prefix}patch_embed.proj.weight"]
    width = proj.shape[0]
    depth = 1 + max(int(m[1]) for k in state if (m := re.match(rf"{prefix}blocks\.(\d+)\.", k)))
    out = {"patch_size": proj.shape[-1], "in_chans": proj.shape[1]}
    if proj.ndim == 5:
        out["tubelet_size"] = proj.shape[2]
    size = next((name for name, p in SIZES.items() if (p.encoder.embed_dim, p.encoder.depth) == (width, depth)), None)
    out.update({"size": size} if size else {"size": "custom", "embed_dim": width, "depth": depth,
                                            "num_heads": max(1, width // 64)})
    if "head.weight" in state:
        out["num_classes"] = state["head.weight"].shape[0]
    if any(".temporal_attn." in k for k in state):
        out["attention"] = "divided"
    if f"{prefix}pos_embed.spatial" in state:
        out["pos_embed"] = "separable_learned"
    if proj.ndim == 4 and "pos_embed" in state:  # timm: keep its table, read the image size from it
        num_prefix = int("cls_token" in state) + (state["reg_token"].shape[1] if "reg_token" in state else 0)
        side = math.isqrt(state["pos_embed"].shape[1] - num_prefix)
        out.update(pos_embed="separable_learned", img_size=side * proj.shape[-1])
    if "fc_norm.weight" in state:
        out["final_norm"] = "fc_norm"
    elif f"{prefix}norm.weight" in state:
        out["final_norm"] = "norm"
    if prefix:
        dec = state["decoder.head.weight"].shape[1]
        dec_depth = 1 + max(int(m[1]) for k in state if (m := re.match(r"decoder\.blocks\.(\d+)\.", k)))
        out.update({"decoder_embed_dim": dec, "decoder_depth": dec_depth})
    return out


def _build_config(args, state: StateDict) -> ModelConfig:
    from runtime.config import load_config, load_yaml

    values = read_config_hints(Path(args.src))
    if not values:
        state_for_shapes = state
        if detect_format(state) == "hf":
            state_for_shapes = hf_to_project(state)[0]
        values = infer_config_fields(state_for_shapes)
        log.warning("model config inferred from tensor shapes: %s (override with --config / --set)", values)
    if args.config:
        data = load_yaml(args.config)
        values.update(data["model"] if isinstance(data.get("model"), dict) else data)
    known = {f.name for f in fields(ModelConfig)}
    overrides = [f"{k}={json.dumps(v)}" for k, v in values.items() if k in known]
    return load_config(ModelConfig, None, overrides + list(args.set))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m models.convert",
        description="Convert video ViT checkpoints: official VideoMAE / V2 (.pth), HF transformers "
                    "VideoMAE (directory or file), timm image ViTs (inflated) and this project's "
                    "safetensors, into this project's safetensors or an HF transformers directory.")
    parser.add_argument("src", help="checkpoint file or HF model directory")
    parser.add_argument("out", help="output .safetensors file (--to project) or directory (--to hf)")
    parser.add_argument("--to", choices=("project", "hf"), default="project", help="output format")
    parser.add_argument("--kind", choices=("auto", "encoder", "pretrain"), default="auto",
                        help="build an encoder or a pretraining model (auto: pretraining if the "
                             "checkpoint has a decoder)")
    parser.add_argument("--config", help="YAML with ModelConfig fields (top level or under 'model:')")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override one ModelConfig field, e.g. attention=divided (repeatable)")
    parser.add_argument("--no-strict", dest="strict", action="store_false",
                        help="load what matches and report the rest instead of failing")
    parser.add_argument("--hf-bias-naming", choices=("new", "old"), default="new",
                        help="HF export: query.bias/value.bias (new) or q_bias/v_bias (old)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    state = read_state_dict(args.src)
    cfg = _build_config(args, state)
    fmt = detect_format(state)
    is_pretrain = fmt == "pretrain" or (fmt == "hf" and hf_to_project(state)[1] == "pretrain")
    kind = args.kind if args.kind != "auto" else ("pretrain" if is_pretrain else "encoder")
    if kind == "pretrain":
        model = VideoMAEPretrain(cfg)
        report = load_pretrain_weights(model, state, strict=args.strict)
    else:
        model = VideoViT(cfg)
        report = load_encoder_weights(model, state, strict=args.strict)
    print(report)
    if args.to == "hf":
        path = export_hf(model, args.out, args.hf_bias_naming)
    else:
        path = save_project_checkpoint(model, args.out)
    print(f"wrote {kind} ({cfg.attention} attention, {cfg.pos_embed}) to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
