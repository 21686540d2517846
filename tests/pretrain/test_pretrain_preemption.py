"""Preemption on two real ranks through ``launch/slurm_pretrain.sbatch`` (stand-ins for
``srun`` / ``scontrol``): SIGUSR1 to one rank mid-epoch and between scheduled checkpoints;
both ranks stop after the same step with a complete checkpoint and exit 75, the script
requeues the job, and the requeued job finishes the run with the losses and final weights of
an uninterrupted run."""
from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from runtime.checkpoint import CheckpointManager
from tests.pretrain.helpers import PYTHON, REPO, losses_by_step, subprocess_env, tiny_args
from tests.pretrain.test_pretrain_distributed import FAKE_SRUN, write_executable

pytestmark = pytest.mark.slow

STEPS = 12  # epochs of 7 steps on two ranks; scheduled checkpoints at 4, 8 and 12
ARGS = {"max_steps": STEPS, "checkpoint.every_steps": 4, "checkpoint.keep_last": 5,
        "engine.zero_stage": 1}
FAKE_SCONTROL = """#!/usr/bin/env bash
# Test stand-in for SLURM's scontrol: hostnames of the allocation, requeue requests logged.
if [[ $1 == requeue ]]; then echo "$2" >> "$REQUEUE_LOG"; else echo localhost; fi
"""


def sbatch(shards: Path, out_dir: Path, bin_dir: Path, job_id: str) -> subprocess.Popen:
    """The sbatch script as SLURM would run it, in the background."""
    env = {**subprocess_env(), "PATH": f"{bin_dir}:{subprocess_env()['PATH']}",
           "PYTHON": PYTHON, "SLURM_JOB_ID": job_id, "SLURM_NTASKS": "2",
           "SLURM_NTASKS_PER_NODE": "2", "SLURM_JOB_NODELIST": "localhost",
           "REQUEUE_LOG": str(bin_dir / "requeued")}
    return subprocess.Popen(["bash", "launch/slurm_pretrain.sbatch",
                             *tiny_args(shards, out_dir, **ARGS)[1:]],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=420)
    assert process.returncode == 0, output[-5000:]
    return output


def rank_processes(out_dir: Path) -> list[psutil.Process]:
    """The rank processes of the run in ``out_dir`` (``python -m pretrain ... out_dir=...``)."""
    return [p for p in psutil.process_iter(["cmdline"])
            if (cmd := p.info["cmdline"] or []) and Path(cmd[0]).name.startswith("python")
            and "pretrain" in cmd and f"out_dir={out_dir}" in cmd]


def logged_steps(out_dir: Path) -> int:
    path = out_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    return max((json.loads(line)["step"] for line in path.read_text().splitlines() if line),
               default=0)


@pytest.fixture(scope="module")
def bin_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("slurm_bin")
    write_executable(folder / "srun", FAKE_SRUN)
    write_executable(folder / "scontrol", FAKE_SCONTROL)
    return folder


def test_signal_to_one_rank_stops_both_and_the_requeued_job_matches(demo_shards, bin_dir,
                                                                    tmp_path):
    reference = tmp_path / "uninterrupted"
    finish(sbatch(demo_shards, reference, bin_dir, "101"))

    preempted = tmp_path / "preempted"
    job = sbatch(demo_shards, preempted, bin_dir, "102")
    deadline = time.monotonic() + 300
    while logged_steps(preempted) < 5:  # past the checkpoint of step 4, mid-epoch
        assert job.poll() is None and time.monotonic() < deadline, "the run ended early"
        time.sleep(0.02)
    ranks = rank_processes(preempted)
    assert len(ranks) == 2
    ranks[1].send_signal(signal.SIGUSR1)  # one rank only: the other learns it collectively
    output = finish(job)
    assert "requeueing job 102" in output  # the ranks exited with PREEMPTED_EXIT_CODE
    assert (bin_dir / "requeued").read_text().split() == ["102"]
    tags = CheckpointManager(preempted / "checkpoints").complete_tags()
    stopped_at = int(tags[-1].removeprefix("step_"))
    assert 5 <= stopped_at < STEPS and logged_steps(preempted) == stopped_at, (tags, output)
    assert output.count("stopped by a signal after step") == 2  # both ranks, exit 75 each

    finish(sbatch(demo_shards, preempted, bin_dir, "102"))  # the requeued job
    expected, got = losses_by_step(reference), losses_by_step(preempted)
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step
    hashes = [json.loads((run / "ranks" / "rank_00000.json").read_text())["weights_sha256"]
              for run in (reference, preempted)]
    assert hashes[0] == hashes[1]
