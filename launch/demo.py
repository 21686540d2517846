"""``make demo``: the whole pipeline on the demo digits set, on one machine, one results table.

Stages (each writes its own run folder under ``--out``; the folders of an earlier demo run are
removed first, so every figure in the final table is computed in this invocation):

1. build the demo action dataset (``data_tools.demo``) as H.264 mp4 files packed in shards;
2. pretrain a tiny VideoMAE on the training shards (DeepSpeed, single process); its final
   reconstruction loss is shown next to the loss of predicting zeros (each patch's mean), the
   level a model that learnt nothing reaches;
3. linear, attentive (V-JEPA's one block) and 4-block attentive (V-JEPA 2, best of a 2-lr
   grid) probes on frozen features: the pretrained encoder vs a randomly initialised one;
4. fine-tune the pretrained encoder with ``space_only``, ``joint`` and ``divided`` attention,
   and ``joint`` from random initialisation (what pretraining adds to fine-tuning);
5. spatio-temporal (AVA-style) and temporal action detection on the demo detection sets.

Run ``python launch/demo.py --help`` for the options.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from runtime.config import load_config  # noqa: E402
from runtime.dist import init_distributed  # noqa: E402
from runtime.io import atomic_write_text  # noqa: E402
from runtime.logging import setup_logging  # noqa: E402

logger = logging.getLogger("demo")

FINETUNE_ATTENTIONS = ("space_only", "joint", "divided")
SCRATCH_ATTENTION = "joint"  # also fine-tuned from random initialisation, the control
# Probe rows: row label -> overrides of configs/finetune/probe_demo.yaml (a linear probe).
PROBE_KINDS = {
    "linear probe": (),
    # V-JEPA's attentive probe: one cross-attention block, 20 epochs
    "attentive probe, 1 block": ("probe.kind=attentive", "probe.blocks=1",
                                 "probe.weight_decays=[0.01]", "probe.epochs=20"),
    # V-JEPA 2's 4-block probe, best of a 2-lr grid, cut to 2 epochs for the demo's time: its
    # 3 self-attention blocks over all tokens cost more than this tiny encoder's 2, and 480
    # training clips in 2 epochs leave it under-trained (docs/finetune.md, bench/RESULTS.md)
    "attentive probe, 4 blocks, 2 epochs": (
        "probe.kind=attentive", "probe.blocks=4", "probe.lrs=[0.001,0.003]",
        "probe.weight_decays=[0.01]", "probe.epochs=2", "probe.warmup_epochs=0"),
}
PROBES = {  # stage name -> (row label in PROBE_KINDS, encoder: pretrained or random init)
    "probe_pretrained": ("linear probe", "pretrained"),
    "probe_random": ("linear probe", "random"),
    "attentive_pretrained": ("attentive probe, 1 block", "pretrained"),
    "attentive_random": ("attentive probe, 1 block", "random"),
    "attentive4_pretrained": ("attentive probe, 4 blocks, 2 epochs", "pretrained"),
    "attentive4_random": ("attentive probe, 4 blocks, 2 epochs", "random"),
}
DETECTION_ENCODERS = {"pretrained": "pretrained", "random": "random init"}
DETECTION_ROWS = (  # (results key, metric, what the row measures, encoder-free baseline)
    ("ava/frame_mAP@0.5", "AVA-style frame mAP@0.5 %", "encoder fine-tuned with the RoI head",
     False),
    ("ava/prior_baseline_frame_mAP@0.5", "AVA-style frame mAP@0.5 %", "baseline: class priors",
     True),
    ("tad/average_mAP", "temporal mAP@[0.3:0.7] %", "frozen encoder, trained 1-D head", False),
    ("tad/whole_video_baseline_average_mAP", "temporal mAP@[0.3:0.7] %", "baseline: whole video",
     True),
)
STAGE_DIRS = ("data", "pretrain", "detection", *PROBES, f"finetune_{SCRATCH_ATTENTION}_random",
              *(f"finetune_{a}" for a in FINETUNE_ATTENTIONS))


def _config(cls, name: str, overrides: list[str]):
    return load_config(cls, ROOT / "configs" / name, overrides)


def build_data(out: Path, quick: bool, seed: int) -> Path:
    from data_tools.demo import DemoConfig, generate_demo

    data_dir = out / "data"
    cfg = DemoConfig(seed=seed, **(dict(train_per_class=16, val_per_class=8) if quick else {}))
    generate_demo(data_dir, cfg, workers=2, overwrite=True)
    return data_dir


def pretrain(out: Path, data_dir: Path, quick: bool, seed: int) -> dict:
    from pretrain.config import PretrainConfig
    from pretrain.train import run

    overrides = [f"out_dir={out / 'pretrain'}", f"data.shards={data_dir / 'train'}",
                 "checkpoint.resume=auto", f"seed={seed}"]
    if quick:
        overrides.append("optim.epochs=3")
    return run(_config(PretrainConfig, "pretrain/demo_tiny.yaml", overrides))


def probe(out: Path, data_dir: Path, weights: str, name: str, kind: str, seed: int) -> dict:
    """The probe row ``kind`` (a key of ``PROBE_KINDS``) on ``weights`` ("" = random init)."""
    from finetune.config import ProbeConfig
    from finetune.probe import run

    cfg = _config(ProbeConfig, "finetune/probe_demo.yaml", [
        f"weights={weights}", f"out_dir={out / name}", f"data.shards={data_dir / 'train'}",
        f"seed={seed}",
        f"val.shards={data_dir / 'val'}", *PROBE_KINDS[kind]])
    return run(cfg)


def finetune(out: Path, data_dir: Path, weights: str, attention: str, quick: bool,
             name: str, seed: int) -> dict:
    from finetune.config import FinetuneConfig
    from finetune.train import run

    overrides = [f"model.attention={attention}", f"pretrained={weights}", f"seed={seed}",
                 f"out_dir={out / name}", f"data.shards={data_dir / 'train'}",
                 f"val.shards={data_dir / 'val'}"]
    if quick:
        overrides.append("optim.epochs=2")
    return run(_config(FinetuneConfig, "finetune/demo_joint.yaml", overrides))


def detection(out: Path, quick: bool, seed: int, weights: str, name: str) -> dict:
    """Both detection demos with the encoder from ``weights`` (a pretraining run folder, or
    "" for random initialisation). The detection configs share the pretraining demo's patch
    size (8) and position tables; its tubelet-1 patch embedding is inflated to their tubelet
    of 2 on loading (``models.loading.inflate_tubelet``), and frames and image size differ
    (fixed sinusoid tables follow the grid)."""
    from finetune.detection.demo import run_detection_demo

    encoder = [f"weights={weights}"] if weights else []
    return run_detection_demo(
        out / "detection", run_suffix=name,
        ava_overrides=[f"seed={seed}", *encoder, *(["optim.epochs=4"] if quick else [])],
        tad_overrides=[f"seed={seed}", *encoder, *(["optim.epochs=6"] if quick else [])])


def _timed(name: str, fn: Callable[[], dict], timings: dict) -> dict:
    logger.info("== %s", name)
    start = time.perf_counter()
    result = fn()
    timings[name] = round(time.perf_counter() - start, 1)
    logger.info("== %s done in %.0f s: %s", name, timings[name], result)
    return result


def result_rows(results: dict) -> list[dict]:
    """The figures of a demo run as rows ``{"stage", "encoder", "metric", "value"}``: losses as
    they are, accuracies and mAPs in percent; a figure the run did not compute is None."""
    def pct(value):
        return None if value is None else 100 * float(value)

    rows = []
    if "pretrain" in results:
        run = results["pretrain"]
        rows.append(("pretraining", "VideoMAE, tube masking", "reconstruction loss (last steps)",
                     run.get("loss")))
        rows.append(("pretraining", "baseline: predicting zeros (each patch's mean)",
                     "reconstruction loss (same clips)", run.get("zero_pred_loss")))
        if run.get("loss") is not None and run.get("zero_pred_loss"):
            rows.append(("pretraining", "loss / baseline", "ratio",
                         float(run["loss"]) / float(run["zero_pred_loss"])))
    for name, (kind, encoder) in PROBES.items():
        if name in results:
            label = "pretrained (VideoMAE)" if encoder == "pretrained" else "random init"
            rows.append((kind, label, "val top-1 %", pct(results[name]["top1"])))
    for attention in FINETUNE_ATTENTIONS:
        key = f"finetune_{attention}"
        if key in results:
            rows.append(("fine-tune", f"{attention}, pretrained", "val top-1 %",
                         pct(results[key]["top1"])))
    key = f"finetune_{SCRATCH_ATTENTION}_random"
    if key in results:
        rows.append(("fine-tune", f"{SCRATCH_ATTENTION}, random init", "val top-1 %",
                     pct(results[key]["top1"])))
    for name, source in DETECTION_ENCODERS.items():
        detection = results.get(f"detection_{name}", {})
        for key, metric, what, baseline in DETECTION_ROWS:
            if key in detection and not (baseline and name != "pretrained"):  # baselines once
                label = what if baseline else f"{what}, {source}"
                rows.append(("detection", label, metric, pct(detection[key])))
    if results.get("chance") is not None:
        rows.append(("(chance)", "", "top-1 %", pct(results["chance"])))
    return [dict(zip(("stage", "encoder", "metric", "value"), row)) for row in rows]


def format_value(metric: str, value) -> str:
    if value is None:
        return "n/a"
    return f"{float(value):.4f}" if "%" not in metric else f"{float(value):.1f}"


def results_table(results: dict) -> str:
    """Markdown table of the figures computed in this run."""
    lines = ["| stage | encoder | metric | value |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['stage']} | {r['encoder']} | {r['metric']} | "
              f"{format_value(r['metric'], r['value'])} |" for r in result_rows(results)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="folder for every stage's outputs")
    parser.add_argument("--quick", action="store_true",
                        help="a much smaller, much faster run (a smoke test, not meaningful "
                             "figures)")
    parser.add_argument("--skip-detection", action="store_true", help="skip stage 5")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds every stage: the demo data, model inits, data order")
    args = parser.parse_args(argv)

    init_distributed()
    setup_logging()
    out = Path(args.out)
    for name in STAGE_DIRS:
        shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    results: dict = {}

    data_dir = _timed("data", lambda: {"dir": str(build_data(out, args.quick, args.seed))},
                      timings)["dir"]
    data_dir = Path(data_dir)
    num_classes = len((data_dir / "classes.txt").read_text().split())
    results["chance"] = 1.0 / num_classes
    run = _timed("pretrain", lambda: pretrain(out, data_dir, args.quick, args.seed), timings)
    results["pretrain"] = run
    weights = run["out_dir"]
    for name, (kind, encoder) in PROBES.items():
        source = weights if encoder == "pretrained" else ""
        results[name] = _timed(f"{kind} ({encoder})",
                               lambda: probe(out, data_dir, source, name, kind, args.seed), timings)
    for attention in FINETUNE_ATTENTIONS:
        name = f"finetune_{attention}"
        results[name] = _timed(f"finetune ({attention}, pretrained)",
                               lambda: finetune(out, data_dir, weights, attention, args.quick,
                                                name, args.seed),
                               timings)
    name = f"finetune_{SCRATCH_ATTENTION}_random"
    results[name] = _timed(f"finetune ({SCRATCH_ATTENTION}, random init)",
                           lambda: finetune(out, data_dir, "", SCRATCH_ATTENTION, args.quick,
                                            name, args.seed),
                           timings)
    if not args.skip_detection:
        for name, source in DETECTION_ENCODERS.items():
            encoder = weights if source == "pretrained" else ""
            results[f"detection_{name}"] = _timed(
                f"detection ({source})",
                lambda: detection(out, args.quick, args.seed, encoder, name), timings)
    results["seconds"] = timings
    results["seed"] = args.seed

    table = results_table(results)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2, default=str))
    atomic_write_text(out / "results.md", table + "\n")
    print("\nDemo results (computed in this run; val = held-out demo clips):\n")
    print(table)
    print(f"\nStage times (s): {json.dumps(timings)}\nOutputs under {out}/")
    print(f"Every attention type from this encoder, TimeSformer-style (~17 min): python "
          f"bench/attention_table.py --pretrained {out}/pretrain --data {out}/data")
    return 0


if __name__ == "__main__":
    sys.exit(main())
