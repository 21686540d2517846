"""Fine-tuning runs on the demo set: learning a time-reversed motion pair, exact resume with
EMA and mixup, mixup on video, run outputs."""
from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data_tools.demo import DemoConfig, generate_demo
from finetune.config import FinetuneConfig, MixupConfig, ValConfig
from finetune.train import VideoMixup, run
from runtime.checkpoint import CheckpointConfig
from runtime.config import load_config
from runtime.engine import EngineConfig

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def motion_pair_root(tmp_path_factory) -> Path:
    """``move_right`` vs ``move_left`` only - the same frames in opposite orders, so a
    single frame cannot tell them apart - without distractors or jitter: 64 + 16 clips per
    class of 16 frames at 32x32."""
    out = tmp_path_factory.mktemp("motion_pair")
    generate_demo(out, DemoConfig.tiny(classes=("move_right", "move_left"), train_per_class=64,
                                       val_per_class=16, shard_max_count=32, jitter=0.0,
                                       max_distractors=0), workers=1, progress=False)
    return out


def learning_config(root: Path, out_dir: Path, attention: str, seed: int = 0) -> FinetuneConfig:
    """configs/finetune/demo_joint.yaml from scratch on 8-frame clips (stride 2, a 4x4x4 grid):
    240 steps of batch 16, peak lr 1.5e-3 with layer decay, no mixup, a full-size head init."""
    return load_config(FinetuneConfig, REPO / "configs/finetune/demo_joint.yaml", [
        "pretrained=", f"data.shards={root / 'train'}", f"val.shards={root / 'val'}",
        f"out_dir={out_dir}", f"model.attention={attention}", f"seed={seed}",
        "model.num_frames=8", "data.num_frames=8", "data.num_workers=0", "data.crop=center",
        "model.img_size=32", "data.input_size=32", "model.tubelet_size=2", "data.tubelet_size=2",
        "data.sampling_rate=2", "data.num_test_clips=1", "data.num_test_crops=1",
        "val.every_epochs=0", "optim.epochs=30", "optim.warmup_epochs=2", "optim.base_lr=0.024",
        "mixup.mixup=0", "mixup.cutmix=0", "mixup.label_smoothing=0", "model.drop_path_rate=0",
        "head_init_scale=1.0", "checkpoint.every_steps=0", "checkpoint.resume=",
        "log.tensorboard=false"])


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["joint", "divided"])
def test_fine_tuning_learns_the_direction_of_motion(motion_pair_root, tmp_path, attention):
    # chance is 0.5; from scratch a 2-block ViT leaves the chance plateau after 100-150
    # steps (checked with seeds 0-2 for both attention types), and reaches >= 0.95
    metrics = run(learning_config(motion_pair_root, tmp_path, attention))
    assert metrics["num_videos"] == 32
    assert metrics["top1"] >= 0.8, metrics
    rows = list(csv.DictReader((tmp_path / "eval" / "predictions.csv").open()))
    assert len(rows) == 32
    assert {r["label_name"] for r in rows} == {"move_right", "move_left"}
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["top1"] == pytest.approx(metrics["top1"]) and saved["views_per_video"] == 1
    exported = load_file(str(tmp_path / "model.safetensors"))
    assert exported["head.weight"].shape == (2, 64)


def resume_config(demo_root: Path, out_dir: Path, max_steps: int) -> FinetuneConfig:
    """A few steps on the tiny demo set with mixup / cutmix, EMA and drop path, checkpoints
    every 3 steps."""
    return FinetuneConfig(
        model=dataclasses.replace(FinetuneConfig().model, size="micro", img_size=32,
                                  patch_size=16, num_frames=8, drop_path_rate=0.1),
        data=dataclasses.replace(FinetuneConfig().data, shards=str(demo_root / "train"),
                                 num_frames=8, sampling_rate=2, input_size=32, patch_size=16,
                                 tubelet_size=2, batch_size=4, num_workers=0, shuffle_buffer=8),
        val=ValConfig(shards=str(demo_root / "val"), every_epochs=0, test_views=False),
        mixup=MixupConfig(), ema=dataclasses.replace(FinetuneConfig().ema, enabled=True, decay=0.9),
        optim=dataclasses.replace(FinetuneConfig().optim, epochs=2, warmup_epochs=0.5,
                                  base_lr=0.05),
        engine=EngineConfig(precision="fp32", zero_stage=0),
        checkpoint=CheckpointConfig(every_steps=3, keep_last=2, resume="auto"),
        out_dir=str(out_dir), max_steps=max_steps)


def test_resumed_run_matches_an_uninterrupted_one(demo_root, tmp_path):
    straight = run(resume_config(demo_root, tmp_path / "straight", 6))
    first = run(resume_config(demo_root, tmp_path / "resumed", 3))
    assert first["step"] == 3
    resumed = run(resume_config(demo_root, tmp_path / "resumed", 6))
    assert straight["step"] == resumed["step"] == 6
    for name in ("model.safetensors", "model_ema.safetensors"):
        a, b = (load_file(str(tmp_path / d / name)) for d in ("straight", "resumed"))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"{name}: {key}")
    assert resumed["top1"] == straight["top1"] and resumed["ema_top1"] == straight["ema_top1"]
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        run(dataclasses.replace(resume_config(demo_root, tmp_path / "straight", 6),
                                checkpoint=CheckpointConfig(every_steps=3, resume="")))


def test_video_cutmix_cuts_the_same_box_from_every_frame():
    mixup = VideoMixup(MixupConfig(mixup=0.0, cutmix=1.0, label_smoothing=0.0), num_classes=3)
    video = torch.stack([torch.full((3, 4, 16, 16), float(i)) for i in range(4)])
    mixed, target = mixup(video.clone(), torch.tensor([0, 1, 2, 1]))
    assert target.shape == (4, 3) and torch.allclose(target.sum(1), torch.ones(4))
    pasted = mixed[0] != 0  # clip 0 receives a box from clip 3 (the batch is flipped)
    assert pasted.any() and not pasted.all()
    assert torch.equal(pasted, pasted[:, :1].expand_as(pasted))  # same box in every frame
    assert torch.equal(pasted, pasted[:1].expand_as(pasted))  # and every channel
    lam = 1 - pasted[0, 0].float().mean()  # the kept fraction of clip 0 (label 0)
    assert target[0].tolist() == pytest.approx([float(lam), 1 - float(lam), 0.0])
