"""DeepSpeed glue shared by pretraining and fine-tuning.

- ``EngineConfig``: the ``engine`` config section (precision, ZeRO stage, accumulation,
  compile, a user DeepSpeed JSON, the non-finite loss limit).
- ``deepspeed_config``: the DeepSpeed JSON generated from the typed config (optionally
  overridden by a user JSON).
- ``create_engine`` / ``TrainEngine``: ``deepspeed.initialize`` with a client AdamW over
  ``runtime.optim.param_groups`` and the ``runtime.optim.WarmupCosine`` schedule applied per
  group (``lr * lr_scale``) before every optimizer step, plus non-finite loss handling (skip,
  count, stop after N in a row) and the fp32 master weights for exports
  (``master_state_dict``).

Checkpoints and exact resume are in ``runtime.checkpoint``. A typical loop::

    engine = create_engine(model, cfg.engine, cfg.optim, micro_batch_size=8,
                           world_size=dist.world_size, out_dir=run_dir, steps_per_epoch=500)
    ckpt = CheckpointManager(run_dir / "checkpoints", keep_last=cfg.checkpoint.keep_last)
    tag = ckpt.resolve(cfg.checkpoint.resume)
    state = ckpt.load(engine, tag) if tag else {}
    for batch in loader:
        with engine.autocast():
            # uint8 batches are normalised after the copy: data_tools.clips.model_input
            loss = engine(model_input(batch, engine.device, cfg.data))
        engine.step(loss)
"""
from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import torch
from torch import nn

from runtime.config import help_text
from runtime.dist import all_reduce_max, all_reduce_max_many, is_main_process
from runtime.errors import RunStopped
from runtime.io import atomic_write_text
from runtime.optim import OptimConfig, WarmupCosine, build_adamw, lr_schedule, set_lr
from runtime.preemption import PreemptionSignal

logger = logging.getLogger(__name__)

DEEPSPEED_CONFIG_NAME = "deepspeed_config.json"


@dataclass
class EngineConfig:
    precision: Literal["fp32", "bf16", "fp16"] = field(default="bf16", metadata=help_text(
        "training precision: fp32, bf16, or fp16 with dynamic loss scaling"))
    zero_stage: int = field(default=1, metadata=help_text("DeepSpeed ZeRO stage: 0, 1 or 2"))
    grad_accum_steps: int = field(default=1, metadata=help_text(
        "micro-batches accumulated per optimizer step"))
    compile: bool = field(default=False, metadata=help_text("torch.compile the model"))
    deepspeed_json: str = field(default="", metadata=help_text(
        "optional DeepSpeed JSON file whose keys override the generated config"))
    max_nonfinite_in_row: int = field(default=10, metadata=help_text(
        "stop with an error after this many non-finite losses in a row"))

    def validate(self) -> None:
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"zero_stage must be 0, 1 or 2, got {self.zero_stage}")
        if self.grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        if self.max_nonfinite_in_row < 1:
            raise ValueError("max_nonfinite_in_row must be >= 1")
        if self.deepspeed_json and not Path(self.deepspeed_json).is_file():
            raise ValueError(f"deepspeed_json file {self.deepspeed_json} does not exist")


# ---------------------------------------------------------------------------------------
# DeepSpeed config


def _deep_update(base: dict, updates: Mapping) -> dict:
    for key, value in updates.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value
    return base


def deepspeed_config(engine_cfg: EngineConfig, optim_cfg: OptimConfig,
                     micro_batch_size: int) -> dict:
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


class NonFiniteLossError(RunStopped, RuntimeError):
    """The loss was NaN/inf for too many micro-batches in a row."""


class NonFiniteWeightsError(RunStopped, RuntimeError):
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
        # a training loop's PreemptionSignal (open_loop): its flag rides on step's collective
        self.stop_signal: PreemptionSignal | None = None
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
        """Whether the loss is finite on every rank; the same collective carries the
        ``stop_signal`` flag when one is attached (one all-reduce per micro-batch)."""
        local = [0.0 if bool(torch.isfinite(loss.detach()).all()) else 1.0]
        if self.stop_signal is not None:
            local.append(self.stop_signal.local_flag())
        reduced = all_reduce_max_many(local)
        if self.stop_signal is not None:
            self.stop_signal.agree(reduced[1] > 0)
        return reduced[0] == 0.0

    def _apply_lr(self) -> None:
        set_lr(self.ds_engine.optimizer, self.lr)

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
        for low, high in zip(getattr(optimizer, "fp16_groups", []),
                             getattr(optimizer, "fp32_groups", [])):
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
    if (engine_cfg.precision == "bf16" and engine_cfg.zero_stage == 0
            and engine_cfg.grad_accum_steps > 1):
        logger.warning("bf16 with ZeRO-0 accumulates gradients in bf16 (DeepSpeed supports fp32 "
                       "accumulation from ZeRO-1 on): consider engine.zero_stage=1")
    if out_dir is not None and is_main_process():
        atomic_write_text(Path(out_dir) / DEEPSPEED_CONFIG_NAME, json.dumps(ds_config, indent=2))
    global_batch = micro_batch_size * world_size * ds_config["gradient_accumulation_steps"]
    schedule = lr_schedule(optim_cfg, global_batch, steps_per_epoch)
    optimizer = build_adamw(model, optim_cfg, schedule.lr_at(0))
    ds_engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    if engine_cfg.compile:
        ds_engine.compile()
    logger.info("engine: global batch %d, peak lr %.3g, %d warm-up / %d total steps, %s, ZeRO-%d",
                global_batch, schedule.base_lr, schedule.warmup_steps, schedule.total_steps,
                engine_cfg.precision, engine_cfg.zero_stage)
    return TrainEngine(ds_engine, schedule, engine_cfg.max_nonfinite_in_row)

