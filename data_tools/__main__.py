"""``python -m data_tools {build,verify,inspect,demo}``: build and check video shard sets.

Run ``python -m data_tools <command> --help`` for each command's options.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from typing import Sequence

logger = logging.getLogger("data_tools")


def _default_workers() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                      else os.cpu_count() or 1))


def _add_build(sub) -> None:
    p = sub.add_parser(
        "build", help="pack videos into WebDataset tar shards + manifest.json",
        description="Pack videos into <out>/<prefix>-NNNNNN.tar shards with <key>.mp4 and "
                    "<key>.json per sample, a manifest.json and a rejects.jsonl. SOURCE is a "
                    "folder (class = first subfolder, or unlabeled), a VideoMAE list "
                    "('path label' per line) or a CSV with a header 'path,label[,start,end]'.")
    p.add_argument("source", help="folder of videos, list file or CSV file")
    p.add_argument("--out", required=True, help="output folder for the shard set")
    p.add_argument("--format", choices=("auto", "folder", "list", "csv"), default="auto",
                   help="how to read SOURCE (auto: folder / .csv / list)")
    p.add_argument("--root", help="folder that relative paths in a list/CSV are relative to "
                                  "(default: the list's folder)")
    p.add_argument("--classes", help="class names file, one per line (line i = label i)")
    p.add_argument("--prefix", default="train", help="shard name prefix (default: train)")
    p.add_argument("--max-count", type=int, default=1000, help="samples per shard at most")
    p.add_argument("--max-size", default="1G", help="bytes per shard at most, e.g. 500M, 1G")
    p.add_argument("--workers", type=int, default=_default_workers(),
                   help="parallel worker processes (default: CPUs, at most 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample shuffle")
    p.add_argument("--no-shuffle", action="store_true", help="keep the input order")
    from data_tools.build import ReencodeOptions

    opts = ReencodeOptions()
    p.add_argument("--reencode", action="store_true",
                   help="store an H.264 copy (short side, every --frame-stride-th frame, short "
                        "keyframe interval, no B-frames) instead of the original bytes; cuts "
                        "CSV start/end segments")
    p.add_argument("--short-side", type=int, default=opts.short_side,
                   help=f"--reencode: short side (px; default {opts.short_side}, never enlarged)")
    p.add_argument("--frame-stride", type=int, default=opts.frame_stride,
                   help=f"--reencode: keep every N-th frame (default {opts.frame_stride}: the "
                        "stride of 16x4 pretraining clips; the loader's data.sampling_rate must "
                        "be a multiple of it; 1 keeps every frame, e.g. for SSv2's stride 2)")
    p.add_argument("--gop", type=int, default=opts.gop,
                   help=f"--reencode: keyframe interval (stored frames; default {opts.gop})")
    p.add_argument("--fps", type=float, default=None, help="--reencode: resample to this frame "
                                                           "rate before --frame-stride (default: "
                                                           "the source's)")
    p.add_argument("--crf", type=int, default=opts.crf, help="--reencode: x264 CRF")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a shard set already in --out")


def _run_build(args) -> int:
    from data_tools.build import ReencodeOptions, build_shards, parse_size
    from data_tools.sources import read_classes, read_sources

    classes = read_classes(args.classes) if args.classes else None
    sources = read_sources(args.source, args.format, args.root, classes)
    reencode = (ReencodeOptions(args.short_side, args.gop, args.fps, args.crf,
                                frame_stride=args.frame_stride) if args.reencode else None)
    manifest = build_shards(sources, args.out, prefix=args.prefix, max_count=args.max_count,
                            max_size=parse_size(args.max_size), reencode=reencode,
                            shuffle_seed=None if args.no_shuffle else args.seed,
                            workers=args.workers, overwrite=args.overwrite)
    print(f"{manifest.num_samples} samples in {len(manifest.shards)} shards "
          f"({manifest.num_classes} classes), {manifest.extra['num_rejects']} rejected "
          f"-> {os.path.join(args.out, 'manifest.json')}")
    return 0


def _add_verify(sub) -> None:
    p = sub.add_parser(
        "verify", help="decode-check every sample; exit 1 if anything is broken",
        description="Read every shard and decode every video with the loader's decoder. Reports "
                    "corrupt or truncated shards, samples missing .mp4/.json or required json "
                    "fields, undecodable videos, frame counts/sizes that differ from the json, "
                    "duplicate keys and sample counts that differ from the manifest. Exits 1 when "
                    "any problem is found.")
    p.add_argument("shards", help="shard-set folder, manifest.json, glob or brace pattern")
    p.add_argument("--no-decode", action="store_true", help="check tar structure and json only")
    from data_tools.decode import BACKENDS

    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="decoder, as in the loader (default auto: the fastest installed, "
                        "falling back to the next)")
    p.add_argument("--workers", type=int, default=_default_workers(), help="parallel processes")


def _run_verify(args) -> int:
    from data_tools.verify import verify_shards

    report = verify_shards(args.shards, decode=not args.no_decode, backend=args.backend,
                           workers=args.workers)
    print(report.summary())
    return 0 if report.ok else 1


def _add_inspect(sub) -> None:
    p = sub.add_parser(
        "inspect", help="print a shard set's summary",
        description="Summarise a shard set from its json records: samples, classes, "
                    "durations, frame counts, resolutions, frame rates (videos not decoded).")
    p.add_argument("shards", help="shard-set folder, manifest.json, glob or brace pattern")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--max-shards", type=int, default=None, help="read only the first N shards")


def _run_inspect(args) -> int:
    from data_tools.inspect_shards import format_summary, summarize_shards

    summary = summarize_shards(args.shards, args.max_shards)
    print(json.dumps(summary, indent=1) if args.json else format_summary(summary))
    return 0


_DEMO_CLI_FIELDS = ("seed", "canvas_size", "num_frames", "fps", "gop", "train_per_class",
                    "val_per_class", "jitter", "background", "pan", "zoom", "digit_scale",
                    "max_distractors", "shard_max_count")


def _add_demo(sub) -> None:
    from data_tools.demo import DemoConfig

    p = sub.add_parser(
        "demo", help="generate the moving-digits demo action dataset and its shards",
        description="Render the demo action dataset (10 motion classes in time-reversed "
                    "pairs, scikit-learn digits on a cluttered canvas) as H.264 mp4 files and "
                    "pack it into <out>/train and <out>/val shard sets.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--tiny", action="store_true",
                   help="a few-second version (32x32, 16 frames, 3+2 clips per class); "
                        "options below still override it")
    defaults = DemoConfig()
    for f in dataclasses.fields(DemoConfig):
        if f.name in _DEMO_CLI_FIELDS:
            p.add_argument("--" + f.name.replace("_", "-"), dest=f.name,
                           type=type(getattr(defaults, f.name)), default=None,
                           help=f"{f.metadata['help']} (default: {getattr(defaults, f.name)})")
    p.add_argument("--workers", type=int, default=_default_workers(), help="parallel processes")
    p.add_argument("--overwrite", action="store_true", help="replace a demo dataset in --out")


def _run_demo(args) -> int:
    from data_tools.demo import DemoConfig, generate_demo

    given = {name: getattr(args, name) for name in _DEMO_CLI_FIELDS
             if getattr(args, name) is not None}
    cfg = DemoConfig.tiny(**given) if args.tiny else DemoConfig(**given)
    manifests = generate_demo(args.out, cfg, workers=args.workers, overwrite=args.overwrite)
    for split, manifest in manifests.items():
        print(f"{split}: {manifest.num_samples} clips in {len(manifest.shards)} shards "
              f"-> {os.path.join(args.out, split)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools",
        description="Build, check and summarise WebDataset video shard sets, and generate "
                    "the demo dataset. 'python -m data_tools COMMAND --help' for each command.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_build, _add_verify, _add_inspect, _add_demo):
        add(sub)
    return parser


_RUNNERS = {"build": _run_build, "verify": _run_verify, "inspect": _run_inspect,
            "demo": _run_demo}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return _RUNNERS[args.command](args)
    except (ValueError, OSError) as err:  # bad input: one clear line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
