"""``DataConfig``: the ``data`` config section, i.e. what ``data_tools.loader.build_loader``
reads (shards, clip sampling, augmentation, batching, masks), with its validation."""
from __future__ import annotations

from dataclasses import dataclass, field

from data_tools import sampling
from data_tools.decode import BACKENDS
from data_tools.masking import DECODER_MASK_TYPES, MASK_TYPES
from data_tools.transforms import IMAGENET_MEAN, IMAGENET_STD

CROPS = ("auto", "multiscale", "random_resized", "center")
REPEAT_SAMPLINGS = ("shared", "independent")


@dataclass
class DataConfig:
    shards: str = field(default="", metadata={
        "help": "a manifest.json, a shard-set folder, or shard URLs: a glob or brace pattern "
                "('train-{000000..000099}.tar'), '::'-separated list, 'pipe:' commands"})
    num_frames: int = field(default=16, metadata={"help": "frames per clip"})
    sampling_rate: int = field(default=4, metadata={
        "help": "frame stride of dense sampling (4 for Kinetics-style, 2 for SSv2-style)"})
    sampling: str = field(default="dense", metadata={
        "help": "'dense' (random start, fixed stride) or 'segment' (TSN: one frame per "
                "segment, as for SSv2 fine-tuning)"})
    num_test_clips: int = field(default=1, metadata={
        "help": "clips per video in test_views mode (VideoMAE: 5 for K400, 2 for SSv2)"})
    num_test_crops: int = field(default=1, metadata={
        "help": "spatial crops per clip in test_views mode: 1 (centre) or 3"})
    input_size: int = field(default=224, metadata={"help": "output height and width"})
    short_side: int = field(default=0, metadata={
        "help": "resize at decode time so the shorter side has this length (0 = keep)"})
    backend: str = field(default="auto", metadata={
        "help": "video decoder: 'auto' (decord if installed, else PyAV), 'decord', 'pyav'"})
    mean: tuple[float, float, float] = field(default=IMAGENET_MEAN, metadata={
        "help": "per-channel mean for normalisation (0-1 pixel units)"})
    std: tuple[float, float, float] = field(default=IMAGENET_STD, metadata={
        "help": "per-channel std for normalisation (0-1 pixel units)"})
    batch_size: int = field(default=8, metadata={
        "help": "clips per batch per rank (repeated clips count individually)"})
    num_workers: int = field(default=4, metadata={"help": "DataLoader worker processes"})
    shuffle_buffer: int = field(default=200, metadata={
        "help": "samples held per worker for shuffling in pretrain/train (encoded bytes)"})
    epoch_samples: int = field(default=0, metadata={
        "help": "videos per epoch over all ranks in pretrain/train (0 = manifest total)"})
    repeat: int = field(default=1, metadata={
        "help": "repeated augmentation: clips sampled and augmented per decoded video "
                "in pretrain/train (VideoMAE V2 / mae_st use 4)"})
    repeat_sampling: str = field(default="shared", metadata={
        "help": "with repeat > 1: 'shared' - the clips share one frame set and differ in "
                "crop, flip and mask (VideoMAE V2); 'independent' - each clip has its own "
                "temporal position (mae_st), the union of their frames is decoded (on short "
                "videos nearly the whole video)"})
    flip: bool = field(default=False, metadata={
        "help": "random horizontal flip in pretrain/train (off for direction-sensitive data "
                "such as SSv2, and in VideoMAE pretraining)"})
    crop: str = field(default="auto", metadata={
        "help": "training crop: 'multiscale', 'random_resized', 'center', or 'auto' "
                "(multiscale for pretrain, random_resized for train)"})
    max_failure_fraction: float = field(default=0.05, metadata={
        "help": "stop with an error when more than this fraction of an epoch's samples fail"})
    seed: int = field(default=0, metadata={"help": "seed of shard resampling, shuffling, "
                                                   "clip sampling, crops and masks"})
    mask_type: str = field(default="tube", metadata={
        "help": "encoder mask in pretrain mode: 'tube', 'random' or 'none'"})
    mask_ratio: float = field(default=0.9, metadata={"help": "fraction of masked tokens"})
    decoder_mask_type: str = field(default="none", metadata={
        "help": "decoder mask in pretrain mode: 'none' or 'running_cell' (VideoMAE V2)"})
    decoder_mask_ratio: float = field(default=0.5, metadata={
        "help": "fraction of tokens the decoder does not reconstruct (running_cell)"})
    tubelet_size: int = field(default=2, metadata={"help": "frames per token"})
    patch_size: int = field(default=16, metadata={"help": "pixels per token side"})

    def validate(self) -> None:
        _choice("sampling", self.sampling, sampling.SAMPLINGS)
        _choice("backend", self.backend, BACKENDS)
        _choice("crop", self.crop, CROPS)
        _choice("repeat_sampling", self.repeat_sampling, REPEAT_SAMPLINGS)
        _choice("mask_type", self.mask_type, MASK_TYPES)
        _choice("decoder_mask_type", self.decoder_mask_type, DECODER_MASK_TYPES)
        for name in ("num_frames", "sampling_rate", "num_test_clips", "input_size",
                     "batch_size", "repeat", "tubelet_size", "patch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("short_side", "num_workers", "shuffle_buffer", "epoch_samples"):
            if getattr(self, name) < 0:
                raise ValueError(f"data.{name} must be >= 0, got {getattr(self, name)}")
        if self.num_test_crops not in (1, 3):
            raise ValueError(f"data.num_test_crops must be 1 or 3, got {self.num_test_crops}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"data.mean/std need 3 values with std > 0, got {self.mean}, "
                             f"{self.std}")
        if not 0.0 <= self.max_failure_fraction <= 1.0:
            raise ValueError(f"data.max_failure_fraction must be in [0, 1], got "
                             f"{self.max_failure_fraction}")
        if self.num_frames % self.tubelet_size:
            raise ValueError(f"data.num_frames={self.num_frames} is not a multiple of "
                             f"tubelet_size={self.tubelet_size}")
        if self.input_size % self.patch_size:
            raise ValueError(f"data.input_size={self.input_size} is not a multiple of "
                             f"patch_size={self.patch_size}")
        if not 0.0 <= self.mask_ratio < 1.0 or not 0.0 < self.decoder_mask_ratio < 1.0:
            raise ValueError(f"data.mask_ratio must be in [0, 1) and decoder_mask_ratio in "
                             f"(0, 1), got {self.mask_ratio}, {self.decoder_mask_ratio}")

    @property
    def token_grid(self) -> tuple[int, int, int]:
        """``(T', H', W')`` of the model's token grid for these clips."""
        side = self.input_size // self.patch_size
        return self.num_frames // self.tubelet_size, side, side


def _choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"data.{name}={value!r} is not one of {list(choices)}")
