"""Classify videos with a fine-tuned classifier:
``python -m finetune.predict VIDEO_OR_FOLDER --model RUN_DIR_OR_FILE [--topk 5] [--out F]``.

The model is a fine-tuning run folder (its ``model.safetensors``) or such a file (a
``.safetensors`` carrying its ``ModelConfig`` in the metadata, e.g. ``model_ema.safetensors``).
The run's ``config.yaml`` (beside the file) gives the evaluation's data settings - frame
stride and sampling, ``num_test_clips`` x ``num_test_crops`` test views, decode resize, mean
and std - and its ``data.shards`` manifest the class names; without them the defaults of
``DataConfig`` apply (one centred view, stride 4, the model's mean / std) and classes are
shown as indices. Each video is cut into the test views by the same code as the loader's
``test_views`` mode (``data_tools.clips.ClipMaker`` / ``ClipCollator``), and the softmax is
averaged over the views (``finetune.evaluate.ViewAggregator``), so a run's evaluation and
this command score a video alike. On CUDA the run's precision is used (autocast), on the
CPU float32. A file that cannot be read is skipped, counted and named at the end; when
none can be read the command fails.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from data_tools.clips import ClipCollator, ClipMaker, model_input
from data_tools.config import DataConfig
from data_tools.decode import VIDEO_EXTENSIONS
from data_tools.loader_stats import LoaderStats, SampleError
from data_tools.shard_set import resolve_shards
from data_tools.sources import VIDEO_SUFFIXES, scan_folder
from finetune.common import autocast_for, default_device
from finetune.config import FinetuneConfig
from finetune.evaluate import VideoScores, ViewAggregator
from finetune.train import MODEL_EXPORT
from models import ModelConfig, VideoViT, load_encoder_weights
from models.convert import read_config_hints
from runtime.config import RESOLVED_CONFIG_NAME, ConfigError, load_config
from runtime.errors import InputError, MissingInputError, run_command
from runtime.io import atomic_write_text
from runtime.logging import progress, setup_logging

logger = logging.getLogger(__name__)

OUTPUT_SUFFIXES = (".csv", ".json")


@dataclass
class Predictor:
    """A classifier with the data settings of its evaluation."""

    model: VideoViT
    data: DataConfig
    class_names: list[str] | None  # None: not recoverable, indices are shown
    device: torch.device
    precision: str = "fp32"
    note: str = ""  # where the settings came from, or why class names are missing

    def label(self, index: int) -> str:
        return self.class_names[index] if self.class_names else str(index)


def _model_file(source: Path) -> Path:
    if source.is_dir():
        if not (source / MODEL_EXPORT).is_file():
            raise MissingInputError(f"{source} holds no {MODEL_EXPORT}: pass a fine-tuning run "
                                    "folder or its exported .safetensors file")
        return source / MODEL_EXPORT
    if not source.is_file():
        raise MissingInputError(f"model {source} does not exist")
    return source


def _run_config(folder: Path) -> FinetuneConfig | None:
    path = folder / RESOLVED_CONFIG_NAME
    if not path.is_file():
        return None
    try:
        return load_config(FinetuneConfig, path)
    except ConfigError as err:
        logger.warning("%s is not a fine-tuning config (%s): using default data settings", path,
                       err)
        return None


def _class_names(run: FinetuneConfig | None, num_classes: int) -> tuple[list[str] | None, str]:
    if run is None:
        return None, f"no {RESOLVED_CONFIG_NAME} beside the model"
    for spec in (run.data.shards, run.val.shards):
        try:
            classes = resolve_shards(spec).classes
        except InputError as err:
            logger.info("class names: %s", err)
            continue
        if classes and len(classes) == num_classes:
            return list(classes), ""
    return None, (f"no manifest of data.shards={run.data.shards!r} lists the "
                  f"{num_classes} classes")


def load_predictor(model: str | Path, device: str | torch.device | None = None,
                   num_test_clips: int | None = None,
                   num_test_crops: int | None = None) -> Predictor:
    """The classifier behind ``model`` (a run folder or an exported file) on ``device``."""
    path = _model_file(Path(model))
    hints = read_config_hints(path)
    if not hints:
        raise InputError(f"{path} carries no ModelConfig in its metadata: pass the "
                         f"{MODEL_EXPORT} a fine-tuning run exports (or its run folder)")
    try:
        model_cfg = ModelConfig(**hints)
    except TypeError as err:
        raise InputError(f"{path}: unreadable ModelConfig metadata ({err})") from err
    if not model_cfg.num_classes:
        raise InputError(f"{path} is an encoder without a classification head: predict needs "
                         "a fine-tuned classifier")
    net = VideoViT(model_cfg)
    load_encoder_weights(net, path)
    run = _run_config(path.parent)
    if run is not None:
        data, precision = run.data, run.engine.precision
    else:
        data = DataConfig(mean=tuple(model_cfg.pixel_mean), std=tuple(model_cfg.pixel_std))
        precision = "fp32"
    views = {"num_test_clips": num_test_clips, "num_test_crops": num_test_crops}
    data = replace(data, **{k: v for k, v in views.items() if v is not None})
    try:
        data = data.with_geometry(**model_cfg.clip_geometry())
        data.validate()
    except ValueError as err:
        raise InputError(f"{path}: {err}") from err
    names, note = _class_names(run, model_cfg.num_classes)
    device = torch.device(device) if device is not None else default_device()
    return Predictor(net.to(device).eval(), data, names, device,
                     precision if device.type == "cuda" else "fp32", note)


def list_videos(source: Path) -> list[tuple[str, Path]]:
    """``(name, path)`` of the video file ``source`` or of the videos under the folder."""
    if source.is_dir():
        try:
            found = scan_folder(source)
        except FileNotFoundError as err:
            raise MissingInputError(str(err)) from err
        return [(item.source, item.path) for item in found.items]
    if not source.exists():
        raise MissingInputError(f"{source} does not exist")
    return [(source.name, source)]


def video_views(predictor: Predictor, name: str, path: Path) -> torch.Tensor:
    """The normalised float32 test views ``(V, C, T, H, W)`` of one video file, on the
    predictor's device; raises ``SampleError`` (or ``OSError``) when it cannot be read."""
    suffix = path.suffix.lower().lstrip(".")
    sample = {"__key__": name, suffix if suffix in VIDEO_EXTENSIONS else "mp4": path.read_bytes(),
              "json": b'{"label": -1}'}
    maker = ClipMaker(predictor.data, "test_views", 0, LoaderStats(1))
    clips = maker.make_clips(sample, np.random.default_rng(0))  # test views draw nothing
    batch = ClipCollator(predictor.data.mean, predictor.data.std)(clips)  # uint8
    return model_input(batch, predictor.device, predictor.data)


def predict(predictor: Predictor, videos: Sequence[tuple[str, Path]],
            ) -> tuple[VideoScores, list[tuple[str, str]]]:
    """Mean softmax over the test views of each readable video, and ``(name, reason)`` of
    each video that could not be read."""
    aggregator = ViewAggregator(predictor.model.cfg.num_classes)
    autocast = autocast_for(predictor.precision, predictor.device)
    unreadable = []
    bar = progress(videos, total=len(videos), desc="predict", enabled=len(videos) > 1)
    for name, path in bar:
        try:
            views = video_views(predictor, name, path)
        except (SampleError, OSError) as err:
            logger.warning("cannot read %s: %s", path, err)
            unreadable.append((name, str(err)))
            continue
        with torch.inference_mode(), autocast():
            logits = predictor.model(views)
        aggregator.add([name] * len(views), torch.full((len(views),), -1), logits.float())
    return aggregator.result(), unreadable


def top_k_rows(predictor: Predictor, scores: VideoScores, k: int) -> list[dict]:
    """One dict per video: ``video``, ``num_views``, ``top_k`` = ``[{rank, index, label,
    score}]``, in input order."""
    k = min(k, predictor.model.cfg.num_classes)
    rows = []
    for i, name in enumerate(scores.keys):
        values, indices = scores.scores[i].topk(k)
        rows.append({"video": name, "num_views": int(scores.num_views[i]), "top_k": [
            {"rank": r + 1, "index": int(c), "label": predictor.label(int(c)),
             "score": float(s)} for r, (s, c) in enumerate(zip(values, indices))]})
    return rows


def table_text(rows: list[dict]) -> str:
    """A plain text table: one line per video and rank."""
    width = max([len("video")] + [len(r["video"]) for r in rows])
    label_width = max([len("label")] + [len(t["label"]) for r in rows for t in r["top_k"]])
    lines = [f"{'video':<{width}}  #  {'label':<{label_width}}  score"]
    for row in rows:
        for t in row["top_k"]:
            name = row["video"] if t["rank"] == 1 else ""
            lines.append(f"{name:<{width}}  {t['rank']}  {t['label']:<{label_width}}  "
                         f"{t['score']:.4f}")
    return "\n".join(lines)


def csv_text(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["video", "rank", "index", "label", "score", "num_views"])
    for row in rows:
        for t in row["top_k"]:
            writer.writerow([row["video"], t["rank"], t["index"], t["label"],
                             f"{t['score']:.6f}", row["num_views"]])
    return buffer.getvalue()


def run(inputs: str | Path, model: str | Path, topk: int = 5, out: str | Path | None = None,
        device: str | None = None, num_test_clips: int | None = None,
        num_test_crops: int | None = None) -> dict:
    """Predict every video of ``inputs``; returns ``rows`` (see ``top_k_rows``),
    ``unreadable`` (``[(name, reason)]``), ``class_names_known``, ``note``, ``views``
    (clips x crops per video) and ``out`` (the file written, or None)."""
    if topk < 1:
        raise InputError(f"--topk must be >= 1, got {topk}")
    if out is not None and Path(out).suffix.lower() not in OUTPUT_SUFFIXES:
        raise InputError(f"--out {out}: give a .csv or .json file")
    videos = list_videos(Path(inputs))
    predictor = load_predictor(model, device, num_test_clips, num_test_crops)
    scores, unreadable = predict(predictor, videos)
    if not len(scores):
        raise InputError(f"none of the {len(videos)} video(s) under {inputs} could be read: "
                         + "; ".join(f"{name}: {reason}" for name, reason in unreadable[:5]))
    rows = top_k_rows(predictor, scores, topk)
    views = predictor.data.num_test_clips * predictor.data.num_test_crops
    result = {"rows": rows, "unreadable": unreadable, "views": views, "out": None,
              "class_names_known": predictor.class_names is not None, "note": predictor.note}
    if out is not None:
        out = Path(out)
        if out.suffix.lower() == ".csv":
            atomic_write_text(out, csv_text(rows))
        else:
            payload = {"model": str(model), "views_per_video": views,
                       "class_names_known": result["class_names_known"], "videos": rows,
                       "unreadable": [{"video": n, "reason": r} for n, r in unreadable]}
            atomic_write_text(out, json.dumps(payload, indent=2) + "\n")
        result["out"] = str(out)
    return result


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m finetune.predict",
        description="Top-k classes of each video (or every video under a folder: "
                    f"{', '.join(VIDEO_SUFFIXES)}) with a fine-tuned classifier, scored on the "
                    "test views of its evaluation (softmax averaged over the views).")
    parser.add_argument("inputs", metavar="VIDEO_OR_FOLDER")
    parser.add_argument("--model", required=True, metavar="RUN_DIR_OR_FILE",
                        help=f"a fine-tuning run folder (its {MODEL_EXPORT}) or an exported "
                             ".safetensors classifier")
    parser.add_argument("--topk", type=int, default=5, help="classes shown per video")
    parser.add_argument("--out", metavar="FILE.csv|FILE.json",
                        help="also write the predictions to this CSV or JSON file")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--num-test-clips", type=int,
                        help="clips per video (default: the run's data.num_test_clips)")
    parser.add_argument("--num-test-crops", type=int, choices=(1, 3),
                        help="crops per clip (default: the run's data.num_test_crops)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging()
    result = run(args.inputs, args.model, args.topk, args.out, args.device,
                 args.num_test_clips, args.num_test_crops)
    if not result["class_names_known"]:
        print(f"note: class names not found ({result['note']}): showing class indices",
              file=sys.stderr)
    print(table_text(result["rows"]))
    if result["unreadable"]:
        print(f"{len(result['unreadable'])} of {len(result['rows']) + len(result['unreadable'])}"
              " video(s) could not be read and were skipped: "
              + ", ".join(name for name, _ in result["unreadable"]), file=sys.stderr)
    if result["out"]:
        print(f"wrote {result['out']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
