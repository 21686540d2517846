"""Fixtures for the pretraining tests: the tiny demo shard set and a reference run."""
from __future__ import annotations

from pathlib import Path

import pytest

from data_tools.demo import DemoConfig, generate_demo
from tests.pretrain.helpers import run_in_process, tiny_args


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> Path:
    """The tiny demo set: 10 classes x 3 clips of 16 frames at 32x32 in 4 train shards."""
    out = tmp_path_factory.mktemp("demo")
    generate_demo(out, DemoConfig.tiny(), workers=1, progress=False)
    return out / "train"


@pytest.fixture(scope="session")
def reference_run(demo_shards, tmp_path_factory) -> Path:
    """An uninterrupted single-rank run: 30 steps (2 epochs), ZeRO-0 fp32, checkpoints every
    3 steps (the last 2 kept), figures at the end, TensorBoard on."""
    out = tmp_path_factory.mktemp("reference")
    run_in_process(tiny_args(demo_shards, out, **{"log.vis_every_steps": 0,
                                                  "log.tensorboard": True}))
    return out
