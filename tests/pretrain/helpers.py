"""Helpers shared by the pretraining tests: tiny run arguments, in-process and launched runs."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from runtime.config import parse_config
from runtime.logging import METRICS_FILE, read_metrics

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "configs" / "pretrain" / "demo_tiny.yaml"
PYTHON = sys.executable


def tiny_args(shards: Path, out_dir: Path, **extra) -> list[str]:
    """Arguments for configs/pretrain/demo_tiny.yaml shrunk to a run of a few CPU seconds:
    8-frame clips (a 4x4x4 token grid), batch 4, no worker processes, a log line every step.
    With 30 videos x 2 repeats an epoch is 15 steps on one rank, 7 on two."""
    values = {
        "data.shards": str(shards), "out_dir": str(out_dir),
        "model.num_frames": 8, "data.num_frames": 8, "data.batch_size": 4,
        "model.img_size": 32, "data.input_size": 32, "data.sampling_rate": 2,
        "model.tubelet_size": 2, "data.tubelet_size": 2,
        "data.num_workers": 0, "data.shuffle_buffer": 8,
        "optim.base_lr": 0.05, "optim.epochs": 2, "optim.warmup_epochs": 0.2,
        "checkpoint.every_steps": 3, "checkpoint.resume": "auto",
        "log.every_steps": 1, "log.vis_every_steps": -1, "log.tensorboard": False,
    }
    values.update(extra)
    return ["--config", str(DEMO_CONFIG)] + [f"{k}={v}" for k, v in values.items()]


def losses_by_step(run_dir: Path) -> dict[int, float]:
    """Logged loss per optimizer step (a step logged twice, i.e. replayed after a resume,
    keeps its last value)."""
    return {r["step"]: float(r["loss"]) for r in read_metrics(run_dir / METRICS_FILE, "train")}


@contextmanager
def one_torch_thread():
    """One intra-op thread: two pytest workers on two cores must not oversubscribe them."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_in_process(args: list[str]) -> dict:
    """``python -m pretrain ARGS`` in this process (one rank), without its logging set-up."""
    from pretrain.config import PretrainConfig
    from pretrain.train import run

    with one_torch_thread():
        return run(parse_config(PretrainConfig, args))


def subprocess_env() -> dict[str, str]:
    """Environment for launched runs: one thread per rank, this checkout importable, no
    rank variables inherited from the pytest process's own process group."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))})
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                "MASTER_PORT"):
        env.pop(key, None)
    return env
