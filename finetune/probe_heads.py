"""Probe heads on frozen encoder features, and a grid of them trained together.

- ``LinearProbe``: mean-pooled tokens ``(B, D)`` -> BatchNorm (no affine) -> Linear (MAE).
- ``AttentiveProbe``: all tokens ``(B, N, D)`` -> ``blocks - 1`` self-attention blocks ->
  cross-attention pooling with one learned query -> LayerNorm -> Linear (V-JEPA 2 with
  ``blocks=4``; V-JEPA with ``blocks=1``).
- ``ProbeGrid``: one head per (lr, weight decay) pair, all built from the same seed and fed
  the same batches; each head's AdamW parameter groups carry its own lr and weight decay.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as torch_dist
from timm.layers import AttentionPoolLatent, trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from runtime.dist import get_world_size, is_initialized
from runtime.optim import WarmupCosine, param_groups


class BatchNormAcrossRanks(nn.BatchNorm1d):
    """``BatchNorm1d`` whose training statistics are those of the whole batch over every
    rank (the online probe splits a batch among ranks); one process: plain ``BatchNorm1d``.
    Gradients flow through the all-reduced statistics, so the result equals one rank with
    the whole batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_initialized() and get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        count = all_reduce(torch.tensor([float(len(x))], dtype=x.dtype, device=x.device))
        sums = all_reduce(torch.stack([x.sum(0), (x * x).sum(0)]), op=torch_dist.ReduceOp.SUM)
        mean = sums[0] / count
        var = (sums[1] / count - mean * mean).clamp(min=0)
        with torch.no_grad():
            unbiased = var * count / (count - 1).clamp(min=1)
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(unbiased, self.momentum)
            self.num_batches_tracked += 1
        return (x - mean) / torch.sqrt(var + self.eps)


class LinearProbe(nn.Module):
    """features ``(B, D)`` -> logits ``(B, K)``: BatchNorm without affine, then Linear (MAE)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = BatchNormAcrossRanks(dim, affine=False, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(features))


class AttentiveProbe(nn.Module):
    """tokens ``(B, N, D)`` -> logits ``(B, K)``.

    ``blocks - 1`` pre-norm self-attention blocks (qkv bias, MLP ratio 4; V-JEPA 2's init:
    trunc_normal(.02) weights, output projections divided by sqrt(2 x layer)) and a
    LayerNorm over the tokens, then cross-attention pooling with one learned query and an
    MLP (``timm.layers.AttentionPoolLatent``), LayerNorm, Linear. ``blocks=1`` is the single
    cross-attention layer of V-JEPA.
    """

    def __init__(self, dim: int, num_classes: int, num_heads: int, blocks: int = 1,
                 mlp_ratio: float = 4.0):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, qkv_bias=True)
                                    for _ in range(blocks - 1))
        self.blocks_norm = nn.LayerNorm(dim) if blocks > 1 else nn.Identity()
        for layer, block in enumerate(self.blocks, start=1):
            for module in block.modules():
                if isinstance(module, nn.Linear):
                    trunc_normal_(module.weight, std=0.02)
                    nn.init.zeros_(module.bias)
            with torch.no_grad():
                block.attn.proj.weight.div_(math.sqrt(2.0 * layer))
                block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer))
        self.pool = AttentionPoolLatent(dim, num_heads=num_heads, mlp_ratio=mlp_ratio,
                                        norm_layer=nn.LayerNorm)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            tokens = block(tokens)
        return self.head(self.norm(self.pool(self.blocks_norm(tokens))))


def build_probe(kind: str, dim: int, num_classes: int, num_heads: int,
                blocks: int = 1) -> nn.Module:
    if kind == "linear":
        return LinearProbe(dim, num_classes)
    if kind == "attentive":
        return AttentiveProbe(dim, num_classes, num_heads, blocks)
    raise ValueError(f"no trained probe of kind {kind!r}")


class ProbeGrid(nn.Module):
    """Probe heads trained side by side, one per ``(lr, weight_decay)`` of ``grid``.

    Every head is built after seeding torch with ``seed``, so each starts from the weights a
    single-head run with that seed starts from; they differ only in lr and weight decay.
    ``forward(x)`` gives ``(H, B, K)`` logits; the heads share no parameters, so the sum of
    their losses gives each head exactly its own gradient.
    """

    def __init__(self, grid: list[tuple[float, float]], seed: int, **probe_args):
        super().__init__()
        self.grid = list(grid)
        heads = []
        for _ in self.grid:
            torch.manual_seed(seed)
            heads.append(build_probe(**probe_args))
        self.heads = nn.ModuleList(heads)

    def __len__(self) -> int:
        return len(self.heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([head(x) for head in self.heads])

    def optimizer(self) -> torch.optim.AdamW:
        """AdamW (0.9, 0.999); head ``h``'s groups carry ``head=h`` and its weight decay
        (none on biases and norms, as ``runtime.optim.param_groups``)."""
        groups = []
        for index, (head, (lr, weight_decay)) in enumerate(zip(self.heads, self.grid)):
            for group in param_groups(head, weight_decay):
                groups.append({**group, "head": index, "lr": lr})
        return torch.optim.AdamW(groups, betas=(0.9, 0.999))

    def schedules(self, min_lr: float, warmup_steps: int, total_steps: int) -> list[WarmupCosine]:
        return [WarmupCosine(lr, min_lr, warmup_steps, total_steps) for lr, _ in self.grid]


def set_grid_lr(optimizer: torch.optim.Optimizer, schedules: list[WarmupCosine],
                step: int) -> None:
    """Each group's lr from its own head's schedule at ``step`` (times its ``lr_scale``)."""
    for group in optimizer.param_groups:
        group["lr"] = schedules[group["head"]].lr_at(step) * group.get("lr_scale", 1.0)
