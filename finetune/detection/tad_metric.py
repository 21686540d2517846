"""Segment mAP for temporal action detection (ActivityNet / THUMOS protocol).

For each class and tIoU threshold, predictions are ranked by score over all videos; each
prediction takes the ground-truth segment of its video and class with the highest tIoU
among those not yet taken (ActivityNet's ``compute_average_precision_detection``, also
used by ActionFormer for THUMOS'14). It is a true positive when that tIoU is >= the
threshold. AP is the area under the precision envelope; the mAP at a threshold averages
the classes that have ground truth, and the reported average is the mean over thresholds.
"""
from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from finetune.detection.ap import average_precision, nanmean
from finetune.detection.segments import segment_iou

THUMOS_TIOU_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)

VideoGroundTruth = tuple[Tensor, Tensor]  # segments (M, 2) seconds, labels (M,)
VideoPredictions = tuple[Tensor, Tensor, Tensor]  # segments (K, 2), labels (K,), scores (K,)


@dataclass
class SegmentAPResult:
    per_class: Tensor  # (num_thresholds, num_classes) float64, NaN without ground truth
    mean_per_threshold: list[float]
    average: float  # mean of mean_per_threshold
    tiou_thresholds: tuple[float, ...]

    def as_dict(self) -> dict[str, float]:
        """Flat scalars: ``mAP@0.3`` ... ``mAP@0.7`` and ``average_mAP``."""
        out = {f"mAP@{thr:g}": value
               for thr, value in zip(self.tiou_thresholds, self.mean_per_threshold)}
        out["average_mAP"] = self.average
        return out


def match_video(segments: Tensor, gt_segments: Tensor, tiou_thresholds: Sequence[float]) -> Tensor:
    """True-positive flags of score-sorted predictions of one class in one video.

    Args:
        segments: ``(K, 2)`` predictions, already sorted by descending score.
        gt_segments: ``(M, 2)``.
    Returns:
        ``(num_thresholds, K)`` bool.
    """
    is_tp = torch.zeros(len(tiou_thresholds), segments.shape[0], dtype=torch.bool)
    if segments.shape[0] == 0 or gt_segments.shape[0] == 0:
        return is_tp
    tiou = segment_iou(segments.double(), gt_segments.double()).tolist()
    for t, threshold in enumerate(tiou_thresholds):
        taken = [False] * gt_segments.shape[0]
        for k, row in enumerate(tiou):
            candidates = [(iou, m) for m, iou in enumerate(row)
                          if iou >= threshold and not taken[m]]
            if candidates:
                _, best = max(candidates, key=lambda pair: pair[0])
                taken[best] = True
                is_tp[t, k] = True
    return is_tp


def segment_mean_average_precision(
    ground_truth: Mapping[Hashable, VideoGroundTruth],
    predictions: Mapping[Hashable, VideoPredictions],
    num_classes: int,
    tiou_thresholds: Sequence[float] = THUMOS_TIOU_THRESHOLDS,
) -> SegmentAPResult:
    """AP per (threshold, class), mAP per threshold and their average.

    Args:
        ground_truth: video -> ``(segments (M, 2), labels (M,))`` in seconds.
        predictions: video -> ``(segments (K, 2), labels (K,), scores (K,))``; predictions
            on videos without ground truth are false positives.
    """
    thresholds = tuple(float(t) for t in tiou_thresholds)
    scores_per_class: list[list[Tensor]] = [[] for _ in range(num_classes)]
    tp_per_class: list[list[Tensor]] = [[] for _ in range(num_classes)]
    num_gt = torch.zeros(num_classes, dtype=torch.long)
    empty = (torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))

    for segments, labels in ground_truth.values():
        _check(segments, labels, num_classes, "ground truth")
        num_gt += torch.bincount(labels.long(), minlength=num_classes)
    for video, (segments, labels, scores) in predictions.items():
        _check(segments, labels, num_classes, "predictions")
        gt_segments, gt_labels = ground_truth.get(video, empty)
        for cls in torch.unique(labels).tolist():
            keep = torch.nonzero(labels == cls).squeeze(1)
            keep = keep[torch.argsort(scores[keep].double(), descending=True, stable=True)]
            scores_per_class[cls].append(scores[keep])
            tp_per_class[cls].append(match_video(segments[keep], gt_segments[gt_labels == cls],
                                                 thresholds))

    per_class = torch.full((len(thresholds), num_classes), float("nan"), dtype=torch.float64)
    for cls in range(num_classes):
        if num_gt[cls] == 0:
            continue
        scores = torch.cat(scores_per_class[cls]) if scores_per_class[cls] else torch.zeros(0)
        is_tp = (
            torch.cat(tp_per_class[cls], dim=1)
            if tp_per_class[cls]
            else torch.zeros(len(thresholds), 0, dtype=torch.bool)
        )
        for t in range(len(thresholds)):
            per_class[t, cls] = average_precision(scores, is_tp[t], int(num_gt[cls]))
    means = [nanmean(per_class[t]) for t in range(len(thresholds))]
    return SegmentAPResult(
        per_class=per_class,
        mean_per_threshold=means,
        average=nanmean(torch.tensor(means, dtype=torch.float64)),
        tiou_thresholds=thresholds,
    )


def _check(segments: Tensor, labels: Tensor, num_classes: int, what: str) -> None:
    if segments.ndim != 2 or segments.shape[-1] != 2 or segments.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{what}: expected segments (K, 2) and labels (K,), got {tuple(segments.shape)} and "
            f"{tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"{what} has a class index outside [0, {num_classes}): {labels.tolist()}")
