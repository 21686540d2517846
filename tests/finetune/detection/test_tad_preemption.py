"""The temporal-detection head stops on SIGUSR1 after the current step with a checkpoint,
and the next run continues from it to the weights of an uninterrupted run."""
from __future__ import annotations

import os
import signal

import pytest
import torch

from finetune.detection import train_tad
from finetune.detection.config import TADConfig
from finetune.detection.features import FeatureGrid
from finetune.detection.train_tad import HEAD_CHECKPOINT, VideoFeatures, train_head
from runtime.config import load_config
from runtime.logging import RunLogger
from runtime.preemption import Preempted


def videos(count: int = 6) -> list[VideoFeatures]:
    generator = torch.Generator().manual_seed(0)
    grid = FeatureGrid(fps=8.0, window_stride=2, span=7, num_steps=32)
    return [VideoFeatures(f"v{i}", torch.randn(32, 16, generator=generator), grid, 8.0,
                          torch.tensor([[1.0 + i % 3, 4.0 + i % 3]]), torch.tensor([i % 2]))
            for i in range(count)]


def config(out_dir) -> TADConfig:
    return load_config(TADConfig, None, [
        f"out_dir={out_dir}", "data.shards=unused", "val.shards=unused", "model.size=micro",
        "head.dim=16", "head.num_levels=3", "data.batch_size=2", "data.max_seq_len=32",
        "optim.epochs=4", "optim.base_lr=0.128", "optim.warmup_epochs=1", "log.every_steps=1"])


def trained(cfg: TADConfig) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    with RunLogger(cfg.out_dir, tensorboard=False) as run_log:
        return train_head(videos(), cfg, 2, torch.device("cpu"), run_log).state_dict()


def test_head_training_stops_on_a_signal_and_continues_exactly(tmp_path, monkeypatch):
    reference = trained(config(tmp_path / "straight"))

    real_loss, calls = train_tad.detection_loss, []

    def loss_then_signal(*args, **kwargs):  # a real SIGUSR1, in the 5th step (mid-epoch 2)
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train_tad, "detection_loss", loss_then_signal)
    cfg = config(tmp_path / "stopped")
    with pytest.raises(Preempted, match="after step 5"):
        trained(cfg)
    assert (tmp_path / "stopped" / HEAD_CHECKPOINT).is_file()
    monkeypatch.setattr(train_tad, "detection_loss", real_loss)
    resumed = trained(cfg)
    assert not (tmp_path / "stopped" / HEAD_CHECKPOINT).exists()
    for name, value in reference.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0, msg=name)
