"""Keyframe-centred clips with actor boxes from WebDataset shards (AVA layout).

A shard sample is an mp4 with a json carrying ``video_id`` (default: the sample key) and
either ``timestamp`` (one keyframe per sample: AVA's usual cut clips) or ``timestamps``
(several keyframes of one video); without either, every annotated keyframe of ``video_id``
that falls inside the clip is used. Timestamps are seconds on the ``video_id`` timeline
(the CSV's); ``source_start`` (written by ``data_tools.build`` when it cuts a clip) is where
the mp4 begins on that timeline. The clip around keyframe frame ``k`` is ``num_frames``
frames ``sampling_rate`` apart, ``k`` at position ``num_frames // 2``, clamped to the video.

Frames are resized whole to ``input_size x input_size``, so normalised boxes stay valid.
Clips stay uint8, as the video loader's (``data_tools.clips``): the consumer normalises a
batch on its device (``data_tools.clips.model_input`` with this config's mean and std).
Training yields keyframes with ground-truth actors (boxes optionally jittered and flipped);
evaluation yields every annotated keyframe once across ranks and workers, with the boxes
to classify: proposals above the score threshold, or the ground-truth boxes.
"""
from __future__ import annotations

import json
import random
from typing import Any, Iterator

import torch
import webdataset as wds

from data_tools.decode import VIDEO_EXTENSIONS, DecodeError, open_video, video_member
from data_tools.shard_set import resolve_shards
from data_tools.transforms import crop_resize
from finetune.detection.annotations import AnnotationError, FrameAnnotation, FrameKey
from finetune.detection.config import AVADataConfig
from finetune.detection.roi_head import jitter_boxes
from runtime.training import DataStream


def keyframe_indices(keyframe: int, num_frames: int, sampling_rate: int,
                     num_video_frames: int) -> list[int]:
    """Frame indices of the clip centred on ``keyframe`` (clamped to the video)."""
    first = keyframe - (num_frames // 2) * sampling_rate
    return [min(max(first + i * sampling_rate, 0), num_video_frames - 1) for i in range(num_frames)]


class KeyframeClips:
    """Turns shard samples into keyframe examples (a webdataset pipeline stage).

    Args:
        annotations: ground truth by keyframe (which keyframes exist, and training targets).
        test_boxes: boxes to classify per keyframe in evaluation (None in training).
    """

    def __init__(self, cfg: AVADataConfig, annotations: dict[FrameKey, FrameAnnotation],
                 test_boxes: dict[FrameKey, torch.Tensor] | None, train: bool, seed: int):
        self.cfg, self.annotations = cfg, annotations
        self.test_boxes, self.train = test_boxes, train
        self.by_video: dict[str, list[float]] = {}
        for video_id, ts in annotations:
            self.by_video.setdefault(video_id, []).append(ts)
        self.seed = seed

    def __call__(self, samples: Iterator[dict]) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        generator = torch.Generator().manual_seed(self.seed * 1000 + (info.id if info else 0))
        for sample in samples:
            yield from self.examples(sample, generator)

    def examples(self, sample: dict, generator: torch.Generator) -> list[dict]:
        where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        meta = self._meta(sample, where)
        video_id = str(meta.get("video_id", sample["__key__"]))
        listed = "timestamp" in meta or "timestamps" in meta
        wanted = [self._keyframe(video_id, ts) for ts in self._timestamps(meta, video_id, where)]
        wanted = [key for key in wanted if key is not None]
        if not wanted:
            return []
        try:
            reader = open_video(video_member(sample)[1], self.cfg.backend, num_threads=1)
            fps, start = reader.fps, float(meta.get("source_start", 0.0))
            clips = {}
            for key in wanted:
                keyframe = int(round((key[1] - start) * fps))
                if 0 <= keyframe < reader.num_frames:
                    clips[key] = keyframe_indices(keyframe, self.cfg.num_frames,
                                                  self.cfg.sampling_rate, reader.num_frames)
                elif listed:  # annotations of other clips of the same video are not an error
                    raise AnnotationError(where, f"keyframe {key[1]} s is outside the clip "
                                          f"({reader.num_frames} frames at {fps:g} fps from "
                                          f"{start} s)")
            if not clips:
                return []
            needed = sorted({i for indices in clips.values() for i in indices})
            frames = reader.get_frames(needed)
        except DecodeError as err:
            raise DecodeError(f"{where}: {err}", err.reason) from err
        row = {index: r for r, index in enumerate(needed)}
        height, width = frames.shape[1:3]
        out = []
        for key, indices in clips.items():
            flip = self.train and self.cfg.flip and bool(torch.rand((), generator=generator) < 0.5)
            clip = crop_resize(frames[[row[i] for i in indices]], (0, 0, height, width),
                               self.cfg.input_size, flip)
            example = {"video": clip.permute(1, 0, 2, 3), "key": key}  # uint8 (C, T, H, W)
            if self.train:
                truth = self.annotations[key]
                boxes = jitter_boxes(truth.boxes, self.cfg.box_jitter, generator)
                example.update(boxes=_flip_boxes(boxes) if flip else boxes,
                               labels=truth.labels.float())
            else:
                example["boxes"] = self.test_boxes[key]
            out.append(example)
        return out

    def _keyframe(self, video_id: str, ts: float) -> FrameKey | None:
        key = (video_id, float(ts))
        if key not in self.annotations:
            return None
        if self.train:
            return key if self.annotations[key].boxes.shape[0] else None
        boxes = self.test_boxes.get(key)
        return key if boxes is not None and boxes.shape[0] else None

    def _timestamps(self, meta: dict, video_id: str, where: str) -> list[float]:
        if "timestamp" in meta:
            raw = [meta["timestamp"]]
        elif "timestamps" in meta:
            raw = meta["timestamps"]
        else:
            return self.by_video.get(video_id, [])
        try:
            return [float(t) for t in raw]
        except (TypeError, ValueError):
            raise AnnotationError(where, f"timestamps must be numbers, got {raw!r}") from None

    @staticmethod
    def _meta(sample: dict, where: str) -> dict:
        if video_member(sample) is None or "json" not in sample:
            raise AnnotationError(where, "sample needs a video member (one of "
                                  f"{', '.join(VIDEO_EXTENSIONS)}) and a .json member")
        try:
            meta = json.loads(sample["json"])
        except ValueError as err:
            raise AnnotationError(where, f"unreadable json: {err}") from None
        if not isinstance(meta, dict):
            raise AnnotationError(where, "json must be an object")
        return meta


def _flip_boxes(boxes: torch.Tensor) -> torch.Tensor:
    return torch.stack([1 - boxes[:, 2], boxes[:, 1], 1 - boxes[:, 0], boxes[:, 3]], dim=1)


def collate_keyframes(examples: list[dict]) -> dict[str, Any]:
    """``video (B, C, T, H, W)`` uint8, ``boxes`` list of ``(K_b, 4)``, ``key`` list of frame keys
    and, in training, ``labels (sum K_b, num_classes)`` float."""
    batch: dict[str, Any] = {
        "video": torch.stack([e["video"] for e in examples]),
        "boxes": [e["boxes"] for e in examples],
        "key": [e["key"] for e in examples],
    }
    if "labels" in examples[0]:
        batch["labels"] = torch.cat([e["labels"] for e in examples])
    return batch


def build_keyframe_loader(
    cfg: AVADataConfig, shards: str, annotations: dict[FrameKey, FrameAnnotation], train: bool,
    rank: int, world_size: int, seed: int, test_boxes: dict[FrameKey, torch.Tensor] | None = None,
) -> tuple[wds.WebLoader | list, int | None]:
    """Loader of one rank and, in training, its batches per epoch.

    Training resamples shards (an endless stream cut into epochs of
    ``keyframes // (batch_size * world_size)`` batches, equal on every rank); evaluation
    reads this rank's shards once (``rank::world_size``), split over at most one worker
    per shard.
    """
    urls = resolve_shards(shards).urls
    stage = KeyframeClips(cfg, annotations, test_boxes, train, seed + 7919 * rank)
    if train:
        num_keyframes = sum(1 for a in annotations.values() if a.boxes.shape[0])
        num_batches = num_keyframes // (cfg.batch_size * world_size)
        if num_batches < 1:
            raise ValueError(
                f"{num_keyframes} training keyframes give no full batch of {cfg.batch_size} on "
                f"{world_size} ranks")
        pipeline = wds.DataPipeline(
            wds.ResampledShards(urls, seed=seed, deterministic=True),
            wds.tarfile_to_samples(),
            wds.shuffle(cfg.shuffle_buffer, initial=cfg.shuffle_buffer // 2 + 1,
                        rng=random.Random(seed + rank)),
            stage,
            wds.batched(cfg.batch_size, collation_fn=collate_keyframes, partial=False),
        )
        workers = cfg.num_workers
    else:
        num_batches = None
        rank_urls = urls[rank::world_size]
        if not rank_urls:  # more ranks than shards: this rank has nothing to evaluate
            return [], None
        workers = min(cfg.num_workers, len(rank_urls))
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(rank_urls), wds.split_by_worker, wds.tarfile_to_samples(), stage,
            wds.batched(cfg.batch_size, collation_fn=collate_keyframes, partial=True),
        )
    loader = wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=workers)
    if num_batches is not None:
        loader = loader.with_epoch(num_batches)
    return loader, num_batches


def keyframe_stream(cfg: AVADataConfig, annotations: dict[FrameKey, FrameAnnotation], seed: int,
                    rank: int, world_size: int, grad_accum_steps: int) -> DataStream:
    """This rank's training keyframes (``cfg.shards``) as a resumable ``DataStream``: the
    loader is rebuilt at every epoch start and after every checkpoint with a seed derived from
    ``(seed, epoch, batch)``, as pretraining and fine-tuning do."""
    def make_loader(segment_seed: int) -> wds.WebLoader:
        return build_keyframe_loader(cfg, cfg.shards, annotations, True, rank, world_size,
                                     segment_seed)[0]

    _, batches = build_keyframe_loader(cfg, cfg.shards, annotations, True, rank, world_size, seed)
    return DataStream(make_loader, seed, batches, grad_accum_steps)


def select_proposals(proposals: dict[FrameKey, tuple[torch.Tensor, torch.Tensor]],
                     threshold: float) -> dict[FrameKey, torch.Tensor]:
    """Proposal boxes with score >= ``threshold`` per keyframe."""
    return {key: boxes[scores >= threshold] for key, (boxes, scores) in proposals.items()}
