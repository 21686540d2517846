"""Video-level evaluation: multi-view aggregation, metrics across ranks, CSV and confusion PNG.

Each rank sees a disjoint set of videos (data_tools ``eval`` / ``test_views`` modes read every
sample once across ranks, without padding). All views of one video arrive on the same rank, so
softmax scores are averaged per video key locally; torchmetrics then sums the per-class
statistics of all ranks once in ``compute()``. Per-video predictions are gathered to rank 0,
which writes the only CSV.
"""
from __future__ import annotations

import contextlib
import csv
import io
import logging
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterable, Iterator, Sequence

import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from data_tools.clips import Normalization, model_input
from runtime.dist import gather_objects
from runtime.io import atomic_path, atomic_write_text
from runtime.logging import progress

log = logging.getLogger(__name__)

PREDICTIONS_CSV = "predictions.csv"
CONFUSION_PNG = "confusion_matrix.png"
IGNORE_LABEL = -1  # unlabeled videos: written to the CSV, left out of the metrics


@dataclass
class VideoScores:
    """Per-video scores after view averaging.

    keys: ``V`` video keys; labels ``(V,)`` long (-1 = unlabeled); scores ``(V, K)`` mean softmax
    over the views; num_views ``(V,)`` long.
    """

    keys: list[str]
    labels: torch.Tensor
    scores: torch.Tensor
    num_views: torch.Tensor

    def __len__(self) -> int:
        return len(self.keys)

    @staticmethod
    def concat(parts: Sequence["VideoScores"], num_classes: int) -> "VideoScores":
        """Join the scores of several ranks; a key present twice means a video was counted twice."""
        keys = [k for p in parts for k in p.keys]
        if len(set(keys)) != len(keys):
            twice = sorted(k for k, n in Counter(keys).items() if n > 1)
            raise RuntimeError(f"{len(twice)} videos were evaluated on more than one rank, "
                               f"e.g. {twice[:5]}")
        if not parts:
            return VideoScores([], torch.zeros(0, dtype=torch.long), torch.zeros(0, num_classes),
                               torch.zeros(0, dtype=torch.long))
        return VideoScores(keys, torch.cat([p.labels for p in parts]),
                           torch.cat([p.scores for p in parts]),
                           torch.cat([p.num_views for p in parts]))


class ViewAggregator:
    """Averages the softmax scores of all views of each video key seen by this rank."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self._index: dict[str, int] = {}
        self._labels: list[int] = []
        self._sums: list[torch.Tensor] = []
        self._counts: list[int] = []

    def add(self, keys: Sequence[str], labels: torch.Tensor, logits: torch.Tensor) -> None:
        """keys: ``B`` video keys (repeated for several views of one video); labels ``(B,)``;
        logits ``(B, K)``. Softmax is taken in float32 before averaging."""
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"expected logits (B, {self.num_classes}), got {tuple(logits.shape)}")
        probs = logits.detach().float().softmax(dim=-1).cpu()
        for key, label, prob in zip(keys, labels.tolist(), probs):
            slot = self._index.get(key)
            if slot is None:
                self._index[key] = len(self._sums)
                self._labels.append(label)
                self._sums.append(prob.clone())
                self._counts.append(1)
                continue
            if self._labels[slot] != label:
                raise ValueError(
                    f"video {key!r} has views with labels {self._labels[slot]} and {label}")
            self._sums[slot] += prob
            self._counts[slot] += 1

    def result(self) -> VideoScores:
        counts = torch.tensor(self._counts, dtype=torch.long)
        sums = torch.stack(self._sums) if self._sums else torch.zeros(0, self.num_classes)
        return VideoScores(list(self._index), torch.tensor(self._labels, dtype=torch.long),
                           sums / counts.clamp(min=1).unsqueeze(1).float(), counts)


def build_metrics(num_classes: int, device: torch.device | str = "cpu",
                  sync: bool = True) -> MetricCollection:
    """top-1 / top-k (k = min(5, K)) micro accuracy, mean per-class accuracy, confusion matrix.

    With ``sync`` (default) ``compute()`` sums the statistics of all ranks.
    """
    common = dict(num_classes=num_classes, ignore_index=IGNORE_LABEL, sync_on_compute=sync)
    return MetricCollection({
        "top1": MulticlassAccuracy(top_k=1, average="micro", **common),
        "top5": MulticlassAccuracy(top_k=min(5, num_classes), average="micro", **common),
        "mean_class_acc": MulticlassAccuracy(top_k=1, average="macro", **common),
        "confusion": MulticlassConfusionMatrix(**common),
    }).to(device)


def compute_metrics(local: VideoScores, num_classes: int, device: torch.device | str = "cpu",
                    sync: bool = True) -> tuple[dict[str, float], torch.Tensor]:
    """Metrics over the videos of every rank (one collective sync inside ``compute``), or of
    ``local`` alone with ``sync=False``.

    Returns ``({"top1", "top5", "mean_class_acc", "num_videos"}, confusion (K, K))``; rows
    of the confusion matrix are true classes. Accuracies are fractions in [0, 1].
    """
    metrics = build_metrics(num_classes, device, sync)
    with warnings.catch_warnings():
        if len(local) == 0:  # a rank without videos still joins the sync, with zero counts
            warnings.filterwarnings("ignore", message=".*before the ``update``.*")
        else:
            metrics.update(local.scores.to(device), local.labels.to(device))
        values = metrics.compute()
    confusion = values.pop("confusion").cpu()
    out = {name: float(v) for name, v in values.items()}
    out["num_videos"] = int(confusion.sum())
    return out, confusion


def gather_to_main(local: VideoScores) -> VideoScores | None:
    """All ranks' per-video scores on rank 0 (None elsewhere); raises if a key is duplicated."""
    parts = gather_objects(local)
    return None if parts is None else VideoScores.concat(parts, local.scores.shape[1])


def _class_name(names: Sequence[str] | None, index: int) -> str:
    if index < 0:
        return ""
    return names[index] if names and index < len(names) else str(index)


def predictions_csv(scores: VideoScores, class_names: Sequence[str] | None = None,
                    top_k: int = 5) -> str:
    """CSV text, one row per video sorted by key: key, label, prediction, score, top-k, views."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["key", "label", "label_name", "pred", "pred_name", "score", "correct",
                     "top_k", "num_views"])
    k = min(top_k, scores.scores.shape[1]) if len(scores) else 0
    order = sorted(range(len(scores)), key=lambda i: scores.keys[i])
    for i in order:
        top_scores, top_ids = scores.scores[i].topk(k) if k else (torch.zeros(0), torch.zeros(0))
        pred, label = int(top_ids[0]), int(scores.labels[i])
        writer.writerow([scores.keys[i], label, _class_name(class_names, label), pred,
                         _class_name(class_names, pred), f"{float(top_scores[0]):.6f}",
                         int(pred == label) if label >= 0 else "",
                         " ".join(str(int(t)) for t in top_ids), int(scores.num_views[i])])
    return buffer.getvalue()


def save_confusion_png(confusion: torch.Tensor, path: str | Path,
                       class_names: Sequence[str] | None = None) -> Path:
    """Confusion matrix (rows = true class) as a PNG; cell counts drawn for up to 20 classes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchmetrics.utilities.plot import plot_confusion_matrix

    num_classes = confusion.shape[0]
    labels = list(class_names) if class_names and len(class_names) == num_classes <= 50 else None
    size = min(4 + 0.35 * num_classes, 40)
    fig, ax = plt.subplots(figsize=(size, size))
    plot_confusion_matrix(confusion, ax=ax, add_text=num_classes <= 20, labels=labels)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return Path(path)


@dataclass
class EvalResult:
    metrics: dict[str, float]
    confusion: torch.Tensor
    scores: VideoScores | None  # every rank's videos, on rank 0 only


def evaluate_logits(stream: Iterable[tuple[Sequence[str], torch.Tensor, torch.Tensor]],
                    num_classes: int, *, device: torch.device | str = "cpu",
                    out_dir: str | Path | None = None,
                    class_names: Sequence[str] | None = None,
                    collective: bool = True) -> EvalResult:
    """Aggregate ``(keys, labels (B,), logits (B, K))`` batches per video, then metrics and files.

    With ``collective`` (default) every rank must call this: metrics are synced and the
    per-video scores gathered to rank 0. With ``collective=False`` the stream is taken as the
    whole evaluation set (e.g. cached features evaluated on one rank). With ``out_dir`` the
    process holding all scores writes ``predictions.csv`` and ``confusion_matrix.png`` there.
    """
    aggregator = ViewAggregator(num_classes)
    for keys, labels, logits in stream:
        aggregator.add(keys, labels, logits)
    local = aggregator.result()
    metrics, confusion = compute_metrics(local, num_classes, device, sync=collective)
    scores = gather_to_main(local) if collective else VideoScores.concat([local], num_classes)
    if scores is not None:
        metrics["num_views"] = float(scores.num_views.float().mean()) if len(scores) else 0.0
        if out_dir is not None:
            atomic_write_text(Path(out_dir) / PREDICTIONS_CSV, predictions_csv(scores, class_names))
            save_confusion_png(confusion, Path(out_dir) / CONFUSION_PNG, class_names)
    return EvalResult(metrics, confusion, scores)


def model_logits(model: nn.Module, loader: Iterable[dict], device: torch.device | str,
                 data: Normalization,
                 autocast: Callable[[], ContextManager] = contextlib.nullcontext,
                 desc: str = "eval") -> Iterator[tuple[list[str], torch.Tensor, torch.Tensor]]:
    """Run ``model`` in eval mode over loader batches (``video``, ``label``, ``key``), the
    video normalised on ``device`` with ``data.mean`` / ``data.std`` (``model_input``)."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in progress(loader, desc=desc):
                with autocast():
                    logits = model(model_input(batch, device, data))
                yield list(batch["key"]), batch["label"], logits.float()
    finally:
        model.train(was_training)


def evaluate(model: nn.Module, loader: Iterable[dict], num_classes: int, *,
             data: Normalization, device: torch.device | str = "cpu",
             autocast: Callable[[], ContextManager] = contextlib.nullcontext,
             out_dir: str | Path | None = None,
             class_names: Sequence[str] | None = None) -> EvalResult:
    """Video-level evaluation of a classifier over an ``eval`` or ``test_views`` loader
    (``data``: the loader's DataConfig, whose mean and std normalise its uint8 batches)."""
    return evaluate_logits(model_logits(model, loader, device, data, autocast), num_classes,
                           device=device, out_dir=out_dir, class_names=class_names)
