"""Model configuration: one dataclass for the encoder, the classifier and the pretraining model."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, NamedTuple, get_args

from runtime.config import check_choices, help_text
from runtime.constants import IMAGENET_MEAN, IMAGENET_STD


Attention = Literal["joint", "divided", "space_only", "mixing", "axial", "sparse_local_global",
                    "window"]
PosEmbed = Literal["sincos_1d", "separable_sincos", "separable_learned"]
NormTarget = Literal["patch_channel", "patch", "none"]
FinalNorm = Literal["auto", "norm", "fc_norm"]
ATTENTION_TYPES: tuple[str, ...] = get_args(Attention)


class Dims(NamedTuple):
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float


class SizePreset(NamedTuple):
    encoder: Dims
    decoder: Dims


# Encoder sizes of VideoMAE / VideoMAE V2 (decoder: 4 blocks, width and heads per size).
# "micro" exists for tests only.
SIZES: dict[str, SizePreset] = {
    "micro": SizePreset(Dims(64, 2, 4, 4.0), Dims(32, 1, 2, 4.0)),
    "tiny": SizePreset(Dims(192, 12, 3, 4.0), Dims(96, 4, 3, 4.0)),
    "small": SizePreset(Dims(384, 12, 6, 4.0), Dims(192, 4, 3, 4.0)),
    "base": SizePreset(Dims(768, 12, 12, 4.0), Dims(384, 4, 6, 4.0)),
    "large": SizePreset(Dims(1024, 24, 16, 4.0), Dims(512, 4, 8, 4.0)),
    "huge": SizePreset(Dims(1280, 32, 16, 4.0), Dims(640, 4, 8, 4.0)),
    "giant": SizePreset(Dims(1408, 40, 16, 48 / 11), Dims(512, 4, 8, 4.0)),
}


@dataclass
class ModelConfig:
    size: str = field(default="base", metadata=help_text(
        f"preset for the widths below: {'|'.join(SIZES)} or custom (then set "
        "embed_dim/depth/num_heads)"))
    embed_dim: int = field(default=0, metadata=help_text("encoder width (0 = from size)"))
    depth: int = field(default=0, metadata=help_text("encoder blocks (0 = from size)"))
    num_heads: int = field(default=0, metadata=help_text("encoder attention heads (0 = from size)"))
    mlp_ratio: float = field(default=0.0,
                             metadata=help_text("MLP hidden width / width (0 = from size)"))
    img_size: int = field(default=224, metadata=help_text("input height and width in pixels"))
    patch_size: int = field(default=16, metadata=help_text("spatial patch size in pixels"))
    num_frames: int = field(default=16, metadata=help_text("input frames per clip"))
    tubelet_size: int = field(default=2,
                              metadata=help_text("frames per tubelet (temporal patch size)"))
    in_chans: int = field(default=3, metadata=help_text("input channels"))
    attention: Attention = field(default="joint", metadata=help_text(
        "joint (VideoMAE space-time) | divided (TimeSformer temporal then spatial) | "
        "space_only (within each time slice, no temporal position code, as TimeSformer) | "
        "mixing (XViT space-time mixing) | axial (TimeSformer T+W+H: time, width, height) | "
        "sparse_local_global (TimeSformer L+G: T' x H'/2 x W'/2 windows, then stride 2) | "
        "window (Video Swin 3D windows of model.window_size, shifted in odd blocks); the last "
        "three need every token (no masked input)"))
    window_size: list[int] = field(default_factory=lambda: [2, 7, 7], metadata=help_text(
        "attention=window: window [Tw, M, M] in tokens (clipped to the grid; an axis no longer "
        "than its window is not shifted); the relative position bias table has "
        "(2Tw-1)(2M-1)(2M-1) rows"))
    pos_embed: PosEmbed = field(default="sincos_1d", metadata=help_text(
        "sincos_1d (VideoMAE fixed table over the token index) | separable_sincos | "
        "separable_learned (spatial + temporal tables, as mae_st)"))
    pos_embed_grid: list[int] = field(default_factory=list, metadata=help_text(
        "token grid [T', H', W'] the fixed position table was trained at; the table is built "
        "there and resized per time slice and spatial grid to this model's grid "
        "(empty = this model's grid, as the official code does)"))
    drop_path_rate: float = field(default=0.0,
                                  metadata=help_text("stochastic depth rate of the last block"))
    layer_scale_init: float = field(default=0.0,
                                    metadata=help_text("layer scale init value (0 = off)"))
    grad_checkpointing: bool = field(default=False,
                                     metadata=help_text("recompute each block in backward"))
    num_classes: int = field(default=0, metadata=help_text("classification classes (0 = no head)"))
    head_drop_rate: float = field(default=0.0,
                                  metadata=help_text("dropout before the classification head"))
    final_norm: FinalNorm = field(default="auto", metadata=help_text(
        "where the last LayerNorm sits: norm (on every token) | fc_norm (after mean pooling) | "
        "auto (fc_norm with a head, norm without: the official fine-tuning / pretraining layouts)"))
    decoder_embed_dim: int = field(default=0, metadata=help_text("decoder width (0 = from size)"))
    decoder_depth: int = field(default=0, metadata=help_text("decoder blocks (0 = from size)"))
    decoder_num_heads: int = field(default=0, metadata=help_text("decoder heads (0 = from size)"))
    norm_target: NormTarget = field(default="patch_channel", metadata=help_text(
        "reconstruction target: patch_channel (VideoMAE: per patch and channel) | "
        "patch (MAE: whole patch) | none (raw pixels in [0, 1])"))
    decoder_mask_ratio: float = field(default=0.0, metadata=help_text(
        "VideoMAE V2 decoder masking: 0 = decoder reconstructs all masked tokens; "
        "0.5 = running-cell subset (the loader supplies decoder_mask)"))
    pixel_mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN), metadata=help_text(
        "per-channel mean the input was normalised with (undone for the target)"))
    pixel_std: list[float] = field(default_factory=lambda: list(IMAGENET_STD), metadata=help_text(
        "per-channel std the input was normalised with (undone for the target)"))

    # -- derived values -------------------------------------------------------------------

    @property
    def grid(self) -> tuple[int, int, int]:
        """Token grid (T', H', W')."""
        side = self.img_size // self.patch_size
        return self.num_frames // self.tubelet_size, side, side

    @property
    def num_tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w

    @property
    def patch_dim(self) -> int:
        """Pixels per tubelet: tubelet * patch * patch * channels."""
        return self.tubelet_size * self.patch_size ** 2 * self.in_chans

    def clip_geometry(self) -> dict[str, int]:
        """The clip geometry the data section derives from this model: the keyword arguments
        of ``data_tools.config.DataConfig.with_geometry``."""
        return {"num_frames": self.num_frames, "input_size": self.img_size,
                "patch_size": self.patch_size, "tubelet_size": self.tubelet_size}

    @property
    def uses_fc_norm(self) -> bool:
        if self.final_norm == "auto":
            return self.num_classes > 0
        return self.final_norm == "fc_norm"

    def encoder_dims(self) -> Dims:
        preset = SIZES.get(self.size)
        base = preset.encoder if preset else Dims(0, 0, 0, 4.0)
        return Dims(self.embed_dim or base.embed_dim, self.depth or base.depth,
                    self.num_heads or base.num_heads, self.mlp_ratio or base.mlp_ratio)

    def decoder_dims(self) -> Dims:
        preset = SIZES.get(self.size)
        if preset:
            base = preset.decoder
        else:  # custom: half width, 4 blocks, as many heads as fit 64-channel heads
            width = self.encoder_dims().embed_dim // 2
            base = Dims(width, 4, max(1, width // 64), 4.0)
        return Dims(self.decoder_embed_dim or base.embed_dim, self.decoder_depth or base.depth,
                    self.decoder_num_heads or base.num_heads, base.mlp_ratio)

    # -- validation -----------------------------------------------------------------------

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        if self.size not in SIZES and self.size != "custom":
            raise ValueError(f"model.size={self.size!r} is unknown; choose one of "
                             f"{sorted(SIZES)} or 'custom'")
        check_choices(self, "model")
        for name in ("img_size", "patch_size", "num_frames", "tubelet_size", "in_chans"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.img_size % self.patch_size:
            raise ValueError(f"model.img_size={self.img_size} is not divisible by "
                             f"model.patch_size={self.patch_size}")
        if self.num_frames % self.tubelet_size:
            raise ValueError(f"model.num_frames={self.num_frames} is not divisible by "
                             f"model.tubelet_size={self.tubelet_size}")
        for part, dims in (("", self.encoder_dims()), ("decoder_", self.decoder_dims())):
            if min(dims.embed_dim, dims.depth, dims.num_heads) <= 0:
                raise ValueError(f"model.size='custom' needs positive model.{part}embed_dim, "
                                 f"model.{part}depth and model.{part}num_heads, got "
                                 f"{tuple(dims[:3])}")
            if dims.embed_dim % dims.num_heads:
                raise ValueError(f"model.{part}embed_dim={dims.embed_dim} is not divisible by "
                                 f"model.{part}num_heads={dims.num_heads}")
        enc = self.encoder_dims()
        if self.attention == "mixing" and enc.embed_dim // enc.num_heads < 8:
            raise ValueError("model.attention='mixing' shifts 1/8 of each head's channels per "
                             f"direction: head width {enc.embed_dim // enc.num_heads} must be >= 8")
        if len(self.window_size) != 3 or min(self.window_size) <= 0:
            raise ValueError(f"model.window_size must be 3 positive ints [Tw, M, M], got "
                             f"{self.window_size}")
        if self.pos_embed_grid and (len(self.pos_embed_grid) != 3 or min(self.pos_embed_grid) <= 0):
            raise ValueError(f"model.pos_embed_grid must be empty or 3 positive ints [T', H', W'], "
                             f"got {self.pos_embed_grid}")
        if self.pos_embed_grid and self.pos_embed == "separable_learned":
            raise ValueError("model.pos_embed_grid applies to fixed tables only; learned tables "
                             "are resized from the checkpoint's shapes at load time")
        for name in ("drop_path_rate", "head_drop_rate", "decoder_mask_ratio"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"model.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.layer_scale_init < 0:
            raise ValueError(f"model.layer_scale_init must be >= 0, got {self.layer_scale_init}")
        if self.num_classes < 0:
            raise ValueError(f"model.num_classes must be >= 0, got {self.num_classes}")
        for name in ("pixel_mean", "pixel_std"):
            if len(getattr(self, name)) != self.in_chans:
                raise ValueError(f"model.{name} has {len(getattr(self, name))} values but "
                                 f"model.in_chans={self.in_chans}")
        if min(self.pixel_std) <= 0:
            raise ValueError(f"model.pixel_std must be positive, got {self.pixel_std}")
