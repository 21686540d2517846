"""Shared builders for the fine-tuning tests."""
from __future__ import annotations

import dataclasses
import tarfile
from pathlib import Path

import torch


def tiny_classifier_run(out: Path, demo_root: Path, **data_overrides) -> Path:
    """A joint-attention micro classifier fine-tuned two steps on the demo shards into run
    folder ``out`` (8 frames of 32x32 at stride 2), its exported weights then randomised so
    the demo clips get different, well separated predictions (two steps from scratch predict
    one class for all); ``data_overrides`` change its data settings."""
    from finetune.config import FinetuneConfig, ValConfig
    from finetune.predict import load_predictor
    from finetune.train import export_model
    from finetune.train import run as finetune
    from runtime.checkpoint import CheckpointConfig
    from runtime.engine import EngineConfig

    base = FinetuneConfig()
    finetune(FinetuneConfig(
        pretrained="", out_dir=str(out), max_steps=2,
        model=dataclasses.replace(base.model, size="micro", img_size=32, patch_size=16,
                                  num_frames=8, drop_path_rate=0.0),
        data=dataclasses.replace(base.data, shards=str(demo_root / "train"), sampling_rate=2,
                                 batch_size=4, num_workers=0, shuffle_buffer=8,
                                 **data_overrides),
        val=ValConfig(shards=str(demo_root / "val"), every_epochs=0, test_views=False),
        optim=dataclasses.replace(base.optim, epochs=1, warmup_epochs=0.5),
        engine=EngineConfig(precision="fp32", zero_stage=0),
        checkpoint=CheckpointConfig(every_steps=0, resume=""),
        log=dataclasses.replace(base.log, tensorboard=False)))
    model = load_predictor(out, "cpu").model
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.5)
    export_model(model, out / "model.safetensors")
    return out


def extract_val_videos(demo_root: Path, out: Path) -> Path:
    """The demo validation shards' mp4 members written to ``out`` as files ``<key>.mp4``."""
    for shard in sorted((demo_root / "val").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".mp4"):
                    (out / Path(member.name).name).write_bytes(tar.extractfile(member).read())
    return out
