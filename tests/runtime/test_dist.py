"""runtime.dist.discover: rank discovery from each launcher's environment variables."""
from __future__ import annotations

import pytest

import os
import re
import subprocess
import sys
from pathlib import Path

from runtime.dist import discover, first_free_port, first_host, job_port


def test_single_process_defaults():
    env = discover({})
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (0, 1, 0, "single")
    assert env.is_main


def test_torchrun_variables():
    env = discover({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                    "MASTER_ADDR": "node0", "MASTER_PORT": "1234", "TORCHELASTIC_RUN_ID": "x"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (5, 8, 1, 4)
    assert (env.master_addr, env.master_port, env.launcher, env.node_rank) == ("node0", 1234,
                                                                               "torchrun", 1)


def test_deepspeed_launcher_variables():
    env = discover({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_SIZE": "2",
                    "CROSS_RANK": "1", "CROSS_SIZE": "2", "MASTER_ADDR": "10.0.0.1",
                    "MASTER_PORT": "29500"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 4, 1, 2)
    assert env.launcher == "deepspeed" and env.master_addr == "10.0.0.1"


def test_slurm_variables_give_first_host_and_job_port():
    env = discover({"SLURM_PROCID": "6", "SLURM_NTASKS": "8", "SLURM_LOCALID": "2",
                    "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_NODELIST": "gpu[017-018]",
                    "SLURM_JOB_ID": "123456"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (6, 8, 2, 4)
    assert env.master_addr == "gpu017" and env.launcher == "slurm"
    assert env.master_port == job_port(123456) == 15000 + 123456 % 15000
    assert env.node_rank == 1


def test_slurm_respects_explicit_master_and_torchrun_wins_inside_slurm():
    env = discover({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "a1",
                    "MASTER_ADDR": "head", "MASTER_PORT": "4000"})
    assert (env.master_addr, env.master_port) == ("head", 4000)
    inside = discover({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "a1",
                       "RANK": "3", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"})
    assert inside.launcher == "torchrun" and inside.world_size == 16


def test_openmpi_variables():
    env = discover({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4",
                    "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
                    "MASTER_ADDR": "mpi-head"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (2, 4, 0, 2)
    assert env.launcher == "openmpi" and env.master_addr == "mpi-head"


@pytest.mark.parametrize("nodelist, host", [
    ("node01", "node01"), ("gpu[003-007,010]", "gpu003"), ("gpu[12,15],cpu[1-2]", "gpu12"),
    ("a-b-c[9]", "a-b-c9"), ("x1,x2", "x1"),
])
def test_first_host(nodelist, host):
    assert first_host(nodelist) == host


def test_bad_values_are_named():
    with pytest.raises(ValueError, match="WORLD_SIZE='two'"):
        discover({"RANK": "0", "WORLD_SIZE": "two"})
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST"):
        discover({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})


def test_multinode_openmpi_without_master_addr_fails_clearly():
    env = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4",
           "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    with pytest.raises(ValueError, match="without MASTER_ADDR.*mpirun -x MASTER_ADDR"):
        discover(env)
    one_node = discover({**env, "OMPI_COMM_WORLD_LOCAL_SIZE": "4"})
    assert one_node.master_addr == "127.0.0.1"


def test_job_ports_stay_below_the_ephemeral_range_and_skip_busy_ports():
    assert all(15000 <= job_port(job) < 30000 for job in (0, 14999, 15000, 10**9 + 7))
    import socket
    with socket.socket() as busy:
        busy.bind(("", 0))
        taken = busy.getsockname()[1]
        assert first_free_port(taken) > taken


def test_sbatch_script_and_srun_only_start_use_one_port_formula():
    """The sbatch script asks ``python -m runtime.dist master-port`` (no formula of its own)."""
    repo = Path(__file__).resolve().parents[2]
    script = (repo / "launch" / "slurm_pretrain.sbatch").read_text()
    assert "python\" -m runtime.dist master-port" in script and "% 1" not in script
    out = subprocess.run([sys.executable, "-m", "runtime.dist", "master-port"], cwd=repo,
                         env={**os.environ, "SLURM_JOB_ID": "4242"}, capture_output=True,
                         text=True, check=True).stdout
    assert re.fullmatch(r"\d+\n", out) and int(out) >= job_port(4242)
