"""``PretrainConfig``: everything one pretraining run reads, as one typed tree.

Sections: ``model`` (models.ModelConfig), ``data`` (data_tools.config.DataConfig), ``optim``
(runtime.optim), ``engine`` (runtime.engine), ``checkpoint`` (runtime.checkpoint), ``log``
(below); plus ``out_dir``, ``seed`` and ``max_steps``. Load with
``runtime.config.parse_config(PretrainConfig, argv)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from data_tools.config import DataConfig
from models import ModelConfig
from models.attention_blocks import NEEDS_FULL_GRID
from runtime.checkpoint import CheckpointConfig
from runtime.config import help_text
from runtime.engine import EngineConfig
from runtime.optim import OptimConfig
from runtime.trackers import MlflowConfig, WandbConfig, mlflow_field, wandb_field


@dataclass
class LogConfig:
    every_steps: int = field(default=20, metadata=help_text(
        "write loss, lr, clips/s and data-wait fraction every N optimizer steps"))
    vis_every_steps: int = field(default=1000, metadata=help_text(
        "save a reconstruction grid PNG every N optimizer steps (0 = only at the end, "
        "-1 = never)"))
    vis_clips: int = field(default=4, metadata=help_text("clips shown in the reconstruction grid"))
    tensorboard: bool = field(default=True, metadata=help_text("also write TensorBoard scalars"))
    wandb: WandbConfig = wandb_field()
    mlflow: MlflowConfig = mlflow_field()

    def validate(self) -> None:
        if self.every_steps < 1 or self.vis_clips < 1 or self.vis_every_steps < -1:
            raise ValueError("every_steps and vis_clips must be >= 1, vis_every_steps >= -1")


@dataclass
class PretrainConfig:
    out_dir: str = field(default="runs/pretrain", metadata=help_text(
        "run folder: config.yaml, deepspeed_config.json, metrics.jsonl, tensorboard/, "
        "figures/, checkpoints/"))
    model: ModelConfig = field(default_factory=ModelConfig, metadata=help_text(
        "pretraining model (encoder + decoder)"))
    data: DataConfig = field(default_factory=DataConfig, metadata=help_text(
        "pretraining shards, clip sampling, augmentation and masking"))
    optim: OptimConfig = field(default_factory=OptimConfig, metadata=help_text(
        "AdamW and the warm-up + cosine schedule"))
    engine: EngineConfig = field(default_factory=EngineConfig, metadata=help_text(
        "DeepSpeed precision, ZeRO stage, accumulation, compile"))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig, metadata=help_text(
        "checkpoint frequency, retention and resume"))
    log: LogConfig = field(default_factory=LogConfig, metadata=help_text("logging and figures"))
    seed: int = field(default=0, metadata=help_text(
        "seeds model init (same on every rank), per-rank RNG and, with data.seed, "
        "the data stream"))
    max_steps: int = field(default=0, metadata=help_text(
        "stop after this many optimizer steps in total (0 = the whole schedule); the "
        "schedule still spans optim.epochs, so a stopped run resumes exactly"))

    def resolve(self) -> PretrainConfig:
        """The data section's clip geometry filled in from the model section (idempotent)."""
        return replace(self, data=self.data.with_geometry(**self.model.clip_geometry()))

    def validate(self) -> None:
        model, data = self.model, self.data
        if tuple(model.pixel_mean) != tuple(data.mean) or tuple(model.pixel_std) != tuple(data.std):
            raise ValueError("model.pixel_mean/pixel_std must equal data.mean/std (the target "
                             "undoes the input normalisation)")
        if data.mask_type == "none":
            raise ValueError("pretraining needs an encoder mask: data.mask_type must be tube, "
                             "random or multiblock")
        if data.mask_type != "tube" and model.attention != "joint":
            raise ValueError(f"data.mask_type={data.mask_type!r} hides different tokens in "
                             f"different time slices, and model.attention={model.attention!r} "
                             "factorises attention over the time slices, so it needs a tube mask "
                             "(the same spatial mask in every slice): pretrain with "
                             "model.attention=joint, or use data.mask_type=tube")
        uses_decoder_mask = data.decoder_mask_type != "none"
        if uses_decoder_mask != (model.decoder_mask_ratio > 0) or (
                uses_decoder_mask and model.decoder_mask_ratio != data.decoder_mask_ratio):
            raise ValueError("decoder masking is set inconsistently: use "
                             "data.decoder_mask_type=running_cell with model.decoder_mask_ratio == "
                             "data.decoder_mask_ratio, or data.decoder_mask_type=none with "
                             "model.decoder_mask_ratio=0")
        if model.num_classes:
            raise ValueError("model.num_classes must be 0 for pretraining")
        if model.attention in NEEDS_FULL_GRID:  # the encoder sees only the visible tokens
            raise ValueError(f"model.attention={model.attention!r} cannot pretrain: "
                             f"{NEEDS_FULL_GRID[model.attention]}, and the encoder sees only the "
                             "visible tokens; pretrain with joint (or divided, space_only, "
                             "mixing) and fine-tune with it")
        if self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {self.max_steps}")
        if not self.out_dir:
            raise ValueError("out_dir must be set")
