"""Both detection demos end to end, for ``make demo``: generate the demo sets (once) and run
the shipped configs ``configs/finetune/detect_demo.yaml`` and ``tad_demo.yaml``.

    from finetune.detection.demo import run_detection_demo
    metrics = run_detection_demo("runs/demo/detection")

Overrides (``key=value``) adapt the configs, e.g. ``weights=...`` plus matching ``model.*``
fields to start from a pretrained encoder.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from finetune.detection.demo_data import ava_demo_paths, generate_ava_demo, generate_tad_demo
from finetune.detection import train_ava, train_tad
from finetune.detection.config import DetectConfig, TADConfig
from runtime.config import load_config

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "finetune"


def run_detection_demo(root: str | Path, ava_overrides: Sequence[str] = (),
                       tad_overrides: Sequence[str] = (), run_suffix: str = "") -> dict[str, float]:
    """Returns ``{"ava/frame_mAP@0.5", "ava/prior_baseline_frame_mAP@0.5", "tad/average_mAP",
    "tad/mAP@0.5", "tad/whole_video_baseline_average_mAP"}``; full results are in
    ``<root>/ava_run[_<run_suffix>]/results.json`` and ``<root>/tad_run[_<run_suffix>]/...``
    (the demo sets under ``<root>/ava`` and ``<root>/tad`` are generated once and shared)."""
    suffix = f"_{run_suffix}" if run_suffix else ""
    root = Path(root)
    if not (root / "ava" / "demo.json").exists():
        generate_ava_demo(root / "ava")
    if not (root / "tad" / "demo.json").exists():
        generate_tad_demo(root / "tad")
    paths = ava_demo_paths(root / "ava")
    ava_cfg = load_config(DetectConfig, CONFIG_DIR / "detect_demo.yaml", [
        f"out_dir={root / f'ava_run{suffix}'}", f"data.shards={paths.shards['train']}",
        f"val.shards={paths.shards['val']}", f"data.annotations={paths.annotations['train']}",
        f"val.annotations={paths.annotations['val']}", f"data.label_map={paths.label_map}",
        f"val.proposals={paths.proposals['val']}", *ava_overrides])
    tad_cfg = load_config(TADConfig, CONFIG_DIR / "tad_demo.yaml", [
        f"out_dir={root / f'tad_run{suffix}'}", f"data.shards={root / 'tad' / 'train'}",
        f"val.shards={root / 'tad' / 'val'}", *tad_overrides])
    ava, tad = train_ava.run(ava_cfg), train_tad.run(tad_cfg)
    return {
        "ava/frame_mAP@0.5": ava["frame_mAP@0.5"],
        "ava/prior_baseline_frame_mAP@0.5": ava["prior_baseline_frame_mAP@0.5"],
        "tad/average_mAP": tad["average_mAP"],
        "tad/mAP@0.5": tad["mAP@0.5"],
        "tad/whole_video_baseline_average_mAP": tad["whole_video_baseline_average_mAP"],
    }
