"""Actor-level action classification on an encoder feature grid (VideoMAE's AVA head).

The encoder's last feature map ``(B, C, T', H', W')`` is averaged over time, each actor box
is pooled with RoIAlign (7x7 bins, sampling adaptive, pixel-aligned as detectron2's
ROIAlignV2) followed by a max over the bins, then dropout and one linear layer give one
logit per action (multi-label, sigmoid). Boxes are normalised ``x1, y1, x2, y2``; scaling
them by the grid size is the same as pixel boxes at ``spatial_scale = 1 / patch_size``
(stride 16 for the official models), without having to know the input resolution.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import Tensor, nn
from torchvision.ops import roi_align


class RoIActionHead(nn.Module):
    """Time mean -> RoIAlign -> max pool -> dropout -> Linear.

    Args:
        in_dim: channels ``C`` of the feature grid.
        num_classes: actions (multi-label).
        roi_size: RoIAlign output bins per side.
        dropout: dropout before the classifier (0.5 in VideoMAE's AVA config).
    """

    def __init__(self, in_dim: int, num_classes: int, roi_size: int = 7, dropout: float = 0.5):
        super().__init__()
        self.roi_size = roi_size
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(in_dim, num_classes)
        trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)

    def forward(self, grid: Tensor, boxes: list[Tensor]) -> Tensor:
        """
        Args:
            grid: ``(B, C, T', H', W')`` encoder features.
            boxes: ``B`` tensors ``(K_b, 4)`` of normalised boxes, one list entry per clip.
        Returns:
            ``(sum K_b, num_classes)`` logits, boxes in batch order.
        """
        pooled = self.pool(grid, boxes)
        return self.fc(self.drop(pooled))

    def pool(self, grid: Tensor, boxes: list[Tensor]) -> Tensor:
        """``(sum K_b, C)`` max-pooled RoI features."""
        if len(boxes) != grid.shape[0]:
            raise ValueError(f"got {len(boxes)} box lists for a batch of {grid.shape[0]} clips")
        fmap = grid.mean(dim=2)  # (B, C, H', W')
        height, width = fmap.shape[-2:]
        scale = fmap.new_tensor([width, height, width, height])
        rois = [b.to(fmap.dtype) * scale for b in boxes]
        regions = roi_align(fmap, rois, output_size=self.roi_size, spatial_scale=1.0,
                            sampling_ratio=0, aligned=True)
        return F.adaptive_max_pool2d(regions, 1).flatten(1)


def jitter_boxes(boxes: Tensor, magnitude: float,
                 generator: torch.Generator | None = None) -> Tensor:
    """Move each side of each box by up to ``magnitude`` x the box's width/height.

    Args:
        boxes: ``(K, 4)`` normalised ``x1, y1, x2, y2``.
    Returns:
        ``(K, 4)`` boxes, clipped to [0, 1] and at least 1% of the frame wide and high.
    """
    if magnitude <= 0 or boxes.numel() == 0:
        return boxes
    size = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    noise = (torch.rand(boxes.shape, generator=generator) * 2 - 1).to(boxes)
    out = (boxes + noise * magnitude * size).clamp(0, 1)
    low = torch.minimum(out[:, :2], out[:, 2:]).clamp(max=0.99)
    high = torch.maximum(torch.maximum(out[:, :2], out[:, 2:]), low + 0.01)
    return torch.cat([low, high], dim=1)


class ActionDetector(nn.Module):
    """A video encoder with an actor-level head; layer ids extend the encoder's for layer decay
    (the encoder's ``no_weight_decay()`` is found by ``runtime.optim.param_groups`` itself).

    Args:
        encoder: a ``models.VideoViT`` (any attention type) with
            ``forward_features(x, return_grid=True) -> (B, C, T', H', W')``.
        head: the box classifier.
    """

    def __init__(self, encoder: nn.Module, head: RoIActionHead):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, video: Tensor, boxes: list[Tensor]) -> Tensor:
        """``video (B, C, T, H, W)``, ``boxes`` B x ``(K_b, 4)`` -> logits ``(sum K_b, K)``."""
        return self.head(self.encoder.forward_features(video, return_grid=True), boxes)

    def num_layers(self) -> int:
        return self.encoder.num_layers()

    def get_layer_id(self, name: str) -> int:
        """Encoder parameters keep the encoder's ids; the head is the last layer."""
        if name.startswith("encoder."):
            return self.encoder.get_layer_id(name[len("encoder."):])
        return self.num_layers() - 1
