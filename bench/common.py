"""Helpers shared by the ``bench/`` scripts: machine and version info, timing (warm-up, then
the median of repeats, with several cases alternated in one process), the pretraining step
every script times, peak matmul throughput, and JSON + Markdown output.

Scripts import it as ``bench.common``; run as files (``python bench/x.py``) they first put the
repository root on ``sys.path``::

    if __package__ in (None, ""):
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.common import ...
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from runtime.io import atomic_write_text

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# -- machine ------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """What a figure was measured on: CPU, cores, threads, load, GPU, library versions."""
    device = torch.device(device)
    info: dict[str, Any] = {
        "cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 2), "python": platform.python_version(),
        "torch": torch.__version__,
        **{name: package_version(name) for name in ("transformers", "timm", "deepspeed")},
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return info


def describe(info: Mapping[str, Any]) -> str:
    """One line naming the machine, for the printed report and RESULTS.md."""
    where = info.get("gpu") or (f"{info['cpu']} ({info['cpu_count']} cores, "
                                f"{info['torch_threads']} torch threads)")
    return (f"{where}; torch {info['torch']}, transformers {info.get('transformers')}; "
            f"load average {info['load_average_1min']}")


def resolve_device(name: str) -> torch.device:
    """``auto`` = cuda when available; asking for cuda without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA device is available here")
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """Mixed-precision forward for ``bf16`` / ``fp16``; nothing for ``fp32``."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[dtype])


# -- timing -------------------------------------------------------------------------------


@dataclass
class Timing:
    """Seconds per call of one case: wall clock and this process's CPU time."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.wall)

    @property
    def best(self) -> float:
        return min(self.wall)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)

    @property
    def spread(self) -> float:
        """Interquartile range / median: how noisy the repeats were."""
        if len(self.wall) < 4:
            return (max(self.wall) - min(self.wall)) / self.median
        q1, _, q3 = statistics.quantiles(self.wall, n=4)
        return (q3 - q1) / self.median

    def as_dict(self) -> dict[str, float]:
        return {"median_s": self.median, "best_s": self.best, "cpu_median_s": self.cpu_median,
                "iqr_over_median": round(self.spread, 3), "repeats": len(self.wall)}


def time_call(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """Wall and process-CPU seconds of one call (the device is synchronised on both ends)."""
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def benchmark(cases: Mapping[str, Callable[[], object]], device: torch.device, warmup: int = 2,
              repeats: int = 5) -> dict[str, Timing]:
    """Time several cases fairly in one process.

    Every case is warmed up first (oneDNN / cuBLAS pick their kernels, allocators grow), then
    the cases run in alternation - round ``r`` starts with case ``r mod k`` - so drifting load
    on a shared machine, thermal state and allocator growth hit every case alike. Compare
    medians.
    """
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    names = list(cases)
    timings = {name: Timing() for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            wall, cpu = time_call(cases[name], device)
            timings[name].wall.append(wall)
            timings[name].cpu.append(cpu)
    return timings


# -- the step being timed -------------------------------------------------------------------


def make_adamw(model: torch.nn.Module, device: torch.device, lr: float = 1.5e-4,
               weight_decay: float = 0.05) -> torch.optim.AdamW:
    """VideoMAE's pretraining AdamW (betas 0.9 / 0.95) with the fused kernel this torch has
    for ``device`` (CUDA and CPU both have one in torch >= 2.4); the same on every side."""
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95),
                             weight_decay=weight_decay, fused=True)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               loss_fn: Callable[[torch.nn.Module], torch.Tensor], device: torch.device,
               dtype: str = "fp32") -> Callable[[], torch.Tensor]:
    """A closure running one optimisation step: forward (under autocast), backward, AdamW."""

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            loss = loss_fn(model)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def tube_masks(batch: int, grid: tuple[int, int, int], ratio: float, seed: int = 0) -> torch.Tensor:
    """``(B, N)`` VideoMAE tube masks (True = hidden) from the project's generator."""
    from data_tools.masking import TubeMaskGenerator

    generator, rng = TubeMaskGenerator(grid, ratio), torch.Generator().manual_seed(seed)
    return torch.stack([generator(rng) for _ in range(batch)])


def matmul_throughput(device: torch.device, sizes: Sequence[int] = (8192,),
                      dtype: torch.dtype = torch.bfloat16, warmup: int = 3,
                      repeats: int = 10) -> list[dict[str, float]]:
    """Dense ``size x size`` matmul throughput (TFLOP/s, median and best of ``repeats``) per
    size, on random data (zeros run faster on some GPUs), the sizes alternated as in
    :func:`benchmark`. Each timed call runs ``products`` matmuls (more for small sizes), so
    the device synchronisation around it stays a small part of the time."""
    cases, products = {}, {}
    for size in sizes:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        products[size] = count = max(1, min(64, (16384 // size) ** 3))
        cases[size] = lambda a=a, b=b, count=count: [a @ b for _ in range(count)]
    timings = benchmark(cases, device, warmup, repeats)
    rows = []
    for size, timing in timings.items():
        flops = 2 * size ** 3 * products[size]
        rows.append({"size": size, "products_per_call": products[size],
                     "ms_per_product": timing.median / products[size] * 1e3,
                     "tflops": flops / timing.median / 1e12,
                     "tflops_best": flops / timing.best / 1e12,
                     "iqr_over_median": round(timing.spread, 3)})
    return rows


def peak_matmul_tflops(device: torch.device, dtype: torch.dtype = torch.bfloat16, size: int = 8192,
                       repeats: int = 10) -> float:
    """Best dense ``size x size`` matmul throughput (TFLOP/s) on ``device``: the ceiling that
    model FLOPs utilisation is measured against."""
    return matmul_throughput(device, [size], dtype, repeats=repeats)[0]["tflops_best"]


def copy_bandwidth(device: torch.device, mib: int = 2048, warmup: int = 3,
                   repeats: int = 10) -> dict[str, float]:
    """Device-to-device copy of ``mib`` MiB: GB/s counting bytes read plus bytes written
    (the memory-bound ceiling), median and best of ``repeats``."""
    src = torch.randn(mib * 2 ** 20 // 4, device=device)
    dst = torch.empty_like(src)
    timing = benchmark({"copy": lambda: dst.copy_(src)}, device, warmup, repeats)["copy"]
    moved = 2 * src.numel() * src.element_size()
    return {"mib": mib, "gb_s": moved / timing.median / 1e9, "gb_s_best": moved / timing.best / 1e9}


# -- command line and output -----------------------------------------------------------------


def add_common_args(parser: argparse.ArgumentParser, warmup: int = 2, repeats: int = 7) -> None:
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="fp32 | bf16 | fp16 (default: fp32 on CPU, bf16 on CUDA)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch.set_num_threads (0 = leave torch's default)")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed calls per case")
    parser.add_argument("--repeats", type=int, default=repeats,
                        help="timed calls per case (median reported)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and few repeats (smoke test)")


def setup(args: argparse.Namespace) -> torch.device:
    """Apply ``--threads``, resolve ``--device`` and the default ``--dtype``; seed torch."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.dtype is None:
        args.dtype = "bf16" if device.type == "cuda" else "fp32"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    return device


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
                   digits: int = 3) -> str:
    columns = list(columns or rows[0].keys())

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def finish(name: str, args: argparse.Namespace, info: Mapping[str, Any],
           rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
           extra: Mapping[str, Any] | None = None,
           default_json: str | Path | None = None) -> dict[str, Any]:
    """Print the table and the machine line, write the JSON result; return the result."""
    result = {"bench": name, "machine": dict(info), "args": {k: str(v) if isinstance(v, Path) else v
                                                           for k, v in vars(args).items()},
              "rows": list(rows), **(extra or {})}
    print(f"\n{name}: {describe(info)}\n")
    print(markdown_table(rows, columns))
    path = args.json or default_json
    if path is not None:
        atomic_write_text(path, json.dumps(result, indent=1, default=str) + "\n")
        print(f"\nJSON: {path}")
    return result


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("nan")
