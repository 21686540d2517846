"""Average precision shared by the frame (AVA) and segment (ActivityNet/THUMOS) metrics.

Both protocols rank detections by score, label each one true or false positive by a
protocol-specific matching, and take the area under the precision envelope ("all-point"
VOC interpolation, as in the TF object-detection API used by AVA and in ActivityNet's
``interpolated_prec_rec``). Only the matching differs, so only the matching lives in
``ava_metric`` / ``tad_metric``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def average_precision(scores: Tensor, is_true_positive: Tensor, num_ground_truth: int) -> float:
    """Area under the monotone precision envelope of a ranked detection list.

    Args:
        scores: ``(K,)`` detection scores; ties keep input order (stable sort).
        is_true_positive: ``(K,)`` bool, the protocol's matching result per detection.
        num_ground_truth: positives to be found; 0 gives NaN (class not evaluated).
    """
    if num_ground_truth == 0:
        return math.nan
    if scores.numel() == 0:
        return 0.0
    order = torch.argsort(scores.double(), descending=True, stable=True)
    tp = is_true_positive[order].double()
    cum_tp = torch.cumsum(tp, 0)
    cum_fp = torch.cumsum(1.0 - tp, 0)
    zero, one = tp.new_zeros(1), tp.new_ones(1)
    recall = torch.cat([zero, cum_tp / num_ground_truth, one])
    precision = torch.cat([zero, cum_tp / (cum_tp + cum_fp), zero])
    # Envelope: precision at recall r is the best precision at any recall >= r.
    envelope = torch.flip(torch.cummax(torch.flip(precision, [0]), 0).values, [0])
    steps = torch.nonzero(recall[1:] != recall[:-1]).squeeze(1) + 1
    return float(((recall[steps] - recall[steps - 1]) * envelope[steps]).sum())


def nanmean(values: Tensor) -> float:
    """Mean over the evaluated (non-NaN) entries; NaN when none is evaluated."""
    kept = values[~torch.isnan(values)]
    return float(kept.mean()) if kept.numel() else math.nan
