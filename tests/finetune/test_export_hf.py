"""``python -m finetune.export_hf``: a tiny fine-tuning run exported as an HF folder that
``transformers.pipeline("video-classification")`` loads and runs on the demo's validation
mp4 files, with the run's class names and its single-view evaluation's top-1.

The run samples 8 frames at stride 2 from 16-frame 32x32 clips: HF's frames (``i * 16 // 8``)
are then the evaluation's (centred start 0) and no resize happens, so the differences left
are the decoder (torchcodec in HF, decord / PyAV here) and HF's ``fc_norm`` eps (1e-5, ours
1e-6). Other geometries differ in frame choice (``models.hf_processor``).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data_tools.decode import open_video
from data_tools.loader import build_loader
from finetune.config import eval_data_config
from finetune.evaluate import evaluate
from finetune.export_hf import main as export_main
from finetune.export_hf import sampling_differences
from finetune.predict import load_predictor, video_views
from finetune.train import export_model
from models import ModelConfig, VideoViT
from tests.finetune.helpers import extract_val_videos, tiny_classifier_run
from runtime.errors import run_command


@pytest.fixture(scope="module")
def tiny_run(demo_root, tmp_path_factory) -> Path:
    """A two-step joint-attention fine-tuning run on the tiny demo set, its exported weights
    then randomised so that the clips get different predictions (two steps from scratch
    predict one class for all)."""
    out = tmp_path_factory.mktemp("hf_run")
    return tiny_classifier_run(out, demo_root, mean=(0.45, 0.45, 0.45),
                               std=(0.25, 0.25, 0.25))


@pytest.fixture(scope="module")
def hf_folder(tiny_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf_export") / "hf"
    assert run_command(export_main, [str(tiny_run), str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def val_videos(demo_root, tmp_path_factory) -> Path:
    """The validation shards' mp4 members as files ``<key>.mp4``."""
    out = tmp_path_factory.mktemp("hf_videos")
    return extract_val_videos(demo_root, out)


def test_folder_carries_the_runs_class_names_and_preprocessing(hf_folder, demo_root):
    config = json.loads((hf_folder / "config.json").read_text())
    classes = json.loads((demo_root / "val" / "manifest.json").read_text())["classes"]
    assert config["architectures"] == ["VideoMAEForVideoClassification"]
    assert config["id2label"] == {str(i): name for i, name in enumerate(classes)}
    assert config["label2id"] == {name: i for i, name in enumerate(classes)}
    video = json.loads((hf_folder / "video_preprocessor_config.json").read_text())
    assert video["image_mean"] == [0.45] * 3 and video["image_std"] == [0.25] * 3
    assert video["crop_size"] == {"height": 32, "width": 32} and video["num_frames"] == 8


def test_processor_reproduces_the_evaluation_clip(tiny_run, hf_folder, val_videos):
    """HF's video processor on the frames it samples (decoded here) gives the evaluation's
    normalised clip: frame choice, resize, crop, mean and std agree for this geometry."""
    from transformers import AutoVideoProcessor

    processor = AutoVideoProcessor.from_pretrained(hf_folder)
    predictor = load_predictor(tiny_run, "cpu")
    for path in sorted(val_videos.glob("*.mp4"))[:3]:
        ours = video_views(predictor, path.stem, path)  # (1, C, T, H, W): one centred view
        reader = open_video(path.read_bytes())
        t = predictor.model.cfg.num_frames
        hf_indices = np.arange(t) * reader.num_frames // t  # HF's default_sample_indices_fn
        frames = reader.get_frames(hf_indices.tolist()).numpy()  # (T, H, W, 3) uint8
        theirs = processor(frames, return_tensors="pt")["pixel_values"]  # (1, T, C, H, W)
        torch.testing.assert_close(theirs.transpose(1, 2), ours, atol=1e-5, rtol=0)


def test_pipeline_top1_equals_the_single_view_evaluation(tiny_run, hf_folder, demo_root,
                                                         val_videos):
    from transformers import pipeline
    from transformers.utils.import_utils import is_torchcodec_usable

    if not is_torchcodec_usable(decode="video"):
        pytest.skip("transformers 5's video pipeline decodes with torchcodec, not usable here")
    predictor = load_predictor(tiny_run, "cpu")
    loader = build_loader(eval_data_config(predictor.data, str(demo_root / "val"), 1, 4, 0),
                          "eval", 0, 1)
    evaluation = evaluate(predictor.model, loader, 10, data=predictor.data).scores
    expected = dict(zip(evaluation.keys, evaluation.scores))
    classes = predictor.class_names
    classify = pipeline("video-classification", model=str(hf_folder), device="cpu")
    videos = sorted(val_videos.glob("*.mp4"))
    assert len(videos) == len(expected) == 20
    for path in videos:
        best = classify(str(path), top_k=1)[0]
        scores = expected[path.stem]
        assert best["label"] == classes[int(scores.argmax())], path.name
        assert best["score"] == pytest.approx(float(scores.max()), abs=1e-4)
    # not one class for every clip: the agreement above is not vacuous
    assert len({int(s.argmax()) for s in evaluation.scores}) > 2


def test_sampling_differences_name_what_hf_cannot_match(tiny_run):
    data = load_predictor(tiny_run, "cpu").data
    assert [n.split(":")[0] for n in sampling_differences(data)] == ["frames"]
    demo_like = dataclasses.replace(data, sampling_rate=4, short_side=64, num_test_clips=2)
    notes = sampling_differences(demo_like)
    assert "32-frame videos and stride <= 2" in notes[0]
    assert [n.split(":")[0] for n in notes] == ["frames", "space", "views"]


def test_attention_hf_lacks_is_one_line(tmp_path, capsys):
    model = VideoViT(ModelConfig(size="micro", img_size=32, num_frames=4, attention="divided",
                                 num_classes=3))
    export_model(model, tmp_path / "model.safetensors")
    assert run_command(export_main, [str(tmp_path), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err
    assert errors[0].startswith("error: cannot export to HF transformers VideoMAE: attention="
                                "'divided' (HF has joint only)")
    assert not (tmp_path / "hf").exists()
