"""Frame AP (AVA protocol) on hand-made boxes whose AP is worked out by hand, and a
cross-check against torchmetrics' COCO mAP where the two protocols agree."""
import math

import pytest
import torch

from finetune.detection.ava_metric import frame_average_precision, match_frame

LEFT = [0.0, 0.0, 0.4, 0.5]
RIGHT = [0.6, 0.5, 1.0, 1.0]


def gt(boxes, labels):
    return (torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            torch.tensor(labels, dtype=torch.long))


def det(boxes, labels, scores):
    return (
        torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        torch.tensor(labels, dtype=torch.long),
        torch.tensor(scores, dtype=torch.float32),
    )


def ap(ground_truth, detections, num_classes=1, **kwargs):
    return frame_average_precision(ground_truth, detections, num_classes, **kwargs)


def test_perfect_detections_give_ap_one():
    ground_truth = {("v", 1): gt([LEFT, RIGHT], [0, 0]), ("v", 2): gt([RIGHT], [0])}
    detections = {("v", 1): det([RIGHT, LEFT], [0, 0], [0.3, 0.2]),
                  ("v", 2): det([RIGHT], [0], [0.9])}
    result = ap(ground_truth, detections)
    assert result.mean == pytest.approx(1.0)
    assert result.as_dict()["frame_mAP@0.5"] == pytest.approx(1.0)


def test_half_right():
    # 2 ground-truth boxes; ranked: LEFT (TP), a miss (FP). Precision [1, 1/2], recall
    # [1/2, 1/2]; the envelope is 1 up to recall 1/2 and recall never reaches 1: AP = 0.5.
    ground_truth = {("v", 1): gt([LEFT, RIGHT], [0, 0])}
    detections = {("v", 1): det([LEFT, [0.4, 0.0, 0.6, 0.2]], [0, 0], [0.9, 0.8])}
    assert ap(ground_truth, detections).mean == pytest.approx(0.5)


def test_duplicate_detection_is_a_false_positive():
    # Ranked: LEFT (TP), LEFT again (FP, box taken), RIGHT (TP).
    # Precision [1, 1/2, 2/3], recall [1/2, 1/2, 1]: AP = 1/2 * 1 + 1/2 * 2/3 = 5/6.
    ground_truth = {("v", 1): gt([LEFT, RIGHT], [0, 0])}
    detections = {("v", 1): det([LEFT, LEFT, RIGHT], [0, 0, 0], [0.9, 0.8, 0.7])}
    assert ap(ground_truth, detections).mean == pytest.approx(5 / 6)
    # The same duplicate ranked last costs nothing: recall 1 is reached at precision 1.
    detections = {("v", 1): det([LEFT, RIGHT, LEFT], [0, 0, 0], [0.9, 0.8, 0.7])}
    assert ap(ground_truth, detections).mean == pytest.approx(1.0)


def test_ranking_pools_frames():
    # Frame 1 has no box of the class: its detection (0.9) is a FP ranked above the TP of
    # frame 2. Precision [0, 1/2], recall [0, 1]: AP = 1/2. Frame 3 is not annotated at all.
    ground_truth = {("v", 1): gt([], []), ("v", 2): gt([LEFT], [0])}
    detections = {("v", 1): det([LEFT], [0], [0.9]), ("v", 2): det([LEFT], [0], [0.8])}
    assert ap(ground_truth, detections).mean == pytest.approx(0.5)
    detections[("w", 3)] = det([LEFT], [0], [0.95])  # unannotated frame: another FP on top
    # Precision [0, 0, 1/3]: AP = 1/3.
    assert ap(ground_truth, detections).mean == pytest.approx(1 / 3)


def test_iou_threshold_is_inclusive():
    ground_truth = {("v", 1): gt([[0.0, 0.0, 0.5, 1.0]], [0])}
    exactly_half = det([[0.0, 0.0, 1.0, 1.0]], [0], [0.9])  # IoU = 0.5 / 1.0
    assert ap(ground_truth, {("v", 1): exactly_half}).mean == pytest.approx(1.0)
    below = det([[0.0, 0.0, 1.0, 0.98]], [0], [0.9])  # IoU = 0.49 / 0.98 < 0.5
    assert ap(ground_truth, {("v", 1): below}).mean == 0.0
    assert ap(ground_truth, {("v", 1): below}, iou_threshold=0.3).mean == pytest.approx(1.0)


def test_pascal_matching_uses_the_most_overlapping_box():
    # Two overlapping ground-truth boxes A=[0,.8] and B=[.2,1] (full height). det1 = A (TP).
    # det2 = [.05,.85] overlaps A by .75/.85 = .88 and B by .65/.95 = .68: AVA/Pascal look
    # only at A, which is taken -> FP, AP = 1/2. COCO would give det2 to B (AP = 1).
    ground_truth = {("v", 1): gt([[0.0, 0.0, 0.8, 1.0], [0.2, 0.0, 1.0, 1.0]], [0, 0])}
    detections = {("v", 1): det([[0.0, 0.0, 0.8, 1.0], [0.05, 0.0, 0.85, 1.0]], [0, 0], [0.9, 0.8])}
    assert ap(ground_truth, detections).mean == pytest.approx(0.5)


def test_classes_are_separate_and_unevaluated_classes_are_left_out():
    # Class 0: one TP -> AP 1. Class 1: the right box with class 2's label does not count;
    # class 1 gets only a miss -> AP 0. Class 2 has no ground truth -> NaN, not in the mean.
    ground_truth = {("v", 1): gt([LEFT, RIGHT], [0, 1])}
    detections = {("v", 1): det([LEFT, RIGHT, LEFT], [0, 2, 1], [0.9, 0.8, 0.7])}
    result = ap(ground_truth, detections, num_classes=3)
    assert result.per_class[0] == pytest.approx(1.0)
    assert result.per_class[1] == 0.0
    assert math.isnan(result.per_class[2])
    assert result.mean == pytest.approx(0.5)


def test_empty_inputs():
    ground_truth = {("v", 1): gt([LEFT], [0])}
    assert ap(ground_truth, {}).mean == 0.0  # nothing detected
    assert math.isnan(ap({}, {("v", 1): det([LEFT], [0], [0.9])}).mean)  # nothing to find
    assert math.isnan(ap({}, {}).mean)
    assert match_frame(torch.zeros(0, 4), torch.zeros(0), torch.tensor([LEFT]), 0.5).shape == (0,)


def test_rejects_class_index_out_of_range():
    with pytest.raises(ValueError, match="outside"):
        ap({("v", 1): gt([LEFT], [3])}, {}, num_classes=2)


def random_frames(generator, num_frames, num_classes):
    """Frames with disjoint ground-truth boxes (on a 3x3 grid of cells), so the Pascal and
    COCO matchings coincide; detections are jittered ground truth, misses and duplicates."""
    cells = [(i / 3, j / 3) for i in range(3) for j in range(3)]
    ground_truth, detections = {}, {}
    for frame in range(num_frames):
        count = int(torch.randint(0, 5, (1,), generator=generator))
        chosen = torch.randperm(9, generator=generator)[:count]
        boxes = []
        for c in chosen.tolist():
            x, y = cells[c]
            w, h = (0.15 + 0.15 * torch.rand(2, generator=generator)).tolist()
            boxes.append([x, y, x + w, y + h])
        gt_boxes = torch.tensor(boxes).reshape(-1, 4)
        gt_labels = torch.randint(0, num_classes, (len(boxes),), generator=generator)
        num_det = int(torch.randint(0, 8, (1,), generator=generator))
        pick = torch.randint(0, max(len(boxes), 1), (num_det,), generator=generator)
        det_boxes = (gt_boxes[pick] if len(boxes)
                     else torch.rand(num_det, 4, generator=generator) * 0.3)
        det_boxes = (det_boxes + 0.02 * torch.randn(num_det, 4, generator=generator)).clamp(0, 1)
        det_boxes[:, 2:] = torch.maximum(det_boxes[:, 2:], det_boxes[:, :2] + 0.01)
        det_labels = gt_labels[pick] if len(boxes) else torch.zeros(num_det, dtype=torch.long)
        flip = torch.rand(num_det, generator=generator) < 0.2
        det_labels = torch.where(
            flip, torch.randint(0, num_classes, (num_det,), generator=generator), det_labels)
        ground_truth[("v", frame)] = (gt_boxes, gt_labels)
        detections[("v", frame)] = (det_boxes, det_labels, torch.rand(num_det, generator=generator))
    return ground_truth, detections


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_torchmetrics_coco_map_at_iou_half(seed):
    """Same matching here; COCO interpolates the same precision envelope at 101 recall
    points instead of integrating it. For a non-increasing envelope p on [0, 1] the
    101-point mean and the integral differ by at most 1/100 (Riemann-sum bound), so that is
    the tolerance; perfect and empty cases coincide exactly."""
    pytest.importorskip("pycocotools")
    from torchmetrics.detection import MeanAveragePrecision

    num_classes = 3
    ground_truth, detections = random_frames(torch.Generator().manual_seed(seed), 40, num_classes)
    ours = frame_average_precision(ground_truth, detections, num_classes)

    coco = MeanAveragePrecision(iou_thresholds=[0.5], class_metrics=True)
    frames = list(ground_truth)
    coco.update(
        [dict(boxes=detections[f][0], labels=detections[f][1], scores=detections[f][2])
         for f in frames],
        [dict(boxes=ground_truth[f][0], labels=ground_truth[f][1]) for f in frames],
    )
    theirs = coco.compute()
    per_class = dict(zip(theirs["classes"].tolist(), theirs["map_per_class"].tolist()))
    evaluated = [c for c in range(num_classes) if not math.isnan(ours.per_class[c])]
    assert evaluated, "the random case must evaluate some class"
    for c in evaluated:
        assert abs(float(ours.per_class[c]) - per_class[c]) <= 0.01 + 1e-6, (
            c, ours.per_class, per_class)
    assert abs(ours.mean - float(theirs["map_50"])) <= 0.01 + 1e-6


def test_agrees_with_torchmetrics_exactly_when_perfect():
    pytest.importorskip("pycocotools")
    from torchmetrics.detection import MeanAveragePrecision

    ground_truth = {("v", 1): gt([LEFT, RIGHT], [0, 1])}
    detections = {("v", 1): det([LEFT, RIGHT], [0, 1], [0.9, 0.8])}
    coco = MeanAveragePrecision(iou_thresholds=[0.5])
    coco.update([dict(boxes=detections[("v", 1)][0], labels=detections[("v", 1)][1],
                      scores=detections[("v", 1)][2])],
                [dict(boxes=ground_truth[("v", 1)][0], labels=ground_truth[("v", 1)][1])])
    assert (float(coco.compute()["map_50"]) == ap(ground_truth, detections, num_classes=2).mean
            == 1.0)
