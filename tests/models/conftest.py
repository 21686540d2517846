"""Tiny model configs, clips and masks shared by the models tests."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from models import ModelConfig


@pytest.fixture
def tiny_cfg():
    """Factory: a 64-wide, 2-block config on 4 frames of 32x32 (grid 2 x 2 x 2 = 8 tokens)."""

    def make(**overrides) -> ModelConfig:
        base = ModelConfig(size="micro", img_size=32, patch_size=16, num_frames=4, tubelet_size=2)
        return dataclasses.replace(base, **overrides)

    return make


@pytest.fixture
def clip():
    """Factory: a normalised random clip (B, C, T, H, W)."""

    def make(cfg: ModelConfig, batch: int = 2, seed: int = 0) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(batch, cfg.in_chans, cfg.num_frames, cfg.img_size, cfg.img_size,
                           generator=gen)

    return make


@pytest.fixture
def tube_mask():
    """Factory: a tube mask (B, N), True = hidden, ``hidden`` spatial positions per sample."""

    def make(cfg: ModelConfig, batch: int = 2, hidden: int = 2, seed: int = 0) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        t, h, w = cfg.grid
        spatial = torch.zeros(batch, h * w, dtype=torch.bool)
        for b in range(batch):
            spatial[b, torch.randperm(h * w, generator=gen)[:hidden]] = True
        return spatial[:, None, :].expand(batch, t, h * w).reshape(batch, -1).clone()

    return make



@pytest.fixture
def train():
    """Factory: ``steps`` AdamW steps minimising ``step_loss()``; returns the losses."""

    def run(model: torch.nn.Module, step_loss, steps: int = 12, lr: float = 2e-3) -> list[float]:
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        losses = []
        for _ in range(steps):
            loss = step_loss()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    return run
