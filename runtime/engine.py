"""DeepSpeed glue shared by pretraining and fine-tuning.

What a stage needs to train a model with DeepSpeed, in five pieces:

- ``param_groups``: AdamW groups without weight decay on biases, norms, tokens and position
  tables, with an optional per-layer ``lr_scale`` (layer-wise lr decay, BEiT style).
- ``WarmupCosine``: linear warm-up then per-step cosine to a floor. DeepSpeed's built-in
  schedulers set one lr for every group, which would erase ``lr_scale``, so the engine
  writes ``lr * lr_scale`` into each group itself before every optimizer step.
- ``create_engine`` / ``TrainEngine``: ``deepspeed.initialize`` with a client AdamW and a
  DeepSpeed JSON generated from the typed config (optionally overridden by a user JSON),
  plus non-finite loss handling (skip, count, stop after N in a row) and the fp32 master
  weights for exports (``master_state_dict``).
- ``DataPosition`` / ``segment_seed``: the data position a checkpoint stores, and the seed of
  the loader segment starting there, so a resumed run reads exactly the same batches.
- ``CheckpointManager``: DeepSpeed checkpoints under ``step_<N>`` tags, each made visible
  only by a ``COMPLETE`` marker written after every rank finished, then ``latest``, then
  pruning to the last K. Per-rank RNG states are saved beside DeepSpeed's files.

A typical loop::

    engine = create_engine(model, cfg.engine, cfg.optim, micro_batch_size=8,
                           world_size=dist.world_size, out_dir=run_dir, steps_per_epoch=500)
    ckpt = CheckpointManager(run_dir / "checkpoints", keep_last=cfg.checkpoint.keep_last)
    tag = ckpt.resolve(cfg.checkpoint.resume)
    state = ckpt.load(engine, tag) if tag else {}
    for batch in loader:
        with engine.autocast():
            loss = engine(batch["video"].to(engine.device))
        engine.step(loss)
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import numpy as np
import torch
from torch import nn

from runtime.dist import all_reduce_max, barrier, get_rank, get_world_size, is_main_process
from runtime.io import atomic_torch_save, atomic_write_text, load_state_dict
from runtime.seed import rng_state, set_rng_state

logger = logging.getLogger(__name__)

DEEPSPEED_CONFIG_NAME = "deepspeed_config.json"
COMPLETE_MARKER = "COMPLETE"
LATEST_FILE = "latest"
TAG_PATTERN = re.compile(r"^step_(\d+)$")

# Parameters that never get weight decay, by their last name component, in case a model
# does not list them in ``no_weight_decay()`` (the official models do).
NO_DECAY_NAMES = frozenset({"pos_embed", "mask_token", "cls_token"})


# ---------------------------------------------------------------------------------------
# Config sections


@dataclass
class OptimConfig:
    base_lr: float = field(default=1.5e-4, metadata={
        "help": "peak learning rate per 256 clips; the actual peak is base_lr * global_batch / 256"})
    min_lr: float = field(default=1e-5, metadata={
        "help": "cosine floor per 256 clips, scaled by global_batch / 256 like base_lr (VideoMAE)"})
    warmup_epochs: float = field(default=40.0, metadata={
        "help": "epochs of linear warm-up from 0 to the peak lr"})
    epochs: int = field(default=800, metadata={"help": "total training epochs"})
    weight_decay: float = field(default=0.05, metadata={
        "help": "AdamW weight decay (none on biases, norms, tokens, position embeddings)"})
    betas: tuple[float, float] = field(default=(0.9, 0.95), metadata={"help": "AdamW betas"})
    eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon"})
    layer_decay: float = field(default=1.0, metadata={
        "help": "layer-wise lr decay: block i gets decay**(num_layers-1-i) (1.0 = off)"})
    clip_grad: float = field(default=0.0, metadata={
        "help": "clip the global gradient norm to this value (0 = off)"})

    def validate(self) -> None:
        if self.base_lr <= 0 or self.min_lr < 0:
            raise ValueError("base_lr must be > 0 and min_lr >= 0")
        if self.epochs < 1 or self.warmup_epochs < 0 or self.warmup_epochs > self.epochs:
            raise ValueError(f"need epochs >= 1 and 0 <= warmup_epochs <= epochs, got "
                             f"epochs={self.epochs}, warmup_epochs={self.warmup_epochs}")
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.clip_grad < 0 or self.weight_decay < 0:
            raise ValueError("clip_grad and weight_decay must be >= 0")


@dataclass
class EngineConfig:
    precision: Literal["fp32", "bf16", "fp16"] = field(default="bf16", metadata={
        "help": "training precision: fp32, bf16, or fp16 with dynamic loss scaling"})
    zero_stage: int = field(default=1, metadata={"help": "DeepSpeed ZeRO stage: 0, 1 or 2"})
    grad_accum_steps: int = field(default=1, metadata={
        "help": "micro-batches accumulated per optimizer step"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    deepspeed_json: str = field(default="", metadata={
        "help": "optional DeepSpeed JSON file whose keys override the generated config"})
    max_nonfinite_in_row: int = field(default=10, metadata={
        "help": "stop with an error after this many non-finite losses in a row"})

    def validate(self) -> None:
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"zero_stage must be 0, 1 or 2, got {self.zero_stage}")
        if self.grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        if self.max_nonfinite_in_row < 1:
            raise ValueError("max_nonfinite_in_row must be >= 1")
        if self.deepspeed_json and not Path(self.deepspeed_json).is_file():
            raise ValueError(f"deepspeed_json file {self.deepspeed_json} does not exist")


@dataclass
class CheckpointConfig:
    every_steps: int = field(default=1000, metadata={
        "help": "save a checkpoint every N optimizer steps (0 = only at the end)"})
    keep_last: int = field(default=3, metadata={"help": "number of complete checkpoints kept"})
    resume: str = field(default="", metadata={
        "help": "'' = fresh start, 'auto' = newest complete checkpoint of this run if any, "
                "or a checkpoint folder (…/checkpoints/step_N) or tag (step_N)"})

    def validate(self) -> None:
        if self.every_steps < 0 or self.keep_last < 1:
            raise ValueError("every_steps must be >= 0 and keep_last >= 1")


# ---------------------------------------------------------------------------------------
# Optimizer groups and schedule


def _declared_no_decay(model: nn.Module) -> set[str]:
    """Full parameter names listed by ``no_weight_decay()`` of the model or any submodule."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        if callable(getattr(module, "no_weight_decay", None)):
            names.update(f"{prefix}.{n}" if prefix else n for n in module.no_weight_decay())
    return names


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """AdamW parameter groups: ``{"params", "weight_decay", "lr_scale"}``, none empty.

    No decay for 1-D parameters (norms), biases, names declared by ``no_weight_decay()``
    anywhere in the model and the tokens in ``NO_DECAY_NAMES``. With ``layer_decay < 1`` the
    model must provide ``get_layer_id(name)`` and ``num_layers()``; layer ``i`` gets
    ``lr_scale = layer_decay ** (num_layers - 1 - i)`` (the head keeps the full lr).
    """
    skip = _declared_no_decay(model)
    if layer_decay < 1.0:
        if not (hasattr(model, "get_layer_id") and hasattr(model, "num_layers")):
            raise ValueError(f"layer_decay={layer_decay} needs {type(model).__name__}."
                             "get_layer_id() and num_layers()")
        num_layers = model.num_layers()
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = (param.ndim <= 1 or name.endswith(".bias") or name in skip
                    or name.rsplit(".", 1)[-1] in NO_DECAY_NAMES)
        layer_id = model.get_layer_id(name) if layer_decay < 1.0 else 0
        scale = layer_decay ** (num_layers - 1 - layer_id) if layer_decay < 1.0 else 1.0
        group = groups.setdefault((layer_id, no_decay), {
            "params": [], "weight_decay": 0.0 if no_decay else weight_decay, "lr_scale": scale})
        group["params"].append(param)
    return [groups[key] for key in sorted(groups)]


@dataclass(frozen=True)
class WarmupCosine:
    """Per-step schedule: ``base_lr * step / warmup_steps`` during warm-up (mae_st), then
    ``min_lr + (base_lr - min_lr) * (1 + cos(pi * progress)) / 2`` until ``total_steps``,
    ``min_lr`` afterwards."""

    base_lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.base_lr * step / self.warmup_steps
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / decay_steps, 1.0)
        return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------
# DeepSpeed config


def _deep_update(base: dict, updates: Mapping) -> dict:
    for key, value in updates.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value
    return base


def deepspeed_config(engine_cfg: EngineConfig, optim_cfg: OptimConfig, micro_batch_size: int) -> dict:
    """The DeepSpeed JSON for these settings; keys of ``engine_cfg.deepspeed_json`` override it.

    The train batch size is left for DeepSpeed to derive (micro x accumulation x ranks), so the
    file works for any world size. The optimizer and schedule are the engine's, so a user
    file may not define ``optimizer``/``scheduler`` or change the batch geometry.
    """
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": int(micro_batch_size),
        "gradient_accumulation_steps": engine_cfg.grad_accum_steps,
        "gradient_clipping": float(optim_cfg.clip_grad),
        "zero_optimization": {"stage": engine_cfg.zero_stage},
        "bf16": {"enabled": engine_cfg.precision == "bf16"},
        "fp16": {"enabled": engine_cfg.precision == "fp16", "loss_scale": 0,
                 "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2,
                 "min_loss_scale": 1},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if engine_cfg.precision == "bf16" and engine_cfg.zero_stage >= 1:
        # Accumulate bf16 gradients in fp32 (DeepSpeed's default keeps bf16 accumulators;
        # ZeRO-0 does not support fp32 accumulation).
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    if engine_cfg.deepspeed_json:
        path = Path(engine_cfg.deepspeed_json)
        try:
            user = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read DeepSpeed JSON {path}: {err}") from err
        if not isinstance(user, dict):
            raise ValueError(f"DeepSpeed JSON {path}: expected an object at the top level")
        for key in ("optimizer", "scheduler"):
            if key in user:
                raise ValueError(f"DeepSpeed JSON {path}: '{key}' is set by the engine "
                                 "(optim section of the YAML config); remove it")
        for key, ours in (("train_micro_batch_size_per_gpu", int(micro_batch_size)),
                          ("gradient_accumulation_steps", engine_cfg.grad_accum_steps)):
            if key in user and user[key] != ours:
                raise ValueError(f"DeepSpeed JSON {path}: {key}={user[key]} conflicts with the "
                                 f"YAML config ({ours}); set it in the YAML config instead")
        _deep_update(config, user)
    if config.get("fp16", {}).get("enabled") and config.get("bf16", {}).get("enabled"):
        raise ValueError("DeepSpeed config enables both fp16 and bf16")
    return config


# ---------------------------------------------------------------------------------------
# Engine


class NonFiniteLossError(RuntimeError):
    """The loss was NaN/inf for too many micro-batches in a row."""


class NonFiniteWeightsError(RuntimeError):
    """The model holds NaN/inf weights; such a model is never checkpointed."""


class TrainEngine:
    """A DeepSpeed engine with the scheduled per-group lr and non-finite loss handling.

    Call it like the model (``engine(x, mask)``) inside ``with engine.autocast():``, then
    ``engine.step(loss)``. ``global_step`` counts optimizer steps (DeepSpeed's counter, saved
    in checkpoints), so the lr follows the schedule across resumes.
    """

    def __init__(self, ds_engine, schedule: WarmupCosine, max_nonfinite_in_row: int):
        self.ds_engine = ds_engine
        self.schedule = schedule
        self.max_nonfinite_in_row = max_nonfinite_in_row
        self.nonfinite_total = 0
        self.nonfinite_in_row = 0
        self.last_step_applied = False
        if ds_engine.bfloat16_enabled():
            self.autocast_dtype: torch.dtype | None = torch.bfloat16
        elif ds_engine.fp16_enabled():
            self.autocast_dtype = torch.float16
        else:
            self.autocast_dtype = None

    # --- model-like access
    def __call__(self, *args, **kwargs):
        return self.ds_engine(*args, **kwargs)

    @property
    def module(self) -> nn.Module:
        return self.ds_engine.module

    @property
    def device(self) -> torch.device:
        return torch.device(self.ds_engine.device)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.ds_engine.optimizer

    @property
    def global_step(self) -> int:
        return int(self.ds_engine.global_steps)

    @property
    def lr(self) -> float:
        """Peak-group lr for the next optimizer step (``lr_scale`` 1)."""
        return self.schedule.lr_at(self.global_step)

    @property
    def grad_norm(self) -> float | None:
        """Global gradient norm of the last optimizer step (before clipping) when DeepSpeed
        computes it (ZeRO >= 1 or bf16/fp16; None for fp32 ZeRO-0)."""
        norm = self.ds_engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def train(self, mode: bool = True) -> "TrainEngine":
        self.ds_engine.train(mode)
        return self

    def eval(self) -> "TrainEngine":
        return self.train(False)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast context matching the DeepSpeed precision (a no-op for fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def is_accumulation_boundary(self) -> bool:
        """True when the next ``step`` will update the weights."""
        return bool(self.ds_engine.is_gradient_accumulation_boundary())

    # --- training
    def _loss_is_finite(self, loss: torch.Tensor) -> bool:
        local_bad = 0.0 if bool(torch.isfinite(loss.detach()).all()) else 1.0
        return all_reduce_max(local_bad) == 0.0

    def _apply_lr(self) -> None:
        lr = self.lr
        for group in self.ds_engine.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def step(self, loss: torch.Tensor) -> bool:
        """Backward and, at an accumulation boundary, an optimizer step at the scheduled lr.

        Returns False without touching the gradients when the loss is non-finite on any rank
        (every rank skips together). Raises ``NonFiniteLossError`` after
        ``max_nonfinite_in_row`` such micro-batches in a row.
        """
        self.last_step_applied = False
        if not self._loss_is_finite(loss):
            self.nonfinite_total += 1
            self.nonfinite_in_row += 1
            logger.warning("non-finite loss at step %d (%d in a row, %d in total); skipped",
                           self.global_step, self.nonfinite_in_row, self.nonfinite_total)
            if self.nonfinite_in_row >= self.max_nonfinite_in_row:
                raise NonFiniteLossError(
                    f"loss was non-finite for {self.nonfinite_in_row} micro-batches in a row at "
                    f"optimizer step {self.global_step} (engine.max_nonfinite_in_row="
                    f"{self.max_nonfinite_in_row}); lower the lr, enable clipping or use bf16/fp32")
            return False
        self.nonfinite_in_row = 0
        self.ds_engine.backward(loss)
        if self.is_accumulation_boundary():
            self._apply_lr()
            self.last_step_applied = True
        self.ds_engine.step()
        return True

    def weights_are_finite(self) -> bool:
        """True when every parameter on every rank is finite."""
        flags = [torch.isfinite(p.detach()).all() for p in self.module.parameters()]
        local_bad = 0.0 if bool(torch.stack(flags).all()) else 1.0
        return all_reduce_max(local_bad) == 0.0

    def master_state_dict(self) -> dict[str, torch.Tensor]:
        """The module's state dict on the CPU in fp32, with the optimizer's fp32 master copy of
        every bf16/fp16 weight. Gathers ZeRO partitions: call it on every rank."""
        from deepspeed.utils import safe_get_full_fp32_param

        optimizer = self.ds_engine.optimizer
        unfused = {}  # ZeRO-0 bf16/fp16 keeps fp32 copies group by group
        for low, high in zip(getattr(optimizer, "fp16_groups", []), getattr(optimizer, "fp32_groups", [])):
            unfused.update({id(p): q for p, q in zip(low, high)})
        state = {k: v.detach().float().cpu() for k, v in self.module.state_dict().items()}
        for name, param in self.module.named_parameters():
            if param.dtype == torch.float32:
                continue
            master = safe_get_full_fp32_param(param)
            master = unfused.get(id(param)) if master is None else master
            if master is None:
                logger.warning("no fp32 master for %s; exporting its %s values", name, param.dtype)
            else:
                state[name] = master.detach().float().cpu().reshape(param.shape)
        return state

    def state_dict(self) -> dict:
        return {"nonfinite_total": self.nonfinite_total, "nonfinite_in_row": self.nonfinite_in_row}

    def load_state_dict(self, state: Mapping) -> None:
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        self.nonfinite_in_row = int(state.get("nonfinite_in_row", 0))


def create_engine(model: nn.Module, engine_cfg: EngineConfig, optim_cfg: OptimConfig,
                  micro_batch_size: int, world_size: int, out_dir: str | Path | None,
                  steps_per_epoch: int) -> TrainEngine:
    """Wrap ``model`` with ``deepspeed.initialize`` and a client AdamW over ``param_groups``.

    ``steps_per_epoch`` counts optimizer steps (micro-batches per rank per epoch divided by
    ``grad_accum_steps``); with ``optim_cfg.epochs`` it sets the schedule length. The peak
    lr is ``base_lr * micro_batch_size * world_size * grad_accum_steps / 256``. The resolved
    DeepSpeed JSON is written to ``out_dir/deepspeed_config.json`` by the main process.
    The process group must already exist (``runtime.dist.init_distributed``).
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    ds_config = deepspeed_config(engine_cfg, optim_cfg, micro_batch_size)
    if engine_cfg.precision != "fp32" and get_accelerator().device_name() == "cpu":
        # CPU autocast keeps LayerNorm in the input dtype, so an fp32 buffer (e.g. a position
        # table) added to bf16 activations would meet bf16 LayerNorm weights; cast buffers too.
        ds_config.setdefault("data_types", {}).setdefault("buffer_dtype", engine_cfg.precision)
    if engine_cfg.precision == "bf16" and engine_cfg.zero_stage == 0 and engine_cfg.grad_accum_steps > 1:
        logger.warning("bf16 with ZeRO-0 accumulates gradients in bf16 (DeepSpeed supports fp32 "
                       "accumulation from ZeRO-1 on): consider engine.zero_stage=1")
    if out_dir is not None and is_main_process():
        atomic_write_text(Path(out_dir) / DEEPSPEED_CONFIG_NAME, json.dumps(ds_config, indent=2))
    global_batch = micro_batch_size * world_size * ds_config["gradient_accumulation_steps"]
    scale = global_batch / 256
    schedule = WarmupCosine(
        base_lr=optim_cfg.base_lr * scale, min_lr=optim_cfg.min_lr * scale,
        warmup_steps=round(optim_cfg.warmup_epochs * steps_per_epoch),
        total_steps=optim_cfg.epochs * steps_per_epoch)
    groups = param_groups(model, optim_cfg.weight_decay, optim_cfg.layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=schedule.lr_at(0), betas=tuple(optim_cfg.betas),
                                  eps=optim_cfg.eps)
    ds_engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    if engine_cfg.compile:
        ds_engine.compile()
    logger.info("engine: global batch %d, peak lr %.3g, %d warm-up / %d total steps, %s, ZeRO-%d",
                global_batch, schedule.base_lr, schedule.warmup_steps, schedule.total_steps,
                engine_cfg.precision, engine_cfg.zero_stage)
    return TrainEngine(ds_engine, schedule, engine_cfg.max_nonfinite_in_row)


# ---------------------------------------------------------------------------------------
# Data position (exact resume)


@dataclass
class DataPosition:
    """Where a run's data stream stands: ``batch`` micro-batches of ``epoch`` consumed.
    Stored in the checkpoint's client state as ``asdict(position)``."""

    epoch: int = 0
    batch: int = 0


def segment_seed(seed: int, epoch: int, start: int) -> int:
    """Loader seed of the stream segment that starts at micro-batch ``start`` of ``epoch``.

    A stage rebuilds its loader at every epoch start and after every checkpoint, seeded from
    that position; a resumed run then reads exactly the batches an uninterrupted run reads,
    without decoding and discarding the batches before the checkpoint.
    """
    return int(np.random.SeedSequence([seed, epoch, start]).generate_state(1)[0])


# ---------------------------------------------------------------------------------------
# Checkpoints


def _rank_state_name(rank: int) -> str:
    return f"rank_{rank:05d}_state.pt"


class CheckpointManager:
    """Complete, prunable DeepSpeed checkpoints under ``<dir>/step_<N>``.

    A checkpoint counts only once ``<dir>/step_<N>/COMPLETE`` exists: it is written after every
    rank finished its DeepSpeed files, its per-rank RNG file and the exports, so a run killed
    mid-save leaves the previous checkpoint as the newest complete one. ``<dir>/latest`` (the
    same format as DeepSpeed's) is rewritten after the marker. All ranks must call ``save``
    and ``load``; the folder must be shared by all nodes.
    """

    def __init__(self, directory: str | Path, keep_last: int = 3):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.dir = Path(directory)
        self.keep_last = keep_last

    @staticmethod
    def tag_for(step: int) -> str:
        return f"step_{step}"

    def _tags(self) -> list[tuple[int, str]]:
        if not self.dir.is_dir():
            return []
        found = []
        for child in self.dir.iterdir():
            match = TAG_PATTERN.match(child.name)
            if match and child.is_dir():
                found.append((int(match.group(1)), child.name))
        return sorted(found)

    def is_complete(self, tag: str | Path) -> bool:
        return (self._tag_dir(tag) / COMPLETE_MARKER).is_file()

    def complete_tags(self) -> list[str]:
        """Complete checkpoint tags, oldest first."""
        return [tag for _, tag in self._tags() if self.is_complete(tag)]

    def _tag_dir(self, tag: str | Path) -> Path:
        tag = Path(tag)
        return tag if tag.is_absolute() or len(tag.parts) > 1 else self.dir / tag

    # --- save
    def save(self, engine: TrainEngine, step: int, client_state: Mapping | None = None,
             exports: Mapping[str, Callable[[Path], Any]] | None = None) -> Path:
        """Write checkpoint ``step_<step>`` on all ranks; returns its folder.

        ``client_state`` (plain Python values and tensors) is stored by DeepSpeed beside the
        engine's own counters; ``exports`` maps a file name to a
        function called by the main process with the path to write inside the checkpoint
        folder (e.g. an encoder-only safetensors). Raises ``NonFiniteWeightsError`` (before
        writing anything) when any weight is NaN/inf.
        """
        if not engine.weights_are_finite():
            raise NonFiniteWeightsError(
                f"refusing to save checkpoint at step {step}: the model has non-finite weights")
        rank_rng = rng_state()  # before anything below can draw random numbers
        tag = self.tag_for(step)
        tag_dir = self.dir / tag
        if self.is_complete(tag):
            return tag_dir
        if is_main_process():
            if tag_dir.exists():  # left over from an interrupted save
                shutil.rmtree(tag_dir)
            self.dir.mkdir(parents=True, exist_ok=True)
        barrier()
        state = {"client": dict(client_state or {}), "engine": engine.state_dict()}
        engine.ds_engine.save_checkpoint(str(self.dir), tag=tag, client_state=state,
                                         save_latest=False)
        atomic_torch_save({"rng": rank_rng, "world_size": get_world_size()},
                          tag_dir / _rank_state_name(get_rank()))
        if is_main_process():
            for name, export in (exports or {}).items():
                export(tag_dir / name)
        barrier()
        if is_main_process():
            atomic_write_text(tag_dir / COMPLETE_MARKER, json.dumps(
                {"step": step, "world_size": get_world_size(), "time": time.time()}))
            atomic_write_text(self.dir / LATEST_FILE, tag)
            self._prune()
        barrier()
        logger.info("saved checkpoint %s", tag_dir)
        return tag_dir

    def _prune(self) -> None:
        """Keep the newest ``keep_last`` complete checkpoints; drop older incomplete ones."""
        tags = self._tags()
        complete = [(s, t) for s, t in tags if self.is_complete(t)]
        keep = {t for _, t in complete[-self.keep_last:]}
        newest = complete[-1][0] if complete else -1
        for step, tag in tags:
            if tag not in keep and step <= newest:
                shutil.rmtree(self.dir / tag, ignore_errors=True)

    # --- resume
    def resolve(self, resume: str) -> str | None:
        """Checkpoint to resume from: ``""`` -> None, ``"auto"`` -> newest complete tag in this
        folder (None when there is none), a tag or a checkpoint folder -> itself (must be
        complete)."""
        if not resume:
            return None
        if resume == "auto":
            tags = self.complete_tags()
            return tags[-1] if tags else None
        tag_dir = self._tag_dir(resume)
        if not tag_dir.is_dir():
            raise FileNotFoundError(f"checkpoint {tag_dir} does not exist")
        if not self.is_complete(tag_dir):
            raise ValueError(f"checkpoint {tag_dir} is incomplete (no {COMPLETE_MARKER} marker): "
                             "the run writing it was interrupted; use an earlier one")
        return str(resume)

    def load(self, engine: TrainEngine, tag: str) -> dict:
        """Restore weights, optimizer, DeepSpeed counters, engine counters and this rank's RNG
        from ``tag``; returns the ``client_state`` given to ``save``."""
        tag_dir = self._tag_dir(tag)
        if not self.is_complete(tag_dir):
            raise ValueError(f"checkpoint {tag_dir} is incomplete or missing")
        saved_world = json.loads((tag_dir / COMPLETE_MARKER).read_text()).get("world_size")
        if saved_world != get_world_size():
            logger.warning("%s was written by %s ranks and is resumed on %d: the data split and "
                           "random streams differ from an uninterrupted run", tag_dir, saved_world,
                           get_world_size())
        load_path, client_state = engine.ds_engine.load_checkpoint(
            str(tag_dir.parent), tag=tag_dir.name, load_optimizer_states=True,
            load_lr_scheduler_states=False)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {tag_dir}")
        engine.load_state_dict(client_state.get("engine", {}))
        rank_file = tag_dir / _rank_state_name(get_rank())
        if rank_file.is_file():
            set_rng_state(load_state_dict(rank_file)["rng"])
        else:
            logger.warning("%s has no RNG state for rank %d", tag_dir, get_rank())
        logger.info("resumed from %s at step %d", tag_dir, engine.global_step)
        return dict(client_state.get("client", {}))

