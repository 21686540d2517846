"""How often ``transformers.pipeline("video-classification")`` on a run's HF export
(``python -m finetune.export_hf``) gives the run's single-view evaluation top-1, on the
validation videos as mp4 files.

Three rows: the run's evaluation (our loader, our model), HF's pipeline on the files (HF's
frame choice, torchcodec decoding, HF's model), and HF's processor + model on the
evaluation's own frames (decoded here), which isolates the frame choice: HF takes frames
``i * L // T`` over the whole video, the evaluation ``T`` frames ``data.sampling_rate``
apart from the centre (``models.hf_processor``).

    python bench/hf_pipeline_agreement.py --run runs/finetune_joint_1d \\
        --val runs/demo/data/val

The run must be HF-expressible (joint attention, ``model.pos_embed=sincos_1d``); the demo's
own fine-tuning configs use ``separable_sincos`` and are refused. Needs torchcodec.
"""
from __future__ import annotations

import argparse
import tarfile
import tempfile
from pathlib import Path
import sys

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from bench.common import finish, machine_info
from data_tools import sampling
from data_tools.decode import open_video
from data_tools.loader import build_loader
from finetune.config import eval_data_config
from finetune.evaluate import evaluate
from finetune.export_hf import export_run
from finetune.predict import load_predictor


def extract_videos(shards: Path, out: Path) -> list[tuple[str, Path, int]]:
    """``(key, mp4 path, label)`` of every sample of the shard folder ``shards``."""
    import json

    found = []
    for shard in sorted(shards.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name, member in members.items():
                if name.endswith(".mp4"):
                    key = Path(name).stem
                    path = out / f"{key}.mp4"
                    path.write_bytes(tar.extractfile(member).read())
                    meta = json.loads(tar.extractfile(members[f"{key}.json"]).read())
                    found.append((key, path, int(meta["label"])))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a fine-tuning run folder")
    parser.add_argument("--val", type=Path, required=True, help="validation shard folder")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForVideoClassification, AutoVideoProcessor, pipeline

    predictor = load_predictor(args.run, "cpu")
    data = predictor.data
    with tempfile.TemporaryDirectory() as tmp:
        folder = export_run(args.run, Path(tmp) / "hf")
        videos = extract_videos(args.val, Path(tmp))
        loader = build_loader(eval_data_config(data, str(args.val), 1, 8, 0), "eval", 0, 1)
        ours = evaluate(predictor.model, loader, predictor.model.cfg.num_classes,
                        data=data).scores
        ours_top1 = {k: int(s.argmax()) for k, s in zip(ours.keys, ours.scores)}
        classify = pipeline("video-classification", model=str(folder), device="cpu")
        processor = AutoVideoProcessor.from_pretrained(folder)
        hf_model = AutoModelForVideoClassification.from_pretrained(folder).eval()
        label2id = hf_model.config.label2id
        pipe_top1, aligned_top1, labels = {}, {}, {}
        for key, path, label in videos:
            labels[key] = label
            pipe_top1[key] = label2id[classify(str(path), top_k=1)[0]["label"]]
            reader = open_video(path.read_bytes(), data.backend, data.short_side)
            index = sampling.multi_view_indices(reader.num_frames, data.num_frames,
                                                data.sampling_rate, 1, data.sampling)[0]
            frames = reader.get_frames(index.tolist()).numpy()
            with torch.no_grad():
                logits = hf_model(**processor(frames, return_tensors="pt")).logits
            aligned_top1[key] = int(logits.argmax())
    keys = sorted(labels)

    def row(name: str, top1: dict[str, int]) -> dict:
        return {"input": name, "videos": len(keys),
                "top1_acc_%": round(100 * np.mean([top1[k] == labels[k] for k in keys]), 1),
                "agrees_with_eval_%": round(100 * np.mean([top1[k] == ours_top1[k]
                                                          for k in keys]), 1)}

    rows = [row("our single-view evaluation", ours_top1),
            row("HF pipeline on the mp4 files", pipe_top1),
            row("HF processor + model on the evaluation's frames", aligned_top1)]
    finish("hf_pipeline_agreement", args, machine_info(), rows,
           extra={"frames": data.num_frames, "sampling_rate": data.sampling_rate,
                  "sampling": data.sampling, "input_size": data.input_size,
                  "short_side": data.short_side})


if __name__ == "__main__":
    main()
