"""``DataConfig``: the ``data`` config section, i.e. what ``data_tools.loader.build_loader``
reads (shards, clip sampling, augmentation, batching, masks), with its validation.

The clip geometry (``num_frames``, ``input_size``, ``patch_size``, ``tubelet_size``) belongs
to the model section: a stage config fills it in with
``data.with_geometry(**model.clip_geometry())`` in its ``resolve()``, so a YAML states it once,
under ``model:``. A DataConfig built in code passes the four values itself; whatever reads
them calls ``require_geometry()`` first.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from data_tools.decode import Backend
from data_tools.masking import DecoderMaskType, MaskType
from data_tools.sampling import Sampling
from data_tools.shard_set import ShardSpec, shard_sources
from runtime.config import check_choices, derived, help_text
from runtime.constants import IMAGENET_MEAN, IMAGENET_STD

# The choices of the fields below. Those whose list lives with the code that uses it (the
# decoder, the samplers, the mask generators) are a Literal over that module's tuple.
Crop = Literal["auto", "multiscale", "random_resized", "center"]
RepeatSampling = Literal["shared", "independent"]
Normalize = Literal["device", "loader"]

# The clip geometry: each data field and the model section's key it is derived from.
GEOMETRY_MODEL_KEYS = {"num_frames": "num_frames", "input_size": "img_size",
                       "patch_size": "patch_size", "tubelet_size": "tubelet_size"}


def _geometry_help(text: str, field_name: str) -> dict:
    return help_text(f"{text}; derived from model.{GEOMETRY_MODEL_KEYS[field_name]} by the stage "
                     "(leave unset; an old YAML may still set it if it agrees)")


@dataclass
class DataConfig:
    shards: ShardSpec = field(default="", metadata=help_text(
        "a manifest.json, a shard-set folder, or shard URLs: a glob or brace pattern "
        "('train-{000000..000099}.tar'), '::'-separated list, 'pipe:' commands; or, for "
        "pretrain/train, several sets mixed by weight: {name: {path: ..., weight: w}, ...} "
        "(weights relative; each batch takes about w / sum(w) of its clips from the set)"))
    num_frames: int | None = field(
        default=None, metadata=_geometry_help("frames per clip", "num_frames"))
    sampling_rate: int = field(default=4, metadata=help_text(
        "frame stride of dense sampling (4 for Kinetics-style, 2 for SSv2-style)"))
    sampling: Sampling = field(default="dense", metadata=help_text(
        "'dense' (random start, fixed stride) or 'segment' (TSN: one frame per "
        "segment, as for SSv2 fine-tuning)"))
    num_test_clips: int = field(default=1, metadata=help_text(
        "clips per video in test_views mode (VideoMAE: 5 for K400, 2 for SSv2)"))
    num_test_crops: int = field(default=1, metadata=help_text(
        "spatial crops per clip in test_views mode: 1 (centre) or 3"))
    input_size: int | None = field(
        default=None, metadata=_geometry_help("output height and width", "input_size"))
    short_side: int = field(default=0, metadata=help_text(
        "resize at decode time so the shorter side has this length (0 = keep)"))
    backend: Backend = field(default="auto", metadata=help_text(
        "video decoder: 'auto' (the fastest installed - PyAV, then torchcodec, then decord - "
        "with a sample one cannot read handed to the next, counted as decoder_fallback), "
        "'pyav', 'torchcodec', 'decord'"))
    mean: tuple[float, float, float] = field(default=IMAGENET_MEAN, metadata=help_text(
        "per-channel mean for normalisation (0-1 pixel units)"))
    std: tuple[float, float, float] = field(default=IMAGENET_STD, metadata=help_text(
        "per-channel std for normalisation (0-1 pixel units)"))
    normalize: Normalize = field(default="device", metadata=help_text(
        "where clips become normalised float32: 'device' - the loader ships uint8 batches (4x "
        "less shared memory, no float work in the workers) and the consumer normalises after "
        "the copy to its device (data_tools.clips.model_input), as timm's PrefetchLoader and "
        "DALI do; 'loader' - the workers ship normalised float32 batches (the old path, for "
        "consumers that read batch['video'] directly). Both give bit-identical model inputs"))
    batch_size: int = field(default=8, metadata=help_text(
        "clips per batch per rank (repeated clips count individually)"))
    num_workers: int = field(default=4, metadata=help_text("DataLoader worker processes"))
    timeout_s: float = field(default=300.0, metadata=help_text(
        "with num_workers > 0: stop with an error naming the shard and key a worker is stuck "
        "on when no batch arrives for this many seconds (a hung decoder); 0 = wait forever"))
    batch_buffers: int = field(default=6, metadata=help_text(
        "with num_workers > 0: shared-memory batch buffers each worker keeps and refills once "
        "no tensor of the consumer uses them (freed with the last view of the batch's video), "
        "instead of a new segment per batch; 0 = a new segment per batch (default_collate's "
        "way). Memory: up to this many batches per worker stay mapped"))
    shuffle_buffer: int = field(default=200, metadata=help_text(
        "samples held per worker for shuffling in pretrain/train (encoded bytes)"))
    epoch_samples: int = field(default=0, metadata=help_text(
        "videos per epoch over all ranks in pretrain/train (0 = manifest total)"))
    repeat: int = field(default=1, metadata=help_text(
        "repeated augmentation: clips sampled and augmented per decoded video "
        "in pretrain/train (VideoMAE V2 / mae_st use 4)"))
    repeat_sampling: RepeatSampling = field(default="shared", metadata=help_text(
        "with repeat > 1: 'shared' - the clips share one frame set and differ in "
        "crop, flip and mask (VideoMAE V2); 'independent' - each clip has its own "
        "temporal position (mae_st), the union of their frames is decoded (on short "
        "videos nearly the whole video)"))
    flip: bool = field(default=False, metadata=help_text(
        "random horizontal flip in pretrain/train (off for direction-sensitive data "
        "such as SSv2, and in VideoMAE pretraining)"))
    crop: Crop = field(default="auto", metadata=help_text(
        "training crop: 'multiscale', 'random_resized', 'center', or 'auto' "
        "(multiscale for pretrain, random_resized for train)"))
    rand_augment_ops: int = field(default=0, metadata=help_text(
        "train mode: RandAugment operations per clip, the same for every frame (torchvision's "
        "RandAugment on the whole clip; VideoMAE fine-tuning: 4; 0 = off). Costly on the CPU "
        "(bench/RESULTS.md, fine-tuning augmentations)"))
    rand_augment_magnitude: int = field(default=7, metadata=help_text(
        "RandAugment magnitude on timm's 0-10 scale (VideoMAE fine-tuning: 7)"))
    random_erasing: float = field(default=0.0, metadata=help_text(
        "train mode: probability that a frame gets one box of per-pixel noise, each frame on "
        "its own (VideoMAE fine-tuning: 0.25, timm RandomErasing mode 'pixel'; 0 = off)"))
    max_failure_fraction: float = field(default=0.05, metadata=help_text(
        "stop with an error when more than this fraction of an epoch's samples fail"))
    seed: int = field(default=0, metadata=help_text("seed of shard resampling, shuffling, "
                                                    "clip sampling, crops and masks"))
    streams: int = field(default=0, metadata=help_text(
        "pretrain/train: data streams the shards are dealt to, each with its own loader and "
        "batch_size clips per batch (0 = the world size when the run starts; a checkpoint "
        "records it). A rank reads streams / world_size of them, so a run resumes on any rank "
        "count that divides it and reads the same global batches"))
    mask_type: MaskType = field(default="tube", metadata=help_text(
        "encoder mask in pretrain mode: 'tube', 'random', 'multiblock' (V-JEPA 3D blocks, "
        "block_* fields) or 'none'"))
    mask_ratio: float = field(default=0.9, metadata=help_text(
        "fraction of masked tokens (tube, random)"))
    block_counts: tuple[int, ...] = field(default=(8, 2), metadata=help_text(
        "multiblock: blocks per mask group; each batch is masked by one group, drawn at "
        "random (V-JEPA: 8 short-range and 2 long-range blocks)"))
    block_scales: tuple[tuple[float, float], ...] = field(
        default=((0.15, 0.15), (0.7, 0.7)), metadata=help_text(
            "multiblock: [min, max] spatial area of each block of a group, as a fraction of "
            "the frame, one range per entry of block_counts"))
    block_aspect_ratio: tuple[float, float] = field(default=(0.75, 1.5), metadata=help_text(
        "multiblock: [min, max] height / width of a block"))
    block_temporal_scale: tuple[float, float] = field(default=(1.0, 1.0), metadata=help_text(
        "multiblock: [min, max] time slices a block spans, as a fraction of the clip "
        "(1 = the whole clip)"))
    decoder_mask_type: DecoderMaskType = field(default="none", metadata=help_text(
        "decoder mask in pretrain mode: 'none' or 'running_cell' (VideoMAE V2)"))
    decoder_mask_ratio: float = field(default=0.5, metadata=help_text(
        "fraction of tokens the decoder does not reconstruct (running_cell)"))
    tubelet_size: int | None = field(
        default=None, metadata=_geometry_help("frames per token", "tubelet_size"))
    patch_size: int | None = field(
        default=None, metadata=_geometry_help("pixels per token side", "patch_size"))

    def validate(self) -> None:
        check_choices(self, "data")
        for name in ("num_frames", "sampling_rate", "num_test_clips", "input_size",
                     "batch_size", "repeat", "tubelet_size", "patch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("short_side", "num_workers", "shuffle_buffer", "epoch_samples", "timeout_s",
                     "batch_buffers"):
            if getattr(self, name) < 0:
                raise ValueError(f"data.{name} must be >= 0, got {getattr(self, name)}")
        if self.rand_augment_ops < 0 or not 0 <= self.rand_augment_magnitude <= 10:
            raise ValueError(f"data.rand_augment_ops must be >= 0 and data.rand_augment_"
                             f"magnitude in 0-10, got {self.rand_augment_ops} and "
                             f"{self.rand_augment_magnitude}")
        if not 0.0 <= self.random_erasing <= 1.0:
            raise ValueError(f"data.random_erasing must be in [0, 1], got {self.random_erasing}")
        if self.num_test_crops not in (1, 3):
            raise ValueError(f"data.num_test_crops must be 1 or 3, got {self.num_test_crops}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"data.mean/std need 3 values with std > 0, got {self.mean}, "
                             f"{self.std}")
        if not 0.0 <= self.max_failure_fraction <= 1.0:
            raise ValueError(f"data.max_failure_fraction must be in [0, 1], got "
                             f"{self.max_failure_fraction}")
        if not 0.0 <= self.mask_ratio < 1.0 or not 0.0 < self.decoder_mask_ratio < 1.0:
            raise ValueError(f"data.mask_ratio must be in [0, 1) and decoder_mask_ratio in "
                             f"(0, 1), got {self.mask_ratio}, {self.decoder_mask_ratio}")
        self._validate_blocks()
        try:
            shard_sources(self.shards)
        except ValueError as err:
            raise ValueError(str(err)) from None

    def _validate_blocks(self) -> None:
        if len(self.block_counts) != len(self.block_scales) or not self.block_counts:
            raise ValueError(f"data.block_counts {list(self.block_counts)} and "
                             f"data.block_scales {[list(s) for s in self.block_scales]} need "
                             "one entry per mask group (at least one)")
        if min(self.block_counts) < 1:
            raise ValueError(f"data.block_counts must be >= 1, got {list(self.block_counts)}")
        ranges = [(f"block_scales[{i}]", r, 1.0) for i, r in enumerate(self.block_scales)]
        ranges += [("block_aspect_ratio", self.block_aspect_ratio, float("inf")),
                   ("block_temporal_scale", self.block_temporal_scale, 1.0)]
        for name, (low, high), top in ranges:
            if not 0 < low <= high <= top:
                raise ValueError(f"data.{name} must be a range [min, max] with 0 < min <= max"
                                 f"{' <= 1' if top == 1.0 else ''}, got {[low, high]}")

    def with_geometry(self, num_frames: int, input_size: int, patch_size: int,
                      tubelet_size: int) -> DataConfig:
        """A copy with the clip geometry filled in (from ``ModelConfig.clip_geometry()``).

        A field this config already sets (an old YAML) must agree: another value raises
        ConfigError (a ValueError) naming both keys and the fix.
        """
        geometry = {"num_frames": num_frames, "input_size": input_size,
                    "patch_size": patch_size, "tubelet_size": tubelet_size}
        return derived(self, "data", **{name: (f"model.{GEOMETRY_MODEL_KEYS[name]}", value)
                                        for name, value in geometry.items()})

    def require_geometry(self) -> DataConfig:
        """``self`` once the clip geometry is set; else a ValueError that says how to set it."""
        missing = [f"data.{name}" for name in GEOMETRY_MODEL_KEYS if getattr(self, name) is None]
        if missing:
            raise ValueError(
                f"{', '.join(missing)} not set: the clip geometry comes from the model section "
                "(a stage config fills it in with cfg.resolve(), i.e. "
                "data.with_geometry(**model.clip_geometry())); a DataConfig built in code "
                "passes num_frames, input_size, patch_size and tubelet_size")
        return self

    @property
    def token_grid(self) -> tuple[int, int, int]:
        """``(T', H', W')`` of the model's token grid for these clips."""
        self.require_geometry()
        side = self.input_size // self.patch_size
        return self.num_frames // self.tubelet_size, side, side
