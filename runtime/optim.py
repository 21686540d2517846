"""Optimizer pieces shared by every training stage.

- ``OptimConfig``: the ``optim`` config section (peak / floor lr per 256 clips, warm-up,
  AdamW settings, layer-wise lr decay, gradient clipping).
- ``param_groups``: AdamW groups without weight decay on biases, norms, tokens and position
  tables, with an optional per-layer ``lr_scale`` (layer-wise lr decay, BEiT style).
- ``WarmupCosine`` / ``lr_schedule``: linear warm-up then per-step cosine to a floor.
  DeepSpeed's built-in schedulers set one lr for every group, which would erase
  ``lr_scale``, so every training loop writes ``lr * lr_scale`` into each group itself
  before every optimizer step (``set_lr``; ``runtime.engine.TrainEngine`` does it for
  DeepSpeed).
- ``build_adamw``: AdamW over those groups with the section's betas and epsilon.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from runtime.config import help_text

# Parameters that never get weight decay, by their last name component, in case a model
# does not list them in ``no_weight_decay()`` (the official models do).
NO_DECAY_NAMES = frozenset({"pos_embed", "mask_token", "cls_token"})


@dataclass
class OptimConfig:
    base_lr: float = field(default=1.5e-4, metadata=help_text(
        "peak learning rate per 256 clips; the actual peak is "
        "base_lr * global_batch / 256"))
    min_lr: float = field(default=1e-5, metadata=help_text(
        "cosine floor per 256 clips, scaled by global_batch / 256 like base_lr (VideoMAE)"))
    warmup_epochs: float = field(default=40.0, metadata=help_text(
        "epochs of linear warm-up from 0 to the peak lr"))
    epochs: int = field(default=800, metadata=help_text("total training epochs"))
    weight_decay: float = field(default=0.05, metadata=help_text(
        "AdamW weight decay (none on biases, norms, tokens, position embeddings)"))
    betas: tuple[float, float] = field(default=(0.9, 0.95), metadata=help_text("AdamW betas"))
    eps: float = field(default=1e-8, metadata=help_text("AdamW epsilon"))
    layer_decay: float = field(default=1.0, metadata=help_text(
        "layer-wise lr decay: block i gets decay**(num_layers-1-i) (1.0 = off)"))
    clip_grad: float = field(default=0.0, metadata=help_text(
        "clip the global gradient norm to this value (0 = off)"))

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
        cosine = 1.0 + math.cos(math.pi * progress)
        return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * cosine


def lr_schedule(cfg: OptimConfig, global_batch: int, steps_per_epoch: int) -> WarmupCosine:
    """The run's schedule: ``cfg.base_lr`` / ``min_lr`` are per 256 samples and scale with
    ``global_batch`` (samples per optimizer step over all ranks)."""
    scale = global_batch / 256
    return WarmupCosine(base_lr=cfg.base_lr * scale, min_lr=cfg.min_lr * scale,
                        warmup_steps=round(cfg.warmup_epochs * steps_per_epoch),
                        total_steps=cfg.epochs * steps_per_epoch)


def build_adamw(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.AdamW:
    """AdamW over ``param_groups`` (weight decay and layer-wise ``lr_scale`` per group)."""
    groups = param_groups(model, cfg.weight_decay, cfg.layer_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Write ``lr * lr_scale`` into every parameter group (the one way every loop sets it)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
