"""Input mistakes end a stage's command line with one line naming the file or field and what
to do (exit 2, no traceback); ``--debug`` shows the traceback."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from models import ModelConfig, VideoViT
from models.checkpoint import save_project_checkpoint

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def cli(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def probe_args(demo_root: Path, out_dir: Path, weights: str) -> list[str]:
    return ["--config", "configs/finetune/probe_demo.yaml", f"data.shards={demo_root / 'train'}",
            f"val.shards={demo_root / 'val'}", f"out_dir={out_dir}", f"weights={weights}",
            "data.num_workers=0", "model.img_size=32", "model.num_frames=8"]


def assert_one_line_error(result: subprocess.CompletedProcess, *expected: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and all(text in error[0] for text in expected), result.stderr[-3000:]


def test_missing_shard_set_names_the_field(tmp_path):
    result = cli("finetune", "--config", "configs/finetune/demo_joint.yaml",
                 f"data.shards={tmp_path / 'nowhere'}", f"val.shards={tmp_path / 'nowhere'}",
                 f"out_dir={tmp_path / 'run'}", "pretrained=")
    assert_one_line_error(result, "data.shards=", "nowhere")


def test_missing_weights_name_the_file_and_debug_shows_the_traceback(demo_root, tmp_path):
    args = probe_args(demo_root, tmp_path / "run", str(tmp_path / "missing.safetensors"))
    assert_one_line_error(cli("finetune.probe", *args), "missing.safetensors", "do not exist")
    debug = cli("finetune.probe", *args, "--debug")
    assert debug.returncode not in (0, 2) and "Traceback" in debug.stderr
    assert "MissingInputError" in debug.stderr


def test_checkpoint_that_does_not_fit_the_model_says_why(demo_root, tmp_path):
    divided = VideoViT(ModelConfig(size="micro", img_size=32, patch_size=8, num_frames=8,
                                   tubelet_size=1, attention="divided"))
    save_project_checkpoint(divided, tmp_path / "divided.safetensors")
    result = cli("finetune.probe", *probe_args(demo_root, tmp_path / "run",
                                               str(tmp_path / "divided.safetensors")))
    assert_one_line_error(result, "divided.safetensors", "joint-attention model")
