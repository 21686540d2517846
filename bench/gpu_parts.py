"""The parts of the one-shot GPU suite (``bench/gpu_suite.py``).

Each part measures one thing through the existing bench scripts, in its own process, and
returns a JSON-ready dict; it calls ``save(partial)`` as figures come in, so a part stopped by
its time budget still reports what it measured. A part that cannot run on this machine raises
:class:`Skip` with the reason. :class:`Sizes` says how large everything is: :data:`GPU` for
the H200 run, :data:`DRY_RUN` for the CPU smoke run (``--dry-run``).

Model FLOPs per clip come from the formulas of ``bench/pretrain.py`` (pretraining step) and
``bench/attention.py`` (encoder forward); the suite divides achieved FLOP/s by the bf16
matmul peak measured in the same run (the ``peak`` part) to give MFU.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from bench import attention as attention_bench
from bench import decoder_mask as decoder_mask_bench
from bench import vs_hf
from bench.common import (benchmark, copy_bandwidth, machine_info, matmul_throughput, setup,
                          synchronize, tube_masks)
from bench.pretrain import pretrain_flops
from models.config import ATTENTION_TYPES

Save = Callable[[dict], None]
WHEELS_HINT = ("carry the wheels: `bash bench/gpu_suite.sh --download-wheels` here, then run "
               "with carry ['.whl'] (bench/RESULTS.md, GPU suite)")


class Skip(Exception):
    """This part cannot run here; the message says why."""


@dataclass(frozen=True)
class AttentionSizes:
    """Fine-tuning encoder of the attention part (bench/attention.py's options)."""

    width: int = 768
    depth: int = 12
    heads: int = 12
    img_size: int = 224
    batch: int = 8
    frames: tuple[int, ...] = (8, 16, 32, 64)


@dataclass(frozen=True)
class LoaderSizes:
    """Synthetic videos packed into shards on the machine, and the loader runs over them."""

    videos: int = 48
    frames: int = 160  # at 30 fps: 5.3 s
    width: int = 568  # 320-pixel short side, 16:9: what `data_tools build --reencode` gives
    height: int = 320
    per_shard: int = 2
    workers: tuple[int, ...] = (8, 16)
    batch: int = 64
    repeats: tuple[int, ...] = (1, 4)  # repeated augmentation (VideoMAE V2: 4)
    build_workers: int = 16


@dataclass(frozen=True)
class Sizes:
    """What every part runs."""

    device: str = "cuda"
    threads: int = 0  # torch.set_num_threads (0: torch's default)
    quick: bool = False  # the bench scripts' micro model (--quick) instead of pretrain_size
    pretrain_size: str = "base"
    pretrain_batches: tuple[int, ...] = (32, 128)  # the last is used by compile, decoder_mask
    compile_backend: str = "inductor"
    profile_batch: int = 32
    warmup: int = 3
    repeats: int = 10
    matmul_sizes: tuple[int, ...] = (4096, 8192, 16384)
    copy_mib: int = 4096
    attention: AttentionSizes = field(default_factory=AttentionSizes)
    loader: LoaderSizes = field(default_factory=LoaderSizes)


GPU = Sizes()
DRY_RUN = Sizes(device="cpu", threads=1, quick=True, pretrain_batches=(2,),
                compile_backend="eager", profile_batch=2, warmup=1, repeats=2,
                matmul_sizes=(128, 256), copy_mib=16,
                attention=AttentionSizes(width=32, depth=1, heads=2, img_size=32, batch=1,
                                         frames=(4, 8)),
                loader=LoaderSizes(videos=4, frames=24, width=64, height=48, per_shard=1,
                                   workers=(1, 2), batch=2, repeats=(1,), build_workers=1))


def script_argv(sizes: Sizes, json_path: Path) -> list[str]:
    """Options every bench script takes (bench.common.add_common_args)."""
    argv = ["--device", sizes.device, "--threads", str(sizes.threads),
            "--warmup", str(sizes.warmup), "--repeats", str(sizes.repeats),
            "--json", str(json_path)]
    return argv + (["--quick"] if sizes.quick else [])


def step_gflops(sizes: Sizes, num_predict: int | None = None) -> float:
    """Pretraining-step GFLOPs per clip at 90% tube masking, ``num_predict`` reconstructed
    tokens (default: all masked ones; ViT-B 16x224: 203)."""
    cfg = vs_hf.model_config(sizes.pretrain_size, sizes.quick)
    visible = int((~tube_masks(1, cfg.grid, vs_hf.MASK_RATIO)[0]).sum())
    predict = cfg.num_tokens - visible if num_predict is None else num_predict
    return pretrain_flops(cfg, visible, predict)["step"] / 1e9


def out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error)


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


# -- parts ---------------------------------------------------------------------------------


def peak(sizes: Sizes, work: Path, save: Save) -> dict:
    """The ceilings: bf16 matmul TFLOP/s on random data, device-to-device copy GB/s."""
    device = torch.device(sizes.device)
    setup(argparse.Namespace(threads=sizes.threads, device=sizes.device, dtype="bf16"))
    save({"machine": machine_info(device)})
    rows = matmul_throughput(device, sizes.matmul_sizes, warmup=sizes.warmup,
                             repeats=sizes.repeats)
    save({"matmul": rows, "peak_tflops": max(r["tflops"] for r in rows)})
    release_memory()
    return {"copy": copy_bandwidth(device, sizes.copy_mib, sizes.warmup, sizes.repeats)}


def pretrain_step(sizes: Sizes, work: Path, save: Save) -> dict:
    """Ours against HF ``VideoMAEForPreTraining`` (and the classification forward), eager."""
    rows: list[dict] = []
    gflops = step_gflops(sizes)
    for batch in sizes.pretrain_batches:
        argv = script_argv(sizes, work / f"vs_hf_{batch}.json")
        try:
            result = vs_hf.main(argv + ["--sizes", sizes.pretrain_size, "--batch", str(batch)])
        except Exception as error:  # noqa: BLE001 - a batch that does not fit is a result
            if not out_of_memory(error):
                raise
            rows.append({"batch": batch, "skipped": f"out of memory: {error}"[:300]})
            release_memory()
            continue
        for row in result["rows"]:
            row["gflop_per_clip"] = gflops if row["mode"] == "pretrain step" else None
        rows += result["rows"]
        save({"rows": rows, "machine": result["machine"]})
        release_memory()
    return {"rows": rows}


def compile_step(sizes: Sizes, work: Path, save: Save) -> dict:
    """``torch.compile`` against eager, per implementation, alternated in one process; the
    first compiled call (tracing + code generation) is timed as ``compile_s``."""
    args = argparse.Namespace(device=sizes.device, dtype=None, threads=sizes.threads,
                              batch=sizes.pretrain_batches[-1], hf_attn="sdpa", compile=False,
                              compile_backend=sizes.compile_backend)
    device = setup(args)
    cfg = vs_hf.model_config(sizes.pretrain_size, sizes.quick)
    gflops = step_gflops(sizes)
    eager, check = vs_hf.pretrain_pair(cfg, args, device)
    compiled, _ = vs_hf.pretrain_pair(cfg, replace_ns(args, compile=True), device)
    rows: list[dict] = []
    for impl in ("ours", "hf"):
        start = time.perf_counter()
        compiled[impl]()
        synchronize(device)
        compile_s = time.perf_counter() - start
        breaks = graph_breaks()
        timings = benchmark({"eager": eager[impl], "compiled": compiled[impl]}, device,
                            sizes.warmup, sizes.repeats)
        rows.append({"impl": impl, "batch": args.batch, "dtype": args.dtype,
                     "backend": sizes.compile_backend, "compile_s": compile_s,
                     "eager_ms": timings["eager"].median * 1e3,
                     "compiled_ms": timings["compiled"].median * 1e3,
                     "speedup": timings["eager"].median / timings["compiled"].median,
                     "eager_clips_s": args.batch / timings["eager"].median,
                     "compiled_clips_s": args.batch / timings["compiled"].median,
                     "gflop_per_clip": gflops, **breaks,
                     "timings": {k: t.as_dict() for k, t in timings.items()}})
        save({"rows": rows, "check": check})
    return {"machine": machine_info(device)}


def graph_breaks() -> dict:
    """Dynamo's graph breaks since the last call (count and the first reasons), then reset:
    each break splits the compiled step into separately optimised graphs."""
    from torch._dynamo.utils import counters

    reasons = counters["graph_break"]
    found = {"graph_breaks": sum(reasons.values()),
             "graph_break_reasons": [" / ".join(reason.splitlines()[:2])[:240]
                                     for reason in list(reasons)[:6]]}
    counters.clear()
    return found


def replace_ns(args: argparse.Namespace, **changes: Any) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), **changes})


def decoder_masking(sizes: Sizes, work: Path, save: Save) -> dict:
    """VideoMAE V2 running-cell decoder mask (50%) against the full decoder."""
    batch = sizes.pretrain_batches[-1]
    result = decoder_mask_bench.main(script_argv(sizes, work / "decoder_mask.json")
                                     + ["--size", sizes.pretrain_size, "--batch", str(batch)])
    for row in result["rows"]:
        row["gflop_per_clip"] = step_gflops(sizes, row["reconstructed"])
    return {"rows": result["rows"], "summary": result["summary"], "machine": result["machine"]}


def attention_kinds(sizes: Sizes, work: Path, save: Save) -> dict:
    """Fine-tuning forward + backward of every attention type against clip length, in this
    process (peak memory reset per case); a case that does not fit is recorded as such."""
    a = sizes.attention
    args = argparse.Namespace(device=sizes.device, dtype=None, threads=sizes.threads, width=a.width,
                              depth=a.depth, heads=a.heads, img_size=a.img_size, batch=a.batch,
                              warmup=max(1, sizes.warmup - 1), repeats=max(1, sizes.repeats // 2))
    device = setup(args)
    setting = {k: v for k, v in vars(args).items() if k not in ("device", "threads")}
    rows: list[dict] = []
    for frames in a.frames:
        for kind in ATTENTION_TYPES:
            try:
                row = attention_bench.measure(kind, frames, args, device)
                row.pop("timing")
            except Exception as error:  # noqa: BLE001 - a case that does not fit is a result
                if not out_of_memory(error):
                    raise
                row = {"attention": kind, "frames": frames,
                       "skipped": f"out of memory: {error}"[:300]}
            rows.append(row)
            release_memory()
            save({"rows": rows, "setting": setting})
    return {"machine": machine_info(device)}


def profile(sizes: Sizes, work: Path, save: Save) -> dict:
    """Top operators and regions of one step, ours and HF (bench/profile_step.py)."""
    from bench import profile_step

    argv = script_argv(sizes, work / "profile.json") + [
        "--size", sizes.pretrain_size, "--batch", str(sizes.profile_batch), "--rows", "12",
        "--out", str(work / "profile"), "--repeats", "2"]
    result = profile_step.main(argv)
    return {"rows": result["rows"], "summaries": result["summaries"],
            "machine": result["machine"]}


def loader(sizes: Sizes, work: Path, save: Save) -> dict:
    """The real loader feeding the pretraining step (bench/e2e.py) from shards of synthetic
    videos built here, with and without repeated augmentation."""
    missing = [name for name in ("webdataset", "braceexpand", "av")
               if importlib.util.find_spec(name) is None]
    if missing:
        raise Skip(f"{', '.join(missing)} not installed on this machine (building shards needs "
                   f"PyAV, reading them webdataset): {WHEELS_HINT}")
    from bench import e2e
    from bench.gpu_videos import synthetic_shards
    from data_tools.decode import resolve_backend

    decord_problem = None
    if importlib.util.find_spec("decord") is not None:
        try:
            import decord  # noqa: F401 - a wheel whose native library does not load here
        except (ImportError, OSError) as error:
            decord_problem = f"decord does not load ({error}); PyAV decodes instead"
            sys.modules["decord"] = None  # backend "auto" then picks PyAV, in the workers too
    shards, videos = synthetic_shards(work / "synthetic", sizes.loader)
    save({"backend": resolve_backend("auto"), "videos": videos, "note": decord_problem})
    runs: list[dict] = []
    for repeat in sizes.loader.repeats:
        argv = script_argv(sizes, work / f"e2e_repeat{repeat}.json") + [
            "--size", sizes.pretrain_size, "--batch", str(sizes.loader.batch),
            "--workers", *map(str, sizes.loader.workers), "--repeat", str(repeat),
            "--shards", str(shards)]
        result = e2e.main(argv)
        runs.append({"repeat": repeat, "rows": result["rows"], "summary": result["summary"],
                     "model": result["model"]})
        save({"runs": runs, "machine": result["machine"]})
    return {}


PARTS: dict[str, Callable[[Sizes, Path, Save], dict]] = {
    "peak": peak, "pretrain_step": pretrain_step, "decoder_mask": decoder_masking,
    "attention": attention_kinds, "loader": loader, "compile": compile_step,
    "profile": profile,
}
