"""Fixtures for the recognition tests: tiny demo shard sets and tiny model configs."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from data_tools.config import DataConfig
from data_tools.demo import DemoConfig, generate_demo
from models import ModelConfig

CLASSES = 10  # DemoConfig.tiny(): 10 classes x (3 train + 2 val) clips of 16 frames at 32x32


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread: two pytest workers on two cores must not oversubscribe them
    (a micro model runs about 20x slower with two contending threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """The tiny demo set: ``train`` (30 clips, 4 shards) and ``val`` (20 clips in shards of
    8, 8 and 4)."""
    out = tmp_path_factory.mktemp("finetune_demo")
    generate_demo(out, DemoConfig.tiny(), workers=1, progress=False)
    return out


@pytest.fixture
def tiny_model_cfg():
    """Factory: a 64-wide, 2-block encoder on 8 frames of 32x32 with 16x16 patches
    (a 4 x 2 x 2 grid of 16 tokens)."""

    def make(**overrides) -> ModelConfig:
        base = ModelConfig(size="micro", img_size=32, patch_size=16, num_frames=8,
                           tubelet_size=2)
        return dataclasses.replace(base, **overrides)

    return make


@pytest.fixture
def tiny_data_cfg(demo_root):
    """Factory: clips for ``tiny_model_cfg`` (8 frames, stride 2, 32x32) from the demo set."""

    def make(split: str = "train", **overrides) -> DataConfig:
        base = DataConfig(shards=str(demo_root / split), num_frames=8, sampling_rate=2,
                          input_size=32, patch_size=16, tubelet_size=2, batch_size=4,
                          num_workers=0)
        return dataclasses.replace(base, **overrides)

    return make
