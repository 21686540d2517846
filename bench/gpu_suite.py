"""One-shot GPU suite: the project's GPU figures in one command that fits a short lease on one
GPU (``bench/gpu_suite.sh`` wraps it; bench/RESULTS.md, "GPU suite", gives the exact device
invocation). Parts, in this order (sizes in ``bench.gpu_parts.GPU``):

    peak           bf16 matmul TFLOP/s (square 4096-16384, random data), copy GB/s
    pretrain_step  ours vs HF VideoMAEForPreTraining, ViT-B 16x224 bf16, forward + backward +
                   AdamW, SDPA, same weights and masks, batch 32 and 128 (bench/vs_hf.py);
                   also the classification forward
    decoder_mask   VideoMAE V2 running-cell decoder masking vs the full decoder (batch 128)
    attention      7 attention types x 8/16/32/64 frames, ViT-B fine-tuning forward + backward
                   (batch 8; a case that does not fit is recorded as out of memory)
    loader         the real loader feeding the model with 8 and 16 workers, repeat 1 and 4
                   (bench/e2e.py), from shards of synthetic videos built on the machine;
                   needs webdataset and PyAV (carried as wheels), else recorded as skipped
    compile        torch.compile vs eager per implementation, alternated; compile time
    profile        top operators and regions per implementation (bench/profile_step.py)

Each part runs in its own process (forked from this one, which never touches the GPU) with
its own time budget, cut to what is left of ``--budget``; a part that cannot run, fails, runs
out of memory or out of time is recorded with the reason and the next part still runs.
``OUT/gpu_suite.json`` is rewritten after every part (a killed run keeps what it measured);
``OUT/gpu_suite.md`` holds the tables (``bench/gpu_table.py``: MFU = model FLOP/s / the peak
part's matmul TFLOP/s), which are also printed last.

    bash bench/gpu_suite.sh                      # GPU; writes under $OUT or bench/out/gpu_suite
    bash bench/gpu_suite.sh --dry-run            # every part on the CPU, tiny sizes
    python bench/gpu_suite.py --parts peak attention --budget 200 --out /tmp/x
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# torch.cuda.is_available() through NVML does not initialise CUDA, so forked parts can use it.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

import torch  # noqa: E402

from bench import gpu_table  # noqa: E402
from bench.gpu_parts import DRY_RUN, GPU, PARTS, Save, Skip  # noqa: E402
from runtime.io import atomic_write_text  # noqa: E402

# seconds per part on the H200 (the suite's --budget cuts them to what is left)
BUDGETS = {"peak": 60, "pretrain_step": 120, "decoder_mask": 90, "attention": 150,
           "loader": 150, "compile": 240, "profile": 90}
DRY_RUN_BUDGET_S = 60  # per part on the CPU
MIN_START_S = 20  # a part is not started with less time than this left
END_RESERVE_S = 10  # kept for writing the tables
PR_SET_PDEATHSIG = 1  # linux/prctl.h
RUNNING: list[multiprocessing.process.BaseProcess] = []  # the part now running, if any


def stop_running_part(signum: int, _frame) -> None:
    """The suite is being stopped: stop the running part's process group too, then exit."""
    for process in list(RUNNING):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    raise SystemExit(128 + signum)


def log(message: str) -> None:
    print(f"[gpu_suite {time.strftime('%H:%M:%S')}] {message}", flush=True)


def write_json(path: Path, value: dict) -> None:
    atomic_write_text(path, json.dumps(value, indent=1, default=str) + "\n")


def _child(target: Callable[[Save], dict], result_path: Path) -> None:
    """Run one part in this (new) process; every outcome is written to ``result_path``."""
    os.setpgid(0, 0)  # its own process group: a timeout stops its loader workers and compilers
    die_with_parent()
    signal.signal(signal.SIGTERM, raise_stopped)  # record where a timeout found the part
    record: dict = {"status": "running"}

    def save(partial_result: dict) -> None:
        record.update(partial_result)
        write_json(result_path, record)

    try:
        save(target(save) or {})
        record["status"] = "ok"
    except Skip as skip:
        record.update(status="skipped", reason=str(skip))
    except BaseException as error:  # noqa: BLE001 - every failure is recorded, not raised
        record.update(status="failed", reason=f"{type(error).__name__}: {error}"[:600],
                      traceback=traceback.format_exc()[-4000:])
    write_json(result_path, record)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no exit handlers: they could wait on helper processes the part left behind


class Stopped(BaseException):
    """The suite stopped this part (its budget ran out)."""


def raise_stopped(signum: int, _frame) -> None:
    raise Stopped(f"stopped by signal {signal.Signals(signum).name}")


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the suite dies (killed at the device call's
    limit, say), so no part keeps the GPU busy after it."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the suite's signal handler still stops it
        pass


def exit_description(code: int | None) -> str:
    if code is not None and code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"exit code {code}"


def stop_group(process: multiprocessing.process.BaseProcess) -> None:
    """SIGTERM, then SIGKILL, to the part's process group: the part if still running, and
    any helper process it left (loader workers, compiler workers)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:  # the group is gone (or setpgid was not reached yet)
            if process.is_alive():
                process.kill()
        process.join(5)


def run_part(target: Callable[[Save], dict], timeout: float, result_path: Path,
             method: str = "fork") -> dict:
    """Run ``target(save)`` in a child process for at most ``timeout`` seconds; returns its
    record: ``status`` ok / skipped / failed / timed_out, ``reason`` unless ok, ``wall_s``,
    and whatever the part saved (also before a timeout or a crash)."""
    result_path.unlink(missing_ok=True)
    process = multiprocessing.get_context(method).Process(target=_child,
                                                          args=(target, result_path))
    start = time.perf_counter()
    process.start()
    RUNNING.append(process)
    process.join(timeout)
    timed_out = process.is_alive()
    stop_group(process)
    RUNNING.remove(process)
    try:
        record = json.loads(result_path.read_text())
    except (OSError, ValueError):
        record = {"status": "running"}
    record.update(wall_s=round(time.perf_counter() - start, 1), budget_s=round(timeout, 1))
    if timed_out:
        record.update(status="timed_out", reason=f"stopped after its {timeout:.0f} s budget; "
                                                 "figures saved before that are kept")
    elif record["status"] == "running":
        record.update(status="failed", reason=f"the part's process ended with "
                      f"{exit_description(process.exitcode)} before reporting (killed for "
                      "memory, or a crash in native code)")
    return record


def nvidia_smi() -> str | None:
    """The GPU's state (clocks, memory, temperature, power) as nvidia-smi reports it."""
    if shutil.which("nvidia-smi") is None:
        return None
    fields = ("name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,clocks.mem,"
              "temperature.gpu,power.draw,power.limit,utilization.gpu")
    try:
        done = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"nvidia-smi failed: {error}"
    return (done.stdout or done.stderr).strip()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true",
                        help="every part on the CPU with tiny sizes and 1-2 steps")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or
                                                         "bench/out/gpu_suite"),
                        help="folder for gpu_suite.json / .md (default: $OUT, else "
                             "bench/out/gpu_suite)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for all parts (default: 420 on the GPU, 300 dry run)")
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS),
                        help="the parts to run (default: all, in the order listed)")
    args = parser.parse_args(argv)
    sizes = DRY_RUN if args.dry_run else GPU
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, stop_running_part)
    budget = args.budget or (300.0 if args.dry_run else 420.0)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "gpu_suite.json"
    start = time.perf_counter()
    result = {"suite": "gpu_suite", "command": " ".join([sys.executable, *sys.argv]),
              "dry_run": args.dry_run, "budget_s": budget, "sizes": asdict(sizes),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "nvidia_smi_before": nvidia_smi(), "parts": {}}
    log(f"{'dry run, ' if args.dry_run else ''}budget {budget:.0f} s, writing to {args.out}; "
        f"nvidia-smi: {result['nvidia_smi_before']}")
    work = Path(tempfile.mkdtemp(prefix="gpu_suite_"))
    try:
        for name in [n for n in PARTS if n in args.parts]:
            left = budget - (time.perf_counter() - start) - END_RESERVE_S
            timeout = min(DRY_RUN_BUDGET_S if args.dry_run else BUDGETS[name], left)
            if timeout < MIN_START_S:
                record = {"status": "skipped", "reason": f"not started: {max(left, 0):.0f} s "
                          f"of the suite's {budget:.0f} s budget were left"}
            else:
                # fork keeps the imports; spawn only if something here initialised CUDA
                method = "spawn" if torch.cuda.is_initialized() else "fork"
                log(f"part {name}: starting (budget {timeout:.0f} s, {method})")
                (work / name).mkdir()
                target = partial(PARTS[name], sizes, work / name)
                record = run_part(target, timeout, work / f"{name}.json", method)
            result["parts"][name] = record
            log(f"part {name}: {record['status']} in {record.get('wall_s', 0)} s"
                + (f" - {record['reason']}" if record.get("reason") else ""))
            write_json(json_path, result)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    machines = [p["machine"] for p in result["parts"].values() if p.get("machine")]
    result.update(machine=machines[0] if machines else None, nvidia_smi_after=nvidia_smi(),
                  wall_s=round(time.perf_counter() - start, 1))
    result["derived"] = gpu_table.derive(result)
    write_json(json_path, result)
    table = gpu_table.render(result)
    atomic_write_text(args.out / "gpu_suite.md", table + "\n")
    print("\n" + table, flush=True)
    log(f"wrote {json_path} and {args.out / 'gpu_suite.md'} in {result['wall_s']} s")
    return result


if __name__ == "__main__":
    main()
