"""Command line: convert a checkpoint into this project's safetensors or an HF directory.

Reads official VideoMAE / V2 (``.pth``), HF transformers VideoMAE (directory or file), timm
image ViTs (inflated) and this project's safetensors (``models.checkpoint``), builds the model
from the config stored beside or inside the checkpoint or inferred from tensor shapes (YAML
and ``--set`` override it), loads it (``models.loading``) and writes it out
(``models.checkpoint.save_project_checkpoint`` or ``models.hf.export_hf``). A
fine-tuning run is better exported by ``python -m finetune.export_hf``, which adds the run's
class names and evaluation mean / std (this command cannot read a run's data manifest).

Usage: ``python -m models.convert --help``. Mistakes in the inputs (a missing file, weights
that do not fit, a model HF cannot express) are one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from dataclasses import fields
from pathlib import Path

from runtime.config import RESOLVED_CONFIG_NAME
from runtime.errors import InputError, MissingInputError, run_command

from .checkpoint import (ENCODER_EXPORT, METADATA_KEY, WEIGHTS_FILES_IN_DIR, StateDict,
                         detect_format, read_state_dict, save_project_checkpoint)
from .config import SIZES, ModelConfig
from .hf import config_from_hf, export_hf, hf_to_project
from .loading import load_encoder_weights, load_pretrain_weights
from .videomae import VideoMAEPretrain
from .vit import VideoViT

log = logging.getLogger(__name__)


def read_config_hints(source: Path) -> dict:
    """ModelConfig fields stored beside or inside a checkpoint: an HF ``config.json``, our
    safetensors metadata (of the file, of a folder's ``model.safetensors``, or, for a
    DeepSpeed checkpoint of a pretraining run, of the ``encoder.safetensors`` beside it)."""
    if source.is_dir() and (source / "config.json").is_file():
        return config_from_hf(json.loads((source / "config.json").read_text()))
    folder = source if source.is_dir() else source.parent
    weights = source / WEIGHTS_FILES_IN_DIR[0] if source.is_dir() else source
    for candidate in (weights, folder / ENCODER_EXPORT):
        if candidate.suffix == ".safetensors" and candidate.is_file():
            from safetensors import safe_open

            with safe_open(str(candidate), framework="pt") as handle:
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
    size = next((name for name, p in SIZES.items()
                 if (p.encoder.embed_dim, p.encoder.depth) == (width, depth)), None)
    out.update({"size": size} if size else {"size": "custom", "embed_dim": width, "depth": depth,
                                            "num_heads": max(1, width // 64)})
    if "head.weight" in state:
        out["num_classes"] = state["head.weight"].shape[0]
    if any(".temporal_attn." in k for k in state):
        out["attention"] = "divided"
    if f"{prefix}pos_embed.spatial" in state:
        out["pos_embed"] = "separable_learned"
    if proj.ndim == 4 and "pos_embed" in state:  # timm: keep its table, read the image size from it
        num_prefix = int("cls_token" in state) + (state["reg_token"].shape[1]
                                                  if "reg_token" in state else 0)
        side = math.isqrt(state["pos_embed"].shape[1] - num_prefix)
        out.update(pos_embed="separable_learned", img_size=side * proj.shape[-1])
    if "fc_norm.weight" in state:
        out["final_norm"] = "fc_norm"
    elif f"{prefix}norm.weight" in state:
        out["final_norm"] = "norm"
    if prefix:
        dec = state["decoder.head.weight"].shape[1]
        dec_depth = 1 + max(int(m[1]) for k in state
                            if (m := re.match(r"decoder\.blocks\.(\d+)\.", k)))
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
        log.warning(
            "model config inferred from tensor shapes: %s (override with --config / --set)", values)
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
    parser.add_argument("out",
                        help="output .safetensors file (--to project) or directory (--to hf)")
    parser.add_argument("--to", choices=("project", "hf"), default="project", help="output format")
    parser.add_argument("--kind", choices=("auto", "encoder", "pretrain"), default="auto",
                        help="build an encoder or a pretraining model (auto: pretraining if the "
                             "checkpoint has a decoder)")
    parser.add_argument("--config",
                        help="YAML with ModelConfig fields (top level or under 'model:')")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override one ModelConfig field, e.g. attention=divided (repeatable)")
    parser.add_argument("--no-strict", dest="strict", action="store_false",
                        help="load what matches and report the rest instead of failing")
    parser.add_argument("--hf-bias-naming", choices=("new", "old"), default="new",
                        help="HF export: query.bias/value.bias (new: transformers 5) or "
                             "q_bias/v_bias (old: transformers 4; transformers 5 renames them "
                             "when loading)")
    parser.add_argument("--class-names", metavar="FILE",
                        help="HF export of a classifier: a text file with one class name per "
                             "line, in class-index order (default LABEL_0, LABEL_1, ...)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    src = Path(args.src)
    if not src.exists():
        raise MissingInputError(f"{src} does not exist")
    class_names = _read_class_names(args.class_names) if args.class_names else None
    try:
        state = read_state_dict(src)
    except (ValueError, FileNotFoundError) as err:
        raise InputError(f"cannot read {src}: {err}") from err
    try:
        cfg = _build_config(args, state)
    except ValueError as err:
        raise InputError(f"model config for {src}: {err}") from err
    fmt = detect_format(state)
    is_pretrain = fmt == "pretrain" or (fmt == "hf" and hf_to_project(state)[1] == "pretrain")
    kind = args.kind if args.kind != "auto" else ("pretrain" if is_pretrain else "encoder")
    try:
        if kind == "pretrain":
            model = VideoMAEPretrain(cfg)
            report = load_pretrain_weights(model, state, strict=args.strict)
        else:
            model = VideoViT(cfg)
            report = load_encoder_weights(model, state, strict=args.strict)
    except ValueError as err:
        raise InputError(f"cannot load {src} into a {kind} model ({cfg.attention} attention, "
                         f"{cfg.num_frames} frames at {cfg.img_size}px): {err}") from err
    print(report)
    if args.to == "hf":
        run_config = (src if src.is_dir() else src.parent) / RESOLVED_CONFIG_NAME
        if run_config.is_file() and class_names is None and cfg.num_classes:
            log.warning("%s is beside a run's %s: python -m finetune.export_hf RUN_DIR OUT also "
                        "writes the run's class names and evaluation mean / std", src,
                        RESOLVED_CONFIG_NAME)
        path = export_hf(model, args.out, args.hf_bias_naming, class_names)
    else:
        path = save_project_checkpoint(model, args.out)
    print(f"wrote {kind} ({cfg.attention} attention, {cfg.pos_embed}) to {path}")
    return 0


def _read_class_names(path: str) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise MissingInputError(f"--class-names {file} does not exist")
    names = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    if not names:
        raise InputError(f"--class-names {file} lists no class names (one per line)")
    return names


if __name__ == "__main__":
    sys.exit(run_command(main))
