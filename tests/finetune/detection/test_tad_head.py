"""TAD head: target assignment, DIoU, soft-NMS, decoding and padding masks."""
import math

import pytest
import torch

from finetune.detection.segments import segment_iou
from finetune.detection.tad_head import (
    DecodeConfig,
    LevelOutputs,
    TemporalDetectionHead,
    assign_targets,
    decode,
    detection_loss,
    diou_loss_1d,
    regression_ranges,
    soft_nms,
)


def test_regression_ranges_match_actionformer():
    assert regression_ranges(6) == [(0, 4), (4, 8), (8, 16), (16, 32), (32, 64), (64, math.inf)]
    assert regression_ranges(1) == [(0, math.inf)]


def test_targets_of_a_hand_made_segment():
    # Segment [10, 20] (centre 15), class 1, 3 levels of a 32-step sequence.
    # Level 0 (stride 1): centre window (13.5, 16.5) -> steps 14..16, but their larger
    #   distance (>= 5) is outside the level's range [0, 4]: no positives.
    # Level 1 (stride 2): window (12, 18) -> points 14, 16 (steps 7, 8), reach 6 in [4, 8]:
    #   offsets (4, 6) / 2 and (6, 4) / 2.
    # Level 2 (stride 4): window (9, 21) clipped to (10, 20) -> point 12 (step 3), reach 8 in
    #   [8, inf): offsets (2, 8) / 4. Point 16 has reach 6: not this level.
    targets = assign_targets(torch.tensor([[10.0, 20.0]]), torch.tensor([1]), num_classes=2,
                             lengths=[32, 16, 8])
    positives = [torch.nonzero(cls.sum(1)).squeeze(1).tolist() for cls, _ in targets]
    assert positives == [[], [7, 8], [3]]
    assert targets[1][0][7].tolist() == [0.0, 1.0]
    assert targets[1][1][7].tolist() == [2.0, 3.0] and targets[1][1][8].tolist() == [3.0, 2.0]
    assert targets[2][1][3].tolist() == [0.5, 2.0]
    assert targets[0][1].abs().sum() == 0


def test_shortest_segment_wins_and_equal_lengths_are_multi_label():
    segments = torch.tensor([[0.0, 6.0], [2.0, 4.0], [2.0, 4.0]])
    cls, _ = assign_targets(segments, torch.tensor([0, 1, 2]), 3, lengths=[8])[0]
    # Step 3 is in the centre windows of all three; the two short ones tie and both win.
    assert cls[3].tolist() == [0.0, 1.0, 1.0]
    empty = assign_targets(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), 3, lengths=[8, 4])
    assert all(c.sum() == 0 for c, _ in empty)


def test_diou_loss_1d():
    same = torch.tensor([[1.0, 2.0]])
    assert diou_loss_1d(same, same).item() == pytest.approx(0.0)
    # Disjoint (2, 0) vs (0, 2): IoU 0, centres 2 apart, enclosing length 4 -> 1 + (2/4)^2.
    loss = diou_loss_1d(torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]]))
    assert loss.item() == pytest.approx(1.25)
    # The IoU part equals the IoU of the absolute segments around a common point.
    pred, target = torch.tensor([[1.0, 3.0]]), torch.tensor([[2.0, 1.0]])
    iou = segment_iou(torch.tensor([[-1.0, 3.0]]), torch.tensor([[-2.0, 1.0]])).item()
    gap = 0.5 * ((3 - 1) - (1 - 2))
    assert diou_loss_1d(pred, target).item() == pytest.approx(1 - iou + (gap / 5) ** 2)


def test_soft_nms_decays_overlaps_of_the_same_class_only():
    segments = torch.tensor([[0.0, 10.0], [0.0, 10.0], [0.0, 10.0], [20.0, 30.0]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    labels = torch.tensor([0, 0, 1, 0])
    out_segments, out_scores, out_labels = soft_nms(segments, scores, labels, sigma=0.5)
    # Duplicate of the 0.9 pick: 0.8 * exp(-1 / 0.5); other class and disjoint untouched.
    assert out_scores.tolist() == pytest.approx([0.9, 0.7, 0.6, 0.8 * math.exp(-2)])
    assert out_labels.tolist() == [0, 1, 0, 0]
    assert out_segments[3].tolist() == [0.0, 10.0]
    _, kept, _ = soft_nms(segments, scores, labels, min_score=0.2, max_segments=2)
    assert kept.tolist() == pytest.approx([0.9, 0.7])
    empty = soft_nms(torch.zeros(0, 2), torch.zeros(0), torch.zeros(0, dtype=torch.long))
    assert [t.shape[0] for t in empty] == [0, 0, 0]


def test_decode_turns_peaks_into_segments():
    def level(length, stride, peaks):
        logits = torch.full((1, length, 2), -20.0)
        offsets = torch.zeros(1, length, 2)
        for step, cls, left, right in peaks:
            logits[0, step, cls] = 2.0
            offsets[0, step] = torch.tensor([left, right])
        return LevelOutputs(logits, offsets, torch.ones(1, length, dtype=torch.bool), stride)

    # Level 0: step 5, class 0, offsets (2, 3) -> [3, 8]. Level 1: step 8 (point 16),
    # class 1, offsets (1.5, 2) strides -> [13, 20].
    outputs = [level(32, 1, [(5, 0, 2.0, 3.0)]), level(16, 2, [(8, 1, 1.5, 2.0)])]
    segments, scores, labels = decode(outputs, 0, DecodeConfig(score_threshold=0.5))
    assert segments.tolist() == [[3.0, 8.0], [13.0, 20.0]]
    assert scores.tolist() == pytest.approx([torch.sigmoid(torch.tensor(2.0)).item()] * 2)
    assert labels.tolist() == [0, 1]


def test_padding_does_not_change_the_real_steps():
    torch.manual_seed(0)
    head = TemporalDetectionHead(in_dim=6, num_classes=3, dim=16, num_levels=3).eval()
    short = torch.randn(1, 6, 16)
    alone = head(short, torch.ones(1, 16, dtype=torch.bool))
    batch = torch.cat([torch.cat([short, torch.randn(1, 6, 16)], dim=2), torch.randn(1, 6, 32)])
    mask = torch.ones(2, 32, dtype=torch.bool)
    mask[0, 16:] = False
    padded = head(batch, mask)
    for a, p in zip(alone, padded):
        length = a.logits.shape[1]
        assert torch.allclose(a.logits[0], p.logits[0, :length], atol=1e-5)
        assert torch.allclose(a.offsets[0], p.offsets[0, :length], atol=1e-5)
        assert not p.mask[0, length:].any()
    with pytest.raises(ValueError, match="multiple of 4"):
        head(torch.randn(1, 6, 18), torch.ones(1, 18, dtype=torch.bool))


def test_loss_ignores_padding_and_trains_towards_the_targets():
    torch.manual_seed(0)
    head = TemporalDetectionHead(in_dim=4, num_classes=2, dim=16, num_levels=2)
    # Class 1 is "on" where feature channel 0 is high: steps 8..15 of a 32-step sequence.
    features = torch.zeros(1, 4, 32)
    features[0, 0, 8:16] = 1.0
    mask = torch.ones(1, 32, dtype=torch.bool)
    targets = [assign_targets(torch.tensor([[8.0, 15.0]]), torch.tensor([1]), 2, lengths=[32, 16])]
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        losses = detection_loss(head(features, mask), targets)
        first = first if first is not None else losses["loss"].item()
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
    assert losses["num_pos"] > 0
    assert losses["loss"].item() < 0.3 * first
    segments, scores, labels = decode(head.eval()(features, mask), 0)
    assert labels[0] == 1
    assert segment_iou(segments[:1], torch.tensor([[8.0, 15.0]])).item() > 0.7
