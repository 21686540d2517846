"""1-D segment geometry shared by the temporal metric, the TAD losses and soft-NMS."""
from __future__ import annotations

import torch
from torch import Tensor


def segment_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise temporal IoU.

    Args:
        a: ``(N, 2)`` segments ``(start, end)``; b: ``(M, 2)``.
    Returns:
        ``(N, M)`` IoU (0 where the union is empty).
    """
    inter = (torch.minimum(a[:, None, 1], b[None, :, 1])
             - torch.maximum(a[:, None, 0], b[None, :, 0])).clamp(min=0)
    union = (a[:, 1] - a[:, 0])[:, None] + (b[:, 1] - b[:, 0])[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny),
                       torch.zeros_like(inter))
