"""Video-level aggregation, metrics, predictions CSV and confusion PNG (no model, no data)."""
from __future__ import annotations

import csv
import io

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, top_k_accuracy_score

from finetune.evaluate import (CONFUSION_PNG, PREDICTIONS_CSV, ViewAggregator, VideoScores,
                               compute_metrics, evaluate_logits, predictions_csv)


def random_views(num_videos=12, views=3, num_classes=6, seed=0):
    """Shuffled view rows ``(keys, labels, logits)`` with several views per video."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (num_videos,), generator=gen)
    keys = [f"vid{i:03d}" for i in range(num_videos) for _ in range(views)]
    row_labels = labels.repeat_interleave(views)
    logits = torch.randn(len(keys), num_classes, generator=gen) * 3
    order = torch.randperm(len(keys), generator=gen)
    return [keys[i] for i in order], row_labels[order], logits[order]


def test_views_are_averaged_per_video_across_batches():
    keys, labels, logits = random_views()
    aggregator = ViewAggregator(6)
    for start in range(0, len(keys), 5):  # batches cut through the views of a video
        aggregator.add(keys[start:start + 5], labels[start:start + 5], logits[start:start + 5])
    scores = aggregator.result()
    assert sorted(scores.keys) == [f"vid{i:03d}" for i in range(12)]
    assert scores.num_views.tolist() == [3] * 12
    probs = logits.softmax(-1)
    for key, label, score in zip(scores.keys, scores.labels, scores.scores):
        rows = [i for i, k in enumerate(keys) if k == key]
        torch.testing.assert_close(score, probs[rows].mean(0))
        assert int(label) == int(labels[rows[0]])


def test_views_with_different_labels_are_rejected():
    aggregator = ViewAggregator(3)
    aggregator.add(["a"], torch.tensor([0]), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="'a' has views with labels 0 and 2"):
        aggregator.add(["a"], torch.tensor([2]), torch.zeros(1, 3))


def test_metrics_match_sklearn():
    num_classes = 6
    keys, labels, logits = random_views(num_videos=40, num_classes=num_classes, seed=3)
    aggregator = ViewAggregator(num_classes)
    aggregator.add(keys, labels, logits)
    scores = aggregator.result()
    metrics, confusion = compute_metrics(scores, num_classes)
    y, p = scores.labels.numpy(), scores.scores.numpy()
    pred = p.argmax(1)
    assert metrics["top1"] == pytest.approx(float((pred == y).mean()))
    assert metrics["top5"] == pytest.approx(top_k_accuracy_score(y, p, k=5,
                                                                 labels=range(num_classes)))
    assert metrics["mean_class_acc"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert metrics["num_videos"] == 40
    np.testing.assert_array_equal(confusion.numpy(),
                                  confusion_matrix(y, pred, labels=range(num_classes)))


def test_unlabeled_videos_are_written_but_not_scored(tmp_path):
    stream = [(["a", "b", "c"], torch.tensor([0, 1, -1]),
               torch.tensor([[5.0, 0.0], [4.0, 0.0], [0.0, 9.0]]))]
    result = evaluate_logits(stream, 2, out_dir=tmp_path, class_names=["left", "right"])
    assert result.metrics["num_videos"] == 2
    assert result.metrics["top1"] == pytest.approx(0.5)
    rows = list(csv.DictReader(io.StringIO((tmp_path / PREDICTIONS_CSV).read_text())))
    assert [r["key"] for r in rows] == ["a", "b", "c"]
    assert rows[1] == {"key": "b", "label": "1", "label_name": "right", "pred": "0",
                       "pred_name": "left", "score": rows[1]["score"], "correct": "0",
                       "top_k": "0 1", "num_views": "1"}
    assert rows[2]["label_name"] == "" and rows[2]["correct"] == ""
    assert float(rows[2]["score"]) == pytest.approx(torch.tensor([0.0, 9.0]).softmax(0)[1].item(),
                                                    abs=1e-6)
    png = (tmp_path / CONFUSION_PNG).read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000


def test_a_video_counted_by_two_ranks_is_an_error():
    part = VideoScores(["a", "b"], torch.tensor([0, 1]), torch.full((2, 2), 0.5),
                       torch.ones(2, dtype=torch.long))
    other = VideoScores(["b"], torch.tensor([1]), torch.full((1, 2), 0.5),
                        torch.ones(1, dtype=torch.long))
    with pytest.raises(RuntimeError, match="1 videos were evaluated on more than one rank.*'b'"):
        VideoScores.concat([part, other], 2)


def test_empty_rank_gives_zero_counts_without_warnings(recwarn):
    metrics, confusion = compute_metrics(ViewAggregator(4).result(), 4)
    assert metrics["num_videos"] == 0 and int(confusion.sum()) == 0
    assert not [w for w in recwarn if "update" in str(w.message)]
    assert predictions_csv(ViewAggregator(4).result()).count("\n") == 1  # header only
