"""Linear and attentive probes on frozen encoder features.

``python -m finetune.probe --config configs/finetune/probe_demo.yaml [overrides]``

1. The frozen encoder (pretrained weights, or random init when ``weights`` is empty - the
   baseline) embeds every training video once (``eval`` view) and every validation video
   (one view per clip x crop with ``eval_views``); features are cached as safetensors files
   under ``cache_dir`` and reused while the encoder, weights and data settings are unchanged.
2. A probe is trained on the cached training features with plain torch:
   - ``linear``: mean-pooled tokens -> ``BatchNorm1d(affine=False, eps=1e-6)`` -> ``Linear``
     (weights N(0, .01)), as MAE's linear probe;
   - ``attentive``: all tokens -> one cross-attention layer with one learned query
     (``timm.layers.AttentionPoolLatent``) -> ``LayerNorm`` -> ``Linear``, as V-JEPA's probe.
3. Validation scores are averaged per video and reported like fine-tuning (top-1, top-5,
   mean per-class accuracy, confusion matrix PNG, predictions CSV).
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
from timm.layers import AttentionPoolLatent, trunc_normal_
from torch import nn

from data_tools.shard_set import resolve_shards
from finetune.config import ProbeConfig, ProbeHeadConfig
from finetune.evaluate import evaluate_logits
from finetune.common import build_model, default_device, resolve_weights
from finetune.extract import FeatureSet, cached_feature_set, extract_split
from runtime.config import parse_config, save_resolved_config, to_dict
from runtime.dist import broadcast_from_main, get_rank, init_distributed
from runtime.errors import run_command
from runtime.io import atomic_write_text
from runtime.logging import RunLogger, setup_logging
from runtime.optim import WarmupCosine, param_groups, set_lr
from runtime.seed import seed_everything

log = logging.getLogger(__name__)


class LinearProbe(nn.Module):
    """features ``(B, D)`` -> logits ``(B, K)``: BatchNorm without affine, then Linear (MAE)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(features))


class AttentiveProbe(nn.Module):
    """tokens ``(B, N, D)`` -> logits ``(B, K)``: cross-attention pooling with one learned
    query (+ MLP), LayerNorm, Linear (V-JEPA's attentive probe)."""

    def __init__(self, dim: int, num_classes: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.pool = AttentionPoolLatent(dim, num_heads=num_heads, mlp_ratio=mlp_ratio,
                                        norm_layer=nn.LayerNorm)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.pool(tokens)))


def build_probe(kind: str, dim: int, num_classes: int, num_heads: int) -> nn.Module:
    if kind == "linear":
        return LinearProbe(dim, num_classes)
    return AttentiveProbe(dim, num_classes, num_heads)


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
# Probe training on cached features


def _batches(features: FeatureSet,
             batch_size: int) -> Iterator[tuple[list[str], torch.Tensor, torch.Tensor]]:
    for start in range(0, len(features), batch_size):
        end = start + batch_size
        yield features.keys[start:end], features.labels[start:end], features.features[start:end]


def train_probe(head: nn.Module, train: FeatureSet, cfg: ProbeHeadConfig, device: torch.device,
                seed: int, run_log: RunLogger | None = None) -> nn.Module:
    """AdamW (0.9, 0.999) with warm-up + cosine on the labelled rows of ``train``."""
    labelled = train.labels >= 0
    inputs, labels = train.features[labelled], train.labels[labelled]
    if len(labels) < 2:
        raise ValueError(f"the probe needs at least 2 labelled training videos, got {len(labels)}")
    steps_per_epoch = math.ceil(len(labels) / cfg.batch_size)
    schedule = WarmupCosine(cfg.lr, cfg.min_lr, round(cfg.warmup_epochs * steps_per_epoch),
                            cfg.epochs * steps_per_epoch)
    head = head.to(device).train()
    optimizer = torch.optim.AdamW(param_groups(head, cfg.weight_decay), lr=cfg.lr,
                                  betas=(0.9, 0.999))
    criterion = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)
    step = 0
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(labels), generator=generator)
        total, count = 0.0, 0
        for start in range(0, len(order), cfg.batch_size):
            index = order[start:start + cfg.batch_size]
            if len(index) < 2:  # batch norm needs two samples
                continue
            set_lr(optimizer, schedule.lr_at(step))
            logits = head(inputs[index].to(device, torch.float32))
            loss = criterion(logits, labels[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            total, count = total + loss.item() * len(index), count + len(index)
        if run_log is not None:
            run_log.log(step, tag="probe", epoch=epoch, loss=total / max(count, 1),
                        lr=schedule.lr_at(step))
    return head.eval()


def probe_logits(head: nn.Module, features: FeatureSet, device: torch.device,
                 batch_size: int = 1024) -> Iterator[tuple[list[str], torch.Tensor, torch.Tensor]]:
    """``(keys, labels, logits)`` batches of ``head`` over every row of ``features``."""
    head.eval()
    with torch.inference_mode():
        for keys, labels, inputs in _batches(features, batch_size):
            yield keys, labels, head(inputs.to(device, torch.float32)).float().cpu()


# ---------------------------------------------------------------------------------------
# Entry point


def run(cfg: ProbeConfig) -> dict:
    """Extract (or reuse) features, train the probe on rank 0 and evaluate it; returns
    ``top1``, ``top5``, ``mean_class_acc`` (fractions), ``num_videos``, ``num_views``,
    ``out_dir`` on every rank."""
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
    pool = "mean" if cfg.probe.kind == "linear" else "tokens"
    val_mode = "test_views" if cfg.val.test_views else "eval"
    train = cached_features(encoder, cfg, "train", cfg.data.shards, "eval", pool, device)
    val = cached_features(encoder, cfg, "val", cfg.val.shards, val_mode, pool, device)
    del encoder

    metrics: dict = {}
    if env.is_main:
        seed_everything(cfg.seed)
        head = build_probe(cfg.probe.kind, train.features.shape[-1], len(classes),
                           cfg.probe.num_heads or cfg.model.encoder_dims().num_heads)
        with RunLogger(out_dir) as run_log:
            head = train_probe(head, train, cfg.probe, device, cfg.seed, run_log)
            result = evaluate_logits(probe_logits(head, val, device), len(classes),
                                     out_dir=out_dir / "eval", class_names=classes,
                                     collective=False)
            metrics = dict(result.metrics)
            run_log.log(cfg.probe.epochs, tag="val", **metrics)
        atomic_write_text(out_dir / "eval" / "metrics.json", json.dumps(
            {"probe": cfg.probe.kind, "weights": cfg.weights or "random init", "mode": val_mode,
             **metrics}, indent=2) + "\n")
        log.info("%s probe (%s): %s", cfg.probe.kind, cfg.weights or "random init",
                 {k: round(v, 4) for k, v in metrics.items()})
    metrics = broadcast_from_main(metrics)
    metrics["out_dir"] = str(out_dir)
    return metrics


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(ProbeConfig, argv, prog="python -m finetune.probe",
                       description="Linear or attentive probe on frozen encoder features.")
    init_distributed()
    setup_logging()
    metrics = run(cfg)
    if get_rank() == 0:
        print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_command(main))
