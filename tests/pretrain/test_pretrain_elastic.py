"""Elastic resume with real processes: a run keeps its data streams (two here), so a
checkpoint written by two ranks resumes on one and a one-rank run with two streams resumes on
two, and both reproduce the uninterrupted two-rank run's losses (ZeRO-2: the optimizer
partitions go through DeepSpeed's universal checkpoint conversion)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from data_tools.stream import resolve_streams
from runtime.checkpoint import CheckpointManager
from runtime.dist import free_port
from runtime.errors import InputError
from tests.pretrain.helpers import PYTHON, losses_by_step, tiny_args
from tests.pretrain.test_pretrain_distributed import launch

pytestmark = pytest.mark.slow

STEPS = 8  # epochs of 7 steps: the resumed part crosses an epoch boundary
ARGS = {"engine.zero_stage": 2, "checkpoint.every_steps": 4, "checkpoint.keep_last": 3}
# Equal up to float summation order: two ranks average two gradients of b clips, one rank
# takes the gradient of the 2b clips of both streams at once.
TOLERANCE = dict(rel=1e-4, abs=1e-6)


def two_ranks(shards: Path, out_dir: Path, max_steps: int, **extra) -> None:
    launch([PYTHON, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
            str(free_port()), "--module", "pretrain",
            *tiny_args(shards, out_dir, max_steps=max_steps, **ARGS, **extra)])


def one_rank(shards: Path, out_dir: Path, max_steps: int, **extra) -> None:
    launch([PYTHON, "-m", "pretrain", *tiny_args(shards, out_dir, max_steps=max_steps, **ARGS,
                                                 **extra)])


def assert_same_losses(run: Path, reference: Path, steps: range) -> None:
    expected, got = losses_by_step(reference), losses_by_step(run)
    assert sorted(got) == list(steps)
    for step in steps:
        assert got[step] == pytest.approx(expected[step], **TOLERANCE), step


def test_two_rank_checkpoint_resumes_on_one_rank_and_back(demo_shards, tmp_path):
    reference = tmp_path / "two_ranks"
    two_ranks(demo_shards, reference, STEPS)
    assert CheckpointManager(reference / "checkpoints").marker("step_4")["streams"] == 2

    # 2 -> 1: the checkpoint of step 4, resumed by one rank reading both streams
    shrunk = tmp_path / "shrunk"
    shutil.copytree(reference, shrunk)
    shutil.rmtree(shrunk / "checkpoints" / f"step_{STEPS}")
    (shrunk / "metrics.jsonl").unlink()
    one_rank(demo_shards, shrunk, STEPS)
    assert_same_losses(shrunk, reference, range(5, STEPS + 1))
    assert (shrunk / "checkpoints" / "universal" / "step_4").is_dir()
    marker = CheckpointManager(shrunk / "checkpoints").marker(f"step_{STEPS}")
    assert (marker["world_size"], marker["streams"]) == (1, 2)

    # 1 -> 2: one rank with two streams reads the two-rank run's batches, then two ranks go on
    grown = tmp_path / "grown"
    one_rank(demo_shards, grown, 4, **{"data.streams": 2})
    two_ranks(demo_shards, grown, STEPS)
    assert_same_losses(grown, reference, range(1, STEPS + 1))


def test_a_rank_count_that_does_not_divide_the_streams_is_refused():
    assert resolve_streams(0, None, 2) == 2 and resolve_streams(0, 4, 2) == 4
    with pytest.raises(InputError, match="resume on a number of ranks that divides 2"):
        resolve_streams(0, 2, 3)
    with pytest.raises(InputError, match="written with 2 streams"):
        resolve_streams(4, 2, 1)
