"""AVA-style detection resumes exactly: a run stopped mid-epoch and resumed from its checkpoint
reads the same keyframe batches and reaches the same losses and metrics as an uninterrupted
run (the loop shape of pretraining and fine-tuning: a ``DataStream`` of keyframes whose
loader restarts at every checkpoint, so both runs read the same segments)."""
from __future__ import annotations

from pathlib import Path

import pytest

from finetune.detection.config import DetectConfig
from finetune.detection.demo import CONFIG_DIR
from finetune.detection.demo_data import AVADemoConfig, generate_ava_demo
from finetune.detection.train_ava import run
from runtime.config import load_config
from runtime.logging import read_metrics

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ava_demo(tmp_path_factory):
    return generate_ava_demo(tmp_path_factory.mktemp("ava_small"),
                             AVADemoConfig(train_videos=6, val_videos=2, shard_max_count=3))


def config(paths, out_dir: Path, max_steps: int) -> DetectConfig:
    return load_config(DetectConfig, CONFIG_DIR / "detect_demo.yaml", [
        f"out_dir={out_dir}", f"data.shards={paths.shards['train']}",
        f"val.shards={paths.shards['val']}", f"data.annotations={paths.annotations['train']}",
        f"val.annotations={paths.annotations['val']}", f"data.label_map={paths.label_map}",
        "val.proposals=", "val.every_epochs=1", "data.num_workers=0", "data.batch_size=4",
        "head.dropout=0.5", "optim.epochs=3", "checkpoint.every_steps=2",
        "checkpoint.keep_last=2", "checkpoint.resume=auto", "log.every_steps=1",
        "log.tensorboard=false", f"max_steps={max_steps}"])


def losses(out_dir: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_metrics(out_dir / "metrics.jsonl", "train")}


def test_stopped_and_resumed_run_matches_an_uninterrupted_one(ava_demo, tmp_path):
    straight = run(config(ava_demo, tmp_path / "straight", 0))
    first = run(config(ava_demo, tmp_path / "resumed", 4))  # stops at the checkpoint of step 4
    resumed = run(config(ava_demo, tmp_path / "resumed", 0))
    reference, continued = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    total = max(reference)
    steps_per_epoch = total // 3
    assert 4 % steps_per_epoch and total - 4 > steps_per_epoch, (
        "the stop should fall mid-epoch and the resumed run cross an epoch boundary")
    assert first["frame_mAP@0.5"] >= 0 and sorted(continued) == sorted(reference)
    for step in range(1, total + 1):
        assert continued[step] == reference[step], step
    assert resumed["frame_mAP@0.5"] == straight["frame_mAP@0.5"]
    validations = read_metrics(tmp_path / "straight" / "metrics.jsonl", "val")
    assert len(validations) == 3  # after epochs 1 and 2, and the final test
