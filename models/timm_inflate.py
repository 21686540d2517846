"""timm image ViT -> video encoder: I3D inflation of an image checkpoint's keys."""
from __future__ import annotations

import math
import re

import torch

from .checkpoint import StateDict


def inflate_timm(state: StateDict, grid: tuple[int, int, int],
                 tubelet: int) -> tuple[StateDict, list[str]]:
    """timm image ViT keys -> video encoder keys (I3D inflation of the patch kernel).

    The 2-D kernel is repeated over the tubelet and divided by its length, so a static clip
    embeds like the image; timm's position table becomes ``pos_embed.spatial`` with a zero
    ``pos_embed.temporal``; ``qkv.bias`` is split into ``q_bias`` / ``v_bias`` (dropping the key
    bias is exact); ``ls1`` / ``ls2`` become ``gamma_1`` / ``gamma_2``; prefix tokens are dropped.
    """
    out: StateDict = {}
    notes = []
    num_prefix = int("cls_token" in state) + (state["reg_token"].shape[1]
                                              if "reg_token" in state else 0)
    for key, value in state.items():
        if key in ("cls_token", "reg_token"):
            notes.append(f"dropped {key} (this encoder has no prefix tokens)")
        elif key == "patch_embed.proj.weight":
            out[key] = value.unsqueeze(2).repeat(1, 1, tubelet, 1, 1) / tubelet
            notes.append(
                f"inflated patch_embed.proj.weight over {tubelet} frames (repeated, divided by "
                f"{tubelet})")
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
        notes.append("split attn.qkv.bias into q_bias / v_bias (key bias dropped: softmax is "
                     "invariant to it)")
    return out, notes
