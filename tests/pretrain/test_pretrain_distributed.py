"""Two-rank CPU runs (gloo) through every launcher, chained on one run folder:

1. ``deepspeed --num_gpus 2 --module pretrain`` (ZeRO-2): steps 1-6, checkpoints at 3 and 6.
2. ``launch/torchrun_multinode.sh ... --resume auto`` (c10d rendezvous) on a copy without
   step_6: resumes from step 3 and must reproduce steps 4-6.
3. ``launch/slurm_pretrain.sbatch`` (with stand-ins for ``srun``/``scontrol``) on a copy of 1:
   resumes from step 6, runs step 7 (the end of epoch 0).
4. ``launch/deepspeed_multinode.sh`` with a one-node hostfile on the folder of 3: step 8
   (epoch 1).
"""
from __future__ import annotations

import json
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from runtime.checkpoint import CheckpointManager
from runtime.dist import free_port
from tests.pretrain.helpers import PYTHON, REPO, losses_by_step, subprocess_env, tiny_args

pytestmark = pytest.mark.slow

STEPS = 6  # an epoch is 7 steps on 2 ranks
ARGS = {"engine.zero_stage": 2, "checkpoint.keep_last": 3}

FAKE_SRUN = """#!/usr/bin/env bash
# Test stand-in for SLURM's srun: SLURM_NTASKS copies of the command on this host.
while [[ $1 == -* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
    SLURM_PROCID=$i SLURM_LOCALID=$i "$@" &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""
FAKE_SCONTROL = "#!/usr/bin/env bash\necho localhost\n"


def launch(command: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=REPO, env={**subprocess_env(), **(env or {})},
                            capture_output=True, text=True, timeout=420)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-5000:])
    return result


def copy_run(source: Path, target: Path, drop_checkpoint: str | None = None) -> Path:
    """A copy of a run folder without its logs and rank summaries (so what the next run
    writes can be told apart), optionally without one checkpoint."""
    shutil.copytree(source, target)
    shutil.rmtree(target / "ranks")
    (target / "metrics.jsonl").unlink()
    if drop_checkpoint:
        shutil.rmtree(target / "checkpoints" / drop_checkpoint)
    return target


def rank_summaries(run_dir: Path) -> list[dict]:
    return [json.loads((run_dir / "ranks" / f"rank_{r:05d}.json").read_text()) for r in (0, 1)]


def write_executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture(scope="module")
def runs(demo_shards, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("two_ranks")
    full = root / "full"
    launch([PYTHON, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
            "--master_port", str(free_port()), "--module", "pretrain",
            *tiny_args(demo_shards, full, max_steps=STEPS, **ARGS)])

    resumed = copy_run(full, root / "resumed", drop_checkpoint=f"step_{STEPS}")
    no_resume = {**ARGS, "checkpoint.resume": ""}  # given as --resume below
    launch(["bash", "launch/torchrun_multinode.sh",
            *tiny_args(demo_shards, resumed, max_steps=STEPS, **no_resume)[1:], "--resume", "auto"],
           {"NNODES": "1", "NPROC_PER_NODE": "2", "MASTER_PORT": str(free_port()),
            "TORCHRUN": f"{PYTHON} -m torch.distributed.run"})

    slurm = copy_run(full, root / "slurm")
    bin_dir = root / "bin"
    bin_dir.mkdir()
    write_executable(bin_dir / "srun", FAKE_SRUN)
    write_executable(bin_dir / "scontrol", FAKE_SCONTROL)
    slurm_env = {"PATH": f"{bin_dir}:{subprocess_env()['PATH']}", "PYTHON": PYTHON,
                 "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2",
                 "SLURM_JOB_NODELIST": "localhost"}
    launch(["bash", "launch/slurm_pretrain.sbatch",
            *tiny_args(demo_shards, slurm, max_steps=STEPS + 1, **ARGS)[1:]], slurm_env)

    hostfile = root / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    (slurm / "metrics.jsonl").rename(slurm / "metrics_slurm.jsonl")
    launch(["bash", "launch/deepspeed_multinode.sh",
            *tiny_args(demo_shards, slurm, max_steps=STEPS + 2, **ARGS)[1:]],
           {"HOSTFILE": str(hostfile), "MASTER_PORT": str(free_port()),
            "LAUNCHER_ARGS": "--no_ssh_check",
            "DEEPSPEED": f"{PYTHON} -m deepspeed.launcher.runner"})
    return {"full": full, "resumed": resumed, "chained": slurm}


def test_ranks_read_disjoint_shards_and_keep_identical_weights(runs, demo_shards):
    ranks = rank_summaries(runs["full"])
    shards = [set(r["shards"]) for r in ranks]
    assert not shards[0] & shards[1]
    assert shards[0] | shards[1] == {str(p) for p in demo_shards.glob("*.tar")}
    assert all(r["loader"]["decoded"] > 0 and r["step"] == STEPS for r in ranks)
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    assert sorted(losses_by_step(runs["full"])) == list(range(1, STEPS + 1))


def test_two_rank_checkpoint_resumes_exactly_on_two_ranks(runs):
    full, resumed = runs["full"], runs["resumed"]
    assert CheckpointManager(resumed / "checkpoints").complete_tags() == ["step_3", f"step_{STEPS}"]
    reference, after = losses_by_step(full), losses_by_step(resumed)
    assert sorted(after) == list(range(4, STEPS + 1))
    for step in after:
        assert after[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), step
    ranks = rank_summaries(resumed)
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    assert ranks[0]["weights_sha256"] == rank_summaries(full)[0]["weights_sha256"]


def test_slurm_and_hostfile_scripts_continue_the_run(runs):
    chained = runs["chained"]
    slurm_steps = [r["step"] for r in
                   map(json.loads, (chained / "metrics_slurm.jsonl").read_text().splitlines())]
    assert slurm_steps == [STEPS + 1]
    records = [json.loads(line) for line in (chained / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["epoch"]) for r in records] == [(STEPS + 2, 1)]
    assert CheckpointManager(chained / "checkpoints").complete_tags() == [
        f"step_{STEPS}", f"step_{STEPS + 1}", f"step_{STEPS + 2}"]
    ranks = rank_summaries(chained)
    assert ranks[0]["step"] == STEPS + 2
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
