"""What the demo's attentive-probe rows cost: the 1-block probe (V-JEPA, one head, 20 epochs)
against 4-block probes (V-JEPA 2) over small lr x weight-decay grids, on the token features
of a finished demo run.

Both probes read the same cached tokens (``<demo>/<stage>/features``), so the extraction is
the same and only probe training and evaluation differ: that is what this times (wall and
user CPU, in one process, the cases one after another). Prints JSON and a table with each
case's cost relative to the 1-block probe and its accuracy (best head, mean over heads)::

    python bench/demo_probes.py --demo runs/demo                 # both encoders
    python bench/demo_probes.py --demo runs/demo --stages attentive_pretrained
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine_info, markdown_table  # noqa: E402
from finetune.config import ProbeHeadConfig  # noqa: E402
from finetune.extract import load_features  # noqa: E402
from finetune.probe_heads import ProbeGrid  # noqa: E402
from finetune.probe_train import (GridTrainer, cached_epochs, evaluate_heads,  # noqa: E402
                                  feature_batches, grid_logits, steps_per_epoch, train_grid)

CASES = {  # name -> probe settings (the 1-block case is the demo's attentive probe before #15)
    "1 block, 1 head, 20 ep": dict(blocks=1, epochs=20, lrs=[1e-3], weight_decays=[0.01]),
    "4 blocks, 2x2, 1 ep": dict(blocks=4, epochs=1, lrs=[1e-3, 3e-3], weight_decays=[0.01, 0.1],
                                warmup_epochs=0.0),
    "4 blocks, 2x1, 2 ep": dict(blocks=4, epochs=2, lrs=[1e-3, 3e-3], weight_decays=[0.01],
                                warmup_epochs=0.0),
    "4 blocks, 2x2, 3 ep": dict(blocks=4, epochs=3, lrs=[1e-3, 3e-3], weight_decays=[0.01, 0.1],
                                warmup_epochs=0.0),
}


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return own.ru_utime + children.ru_utime


def run_case(train, val, settings: dict, seed: int = 0) -> dict:
    cfg = ProbeHeadConfig(kind="attentive", batch_size=64, **settings)
    num_classes = int(train.labels.max()) + 1
    start, cpu = time.perf_counter(), cpu_seconds()
    torch.manual_seed(seed)
    grid = ProbeGrid(cfg.grid, seed, kind="attentive", dim=train.features.shape[-1],
                     num_classes=num_classes, num_heads=4, blocks=cfg.blocks)
    trainer = GridTrainer(grid, cfg, steps_per_epoch(len(train), cfg.batch_size),
                          torch.device("cpu"))
    grid = train_grid(trainer, cached_epochs(train, cfg.batch_size, seed), train.features.shape[1:])
    per_head = grid_logits(grid, feature_batches(val, cfg.batch_size), torch.device("cpu"))
    summary, _, _ = evaluate_heads(per_head, grid.grid, num_classes, out_dir=None,
                                   class_names=None, collective=False)
    return {"wall_s": round(time.perf_counter() - start, 1),
            "user_cpu_s": round(cpu_seconds() - cpu, 1),
            "top1_best": round(100 * summary["top1"], 1),
            "top1_mean": round(100 * summary["mean_top1"], 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", default="runs/demo", help="a finished make-demo folder")
    parser.add_argument("--stages", nargs="+", default=["attentive_pretrained",
                                                        "attentive_random"])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args(argv)
    rows = []
    for stage in args.stages:
        features = Path(args.demo) / stage / "features"
        train = load_features(features / "train-tokens.safetensors")
        val = load_features(features / "val-tokens.safetensors")
        base = None
        for name in args.cases:
            result = run_case(train, val, CASES[name])
            base = base or result
            rows.append({"stage": stage, "case": name, **result,
                         "cpu_ratio": round(result["user_cpu_s"] / base["user_cpu_s"], 2)})
            print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"machine": machine_info(), "rows": rows}, indent=2))
    print(markdown_table(rows, list(rows[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
