"""Typed configs of the recognition stage: ``FinetuneConfig``, ``ProbeConfig``, ``ExtractConfig``.

Sections reuse the shared ones: ``model`` (models.ModelConfig), ``data``
(data_tools.config.DataConfig), ``optim`` (runtime.optim), ``engine`` (runtime.engine),
``checkpoint`` (runtime.checkpoint).
Load with ``runtime.config.parse_config(FinetuneConfig, argv)``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Literal

from data_tools.config import DataConfig
from data_tools.shard_set import resolve_shards
from models import ModelConfig
from runtime.checkpoint import CheckpointConfig
from runtime.config import help_text
from runtime.engine import EngineConfig
from runtime.errors import InputError
from runtime.optim import OptimConfig
from runtime.trackers import MlflowConfig, WandbConfig, mlflow_field, wandb_field

log = logging.getLogger(__name__)


def eval_data_config(data: DataConfig, shards: str, world_size: int, batch_size: int = 0,
                     num_workers: int = -1) -> DataConfig:
    """``data`` pointed at ``shards`` for the read-once modes (eval / test_views).

    Those modes give every rank x worker its own shards, so the number of workers is lowered
    to what the shard count allows (with a log line) instead of failing.
    """
    count = len(resolve_shards(shards).urls)
    if count < world_size:
        raise InputError(f"{shards} has {count} shard(s) but {world_size} ranks each need one "
                         "(every video is read once, by one rank): write smaller shards")
    workers = data.num_workers if num_workers < 0 else num_workers
    if workers > count // world_size:
        log.info("%s: %d shards for %d rank(s): using %d loader workers per rank instead of %d",
                 shards, count, world_size, count // world_size, workers)
        workers = count // world_size
    return replace(data, shards=shards, num_workers=workers,
                   batch_size=batch_size or data.batch_size)


@dataclass
class MixupConfig:
    mixup: float = field(default=0.8, metadata=help_text(
        "mixup alpha (0 = off); VideoMAE fine-tuning uses 0.8"))
    cutmix: float = field(default=1.0, metadata=help_text(
        "cutmix alpha (0 = off); the box is cut in H x W and spans all frames"))
    cutmix_minmax: list[float] = field(default_factory=list, metadata=help_text(
        "cutmix box size range [min, max] as fractions of the side (empty = from alpha)"))
    prob: float = field(default=1.0, metadata=help_text(
        "probability of applying mixup or cutmix to a batch / element"))
    switch_prob: float = field(default=0.5, metadata=help_text(
        "probability of cutmix instead of mixup when both are on"))
    mode: Literal["batch", "pair", "elem"] = field(default="batch", metadata=help_text(
        "draw the mixing parameters per batch, per pair or per element (timm)"))
    label_smoothing: float = field(default=0.1, metadata=help_text(
        "label smoothing of the (soft) targets"))

    @property
    def active(self) -> bool:
        return self.prob > 0 and (self.mixup > 0 or self.cutmix > 0 or bool(self.cutmix_minmax))

    def validate(self) -> None:
        if min(self.mixup, self.cutmix) < 0 or not 0 <= self.prob <= 1:
            raise ValueError("mixup and cutmix must be >= 0, prob in [0, 1]")
        if self.cutmix_minmax and len(self.cutmix_minmax) != 2:
            raise ValueError(f"cutmix_minmax must be empty or [min, max], got {self.cutmix_minmax}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")


@dataclass
class EmaConfig:
    enabled: bool = field(default=False, metadata=help_text(
        "keep an exponential moving average of the weights (timm ModelEmaV3, fp32)"))
    decay: float = field(default=0.9999, metadata=help_text("EMA decay per optimizer step"))
    warmup: bool = field(default=False, metadata=help_text(
        "ramp the decay up over the first steps (timm's warm-up: 1 - (1 + step)^-2/3)"))

    def validate(self) -> None:
        if not 0 < self.decay < 1:
            raise ValueError(f"decay must be in (0, 1), got {self.decay}")


@dataclass
class ValConfig:
    shards: str = field(default="", metadata=help_text(
        "validation shards (manifest, directory or pattern); every video is scored once"))
    batch_size: int = field(default=0, metadata=help_text(
        "clips per evaluation batch per rank (0 = data.batch_size)"))
    num_workers: int = field(default=-1, metadata=help_text(
        "loader workers per rank (-1 = data.num_workers; lowered to shards / ranks)"))
    every_epochs: int = field(default=1, metadata=help_text(
        "single-view validation every N epochs during training (0 = only the final test)"))
    test_views: bool = field(default=True, metadata=help_text(
        "final test with data.num_test_clips x data.num_test_crops views per video, "
        "softmax scores averaged (False: one centred view)"))

    def validate(self) -> None:
        if self.batch_size < 0 or self.every_epochs < 0 or self.num_workers < -1:
            raise ValueError("batch_size and every_epochs must be >= 0, num_workers >= -1")


@dataclass
class LogConfig:
    every_steps: int = field(default=20, metadata=help_text(
        "write the training loss and lr every N optimizer steps"))
    tensorboard: bool = field(default=True, metadata=help_text("also write TensorBoard scalars"))
    wandb: WandbConfig = wandb_field()
    mlflow: MlflowConfig = mlflow_field()

    def validate(self) -> None:
        if self.every_steps < 1:
            raise ValueError(f"every_steps must be >= 1, got {self.every_steps}")


def _finetune_optim() -> OptimConfig:
    """VideoMAE's fine-tuning recipe (ViT-B): AdamW (0.9, 0.999), wd 0.05, layer decay 0.75,
    5 warm-up epochs, cosine to 1e-6."""
    return OptimConfig(base_lr=1e-3, min_lr=1e-6, warmup_epochs=5.0, epochs=50,
                       weight_decay=0.05, betas=(0.9, 0.999), layer_decay=0.75)


@dataclass
class FinetuneConfig:
    out_dir: str = field(default="runs/finetune", metadata=help_text(
        "run folder: config.yaml, metrics.jsonl, checkpoints/, model.safetensors, "
        "eval/ (metrics.json, predictions.csv, confusion_matrix.png)"))
    model: ModelConfig = field(
        default_factory=lambda: ModelConfig(drop_path_rate=0.1), metadata=help_text(
        "encoder + classification head (num_classes 0 = from the training manifest)"))
    pretrained: str = field(default="", metadata=help_text(
        "encoder weights: this project's encoder.safetensors, a pretraining run or "
        "checkpoint folder, an official VideoMAE / V2 .pth or an HF directory "
        "('' = random init); converted to model.attention as models.loading documents"))
    head_init_scale: float = field(default=0.001, metadata=help_text(
        "the fresh head starts as trunc_normal(std .02) x this (VideoMAE's init_scale "
        "0.001, meant for pretrained encoders; 1.0 shortens the initial plateau of "
        "small models trained from scratch)"))
    pretrained_strict: bool = field(default=True, metadata=help_text(
        "fail when the checkpoint does not fit the model (beyond a fresh head / fc_norm)"))
    data: DataConfig = field(
        default_factory=lambda: DataConfig(crop="random_resized"), metadata=help_text(
        "training shards, clip sampling and augmentation; num_test_clips / "
        "num_test_crops set the final multi-view test"))
    val: ValConfig = field(default_factory=ValConfig, metadata=help_text("validation and test"))
    mixup: MixupConfig = field(default_factory=MixupConfig, metadata=help_text(
        "mixup / cutmix and label smoothing (soft-target cross-entropy)"))
    ema: EmaConfig = field(default_factory=EmaConfig, metadata=help_text("weight EMA"))
    optim: OptimConfig = field(default_factory=_finetune_optim, metadata=help_text(
        "AdamW, layer decay and the warm-up + cosine schedule"))
    engine: EngineConfig = field(default_factory=EngineConfig, metadata=help_text(
        "DeepSpeed precision, ZeRO stage, accumulation, compile"))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig, metadata=help_text(
        "checkpoint frequency, retention and resume (as pretraining)"))
    log: LogConfig = field(default_factory=LogConfig, metadata=help_text("training logs"))
    seed: int = field(default=0, metadata=help_text(
        "seeds the head init (same on every rank), per-rank RNG and the data stream"))
    max_steps: int = field(default=0, metadata=help_text(
        "stop after this many optimizer steps (0 = the whole schedule); the schedule "
        "still spans optim.epochs"))

    def resolve(self) -> FinetuneConfig:
        """The data section's clip geometry filled in from the model section (idempotent)."""
        return replace(self, data=self.data.with_geometry(**self.model.clip_geometry()))

    def validate(self) -> None:
        if not self.val.shards:
            raise ValueError("val.shards must be set (the validation / test shard set)")
        if self.mixup.active and self.mixup.mode != "elem" and self.data.batch_size % 2:
            raise ValueError(f"mixup/cutmix mode {self.mixup.mode!r} needs an even "
                             f"data.batch_size, got {self.data.batch_size}")
        if self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {self.max_steps}")
        if self.head_init_scale <= 0:
            raise ValueError(f"head_init_scale must be > 0, got {self.head_init_scale}")
        if not self.out_dir:
            raise ValueError("out_dir must be set")


# ---------------------------------------------------------------------------------------
# Probe


@dataclass
class ProbeHeadConfig:
    kind: Literal["linear", "attentive", "knn"] = field(default="linear", metadata=help_text(
        "linear: BatchNorm (no affine) + Linear on mean-pooled tokens (MAE); attentive: "
        "probe.blocks attention blocks ending in cross-attention with one learned query, "
        "then Linear, on all tokens (V-JEPA / V-JEPA 2); knn: weighted k-nearest-neighbour "
        "vote on L2-normalised mean-pooled tokens, no training (DINO)"))
    blocks: int = field(default=4, metadata=help_text(
        "attentive probe depth: blocks - 1 self-attention blocks over the frozen tokens, "
        "then the cross-attention pooling block (V-JEPA 2: 4; 1 = V-JEPA's single "
        "cross-attention layer)"))
    heads: int = field(default=0, metadata=help_text(
        "attention heads of the attentive probe (0 = the encoder's; must divide its width)"))
    features: Literal["cached", "online"] = field(default="cached", metadata=help_text(
        "cached: embed every video once and train on the stored features (small sets); "
        "online: the frozen encoder runs in the loop every epoch on every rank, nothing "
        "stored (sets too large to cache)"))
    augment: bool = field(default=False, metadata=help_text(
        "features=online only: train on clips sampled and augmented as for fine-tuning "
        "(data loader mode 'train': random temporal position, data.crop - random resized by "
        "default - and data.flip; videos resampled and shuffled, a new draw every epoch, an "
        "epoch = the set's videos) instead of one centred clip per video, as V-JEPA 2 trains "
        "its probes; validation views are unchanged"))
    epochs: int = field(default=90, metadata=help_text("passes over the training videos"))
    batch_size: int = field(default=256, metadata=help_text(
        "videos per step, over all ranks (online: divided among them)"))
    lrs: list[float] = field(default_factory=lambda: [1e-3], metadata=help_text(
        "peak AdamW learning rates; one probe is trained per (lr, weight decay) pair, "
        "all on the same batches (V-JEPA 2: 5 lrs x 4 weight decays)"))
    weight_decays: list[float] = field(default_factory=lambda: [0.0], metadata=help_text(
        "AdamW weight decays on weight matrices, crossed with lrs (MAE linear probe: 0; "
        "V-JEPA: 0.01)"))
    min_lr: float = field(default=0.0, metadata=help_text("cosine floor"))
    warmup_epochs: float = field(default=5.0, metadata=help_text("linear warm-up epochs"))
    knn_k: int = field(default=20, metadata=help_text("kind=knn: neighbours that vote (DINO: 20)"))
    knn_temperature: float = field(default=0.07, metadata=help_text(
        "kind=knn: a neighbour's vote is exp(cosine similarity / T) (DINO: 0.07)"))

    @property
    def grid(self) -> list[tuple[float, float]]:
        """The (lr, weight decay) pair of every probe head, lr-major."""
        return [(lr, wd) for lr in self.lrs for wd in self.weight_decays]

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if not self.lrs or min(self.lrs) <= 0:
            raise ValueError(f"lrs must be a non-empty list of values > 0, got {self.lrs}")
        if not self.weight_decays or min(self.weight_decays) < 0:
            raise ValueError("weight_decays must be a non-empty list of values >= 0, "
                             f"got {self.weight_decays}")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(f"warmup_epochs must be in [0, epochs], got {self.warmup_epochs}")
        if self.blocks < 1 or self.heads < 0:
            raise ValueError(f"blocks must be >= 1 and heads >= 0, got "
                             f"{self.blocks} and {self.heads}")
        if self.knn_k < 1 or self.knn_temperature <= 0:
            raise ValueError(f"knn_k must be >= 1 and knn_temperature > 0, got "
                             f"{self.knn_k} and {self.knn_temperature}")
        if self.augment and self.features != "online":
            raise ValueError("augment=true needs features=online (cached features hold one "
                             "centred clip per video)")
        if self.kind == "knn" and self.features == "online":
            raise ValueError("kind=knn compares against stored training features: "
                             "use features=cached")


@dataclass
class ProbeConfig:
    out_dir: str = field(default="runs/probe", metadata=help_text(
        "run folder: config.yaml, features/, metrics.jsonl, eval/"))
    model: ModelConfig = field(default_factory=ModelConfig, metadata=help_text(
        "frozen encoder (num_classes is ignored)"))
    weights: str = field(default="", metadata=help_text(
        "encoder weights as for fine-tuning ('' = randomly initialised encoder, the "
        "baseline a pretrained encoder must beat)"))
    data: DataConfig = field(default_factory=DataConfig, metadata=help_text(
        "training shards and clip settings (features use one centred view per video)"))
    val: ValConfig = field(default_factory=ValConfig, metadata=help_text(
        "validation shards; test_views scores num_test_clips x num_test_crops views"))
    probe: ProbeHeadConfig = field(default_factory=ProbeHeadConfig, metadata=help_text(
        "probe head and its training"))
    cache_dir: str = field(default="", metadata=help_text(
        "feature cache folder ('' = <out_dir>/features); reused while the encoder, "
        "weights and data settings are unchanged"))
    precision: Literal["fp32", "bf16", "fp16"] = field(default="fp32", metadata=help_text(
        "autocast precision of the feature extraction (bf16/fp16 on GPUs)"))
    seed: int = field(default=0, metadata=help_text("seeds the random encoder and the probe"))
    log: LogConfig = field(default_factory=LogConfig, metadata=help_text(
        "TensorBoard and experiment trackers (the probe writes one line per epoch: "
        "every_steps is not used)"))

    def resolve(self) -> ProbeConfig:
        """The data section's clip geometry filled in from the model section (idempotent)."""
        return replace(self, data=self.data.with_geometry(**self.model.clip_geometry()))

    def validate(self) -> None:
        if not self.val.shards:
            raise ValueError("val.shards must be set (the validation shard set)")
        if not self.out_dir:
            raise ValueError("out_dir must be set")
        width = self.model.encoder_dims().embed_dim
        if self.probe.kind == "attentive" and self.probe.heads and width % self.probe.heads:
            raise ValueError(f"probe.heads={self.probe.heads} does not divide the encoder "
                             f"width {width}")


# ---------------------------------------------------------------------------------------
# Feature extraction


@dataclass
class ExtractConfig:
    model: ModelConfig = field(default_factory=ModelConfig, metadata=help_text(
        "frozen encoder (num_classes is ignored)"))
    weights: str = field(default="", metadata=help_text(
        "encoder weights as for fine-tuning ('' = random init, for tests only)"))
    data: DataConfig = field(default_factory=DataConfig, metadata=help_text(
        "the shard set to embed (data.shards) and clip settings"))
    mode: Literal["clip", "views", "sliding_window"] = field(default="clip", metadata=help_text(
        "clip: one centred clip per video; views: data.num_test_clips x "
        "data.num_test_crops per video; sliding_window: windows over the whole video, "
        "centre-cropped (temporal action detection)"))
    pool: Literal["mean", "tokens"] = field(default="mean", metadata=help_text(
        "mean: (D,) per row; tokens: (N, D) per row (for attentive probes)"))
    window_stride: int = field(default=4, metadata=help_text(
        "sliding_window: source frames between window starts (a window is "
        "data.num_frames frames data.sampling_rate apart, resized to data.input_size)"))
    dtype: Literal["float32", "float16", "bfloat16"] = field(default="float32", metadata=help_text(
        "storage type of the features"))
    precision: Literal["fp32", "bf16", "fp16"] = field(default="fp32", metadata=help_text(
        "autocast precision of the encoder forward"))
    out: str = field(default="runs/features/features.safetensors", metadata=help_text(
        "output safetensors file (rows, keys and labels; see finetune.extract)"))

    def resolve(self) -> ExtractConfig:
        """The data section's clip geometry filled in from the model section (idempotent)."""
        return replace(self, data=self.data.with_geometry(**self.model.clip_geometry()))

    def validate(self) -> None:
        if not self.data.shards:
            raise ValueError("data.shards must be set")
        if self.window_stride < 1:
            raise ValueError(f"window_stride must be >= 1, got {self.window_stride}")
        if not self.out.endswith(".safetensors"):
            raise ValueError(f"out must end with .safetensors, got {self.out}")
