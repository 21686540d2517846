"""Frame-level average precision for spatio-temporal action detection (AVA protocol).

AVA evaluates every annotated keyframe as an image: for each class, detections of that
class are ranked by score over all frames, each detection is matched within its frame,
and AP is the area under the precision envelope. Matching follows the TF object-detection
API's ``PascalDetectionEvaluator`` that the official AVA script uses: a detection is
compared with the ground-truth box it overlaps most (over *all* boxes of the class in the
frame); it is a true positive when that IoU is >= the threshold and that box is not
already taken, else a false positive. (COCO instead takes the best *still unmatched* box;
the two agree unless one detection overlaps two ground-truth boxes.) Classes without
ground truth are not evaluated (NaN) and are left out of the mean.

Inputs use one row per (box, class), like AVA's CSV files: an actor doing two actions is
two rows with the same box.
"""
from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import box_iou

from finetune.detection.ap import average_precision, nanmean

FrameGroundTruth = tuple[Tensor, Tensor]  # boxes (M, 4) xyxy, labels (M,) class index
FrameDetections = tuple[Tensor, Tensor, Tensor]  # boxes (K, 4), labels (K,), scores (K,)


@dataclass
class FrameAPResult:
    per_class: Tensor  # (num_classes,) float64, NaN for classes without ground truth
    mean: float  # mean over evaluated classes (NaN when none)
    iou_threshold: float

    def as_dict(self, class_names: list[str] | None = None) -> dict[str, float]:
        """Flat scalars for logging: ``frame_mAP@0.5`` and ``AP@0.5/<class>``."""
        tag = f"@{self.iou_threshold:g}"
        out = {f"frame_mAP{tag}": self.mean}
        for index, ap in enumerate(self.per_class.tolist()):
            name = class_names[index] if class_names else str(index)
            out[f"AP{tag}/{name}"] = ap
        return out


def match_frame(boxes: Tensor, scores: Tensor, gt_boxes: Tensor, iou_threshold: float) -> Tensor:
    """True/false positive flags for one class in one frame (Pascal/AVA greedy matching).

    Args:
        boxes: ``(K, 4)`` detections; scores ``(K,)``; gt_boxes ``(M, 4)``.
    Returns:
        ``(K,)`` bool in the input order.
    """
    is_tp = torch.zeros(boxes.shape[0], dtype=torch.bool)
    if boxes.shape[0] == 0 or gt_boxes.shape[0] == 0:
        return is_tp
    iou = box_iou(boxes.double(), gt_boxes.double())
    best_iou, best_gt = iou.max(dim=1)
    taken = torch.zeros(gt_boxes.shape[0], dtype=torch.bool)
    for det in torch.argsort(scores.double(), descending=True, stable=True).tolist():
        gt = int(best_gt[det])
        if best_iou[det] >= iou_threshold and not taken[gt]:
            is_tp[det] = True
            taken[gt] = True
    return is_tp


def frame_average_precision(
    ground_truth: Mapping[Hashable, FrameGroundTruth],
    detections: Mapping[Hashable, FrameDetections],
    num_classes: int,
    iou_threshold: float = 0.5,
) -> FrameAPResult:
    """Per-class frame AP and its mean over classes with ground truth.

    Args:
        ground_truth: frame key -> ``(boxes (M, 4), labels (M,))``. Frames listed here are
            the evaluated frames (a frame may have zero boxes).
        detections: frame key -> ``(boxes (K, 4), labels (K,), scores (K,))``. Detections on
            frames absent from ``ground_truth`` are false positives.
        num_classes: labels are ``0..num_classes-1``.
    """
    scores_per_class: list[list[Tensor]] = [[] for _ in range(num_classes)]
    tp_per_class: list[list[Tensor]] = [[] for _ in range(num_classes)]
    num_gt = torch.zeros(num_classes, dtype=torch.long)
    empty_boxes, empty_labels = torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)

    for gt_boxes, gt_labels in ground_truth.values():
        _check_labels(gt_labels, num_classes, "ground truth")
        num_gt += torch.bincount(gt_labels.long(), minlength=num_classes)
    for frame, (boxes, labels, scores) in detections.items():
        _check_labels(labels, num_classes, "detections")
        gt_boxes, gt_labels = ground_truth.get(frame, (empty_boxes, empty_labels))
        for cls in torch.unique(labels).tolist():
            keep = labels == cls
            is_tp = match_frame(boxes[keep], scores[keep], gt_boxes[gt_labels == cls],
                                iou_threshold)
            scores_per_class[cls].append(scores[keep])
            tp_per_class[cls].append(is_tp)

    per_class = torch.full((num_classes,), float("nan"), dtype=torch.float64)
    for cls in range(num_classes):
        if num_gt[cls] == 0:
            continue
        scores = torch.cat(scores_per_class[cls]) if scores_per_class[cls] else torch.zeros(0)
        is_tp = (torch.cat(tp_per_class[cls]) if tp_per_class[cls]
                 else torch.zeros(0, dtype=torch.bool))
        per_class[cls] = average_precision(scores, is_tp, int(num_gt[cls]))
    return FrameAPResult(per_class=per_class, mean=nanmean(per_class), iou_threshold=iou_threshold)


def _check_labels(labels: Tensor, num_classes: int, what: str) -> None:
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"{what} has a class index outside [0, {num_classes}): {labels.tolist()}")
