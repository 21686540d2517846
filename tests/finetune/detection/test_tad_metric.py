"""Segment mAP (ActivityNet/THUMOS protocol) on hand-made segments worked out by hand."""
import math

import pytest
import torch

from finetune.detection.segments import segment_iou
from finetune.detection.tad_metric import THUMOS_TIOU_THRESHOLDS, segment_mean_average_precision


def gt(segments, labels):
    return (torch.tensor(segments, dtype=torch.float32).reshape(-1, 2),
            torch.tensor(labels, dtype=torch.long))


def pred(segments, labels, scores):
    return (*gt(segments, labels), torch.tensor(scores, dtype=torch.float32))


def evaluate(ground_truth, predictions, num_classes=1):
    return segment_mean_average_precision(ground_truth, predictions, num_classes)


def test_segment_iou():
    iou = segment_iou(torch.tensor([[0.0, 10.0], [5.0, 5.0]]),
                      torch.tensor([[5.0, 15.0], [20.0, 30.0]]))
    assert torch.allclose(iou, torch.tensor([[5 / 15, 0.0], [0.0, 0.0]]))


def test_perfect_predictions():
    ground_truth = {"a": gt([[0, 10], [20, 30]], [0, 1]), "b": gt([[3, 4]], [0])}
    predictions = {"a": pred([[20, 30], [0, 10]], [1, 0], [0.5, 0.4]),
                   "b": pred([[3, 4]], [0], [0.1])}
    result = evaluate(ground_truth, predictions, num_classes=2)
    assert result.mean_per_threshold == pytest.approx([1.0] * 5)
    assert result.as_dict() == pytest.approx({**{f"mAP@{t:g}": 1.0 for t in THUMOS_TIOU_THRESHOLDS},
                                              "average_mAP": 1.0})


def test_half_right():
    # Ranked: [0,10] (TP), [40,50] (FP); 2 ground-truth segments: AP = 1/2 * 1 = 0.5.
    ground_truth = {"a": gt([[0, 10], [20, 30]], [0, 0])}
    predictions = {"a": pred([[0, 10], [40, 50]], [0, 0], [0.9, 0.8])}
    assert evaluate(ground_truth, predictions).average == pytest.approx(0.5)


def test_precision_changes_with_the_tiou_threshold():
    # [0,6] against [0,10]: tIoU 0.6, a TP at 0.3..0.6 and a FP at 0.7.
    # APs [1, 1, 1, 1, 0], average 0.8.
    result = evaluate({"a": gt([[0, 10]], [0])}, {"a": pred([[0, 6]], [0], [0.9])})
    assert result.mean_per_threshold == pytest.approx([1, 1, 1, 1, 0])
    assert result.average == pytest.approx(0.8)


def test_duplicates_are_false_positives():
    # Ranked: [0,10] TP, [1,10] duplicate of the taken segment (FP), [20,30] TP.
    # Precision [1, 1/2, 2/3], recall [1/2, 1/2, 1]: AP = 1/2 + 1/2 * 2/3 = 5/6 everywhere.
    ground_truth = {"a": gt([[0, 10], [20, 30]], [0, 0])}
    predictions = {"a": pred([[0, 10], [1, 10], [20, 30]], [0, 0, 0], [0.9, 0.8, 0.7])}
    assert evaluate(ground_truth, predictions).mean_per_threshold == pytest.approx([5 / 6] * 5)


def test_a_taken_segment_passes_the_prediction_to_the_next_best():
    # A=[0,10], B=[5,15]. p1=[5,15] takes B. p2=[4,14] overlaps B by 9/11 (taken) and A by
    # 6/14 = 0.43: a TP at 0.3 and 0.4 (ActivityNet matching), a FP from 0.5.
    # APs [1, 1, 1/2, 1/2, 1/2], average 0.7.
    ground_truth = {"a": gt([[0, 10], [5, 15]], [0, 0])}
    predictions = {"a": pred([[5, 15], [4, 14]], [0, 0], [0.9, 0.8])}
    result = evaluate(ground_truth, predictions)
    assert result.mean_per_threshold == pytest.approx([1, 1, 0.5, 0.5, 0.5])
    assert result.average == pytest.approx(0.7)


def test_ranking_pools_videos_and_unknown_videos_count_as_false_positives():
    # Ranked: video b (no ground truth) 0.9 FP, video a 0.8 TP: precision [0, 1/2] -> 0.5.
    ground_truth = {"a": gt([[0, 10]], [0])}
    predictions = {"a": pred([[0, 10]], [0], [0.8]), "b": pred([[0, 10]], [0], [0.9])}
    assert evaluate(ground_truth, predictions).average == pytest.approx(0.5)


def test_classes_without_ground_truth_are_left_out():
    # Class 0 AP 1, class 1 AP 0 (wrong place), class 2 no ground truth: mAP = 0.5.
    ground_truth = {"a": gt([[0, 10], [20, 30]], [0, 1])}
    predictions = {"a": pred([[0, 10], [50, 60], [20, 30]], [0, 1, 2], [0.9, 0.8, 0.7])}
    result = evaluate(ground_truth, predictions, num_classes=3)
    assert result.per_class[:, 0].tolist() == [1.0] * 5
    assert result.per_class[:, 1].tolist() == [0.0] * 5
    assert all(math.isnan(v) for v in result.per_class[:, 2].tolist())
    assert result.average == pytest.approx(0.5)


def test_empty_inputs():
    assert evaluate({"a": gt([[0, 10]], [0])}, {}).average == 0.0
    assert math.isnan(evaluate({}, {"a": pred([[0, 10]], [0], [0.9])}).average)
    assert math.isnan(evaluate({}, {}).average)


def test_rejects_malformed_inputs():
    with pytest.raises(ValueError, match="outside"):
        evaluate({"a": gt([[0, 10]], [5])}, {})
    with pytest.raises(ValueError, match=r"\(K, 2\)"):
        evaluate({}, {"a": (torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), torch.zeros(2))})
