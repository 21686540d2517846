"""Linear, attentive and kNN probes on frozen encoder features.

``python -m finetune.probe --config configs/finetune/probe_demo.yaml [overrides]``

1. Features of the frozen encoder (pretrained weights, or random init when ``weights`` is
   empty - the baseline): training videos give one centred clip each (``eval`` view),
   validation videos one view per clip x crop with ``val.test_views``.
   - ``probe.features=cached``: every video is embedded once and the features are cached
     as safetensors files under ``cache_dir``, reused while the encoder, weights and data
     settings are unchanged; the probes are trained on rank 0.
   - ``probe.features=online``: the encoder runs in the loop every epoch; each rank encodes
     its share of every batch and the probes' gradients are summed over ranks
     (``finetune.probe_train``); nothing is stored. With ``probe.augment`` the training
     clips are drawn and augmented anew every epoch (loader mode ``train``), as V-JEPA 2
     trains its probes.
2. One probe head per (lr, weight decay) of ``probe.lrs x probe.weight_decays``, all from
   the same initial weights, trained together on the same batches (``finetune.probe_heads``):
   ``linear`` (MAE), ``attentive`` with ``probe.blocks`` blocks (V-JEPA 2: 4), or no training
   with ``knn`` (``finetune.knn``, DINO's weighted vote).
3. Validation scores are averaged per video over its views and reported like fine-tuning
   (top-1, top-5, mean per-class accuracy) for every head, the best head (which also writes
   the predictions CSV and confusion matrix PNG) and the mean over heads.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from data_tools.clips import Normalization, model_input
from data_tools.loader import build_loader
from data_tools.shard_set import resolve_shards
from finetune.common import autocast_for, build_model, default_device, resolve_weights
from finetune.config import ProbeConfig, eval_data_config
from finetune.evaluate import evaluate_logits
from finetune.extract import FeatureSet, cached_feature_set, extract_split, pool_tokens
from finetune.knn import knn_logits
from finetune.probe_heads import AttentiveProbe, LinearProbe, ProbeGrid, build_probe
from finetune.probe_train import (Batch, GridTrainer, cached_epochs, evaluate_heads,
                                  feature_batches, grid_logits, steps_per_epoch, train_grid)
from runtime.config import parse_config, save_resolved_config, to_dict
from runtime.dist import broadcast_from_main, get_rank, get_world_size, init_distributed
from runtime.errors import InputError, run_command
from runtime.io import atomic_write_text
from runtime.logging import RunLogger, progress, setup_logging
from runtime.seed import seed_everything
from runtime.trackers import tracked

log = logging.getLogger(__name__)

__all__ = ["AttentiveProbe", "LinearProbe", "ProbeGrid", "build_probe", "run", "main"]


# ---------------------------------------------------------------------------------------
# Feature cache


def _weights_identity(weights: str, seed: int) -> dict:
    if not weights:
        return {"random_init_seed": seed}
    path = resolve_weights(weights)
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def cache_fingerprint(cfg: ProbeConfig, shards: str, mode: str, pool: str) -> str:
    """Changes whenever the cached features of one split would differ."""
    data = to_dict(cfg.data)
    for name in ("shards", "batch_size", "num_workers", "shuffle_buffer", "epoch_samples",
                 "repeat", "flip", "crop", "seed", "mask_type", "mask_ratio",
                 "decoder_mask_type", "decoder_mask_ratio", "max_failure_fraction"):
        data.pop(name, None)  # settings the read-once modes do not use
    identity = {"model": to_dict(replace(cfg.model, num_classes=0)), "data": data,
                "shards": shards, "mode": mode, "pool": pool, "precision": cfg.precision,
                "weights": _weights_identity(cfg.weights, cfg.seed)}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def cached_features(encoder: nn.Module, cfg: ProbeConfig, split: str, shards: str, mode: str,
                    pool: str, device: torch.device) -> FeatureSet:
    """Features of one split from ``<cache_dir>/<split>-<pool>.safetensors``, extracted by
    all ranks first when missing or made with other settings."""
    path = Path(cfg.cache_dir or Path(cfg.out_dir) / "features") / f"{split}-{pool}.safetensors"

    def extract() -> FeatureSet:
        dtype = torch.float16 if pool == "tokens" else torch.float32
        local = extract_split(encoder, cfg.data, shards, mode, pool=pool, device=device,
                              precision=cfg.precision, dtype=dtype, desc=f"{split} features")
        local.info = {"split": split, "shards": shards, "mode": mode}
        return local

    return cached_feature_set(path, cache_fingerprint(cfg, shards, mode, pool), extract)



# ---------------------------------------------------------------------------------------
# The frozen encoder in the loop


def encoded_batches(encoder: nn.Module, loader, data: Normalization, pool: str, precision: str,
                    device: torch.device, desc: str) -> Iterator[Batch]:
    """``(keys, labels (B,), features)`` of this rank's loader batches (their video normalised
    on ``device`` with ``data.mean`` / ``data.std``): ``(B, D)`` mean-pooled or ``(B, N, D)``
    tokens in float32, computed without gradients."""
    autocast = autocast_for(precision, device)
    for batch in progress(loader, desc=desc):
        with torch.no_grad(), autocast():
            tokens = encoder.forward_features(model_input(batch, device, data))
        yield list(batch["key"]), batch["label"].long(), pool_tokens(tokens.float(), pool)


def _online_loader(cfg: ProbeConfig, shards: str, mode: str, batch_size: int,
                   num_workers: int = -1):
    """This rank's read-once loader of ``shards`` (every video once over all ranks)."""
    world = get_world_size()
    data = eval_data_config(cfg.data, shards, world, batch_size, num_workers)
    return build_loader(data, mode, get_rank(), world)


def _train_online(encoder: nn.Module, cfg: ProbeConfig, grid: ProbeGrid, pool: str,
                  device: torch.device, run_log: RunLogger | None) -> ProbeGrid:
    world = get_world_size()
    if cfg.probe.batch_size % world:
        raise InputError(f"probe.batch_size={cfg.probe.batch_size} must be divisible by the "
                         f"{world} ranks of the online probe (each encodes an equal share)")
    videos = resolve_shards(cfg.data.shards).total_samples
    if not videos:
        raise InputError(f"data.shards={cfg.data.shards} has no manifest with sample counts: "
                         "the online probe needs them for its lr schedule")
    augmented = None
    if cfg.probe.augment:
        # one resampled loader for the whole run: each pass draws new clips and crops, and
        # every rank takes the same number of batches per epoch
        augmented = build_loader(replace(cfg.data, batch_size=cfg.probe.batch_size // world,
                                         epoch_samples=videos), "train", get_rank(), world)
    steps = (len(augmented) if augmented is not None
             else steps_per_epoch(videos, cfg.probe.batch_size))
    trainer = GridTrainer(grid, cfg.probe, steps, device, across_ranks=True)
    tokens = math.prod(cfg.data.token_grid)
    width = cfg.model.encoder_dims().embed_dim
    shape = (tokens, width) if pool == "tokens" else (width,)

    def epoch(index: int) -> Iterator[Batch]:
        loader = augmented if augmented is not None else _online_loader(
            cfg, cfg.data.shards, "eval", cfg.probe.batch_size // world)
        return encoded_batches(encoder, loader, cfg.data, pool, cfg.precision, device,
                               desc=f"probe epoch {index}")

    return train_grid(trainer, epoch, shape, run_log)


# ---------------------------------------------------------------------------------------
# Entry point


def _grid(cfg: ProbeConfig, dim: int, num_classes: int) -> ProbeGrid:
    return ProbeGrid(cfg.probe.grid, cfg.seed, kind=cfg.probe.kind, dim=dim,
                     num_classes=num_classes,
                     num_heads=cfg.probe.heads or cfg.model.encoder_dims().num_heads,
                     blocks=cfg.probe.blocks)


def _knn(train: FeatureSet, val: FeatureSet, cfg: ProbeConfig, classes: list[str],
         out_dir: Path) -> tuple[dict, list[dict]]:
    labelled = train.labels >= 0
    logits = knn_logits(train.features[labelled], train.labels[labelled], val.features,
                        len(classes), cfg.probe.knn_k, cfg.probe.knn_temperature)
    result = evaluate_logits([(val.keys, val.labels, logits)], len(classes),
                             out_dir=out_dir / "eval", class_names=classes, collective=False)
    return {**result.metrics, "knn_k": cfg.probe.knn_k,
            "knn_temperature": cfg.probe.knn_temperature}, []


@tracked
def run(cfg: ProbeConfig) -> dict:
    """Train and evaluate the probe grid (or the kNN classifier); returns, on every rank, the
    best head's ``top1``, ``top5``, ``mean_class_acc`` (fractions), ``num_videos``,
    ``num_views``, ``best_head`` / ``best_lr`` / ``best_weight_decay``, the means over heads
    (``mean_top1``, ...), every head's metrics under ``heads``, and ``out_dir``."""
    cfg = cfg.resolve()
    env = init_distributed()
    out_dir = Path(cfg.out_dir)
    if env.is_main:
        save_resolved_config(cfg, out_dir)
    classes = resolve_shards(cfg.data.shards).classes
    if not classes:
        raise ValueError(f"{cfg.data.shards} has no manifest with classes: the probe needs them")
    device = default_device()
    encoder = build_model(replace(cfg.model, num_classes=0), cfg.weights, seed=cfg.seed)
    encoder = encoder.to(device).eval().requires_grad_(False)
    pool = "tokens" if cfg.probe.kind == "attentive" else "mean"
    val_mode = "test_views" if cfg.val.test_views else "eval"
    online = cfg.probe.features == "online"
    metrics: dict = {}
    heads: list[dict] = []
    with RunLogger(out_dir, enabled=env.is_main, tensorboard=cfg.log.tensorboard) as run_log:
        if online:
            grid = _train_online(encoder, cfg, _grid(cfg, cfg.model.encoder_dims().embed_dim,
                                                     len(classes)), pool, device, run_log)
            val = _online_loader(cfg, cfg.val.shards, val_mode, cfg.val.batch_size,
                                 cfg.val.num_workers)
            per_head = grid_logits(grid, encoded_batches(encoder, val, cfg.data, pool,
                                                         cfg.precision, device, "val"), device)
            metrics, heads, _ = evaluate_heads(per_head, grid.grid, len(classes),
                                               out_dir=out_dir / "eval", class_names=classes,
                                               collective=True)
        else:
            train = cached_features(encoder, cfg, "train", cfg.data.shards, "eval", pool, device)
            val = cached_features(encoder, cfg, "val", cfg.val.shards, val_mode, pool, device)
            del encoder
            if env.is_main and cfg.probe.kind == "knn":
                metrics, heads = _knn(train, val, cfg, classes, out_dir)
            elif env.is_main:
                seed_everything(cfg.seed)
                labelled = int((train.labels >= 0).sum())
                if labelled < 2:
                    raise ValueError("the probe needs at least 2 labelled training videos, "
                                     f"got {labelled}")
                trainer = GridTrainer(
                    _grid(cfg, train.features.shape[-1], len(classes)), cfg.probe,
                    steps_per_epoch(labelled, cfg.probe.batch_size), device)
                grid = train_grid(trainer, cached_epochs(train, cfg.probe.batch_size, cfg.seed),
                                  train.features.shape[1:], run_log)
                per_head = grid_logits(grid, feature_batches(val, cfg.probe.batch_size), device)
                metrics, heads, _ = evaluate_heads(per_head, grid.grid, len(classes),
                                                   out_dir=out_dir / "eval",
                                                   class_names=classes, collective=False)
        if env.is_main:
            run_log.log(cfg.probe.epochs, tag="val", **_scalars(metrics),
                        **{f"top1_h{i}": h["top1"] for i, h in enumerate(heads)})
    if env.is_main:
        _report(cfg, metrics, heads, val_mode, out_dir)
    metrics = broadcast_from_main({**metrics, "heads": heads} if heads else metrics)
    metrics["out_dir"] = str(out_dir)
    return metrics


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def _report(cfg: ProbeConfig, metrics: dict, heads: list[dict], val_mode: str,
            out_dir: Path) -> None:
    atomic_write_text(out_dir / "eval" / "metrics.json", json.dumps(
        {"probe": cfg.probe.kind, "weights": cfg.weights or "random init", "mode": val_mode,
         "features": cfg.probe.features,
         **({"blocks": cfg.probe.blocks} if cfg.probe.kind == "attentive" else {}),
         **metrics, **({"heads": heads} if heads else {})}, indent=2) + "\n")
    what = cfg.probe.kind + (f" ({cfg.probe.blocks} blocks)" if cfg.probe.kind == "attentive"
                             else "")
    for i, head in enumerate(heads):
        log.info("%s probe head %d (lr %g, wd %g): top-1 %.4f top-5 %.4f", what, i,
                 head["lr"], head["weight_decay"], head["top1"], head["top5"])
    log.info("%s probe (%s): %s", what, cfg.weights or "random init",
             {k: round(v, 4) for k, v in _scalars(metrics).items()})


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(ProbeConfig, argv, prog="python -m finetune.probe",
                       description="Linear, attentive or kNN probes on frozen encoder features.")
    init_distributed()
    setup_logging()
    metrics = run(cfg)
    if get_rank() == 0:
        print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_command(main))
