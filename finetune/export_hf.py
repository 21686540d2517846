"""A fine-tuning run as an HF transformers folder:
``python -m finetune.export_hf RUN_DIR_OR_FILE OUT [--hf-bias-naming new|old]``.

The run is read as ``finetune.predict`` reads it (``load_predictor``: the exported
``model.safetensors``, the run's ``config.yaml`` data settings, the class names of its
``data.shards`` manifest) and written by ``models.hf.export_hf`` with those class names as
``id2label`` / ``label2id`` and the evaluation's mean / std in the processor configs, so
``transformers.pipeline("video-classification", model=OUT)`` scores a video file as the
run's single-view evaluation does, up to the differences ``models.hf_processor`` states
(HF picks its frames over the whole video; this command logs what that means for the run's
sampling). HF's VideoMAE has joint attention and a 1-D sinusoid position table only: a run
with another attention type or position table is refused with one line saying so.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

import torch

from data_tools.config import DataConfig
from finetune.predict import load_predictor
from models.hf import export_hf
from runtime.errors import run_command
from runtime.logging import setup_logging

logger = logging.getLogger(__name__)


def sampling_differences(data: DataConfig) -> list[str]:
    """How the HF pipeline's input differs from this run's single-view evaluation."""
    t, r = data.num_frames, data.sampling_rate
    if data.sampling == "segment":
        notes = [f"frames: HF takes the first frame of each of {t} segments, the evaluation "
                 "the middle one"]
    else:
        notes = [f"frames: HF takes {t} frames spread over the whole video (i * L // {t}), the "
                 f"evaluation {t} frames {r} apart from the centre; the same frames only for "
                 f"{t * r}-frame videos" + (" and stride <= 2" if r > 2 else "")]
    if data.short_side:
        notes.append(f"space: the evaluation resizes the short side to {data.short_side} at "
                     f"decode time before the {data.input_size}px crop; HF resizes once")
    if data.num_test_clips * data.num_test_crops > 1:
        notes.append(f"views: the run's multi-view test averages {data.num_test_clips} clips x "
                     f"{data.num_test_crops} crops; the pipeline scores one centred view")
    return notes


def export_run(run: str | Path, out: str | Path, bias_naming: str = "new") -> Path:
    """Write the classifier of ``run`` (a fine-tuning run folder or its exported
    ``.safetensors``) as an HF folder ``out``; returns ``out``."""
    predictor = load_predictor(run, torch.device("cpu"))
    if predictor.class_names is None:
        logger.warning("class names not found (%s): the HF config names the classes LABEL_i",
                       predictor.note)
    path = export_hf(predictor.model, out, bias_naming, predictor.class_names,
                     predictor.data.mean, predictor.data.std)
    for note in sampling_differences(predictor.data):
        logger.info("HF pipeline vs this run's evaluation: %s", note)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m finetune.export_hf",
        description="Write a fine-tuned classifier as an HF transformers folder (config.json "
                    "with the run's class names, model.safetensors, processor configs with its "
                    "evaluation's preprocessing) that transformers.pipeline("
                    "'video-classification', model=OUT) runs on video files.")
    parser.add_argument("run", metavar="RUN_DIR_OR_FILE",
                        help="a fine-tuning run folder (its model.safetensors) or such a file")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--hf-bias-naming", choices=("new", "old"), default="new",
                        help="query.bias/value.bias (new: transformers 5) or q_bias/v_bias "
                             "(old: transformers 4)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging()
    path = export_run(args.run, args.out, args.hf_bias_naming)
    print(f"wrote {path}: transformers.pipeline('video-classification', model={str(path)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
