"""Training and evaluating a ``ProbeGrid``: on cached features (one process) or with the
frozen encoder in the loop (every rank encodes its share of each batch).

Both modes go through ``GridTrainer.step``: every head's summed cross-entropy is divided by
the number of labelled videos in the whole batch (over all ranks), the heads' gradients
(and their losses, for the log) are summed over ranks in one all-reduce, then one AdamW
step applies each head's own lr and weight decay. A rank without a batch still takes part
with an empty one, so ranks that read different numbers of videos stay in step.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F

from finetune.config import ProbeHeadConfig
from finetune.evaluate import EvalResult, evaluate_logits
from finetune.extract import FeatureSet
from finetune.probe_heads import ProbeGrid, set_grid_lr
from runtime.dist import get_world_size, is_initialized
from runtime.logging import RunLogger

Batch = tuple[list[str], torch.Tensor, torch.Tensor]  # keys, labels (B,), features (B, ...)


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if is_initialized() and get_world_size() > 1:
        if torch_dist.get_backend() == "nccl" and not tensor.is_cuda:
            tensor = tensor.cuda()
        torch_dist.all_reduce(tensor)
    return tensor


class GridTrainer:
    """One optimizer over every head of ``grid``, the heads' schedules and the step count.

    ``across_ranks``: every rank holds a share of each batch (the online probe) and the
    gradients are summed over ranks; otherwise this process trains alone on whole batches.
    ``min_batch`` skips a step whose whole batch has fewer labelled videos (BatchNorm needs
    two)."""

    def __init__(self, grid: ProbeGrid, cfg: ProbeHeadConfig, steps_per_epoch: int,
                 device: torch.device, across_ranks: bool = False, min_batch: int = 2):
        self.grid = grid.to(device).train()
        self.cfg, self.device, self.min_batch = cfg, device, min_batch
        self.across_ranks = across_ranks
        self.optimizer = grid.optimizer()
        self.schedules = grid.schedules(cfg.min_lr, round(cfg.warmup_epochs * steps_per_epoch),
                                        cfg.epochs * steps_per_epoch)
        self.step_count = 0
        self.params = [p for p in grid.parameters() if p.requires_grad]

    def reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks in the online mode; unchanged otherwise."""
        return _all_reduce_sum(tensor) if self.across_ranks else tensor

    def step(self, features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        """One step of every head on this rank's labelled rows ``features (B, ...)``, ``labels
        (B,)`` (B may be 0). Every rank must call it. Returns the heads' mean losses over the
        whole batch ``(H,)`` and its size (0 = skipped)."""
        keep = labels >= 0
        features = features[keep].to(self.device, torch.float32)
        labels = labels[keep].to(self.device)
        total = int(self.reduce(torch.tensor([float(len(labels))])).item())
        if total < self.min_batch:
            return torch.zeros(len(self.grid)), 0
        set_grid_lr(self.optimizer, self.schedules, self.step_count)
        logits = self.grid(features)  # (H, B, K)
        losses = torch.stack([F.cross_entropy(head_logits, labels, reduction="sum")
                              for head_logits in logits]) / total
        self.optimizer.zero_grad(set_to_none=False)
        losses.sum().backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = self.reduce(torch.cat([*(g.reshape(-1) for g in grads), losses.detach()]))
        offset = 0
        for param in self.params:
            param.grad = flat[offset:offset + param.numel()].view_as(param).to(param.device)
            offset += param.numel()
        self.optimizer.step()
        self.step_count += 1
        return flat[offset:].cpu(), total

    def lrs(self) -> list[float]:
        return [s.lr_at(self.step_count) for s in self.schedules]


def train_grid(trainer: GridTrainer, epoch_batches: Callable[[int], Iterable[Batch]],
               feature_shape: Sequence[int], run_log: RunLogger | None = None) -> ProbeGrid:
    """``cfg.epochs`` passes over ``epoch_batches(epoch)`` (this rank's batches); logs every
    head's mean training loss per epoch (``loss`` = mean over heads, ``loss_h<i>``)."""
    for epoch in range(trainer.cfg.epochs):
        sums, count = torch.zeros(len(trainer.grid)), 0
        batches = iter(epoch_batches(epoch))
        while True:
            batch = next(batches, None)
            if not trainer.reduce(torch.tensor([float(batch is not None)])).item():
                break
            _, labels, features = batch or ([], torch.zeros(0, dtype=torch.long),
                                            torch.zeros(0, *feature_shape))
            losses, total = trainer.step(features, labels)
            sums, count = sums + losses * total, count + total
        if run_log is not None:
            means = (sums / max(count, 1)).tolist()
            run_log.log(trainer.step_count, tag="probe", epoch=epoch,
                        loss=sum(means) / len(means), lr=max(trainer.lrs()),
                        **({f"loss_h{i}": v for i, v in enumerate(means)} if len(means) > 1
                           else {}))
    return trainer.grid.eval()


def cached_epochs(train: FeatureSet, batch_size: int,
                  seed: int) -> Callable[[int], Iterator[Batch]]:
    """Shuffled batches of the labelled rows of ``train``, a new order every epoch (one
    generator seeded with ``seed``, so epochs must be drawn in order)."""
    labelled = train.labels >= 0
    keys = [k for k, keep in zip(train.keys, labelled.tolist()) if keep]
    inputs, labels = train.features[labelled], train.labels[labelled]
    generator = torch.Generator().manual_seed(seed)

    def epoch(_: int) -> Iterator[Batch]:
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            yield [keys[i] for i in index.tolist()], labels[index], inputs[index]

    return epoch


def steps_per_epoch(num_videos: int, batch_size: int) -> int:
    return max(math.ceil(num_videos / batch_size), 1)


def grid_logits(grid: ProbeGrid, batches: Iterable[Batch],
                device: torch.device) -> list[list[Batch]]:
    """Per head, ``(keys, labels, logits (B, K))`` of every batch (logits on the CPU)."""
    grid.eval()
    per_head: list[list[Batch]] = [[] for _ in range(len(grid))]
    with torch.inference_mode():
        for keys, labels, inputs in batches:
            logits = grid(inputs.to(device, torch.float32)).float().cpu()
            for head, head_logits in zip(per_head, logits):
                head.append((list(keys), labels, head_logits))
    return per_head


def feature_batches(features: FeatureSet, batch_size: int) -> Iterator[Batch]:
    for start in range(0, len(features), batch_size):
        end = start + batch_size
        yield features.keys[start:end], features.labels[start:end], features.features[start:end]


def evaluate_heads(per_head: list[list[Batch]], grid: list[tuple[float, float]],
                   num_classes: int, *, out_dir, class_names, collective: bool
                   ) -> tuple[dict, list[dict], EvalResult]:
    """Video-level metrics of every head (softmax averaged over views, as fine-tuning's
    evaluation); the best head by top-1 (first on ties) also writes its predictions CSV and
    confusion matrix to ``out_dir``. Returns ``(summary, heads, best result)`` where
    ``summary`` holds the best head's metrics, ``best_head``, ``best_lr``,
    ``best_weight_decay`` and ``mean_top1`` / ``mean_top5`` / ``mean_mean_class_acc`` over
    heads, and ``heads`` is one ``{"lr", "weight_decay", metrics...}`` per head."""
    heads = []
    for batches, (lr, weight_decay) in zip(per_head, grid):
        result = evaluate_logits(batches, num_classes, collective=collective)
        heads.append({"lr": lr, "weight_decay": weight_decay, **result.metrics})
    best = max(range(len(heads)), key=lambda i: (heads[i]["top1"], -i))
    result = evaluate_logits(per_head[best], num_classes, out_dir=out_dir,
                             class_names=class_names, collective=collective)
    summary = {**result.metrics, "best_head": best, "best_lr": grid[best][0],
               "best_weight_decay": grid[best][1]}
    for name in ("top1", "top5", "mean_class_acc"):
        summary[f"mean_{name}"] = sum(h[name] for h in heads) / len(heads)
    return summary, heads, result
