"""The loader's worker-side stages: tar sample -> clip dicts (``ClipMaker``) -> batch
(``ClipCollator``).

A clip dict holds ``video`` uint8 ``(T, C, H, W)``, ``label`` int, ``key`` str, and, depending
on the mode, ``mask`` / ``decoder_mask`` bool ``(N,)`` (True = masked) and ``view`` int. A
batch holds ``video`` ``(B, C, T, H, W)`` - uint8 pixels with ``data.normalize="device"``
(the default; a view of channels-last ``(B, T, H, W, C)`` memory, not contiguous),
normalised float32 with ``"loader"`` -, ``label`` long ``(B,)``, ``key``
list[str], and ``mask`` / ``decoder_mask`` bool ``(B, N)``, ``view`` long ``(B,)`` when the
clips have them. ``model_input`` turns a batch's video into the model's float32 input on a
device in either case. The modes are those of ``data_tools.loader``.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Iterator, Protocol, Sequence

import numpy as np
import torch
from torch.utils.data import get_worker_info

from data_tools import sampling
from data_tools.augment import clip_appearance
from data_tools.batch_buffers import BatchBuffers, LeasedBatch, batch_memory
from data_tools.config import DataConfig, Normalize
from data_tools.decode import (VIDEO_EXTENSIONS, DecodeError, backend_chain, close_reader,
                               open_video, video_member)
from data_tools.loader_stats import WORKER_CHECK_MIN_SAMPLES, LoaderStats, SampleError
from data_tools.masking import MaskGenerator
from data_tools.seeding import stream_seed
from data_tools.transforms import ClipTransform, normalize_batch, normalize_video, stack_clips
from data_tools.worker_watch import WorkerWatch
from runtime.errors import InputError

logger = logging.getLogger(__name__)

MODES = ("pretrain", "train", "eval", "test_views")
RESAMPLED_MODES = ("pretrain", "train")


class ClipMaker:
    """Turns raw tar samples into clip dicts; skips and counts samples that fail.

    Each video is decoded once (the union of the frames its clips need); in pretrain/train it
    yields ``repeat`` independently augmented clips (of one frame set, or each at its own
    temporal position with ``repeat_sampling="independent"``), in test_views
    ``num_test_clips x num_test_crops`` views.
    """

    def __init__(self, cfg: DataConfig, mode: str, rank: int, stats: LoaderStats,
                 mask_generator=None, decoder_mask_generator=None):
        self.cfg, self.mode, self.rank, self.stats = cfg, mode, rank, stats
        backend_chain(cfg.backend)  # an explicit backend that is not installed fails here
        self.backend = cfg.backend
        crop = cfg.crop if cfg.crop != "auto" else (
            "multiscale" if mode == "pretrain" else "random_resized")
        self.transform = ClipTransform(cfg.input_size, crop, cfg.flip,
                                       clip_appearance(cfg) if mode == "train" else None)
        self.mask_generator = mask_generator
        self.decoder_mask_generator = decoder_mask_generator
        self.watch = WorkerWatch(cfg.num_workers)  # what each worker is decoding (timeouts)
        self.passes = 0

    def __call__(self, samples: Iterator[dict]) -> Iterator[dict]:
        self.passes += 1
        seed = stream_seed(self.cfg.seed, self.rank, 2, self.passes)
        rng = np.random.default_rng(seed)
        mask_rng = torch.Generator().manual_seed(seed)
        for sample in samples:
            key, url = sample.get("__key__", "?"), sample.get("__url__", "?")
            self.watch.start(url, key)
            try:
                clips = self.make_clips(sample, rng)
            except SampleError as err:
                self._skip(err.reason, f"{err}", key, url)
                continue
            finally:
                self.watch.finish()
            self.stats.add_decoded()
            for clip in clips:
                if self.mask_generator is not None:
                    clip["mask"] = _call_mask_generator(self.mask_generator, mask_rng)
                if self.decoder_mask_generator is not None:
                    clip["decoder_mask"] = _call_mask_generator(self.decoder_mask_generator,
                                                                mask_rng)
                yield clip

    def _stored_stride(self, frame_stride: int, sample: dict) -> int:
        """The dense-sampling stride in stored frames: ``data.sampling_rate`` counts source
        frames, and a shard set built with ``--frame-stride s`` keeps every s-th of them."""
        rate = self.cfg.sampling_rate
        if frame_stride == 1 or self.cfg.sampling != "dense":
            return rate
        if rate % frame_stride:
            raise InputError(
                f"shard {sample.get('__url__', '?')}, sample {sample.get('__key__', '?')}: "
                f"the set stores every {frame_stride}th frame (built with --frame-stride "
                f"{frame_stride}) but data.sampling_rate={rate} is not a multiple of it; set "
                f"data.sampling_rate to a multiple of {frame_stride}, or rebuild the shards "
                f"with --frame-stride 1 (or a divisor of {rate})")
        return rate // frame_stride

    def _skip(self, reason: str, message: str, key: str, url: str) -> None:
        self.stats.add_skipped(reason)
        logger.warning("skipping sample %r in shard %s: %s (%s)", key, url, reason, message)
        totals = self.stats.worker_counts()
        if int(totals.sum()) >= WORKER_CHECK_MIN_SAMPLES:
            info = get_worker_info()
            self.stats.check(totals, self.cfg.max_failure_fraction,
                             f"rank {self.rank} worker {info.id if info else 0}")

    def make_clips(self, sample: dict, rng: np.random.Generator) -> list[dict]:
        label, size, frame_stride = _read_meta(sample)
        member = video_member(sample)
        if member is None:
            raise SampleError("missing_video", f"no video member (.{'/.'.join(VIDEO_EXTENSIONS)})")
        cfg = self.cfg
        stride = self._stored_stride(frame_stride, sample)
        independent = cfg.repeat_sampling == "independent"
        reader = None
        try:
            reader = open_video(member[1], self.backend, cfg.short_side, size, num_threads=1)
            if self.mode in RESAMPLED_MODES:
                clip_indices = [sampling.train_indices(reader.num_frames, cfg.num_frames,
                                                       stride, cfg.sampling, rng)
                                for _ in range(cfg.repeat if independent else 1)]
            else:
                num_clips = cfg.num_test_clips if self.mode == "test_views" else 1
                clip_indices = sampling.multi_view_indices(
                    reader.num_frames, cfg.num_frames, stride, num_clips, cfg.sampling)
            unique, inverse = np.unique(np.concatenate(clip_indices), return_inverse=True)
            frames = reader.get_frames(unique.tolist())
        except DecodeError as err:
            raise SampleError(err.reason, str(err)) from err
        finally:
            if reader is not None:
                close_reader(reader)
                if getattr(reader, "fallbacks", 0):
                    self.stats.add_event("decoder_fallback", reader.fallbacks)
        key = sample["__key__"]
        positions = [torch.from_numpy(p) for p in inverse.reshape(len(clip_indices), -1)]
        if len(positions) == 1 and np.array_equal(inverse, np.arange(len(inverse))):
            positions = [None]  # the decoded frames are the clip: no gather needed
        if self.mode in RESAMPLED_MODES and not independent:
            positions = positions * cfg.repeat
        clips = []
        for clip_idx, pos in enumerate(positions):
            if self.mode in RESAMPLED_MODES:
                video = self.transform.train(frames, rng, pos)
                clips.append({"video": video, "label": label, "key": key})
                continue
            num_crops = cfg.num_test_crops if self.mode == "test_views" else 1
            for crop_idx, video in enumerate(self.transform.test(frames, num_crops, pos)):
                clip = {"video": video, "label": label, "key": key}
                if self.mode == "test_views":
                    clip["view"] = clip_idx * num_crops + crop_idx
                clips.append(clip)
        return clips


def _read_meta(sample: dict) -> tuple[int, tuple[int, int], int]:
    """``label``, stored ``(width, height)`` (0 when absent) and ``frame_stride`` (stored
    frame i is source frame ``i * frame_stride``; 1 when absent) from the sample's json."""
    if "json" not in sample:
        raise SampleError("missing_json", "no .json member")
    try:
        meta = json.loads(sample["json"])
        if not isinstance(meta, dict):
            raise ValueError(f"expected an object, got {type(meta).__name__}")
        frame_stride = int(meta.get("frame_stride", 1))
        if frame_stride < 1:
            raise ValueError(f"frame_stride must be >= 1, got {frame_stride}")
        return (int(meta.get("label", -1)), (int(meta.get("width", 0)), int(meta.get("height", 0))),
                frame_stride)
    except (ValueError, TypeError) as err:
        raise SampleError("bad_json", f"unreadable metadata: {err}") from err


def _call_mask_generator(generator, rng: torch.Generator) -> torch.Tensor:
    """This package's generators take the worker's RNG; other callables take no argument."""
    return generator(rng) if isinstance(generator, MaskGenerator) else generator()


class ClipCollator:
    """Clip dicts -> a batch. The clips are written straight into the batch tensor: uint8
    with ``normalize="device"``, normalised float32 (4x the bytes, converted in the worker)
    with ``normalize="loader"``. Inside a DataLoader worker that tensor is shared memory (as
    ``default_collate`` makes it), so handing the batch to the main process copies nothing;
    with ``buffers`` the worker refills a buffer the main process has let go of instead of
    making a new segment per batch (``data_tools.batch_buffers``)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...],
                 normalize: Normalize = "device", buffers: BatchBuffers | None = None):
        self.mean, self.std, self.normalize = mean, std, normalize
        self.buffers = buffers

    def __call__(self, clips: list[dict]) -> dict[str, Any]:
        first = clips[0]["video"]  # (T, C, H, W) uint8
        num_frames, channels, height, width = first.shape
        videos = [c["video"] for c in clips]
        if self.normalize == "loader":
            memory, lease = self._buffer((len(clips), channels, num_frames, height, width),
                                         torch.float32)
            video = normalize_batch(videos, self.mean, self.std, out=memory)
        else:
            # (B, T, H, W, C) memory: the crops are channels-last already, so filling a slot
            # is a plain copy; model_input makes the batch contiguous on the consumer's device
            memory, lease = self._buffer((len(clips), num_frames, height, width, channels),
                                         torch.uint8)
            video = stack_clips(videos, out=memory.permute(0, 4, 1, 2, 3))
        batch: dict[str, Any] = {
            "video": video,
            "label": torch.tensor([c["label"] for c in clips], dtype=torch.long),
            "key": [c["key"] for c in clips],
        }
        for name in ("mask", "decoder_mask"):
            if name in clips[0]:
                batch[name] = torch.stack([c[name] for c in clips])
        if "view" in clips[0]:
            batch["view"] = torch.tensor([c["view"] for c in clips], dtype=torch.long)
        return batch if lease is None else LeasedBatch(batch, lease)

    def _buffer(self, shape: tuple[int, ...], dtype: torch.dtype):
        """An uninitialised contiguous tensor and its lease (None when not pooled)."""
        if self.buffers is not None:
            return self.buffers.take(shape, dtype)
        return batch_memory(shape, dtype), None


class Normalization(Protocol):
    """What ``model_input`` reads: a ``DataConfig``, or any config with mean and std."""
    mean: Sequence[float]
    std: Sequence[float]


def model_input(batch: dict[str, Any], device: torch.device | str,
                data: Normalization) -> torch.Tensor:
    """The model's input from a batch: ``batch["video"]`` ``(B, C, T, H, W)`` copied to
    ``device`` (non-blocking; from pinned memory the copy overlaps) and normalised there with
    ``data.mean`` / ``data.std`` -> contiguous float32 ``(B, C, T, H, W)``. A uint8 batch may
    be a channels-last view (``ClipCollator``): it is copied as laid out and made contiguous
    by the conversion on ``device``. A batch normalised by the loader
    (``data.normalize="loader"``) is only copied."""
    return normalize_video(batch["video"].to(device, non_blocking=True), data.mean, data.std)
