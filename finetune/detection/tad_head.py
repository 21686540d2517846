"""Temporal action detection head on a sequence of clip features (ActionFormer-style).

A small 1-D feature pyramid (level ``l`` has stride ``2**l`` feature steps) shares one
classification branch (per step and class, sigmoid) and one regression branch (distances
from the step to the action's start and end, in units of the level's stride). Training
targets follow ActionFormer: each ground-truth segment is assigned to the pyramid level
whose regression range holds its larger distance, positives are the steps within
``center_radius`` strides of the segment centre (centre sampling), and where segments
compete the shortest wins. Losses: sigmoid focal loss on all valid steps and the 1-D DIoU
loss on positives, both normalised by the number of positives. Decoding keeps the top
scoring (step, class) pairs per level and applies class-wise soft-NMS.

All positions here are in feature steps (the index into the feature sequence);
``finetune.detection.features.FeatureGrid`` converts them to seconds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from finetune.detection.segments import segment_iou
from runtime.config import help_text


class MaskedConvBlock(nn.Module):
    """Conv1d (k=3, optionally strided) -> LayerNorm over channels -> ReLU; padded steps zeroed."""

    def __init__(self, in_dim: int, out_dim: int, stride: int = 1):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv1d(in_dim, out_dim, kernel_size=3, stride=stride, padding=1)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """``x (B, C, T)``, ``mask (B, T)`` bool -> ``(B, C', T / stride)`` and its mask."""
        if self.stride > 1:
            mask = mask[:, :: self.stride]
        x = self.conv(x)
        x = F.relu(self.norm(x.transpose(1, 2)).transpose(1, 2))
        return x * mask[:, None, :].to(x.dtype), mask


class FeaturePyramid1d(nn.Module):
    """Projection then ``num_levels`` levels, each halving the length (level 0 keeps it)."""

    def __init__(self, in_dim: int, dim: int, num_levels: int):
        super().__init__()
        self.proj = nn.ModuleList([MaskedConvBlock(in_dim, dim), MaskedConvBlock(dim, dim)])
        self.downsample = nn.ModuleList(
            [MaskedConvBlock(dim, dim, stride=2) for _ in range(num_levels - 1)])

    def forward(self, x: Tensor, mask: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        for block in self.proj:
            x, mask = block(x, mask)
        features, masks = [x], [mask]
        for block in self.downsample:
            x, mask = block(x, mask)
            features.append(x)
            masks.append(mask)
        return features, masks


class Scale(nn.Module):
    """A learned scalar per pyramid level for the regression outputs."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


@dataclass
class LevelOutputs:
    """Per pyramid level: ``logits (B, T_l, K)``, ``offsets (B, T_l, 2)`` (>= 0, in strides),
    ``mask (B, T_l)`` bool and the level's ``stride`` in feature steps."""

    logits: Tensor
    offsets: Tensor
    mask: Tensor
    stride: int


class TemporalDetectionHead(nn.Module):
    """Pyramid + shared classification and regression branches.

    Args:
        in_dim: feature channels; dim: pyramid width; num_levels: pyramid levels;
        num_classes: actions; prior_prob: initial foreground probability of the classifier
        (focal-loss initialisation).
    """

    def __init__(self, in_dim: int, num_classes: int, dim: int = 128, num_levels: int = 4,
                 prior_prob: float = 0.01):
        super().__init__()
        self.num_classes = num_classes
        self.num_levels = num_levels
        self.pyramid = FeaturePyramid1d(in_dim, dim, num_levels)
        self.cls_branch = nn.ModuleList([MaskedConvBlock(dim, dim) for _ in range(2)])
        self.reg_branch = nn.ModuleList([MaskedConvBlock(dim, dim) for _ in range(2)])
        self.cls_out = nn.Conv1d(dim, num_classes, kernel_size=3, padding=1)
        self.reg_out = nn.Conv1d(dim, 2, kernel_size=3, padding=1)
        self.scales = nn.ModuleList([Scale() for _ in range(num_levels)])
        nn.init.constant_(self.cls_out.bias, -math.log((1 - prior_prob) / prior_prob))

    @property
    def max_stride(self) -> int:
        return 2 ** (self.num_levels - 1)

    def forward(self, features: Tensor, mask: Tensor) -> list[LevelOutputs]:
        """
        Args:
            features: ``(B, C, T)``, ``T`` a multiple of ``max_stride`` (pad and mask).
            mask: ``(B, T)`` bool, True on real (not padded) steps.
        """
        if features.shape[-1] % self.max_stride:
            raise ValueError(
                f"sequence length {features.shape[-1]} must be a multiple of {self.max_stride}")
        levels, masks = self.pyramid(features * mask[:, None, :].to(features.dtype), mask)
        outputs = []
        for level, (x, level_mask) in enumerate(zip(levels, masks)):
            cls, reg = x, x
            for block in self.cls_branch:
                cls, _ = block(cls, level_mask)
            for block in self.reg_branch:
                reg, _ = block(reg, level_mask)
            logits = self.cls_out(cls).transpose(1, 2)
            offsets = F.relu(self.scales[level](self.reg_out(reg))).transpose(1, 2)
            outputs.append(LevelOutputs(logits, offsets, level_mask, 2**level))
        return outputs


def regression_ranges(num_levels: int) -> list[tuple[float, float]]:
    """ActionFormer's ranges of the larger start/end distance (feature steps) per level:
    (0, 4), (4, 8), (8, 16), ... with the last level unbounded."""
    ranges = []
    for level in range(num_levels):
        low = 0.0 if level == 0 else float(2 ** (level + 1))
        high = math.inf if level == num_levels - 1 else float(2 ** (level + 2))
        ranges.append((low, high))
    return ranges


def assign_targets(
    segments: Tensor, labels: Tensor, num_classes: int, lengths: list[int],
    center_radius: float = 1.5
) -> list[tuple[Tensor, Tensor]]:
    """Targets of one video for every pyramid level.

    Args:
        segments: ``(M, 2)`` ground truth in feature steps; labels ``(M,)``.
        lengths: ``T_l`` per level (level ``l`` has stride ``2**l``).
    Returns:
        per level ``(cls_targets (T_l, K) float 0/1, offsets (T_l, 2) in strides)``.
    """
    out = []
    for level, ((low, high), length) in enumerate(zip(regression_ranges(len(lengths)), lengths)):
        stride = 2**level
        points = torch.arange(length, dtype=torch.float32)[:, None] * stride  # (T_l, 1)
        if segments.shape[0] == 0:
            out.append((torch.zeros(length, num_classes), torch.zeros(length, 2)))
            continue
        start, end = segments[None, :, 0], segments[None, :, 1]
        left, right = points - start, end - points  # (T_l, M)
        centre = 0.5 * (start + end)
        inside_centre = torch.minimum(
            points - torch.maximum(centre - center_radius * stride, start),
            torch.minimum(centre + center_radius * stride, end) - points,
        ) > 0
        reach = torch.maximum(left, right)
        in_range = (reach >= low) & (reach <= high)
        seg_len = (end - start).expand(length, -1).masked_fill(~(inside_centre & in_range),
                                                               math.inf)
        shortest, which = seg_len.min(dim=1)
        # ties: multi-label
        winners = (seg_len <= shortest[:, None] + 1e-3) & torch.isfinite(seg_len)
        cls_targets = (winners.float() @ F.one_hot(labels, num_classes).float()).clamp(max=1)
        offsets = torch.stack([left, right], dim=-1)[torch.arange(length), which] / stride
        out.append((cls_targets, offsets * torch.isfinite(shortest)[:, None]))
    return out


def diou_loss_1d(pred: Tensor, target: Tensor, eps: float = 1e-8) -> Tensor:
    """Distance-IoU loss of segments given as (left, right) distances from the same point.

    Args:
        pred, target: ``(N, 2)`` non-negative distances.
    Returns:
        ``(N,)`` ``1 - IoU + (centre distance / enclosing length)^2``.
    """
    pl, pr = pred.unbind(-1)
    tl, tr = target.unbind(-1)
    inter = torch.minimum(pl, tl) + torch.minimum(pr, tr)
    union = pl + pr + tl + tr - inter
    iou = inter / union.clamp(min=eps)
    enclosing = torch.maximum(pl, tl) + torch.maximum(pr, tr)
    centre_gap = 0.5 * ((pr - pl) - (tr - tl))
    return 1.0 - iou + (centre_gap / enclosing.clamp(min=eps)) ** 2


def detection_loss(
    outputs: list[LevelOutputs], targets: list[list[tuple[Tensor, Tensor]]],
    label_smoothing: float = 0.0
) -> dict[str, Tensor]:
    """Focal + DIoU loss of a batch.

    Args:
        outputs: the head's per-level outputs.
        targets: per video, per level ``(cls_targets, offsets)`` from :func:`assign_targets`.
    Returns:
        ``{"loss", "cls_loss", "reg_loss", "num_pos"}``.
    """
    logits = torch.cat([o.logits for o in outputs], dim=1)  # (B, sum T_l, K)
    offsets = torch.cat([o.offsets for o in outputs], dim=1)
    mask = torch.cat([o.mask for o in outputs], dim=1)
    gt_cls = torch.stack([torch.cat([c for c, _ in video]) for video in targets]).to(logits)
    gt_offsets = torch.stack([torch.cat([r for _, r in video]) for video in targets]).to(offsets)
    positive = (gt_cls.sum(-1) > 0) & mask
    num_pos = positive.sum().clamp(min=1).to(logits)
    smoothed = gt_cls[mask] * (1 - label_smoothing) + label_smoothing / (logits.shape[-1] + 1)
    cls_loss = sigmoid_focal_loss(logits[mask], smoothed, reduction="sum") / num_pos
    reg_loss = diou_loss_1d(offsets[positive], gt_offsets[positive]).sum() / num_pos
    return {"loss": cls_loss + reg_loss, "cls_loss": cls_loss, "reg_loss": reg_loss,
            "num_pos": positive.sum()}


@dataclass
class DecodeConfig:
    """Decoding and soft-NMS settings (defaults: ActionFormer's THUMOS'14 config)."""

    score_threshold: float = field(
        default=0.001, metadata=help_text("keep (step, class) candidates above this score"))
    top_k: int = field(default=2000, metadata=help_text("candidates per pyramid level before NMS"))
    min_length: float = field(default=0.05,
                              metadata=help_text("drop segments shorter than this (feature steps)"))
    nms_sigma: float = field(
        default=0.5, metadata=help_text("Gaussian soft-NMS: scores decay by exp(-IoU^2 / sigma)"))
    nms_min_score: float = field(
        default=0.001, metadata=help_text("soft-NMS drops segments whose score falls below this"))
    max_segments: int = field(default=200, metadata=help_text("segments kept per video"))


def decode(outputs: list[LevelOutputs], index: int,
           cfg: DecodeConfig | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Detections of video ``index`` of the batch, in feature steps.

    Returns:
        ``segments (K, 2)``, ``scores (K,)``, ``labels (K,)`` after soft-NMS, best first.
    """
    cfg = cfg or DecodeConfig()
    all_segments, all_scores, all_labels = [], [], []
    for level in outputs:
        valid = level.mask[index]
        probs = level.logits[index][valid].sigmoid().flatten()  # (T_l * K,)
        offsets = level.offsets[index][valid]
        keep = torch.nonzero(probs > cfg.score_threshold).squeeze(1)
        keep = keep[torch.argsort(probs[keep], descending=True)[: cfg.top_k]]
        step, label = keep // level.logits.shape[-1], keep % level.logits.shape[-1]
        centre = torch.nonzero(valid).squeeze(1)[step].to(offsets.dtype) * level.stride
        segments = torch.stack([centre - offsets[step, 0] * level.stride,
                                centre + offsets[step, 1] * level.stride], dim=1)
        long_enough = segments[:, 1] - segments[:, 0] > cfg.min_length
        all_segments.append(segments[long_enough])
        all_scores.append(probs[keep][long_enough])
        all_labels.append(label[long_enough])
    return soft_nms(
        torch.cat(all_segments), torch.cat(all_scores), torch.cat(all_labels),
        sigma=cfg.nms_sigma, min_score=cfg.nms_min_score, max_segments=cfg.max_segments,
    )


def soft_nms(
    segments: Tensor, scores: Tensor, labels: Tensor, sigma: float = 0.5, min_score: float = 0.001,
    max_segments: int = 200
) -> tuple[Tensor, Tensor, Tensor]:
    """Class-wise Gaussian soft-NMS (Bodla et al. 2017): each pick decays the scores of the
    remaining segments of its class by ``exp(-IoU^2 / sigma)``; scores below ``min_score``
    are dropped. Returns at most ``max_segments`` segments, best first.

    Args:
        segments: ``(N, 2)``; scores ``(N,)``; labels ``(N,)``.
    """
    kept_segments, kept_scores, kept_labels = [], [], []
    for cls in torch.unique(labels).tolist():
        pool_segments = segments[labels == cls]
        pool_scores = scores[labels == cls].clone()
        while pool_scores.numel():
            best = int(torch.argmax(pool_scores))
            kept_segments.append(pool_segments[best])
            kept_scores.append(pool_scores[best])
            kept_labels.append(cls)
            rest = torch.arange(pool_scores.numel()) != best
            iou = segment_iou(pool_segments[best : best + 1], pool_segments[rest])[0]
            pool_segments = pool_segments[rest]
            pool_scores = pool_scores[rest] * torch.exp(-(iou**2) / sigma)
            alive = pool_scores >= min_score
            pool_segments, pool_scores = pool_segments[alive], pool_scores[alive]
    if not kept_scores:
        return segments.new_zeros(0, 2), scores.new_zeros(0), labels.new_zeros(0)
    out_scores = torch.stack(kept_scores)
    order = torch.argsort(out_scores, descending=True, stable=True)[:max_segments]
    return (torch.stack(kept_segments)[order], out_scores[order],
            torch.tensor(kept_labels, dtype=labels.dtype)[order])
