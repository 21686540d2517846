"""Loading any supported checkpoint into a model of this project.

Every source is first turned into this project's key layout (the official VideoMAE one:
``models.hf`` for HF transformers, ``models.timm_inflate`` for timm image ViTs), then adapted
to the target model (attention type, position-table size, head / final-norm layout) and
loaded strictly, with a readable ``LoadReport`` of what was converted, dropped or is missing.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from .attention_blocks import AxialBlock, SparseLocalGlobalBlock
from .checkpoint import StateDict, detect_format, read_state_dict
from .hf import hf_to_project
from .layers import DividedBlock
from .pos_embed import resize_separable_state
from .timm_inflate import inflate_timm
from .videomae import VideoMAEPretrain
from .vit import VideoViT

log = logging.getLogger(__name__)


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


# -- adapting a VideoMAE-layout encoder state to a model ------------------------------------


def inflate_tubelet(state: StateDict, tubelet_size: int, report: LoadReport) -> None:
    """A patch embedding with a shorter temporal kernel than ``tubelet_size`` (which it must
    divide) is repeated over time and divided by the factor (I3D inflation), in place: on a
    clip whose frames repeat in pairs the inflated embedding gives the source's tokens."""
    weight = state.get("patch_embed.proj.weight")
    if weight is None or weight.ndim != 5 or weight.shape[2] == tubelet_size:
        return
    source = weight.shape[2]
    if tubelet_size % source:
        raise ValueError(f"patch_embed has a temporal kernel of {source}, which does not divide "
                         f"the model's tubelet_size {tubelet_size}")
    factor = tubelet_size // source
    state["patch_embed.proj.weight"] = weight.repeat_interleave(factor, dim=2) / factor
    report.notes.append(f"patch_embed inflated over time from tubelet {source} to "
                        f"{tubelet_size} (repeated, divided by {factor})")


# branch prefixes of each attention type (``<p>_norm1``, ``<p>_attn``, ``<p>_fc`` per block)
BRANCHES = {"divided": DividedBlock.branches, "axial": AxialBlock.branches,
            "sparse_local_global": SparseLocalGlobalBlock.branches}
BIAS_TABLE = "attn.relative_position_bias_table"  # attention=window


def _source_type(branches: set[str], has_tables: bool) -> str:
    if has_tables:
        return "window"
    if "width" in branches:
        return "axial"
    return "sparse_local_global" if "local" in branches else "divided"


def convert_attention(state: StateDict, model: VideoViT, report: LoadReport) -> None:
    """Adapt the blocks of ``state`` to ``model.cfg.attention``, in place.

    A branch the model has and the checkpoint lacks starts as a copy of the block's
    ``norm1`` / ``attn`` with a zero ``<branch>_fc`` (so it adds nothing); a window model's
    relative position bias tables start at zero. So a joint / space_only / mixing checkpoint
    (the same keys) loads into every type: into divided it computes per-slice attention, into
    axial per-column attention (same t and w), into sparse_local_global the stride-2 global
    step alone, and into window joint attention restricted to each (shifted) window, each
    with the checkpoint's weights. Branches or tables the model lacks are left in place, so a
    strict load fails, with a hint naming the type the checkpoint was built for.
    """
    attention = model.cfg.attention
    branches = {p for group in BRANCHES.values() for p in group
                if any(f".{p}_attn." in k for k in state)}
    has_tables = any(k.endswith(BIAS_TABLE) for k in state)
    wanted = set(BRANCHES.get(attention, ()))
    if branches - wanted or (has_tables and attention != "window"):
        source = _source_type(branches, has_tables)
        report.hints.append(f"the checkpoint has {source}-attention blocks (its extra keys are "
                            f"unexpected here): load it into attention={source!r}")
        return
    for prefix in sorted(wanted - branches):
        for i, block in enumerate(model.blocks):
            for name in [k for k in state
                         if k.startswith((f"blocks.{i}.norm1.", f"blocks.{i}.attn."))]:
                rest = name[len(f"blocks.{i}."):]  # norm1.* or attn.*
                state[f"blocks.{i}.{prefix}_{rest}"] = state[name].clone()
            fc = getattr(block, f"{prefix}_fc")
            state[f"blocks.{i}.{prefix}_fc.weight"] = torch.zeros_like(fc.weight)
            state[f"blocks.{i}.{prefix}_fc.bias"] = torch.zeros_like(fc.bias)
        report.notes.append(f"blocks -> {attention}: {prefix}_norm1/{prefix}_attn copied from "
                            f"norm1/attn, {prefix}_fc zero")
    if attention == "window" and not has_tables:
        for i, block in enumerate(model.blocks):
            table = block.attn.relative_position_bias_table
            state[f"blocks.{i}.{BIAS_TABLE}"] = torch.zeros_like(table)
        report.notes.append(f"blocks -> window: every weight kept, {BIAS_TABLE} zero")


def adapt_encoder_state(state: StateDict, model: VideoViT, report: LoadReport) -> StateDict:
    """Convert attention type, resize learned position tables, reconcile head / final norm."""
    cfg = model.cfg
    state = dict(state)
    inflate_tubelet(state, cfg.tubelet_size, report)
    if model.pos_embed.learned:
        report.notes += resize_separable_state(state, "pos_embed.", model.grid)
        if model.pos_embed.time_invariant and state.pop("pos_embed.temporal", None) is not None:
            report.notes.append("dropped pos_embed.temporal (space_only has no time code)")
    convert_attention(state, model, report)
    model_keys = set(model.state_dict())
    if cfg.uses_fc_norm and "fc_norm.weight" not in state and "norm.weight" in state:
        for name in ("norm.weight", "norm.bias"):
            state.pop(name, None)
        report.notes.append("dropped norm.* (per-token norm of a pretraining encoder); fc_norm "
                            "starts fresh, as in official fine-tuning")
    elif cfg.uses_fc_norm and "fc_norm.weight" not in state:
        report.notes.append("fc_norm initialised fresh")
    if not cfg.uses_fc_norm and "fc_norm.weight" in state and "norm.weight" not in state:
        report.hints.append("the checkpoint normalises after pooling (fc_norm): build the model "
                            "with final_norm='fc_norm'")
    head_keys = [k for k in state if k.startswith("head.")]
    if head_keys and ("head.weight" not in model_keys
                      or state["head.weight"].shape != model.head.weight.shape):
        for name in head_keys:
            state.pop(name)
        report.notes.append("dropped the checkpoint's head (no head or a different number of "
                            "classes in the model)")
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


def _load(model: nn.Module, state: StateDict, report: LoadReport, strict: bool,
          fresh_ok=_fresh_ok) -> LoadReport:
    own = model.state_dict()
    for key in list(state):
        if key in own and own[key].shape != state[key].shape:
            report.mismatched.append(
                f"{key} {tuple(state[key].shape)} vs model {tuple(own[key].shape)}")
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
            report.notes.append(
                f"dropped {len(dropped)} decoder tensors (decoder, encoder_to_decoder, mask_token)")
    return state


def load_encoder_weights(model: VideoViT, source: str | Path | Mapping,
                         strict: bool = True) -> LoadReport:
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


def load_pretrain_weights(model: VideoMAEPretrain, source: str | Path | Mapping,
                          strict: bool = True) -> LoadReport:
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
