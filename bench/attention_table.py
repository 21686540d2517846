"""TimeSformer's attention ablation (Bertasius et al. 2021, Table 1) at demo scale: every
``model.attention`` type fine-tuned from the same pretrained demo encoder on the demo set.

Each type runs ``configs/finetune/demo_joint.yaml`` (the ``make demo`` fine-tuning: 30 epochs
on 480 clips, 8 frames at 48x48, tubelets of 1, a micro 2-block encoder) with
``model.attention`` set, the same ``--pretrained`` encoder (converted to the type as
``models.loading`` documents), data and seed, in ``<out>/finetune_<attention>`` (removed first,
so every figure comes from this invocation). The table: parameters (with the head), top-1 of
the multi-view test on the validation clips, fine-tuning wall time (training and test), and
forward GFLOPs per clip (``bench.attention.attention_flops``), beside TimeSformer's ViT-B
numbers (K400 / SSv2 top-1) for the types its Table 1 has.

    make demo                                     # once: runs/demo/{data,pretrain}
    python bench/attention_table.py               # about 20 min on 2 CPU cores
    python bench/attention_table.py --quick       # smoke run: 2 steps per type, one view
    python bench/attention_table.py --attention joint divided --json bench/out/table.json
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

from bench.attention import attention_flops  # noqa: E402
from bench.common import machine_info, markdown_table  # noqa: E402
from finetune.config import FinetuneConfig  # noqa: E402
from finetune.train import num_classes_of, run  # noqa: E402
from models import VideoViT  # noqa: E402
from models.config import ATTENTION_TYPES  # noqa: E402
from runtime.config import load_config  # noqa: E402
from runtime.io import atomic_write_text  # noqa: E402
from runtime.logging import setup_logging  # noqa: E402

CONFIG = ROOT / "configs" / "finetune" / "demo_joint.yaml"
# TimeSformer Table 1 (ViT-B, top-1 %): name, K400, SSv2 (docs: ../shared/reference/facts.md)
TIMESFORMER = {"space_only": ("Space (S)", 76.9, 36.6),
               "joint": ("Joint Space-Time (ST)", 77.4, 58.5),
               "divided": ("Divided Space-Time (T+S)", 78.0, 59.5),
               "sparse_local_global": ("Sparse Local Global (L+G)", 75.9, 56.3),
               "axial": ("Axial (T+W+H)", 73.5, 56.2)}
QUICK = ("optim.epochs=1", "optim.warmup_epochs=0", "max_steps=2", "val.every_epochs=0",
         "data.num_test_clips=1", "data.num_test_crops=1", "data.num_workers=0",
         "checkpoint.every_steps=0", "log.tensorboard=false")


def finetune_config(attention: str, args: argparse.Namespace) -> FinetuneConfig:
    data = Path(args.data)
    overrides = [f"model.attention={attention}", f"pretrained={args.pretrained}",
                 f"seed={args.seed}", f"out_dir={Path(args.out) / f'finetune_{attention}'}",
                 f"data.shards={data / 'train'}", f"val.shards={data / 'val'}",
                 *(QUICK if args.quick else ()), *args.set]
    return load_config(FinetuneConfig, CONFIG, overrides)


def table_row(attention: str, args: argparse.Namespace) -> dict:
    """Fine-tune one attention type; its row of the table."""
    cfg = finetune_config(attention, args)
    shutil.rmtree(cfg.out_dir, ignore_errors=True)
    start = time.perf_counter()
    metrics = run(cfg)
    wall = time.perf_counter() - start
    model_cfg = replace(cfg.model, num_classes=num_classes_of(cfg)[0])
    params = sum(p.numel() for p in VideoViT(model_cfg).parameters())
    name, k400, ssv2 = TIMESFORMER.get(attention, ("-", None, None))
    return {"attention": attention, "params": params, "top1": 100 * float(metrics["top1"]),
            "finetune_s": round(wall, 1), "gflops_fwd": attention_flops(model_cfg) / 1e9,
            "steps": metrics.get("step"), "timesformer": name, "timesformer_k400": k400,
            "timesformer_ssv2": ssv2}


def markdown(rows: list[dict]) -> str:
    """TimeSformer-style table: our demo figures beside its ViT-B Table 1."""
    def pct(value):
        return "-" if value is None else f"{value:.1f}"

    return markdown_table([{
        "attention": r["attention"], "params": f"{r['params'] / 1e3:.1f}K",
        "demo top-1 %": f"{r['top1']:.1f}", "fine-tune wall (s)": f"{r['finetune_s']:.0f}",
        "fwd GFLOPs / clip": f"{r['gflops_fwd']:.3f}",
        "TimeSformer (ViT-B)": r["timesformer"],
        "K400 / SSv2 top-1 %": f"{pct(r['timesformer_k400'])} / {pct(r['timesformer_ssv2'])}"}
        for r in rows])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", default="runs/demo/pretrain",
                        help="the encoder every type starts from (a pretraining run folder or "
                             "an encoder file)")
    parser.add_argument("--data", default="runs/demo/data",
                        help="demo data folder with train/ and val/ shards")
    parser.add_argument("--out", default="runs/attention_table", help="run folders go here")
    parser.add_argument("--attention", nargs="+", choices=ATTENTION_TYPES,
                        default=list(ATTENTION_TYPES), help="the types (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="the same seed for every type")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 steps per type, one test view per clip")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="more fine-tuning config overrides, for every type")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)

    rows = []
    for attention in args.attention:
        rows.append(table_row(attention, args))
        print(json.dumps(rows[-1]), flush=True)
    result = {"name": "attention_table", "machine": machine_info("cpu"), "quick": args.quick,
              "config": str(CONFIG.relative_to(ROOT)), "pretrained": args.pretrained,
              "seed": args.seed, "overrides": [*(QUICK if args.quick else ()), *args.set],
              "rows": rows}
    print(json.dumps(result, indent=1))
    print()
    print(markdown(rows))
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    setup_logging()  # the conversion report of each type's encoder, the training progress
    main()
