"""Rank discovery for every launcher, and process-group set-up.

One entry point runs under torchrun, the ``deepspeed`` launcher, SLURM's ``srun``, OpenMPI's
``mpirun`` or as a single process. ``discover`` only reads environment variables, so it is
testable without launching anything; ``init_distributed`` exports what it found in the
torchrun spelling (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and starts the
process group through DeepSpeed.
"""
from __future__ import annotations

import os
import re
import socket
import sys
from dataclasses import dataclass
from typing import Mapping, Sequence, TypeVar

import torch
import torch.distributed as torch_dist

DEFAULT_MASTER_PORT = 29500

T = TypeVar("T")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "single" | "torchrun" | "deepspeed" | "slurm" | "openmpi" | "env"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def node_rank(self) -> int:
        return self.rank // max(self.local_world_size, 1)


def first_host(nodelist: str) -> str:
    """First host name of a SLURM node list: ``gpu[003-007,010],cpu1`` -> ``gpu003``."""
    nodelist = nodelist.strip()
    if not nodelist:
        raise ValueError("empty SLURM node list")
    match = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if match is None:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, bracket = match.group(1), match.group(3)
    if bracket is None:
        return prefix
    first = bracket.split(",")[0].split("-")[0]
    return f"{prefix}{first}"


def _slurm_tasks_per_node(env: Mapping[str, str]) -> int:
    if "SLURM_NTASKS_PER_NODE" in env:
        return int(env["SLURM_NTASKS_PER_NODE"].split("(")[0].split(",")[0])
    if "SLURM_TASKS_PER_NODE" in env:  # e.g. "4(x2)" or "4,2"
        return int(env["SLURM_TASKS_PER_NODE"].split("(")[0].split(",")[0])
    return 1


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError as err:
        raise ValueError(f"environment variable {key}={env[key]!r} is not an integer") from err


def discover(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read rank, world size, local rank and master address from the launcher's variables.

    Precedence: explicit torchrun/deepspeed variables (RANK + WORLD_SIZE), then OpenMPI
    (OMPI_COMM_WORLD_*), then SLURM (SLURM_PROCID + SLURM_NTASKS), else a single process.
    MASTER_ADDR / MASTER_PORT from the environment always win; under SLURM the address
    defaults to the first host of SLURM_JOB_NODELIST and the port to one derived from the
    job id (so two jobs sharing a node do not collide).
    """
    env = os.environ if environ is None else environ
    addr = env.get("MASTER_ADDR")
    port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else None

    if "RANK" in env and "WORLD_SIZE" in env:
        if "TORCHELASTIC_RUN_ID" in env or "LOCAL_WORLD_SIZE" in env:
            launcher = "torchrun"
        elif "CROSS_RANK" in env or "LOCAL_SIZE" in env:
            launcher = "deepspeed"
        else:
            launcher = "env"
        world = _int(env, "WORLD_SIZE")
        local_world = int(env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or world)
        return DistEnv(_int(env, "RANK"), world, int(env.get("LOCAL_RANK", 0)), local_world,
                       addr or "127.0.0.1", port or DEFAULT_MASTER_PORT, launcher)

    if "OMPI_COMM_WORLD_RANK" in env:
        world = _int(env, "OMPI_COMM_WORLD_SIZE")
        local_world = int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", world))
        if addr is None and local_world < world:
            raise ValueError(
                f"OpenMPI run of {world} ranks over several nodes ({local_world} per node) "
                "without MASTER_ADDR: every rank must meet at one address; pass the first "
                "node's name, e.g. mpirun -x MASTER_ADDR=$(hostname) -x MASTER_PORT=29500 ...")
        return DistEnv(_int(env, "OMPI_COMM_WORLD_RANK"), world,
                       int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)), local_world,
                       addr or "127.0.0.1", port or DEFAULT_MASTER_PORT, "openmpi")

    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        if addr is None:
            nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") \
                or env.get("SLURM_NODELIST")
            if not nodelist:
                raise ValueError("SLURM run without SLURM_JOB_NODELIST: set MASTER_ADDR")
            addr = first_host(nodelist)
        if port is None:
            port = job_port(int(env.get("SLURM_JOB_ID", "0") or 0))
        return DistEnv(_int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS"),
                       int(env.get("SLURM_LOCALID", 0)), _slurm_tasks_per_node(env),
                       addr, port, "slurm")

    return DistEnv(0, 1, 0, 1, addr or "127.0.0.1", port or DEFAULT_MASTER_PORT, "single")


def job_port(job_id: int) -> int:
    """The master port of a SLURM job without MASTER_PORT: ``15000 + job_id % 15000``, below
    Linux's ephemeral range (32768+), different for jobs that share a node. The sbatch script
    (``python -m runtime.dist master-port``) moves up from it until a port is free on the first
    node and exports it; an srun-only start uses it as it is."""
    return 15000 + job_id % 15000


def first_free_port(start: int) -> int:
    """``start`` or the next port above it that can be bound on this host."""
    port = start
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("", port))
                return port
            except OSError:
                port += 1


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(backend: str | None = None) -> DistEnv:
    """Start the default process group (idempotent) and return the discovered ``DistEnv``.

    The backend defaults to DeepSpeed's accelerator choice (nccl on CUDA, gloo on CPU).
    A single process gets a private free port so parallel test runs do not collide.
    """
    info = discover()
    if torch_dist.is_available() and torch_dist.is_initialized():
        return info
    if info.launcher == "single" and "MASTER_PORT" not in os.environ:
        info = DistEnv(0, 1, 0, 1, info.master_addr, free_port(), "single")
    os.environ.update({
        "RANK": str(info.rank), "WORLD_SIZE": str(info.world_size),
        "LOCAL_RANK": str(info.local_rank), "LOCAL_WORLD_SIZE": str(info.local_world_size),
        "MASTER_ADDR": info.master_addr, "MASTER_PORT": str(info.master_port),
    })
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() == "cuda":
        torch.cuda.set_device(info.local_rank)
    deepspeed.init_distributed(dist_backend=backend or accelerator.communication_backend_name(),
                               auto_mpi_discovery=False, verbose=False)
    return info


def is_initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def get_rank() -> int:
    return torch_dist.get_rank() if is_initialized() else discover().rank


def get_world_size() -> int:
    return torch_dist.get_world_size() if is_initialized() else discover().world_size


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_initialized():
        torch_dist.barrier()


def all_reduce_max(value: float) -> float:
    """Max of a scalar over ranks (identity when not distributed)."""
    return all_reduce_max_many([value])[0]


def all_reduce_max_many(values: Sequence[float]) -> list[float]:
    """Element-wise max of ``values`` over ranks in one collective (identity when not
    distributed)."""
    if not is_initialized():
        return [float(v) for v in values]
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if torch_dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX)
    return tensor.tolist()


def gather_objects(local: T) -> list[T] | None:
    """Every rank's ``local`` on the main process, in rank order (None on the others)."""
    if not is_initialized() or get_world_size() == 1:
        return [local]
    parts: list | None = [None] * get_world_size() if get_rank() == 0 else None
    torch_dist.gather_object(local, parts, dst=0)
    return parts


def broadcast_from_main(obj: T) -> T:
    """The main process's ``obj`` on every rank (every rank must call this)."""
    if not is_initialized() or get_world_size() == 1:
        return obj
    holder = [obj]
    torch_dist.broadcast_object_list(holder, src=0)
    return holder[0]


def main(argv: list[str] | None = None) -> int:
    """``python -m runtime.dist master-port``: print the port a SLURM job's ranks meet on (the
    job's ``job_port``, moved up until free here); used by ``launch/slurm_pretrain.sbatch``."""
    args = sys.argv[1:] if argv is None else argv
    if args != ["master-port"]:
        print("usage: python -m runtime.dist master-port", file=sys.stderr)
        return 2
    print(first_free_port(job_port(int(os.environ.get("SLURM_JOB_ID", "0") or 0))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
