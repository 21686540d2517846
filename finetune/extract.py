"""Frozen-encoder features of a shard set, written to one safetensors file.

``python -m finetune.extract --config configs/finetune/extract_demo.yaml`` (see ``ExtractConfig``).

A feature file holds one row per clip (per view in multi-view mode, per window in
sliding-window mode):

- ``features``: ``(M, D)`` mean-pooled encoder tokens, or ``(M, N, D)`` with ``pool=tokens``
  (what the attentive probe needs);
- ``labels`` ``(M,)`` long, ``views`` ``(M,)`` long (view or window index);
- optional per-row tensors (``window_start`` / ``window_end`` in seconds for sliding windows);
- metadata: ``keys`` (JSON list of ``M`` video keys) and ``info`` (JSON: config fingerprint,
  classes, ...).

Under several ranks each rank extracts its own videos into a part file; rank 0 concatenates
the parts into the final file (written atomically) and removes them.
"""
from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, ContextManager, Iterable, Literal, Sequence

import torch
import webdataset as wds
from safetensors import safe_open
from torch import nn

from data_tools.clips import Normalization, model_input
from data_tools.config import DataConfig
from data_tools.decode import VIDEO_EXTENSIONS, DecodeError, open_video
from data_tools.loader import build_loader
from data_tools.shard_set import resolve_shards
from finetune.config import ExtractConfig, eval_data_config
from finetune.detection.features import sliding_window_features
from finetune.common import autocast_for, build_model, default_device
from runtime.config import parse_config, to_dict
from runtime.dist import barrier, get_rank, get_world_size, init_distributed
from runtime.errors import run_command
from runtime.io import atomic_save_safetensors
from runtime.logging import progress, setup_logging

log = logging.getLogger(__name__)

Pooling = Literal["mean", "tokens"]


@dataclass
class FeatureSet:
    """Rows of features with their video keys; see the module docstring for shapes."""

    keys: list[str]
    labels: torch.Tensor
    views: torch.Tensor
    features: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    videos: dict[str, dict] = field(default_factory=dict)  # per-video json (sliding windows)

    def __len__(self) -> int:
        return len(self.keys)

    def __post_init__(self) -> None:
        rows = {"labels": len(self.labels), "views": len(self.views),
                "features": len(self.features), **{k: len(v) for k, v in self.extra.items()}}
        bad = {name: n for name, n in rows.items() if n != len(self.keys)}
        if bad:
            raise ValueError(f"feature set with {len(self.keys)} keys has mismatched rows: {bad}")

    @staticmethod
    def concat(parts: list["FeatureSet"]) -> "FeatureSet":
        if not parts:
            raise ValueError("no feature parts to concatenate")
        extra_names = set(parts[0].extra)
        return FeatureSet(
            keys=[k for p in parts for k in p.keys],
            labels=torch.cat([p.labels for p in parts]),
            views=torch.cat([p.views for p in parts]),
            features=torch.cat([p.features for p in parts]),
            extra={n: torch.cat([p.extra[n] for p in parts]) for n in extra_names},
            info=parts[0].info, videos={k: v for p in parts for k, v in p.videos.items()})


def save_features(features: FeatureSet, path: str | Path) -> Path:
    tensors = {"labels": features.labels, "views": features.views,
               "features": features.features, **features.extra}
    metadata = {"keys": json.dumps(features.keys), "info": json.dumps(features.info),
                "extra": json.dumps(sorted(features.extra)),
                "videos": json.dumps(features.videos)}
    return atomic_save_safetensors(tensors, path, metadata=metadata)


def load_features(path: str | Path) -> FeatureSet:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"feature file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        extra_names = json.loads(meta.get("extra", "[]"))
        return FeatureSet(json.loads(meta["keys"]), tensors["labels"], tensors["views"],
                          tensors["features"], {n: tensors[n] for n in extra_names},
                          json.loads(meta.get("info", "{}")), json.loads(meta.get("videos", "{}")))
    except (KeyError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a feature file written by finetune.extract "
                         f"(missing or invalid {err})") from err


def read_info(path: str | Path) -> dict | None:
    """The ``info`` metadata of a feature file, or None if the file is missing or unreadable."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return json.loads((handle.metadata() or {}).get("info", "null"))
    except (OSError, ValueError, json.JSONDecodeError):
        return None


def pool_tokens(tokens: torch.Tensor, pool: Pooling) -> torch.Tensor:
    """tokens ``(B, N, D)`` -> ``(B, D)`` (mean) or unchanged (tokens)."""
    return tokens.mean(dim=1) if pool == "mean" else tokens


def extract_clip_features(encoder: nn.Module, loader: Iterable[dict], *, data: Normalization,
                          device: torch.device | str = "cpu", pool: Pooling = "mean",
                          dtype: torch.dtype = torch.float32,
                          autocast: Callable[[], ContextManager] = contextlib.nullcontext,
                          desc: str = "features") -> FeatureSet:
    """Encoder features of every clip this rank's loader yields (one row per clip/view).

    ``encoder.forward_features(video)`` gives ``(B, N, D)`` tokens after the final norm; the
    video is normalised on ``device`` with ``data.mean`` / ``data.std`` (``model_input``).
    """
    encoder.eval()
    keys, labels, views, chunks = [], [], [], []
    with torch.inference_mode():
        for batch in progress(loader, desc=desc):
            video = model_input(batch, device, data)
            with autocast():
                tokens = encoder.forward_features(video)
            chunks.append(pool_tokens(tokens.float(), pool).to("cpu", dtype))
            keys.extend(batch["key"])
            labels.append(batch["label"].long().cpu())
            views.append(batch["view"].long().cpu() if "view" in batch
                         else torch.zeros(len(batch["key"]), dtype=torch.long))
    if not chunks:
        dim = getattr(encoder, "embed_dim", 0)
        empty = torch.zeros((0, dim), dtype=dtype)
        return FeatureSet([], torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                          empty if pool == "mean" else empty[:, None])
    return FeatureSet(keys, torch.cat(labels), torch.cat(views), torch.cat(chunks))


def write_across_ranks(local: FeatureSet, path: str | Path) -> Path:
    """Write every rank's rows into ``path``: parts per rank, merged by rank 0, then a barrier.

    Every rank must call this. Rows keep rank order (rank 0's rows first).
    """
    path = Path(path)
    world, rank = get_world_size(), get_rank()
    if world == 1:
        return save_features(local, path)
    part = path.with_name(f"{path.stem}.part{rank:05d}-of-{world:05d}.safetensors")
    save_features(local, part)
    barrier()
    if rank == 0:
        parts = [path.with_name(f"{path.stem}.part{r:05d}-of-{world:05d}.safetensors")
                 for r in range(world)]
        merged = FeatureSet.concat([p for p in map(load_features, parts) if len(p)] or [local])
        merged.info = local.info
        save_features(merged, path)
        for p in parts:
            p.unlink()
    barrier()
    return path


def cached_feature_set(path: str | Path, fingerprint: str,
                       extract: Callable[[], FeatureSet]) -> FeatureSet:
    """The feature file ``path`` when it was made with ``fingerprint``, else ``extract()`` (this
    rank's rows) written there from every rank first. Every rank must call this."""
    path = Path(path)
    info = read_info(path) if path.is_file() else None
    if info and info.get("fingerprint") == fingerprint:
        log.info("using cached features %s", path)
    else:
        log.info("extracting features into %s", path)
        local = extract()
        local.info = {**local.info, "fingerprint": fingerprint}
        write_across_ranks(local, path)
    return load_features(path)


# ---------------------------------------------------------------------------------------
# Running an extraction


STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def extract_split(encoder: nn.Module, data: DataConfig, shards: str, mode: str, *,
                  pool: Pooling, device: torch.device, precision: str = "fp32",
                  dtype: torch.dtype = torch.float32, desc: str = "features") -> FeatureSet:
    """This rank's rows for ``shards`` read in loader mode ``eval`` (one centred clip per
    video) or ``test_views`` (every view)."""
    world, rank = get_world_size(), get_rank()
    loader_cfg = eval_data_config(data, shards, world)
    loader = build_loader(loader_cfg, mode, rank, world)
    return extract_clip_features(encoder, loader, data=loader_cfg, device=device, pool=pool,
                                 dtype=dtype, autocast=autocast_for(precision, device), desc=desc)


def extract_windows(encoder: nn.Module, shards: str, *, num_frames: int, sampling_rate: int,
                    window_stride: int, input_size: int, mean: Sequence[float],
                    std: Sequence[float], batch_size: int, backend: str = "auto",
                    short_side: int = 0, device: torch.device,
                    dtype: torch.dtype = torch.float32) -> FeatureSet:
    """Sliding-window rows of this rank's shards (``shards[rank::world]``), one row per
    window (``finetune.detection.features``), with ``window_center`` seconds per row and, per
    video, its json plus ``fps``, ``duration``, ``span``, ``window_stride`` in ``videos``."""
    world, rank = get_world_size(), get_rank()
    urls = resolve_shards(shards).urls[rank::world]
    keys, labels, views, chunks, centers, videos = [], [], [], [], [], {}
    samples = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()) if urls else []
    for sample in progress(samples, desc=f"windows {Path(shards).name}"):
        key, url = sample["__key__"], sample.get("__url__", "?")
        try:
            meta = json.loads(sample["json"])
            video = next(sample[e] for e in VIDEO_EXTENSIONS if e in sample)
            reader = open_video(video, backend, short_side,
                                (int(meta.get("width", 0)), int(meta.get("height", 0))))
        except (KeyError, StopIteration, ValueError, DecodeError) as err:
            raise ValueError(f"sample {key!r} of shard {url}: cannot read its video and json "
                             f"({err!r})") from err
        fps = float(meta.get("fps") or reader.fps)
        features, grid = sliding_window_features(
            encoder, reader, fps, num_frames=num_frames, sampling_rate=sampling_rate,
            window_stride=window_stride, size=input_size, mean=mean, std=std,
            batch_size=batch_size, device=device)
        steps = torch.arange(grid.num_steps)
        keys += [key] * grid.num_steps
        labels.append(torch.full((grid.num_steps,), int(meta.get("label", -1)), dtype=torch.long))
        views.append(steps)
        chunks.append(features.to(dtype))
        centers.append(grid.to_seconds(steps.double()).float())
        videos[key] = {"json": meta, "where": f"{url}:{key}", "fps": fps, "span": grid.span,
                       "window_stride": window_stride, "duration": reader.num_frames / fps}
    if not chunks:
        return FeatureSet([], torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                          torch.zeros(0, encoder.embed_dim, dtype=dtype),
                          {"window_center": torch.zeros(0)})
    return FeatureSet(keys, torch.cat(labels), torch.cat(views), torch.cat(chunks),
                      {"window_center": torch.cat(centers)}, videos=videos)


def run(cfg: ExtractConfig) -> dict:
    """Embed ``cfg.data.shards`` with the frozen encoder into ``cfg.out``; returns ``{"out",
    "rows"}`` (the file and this rank's row count)."""
    cfg = cfg.resolve()
    init_distributed()
    device = default_device()
    encoder = build_model(replace(cfg.model, num_classes=0), cfg.weights).to(device).eval()
    dtype = STORAGE_DTYPES[cfg.dtype]
    if cfg.mode == "sliding_window":
        if cfg.pool != "mean":
            raise ValueError("mode=sliding_window stores mean-pooled features only (pool=mean)")
        data = cfg.data
        local = extract_windows(encoder, data.shards, num_frames=data.num_frames,
                                sampling_rate=data.sampling_rate, window_stride=cfg.window_stride,
                                input_size=data.input_size, mean=data.mean, std=data.std,
                                batch_size=data.batch_size, backend=data.backend,
                                short_side=data.short_side, device=device, dtype=dtype)
    else:
        mode = "test_views" if cfg.mode == "views" else "eval"
        local = extract_split(encoder, cfg.data, cfg.data.shards, mode, pool=cfg.pool,
                              device=device, precision=cfg.precision, dtype=dtype)
    local.info = {"config": to_dict(cfg)}
    path = write_across_ranks(local, cfg.out)
    log.info("wrote features of %s to %s", cfg.data.shards, path)
    return {"out": str(path), "rows": len(local)}


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(ExtractConfig, argv, prog="python -m finetune.extract",
                       description="Write frozen-encoder features of a shard set to one "
                                   "safetensors file (per clip, per view or per sliding window).")
    setup_logging()
    result = run(cfg)
    if get_rank() == 0:
        print(result["out"])
    return 0


if __name__ == "__main__":
    raise SystemExit(run_command(main))
