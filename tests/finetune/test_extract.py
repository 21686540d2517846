"""``finetune.extract``: per-clip, per-view and sliding-window features of real shards."""
from __future__ import annotations

import json

import pytest
import torch

from data_tools.clips import model_input
from data_tools.loader import build_loader
from finetune.config import ExtractConfig
from finetune.extract import FeatureSet, load_features, run, save_features
from finetune.common import build_model
from runtime.io import atomic_save_safetensors


@pytest.fixture
def encoder_file(tmp_path, tiny_model_cfg):
    torch.manual_seed(3)
    model = build_model(tiny_model_cfg(), "")
    path = tmp_path / "encoder.safetensors"
    atomic_save_safetensors(model.state_dict(), path)
    return path, model


def test_clip_features_are_the_mean_pooled_encoder_tokens(encoder_file, tiny_model_cfg,
                                                          tiny_data_cfg, demo_root, tmp_path):
    path, model = encoder_file
    cfg = ExtractConfig(model=tiny_model_cfg(), weights=str(path), data=tiny_data_cfg("val"),
                        out=str(tmp_path / "val.safetensors"))
    features = load_features(run(cfg)["out"])
    assert features.features.shape == (20, 64) and len(set(features.keys)) == 20
    manifest = json.loads((demo_root / "val" / "manifest.json").read_text())
    assert manifest["num_samples"] == 20
    assert features.info["config"]["mode"] == "clip"

    data = tiny_data_cfg("val", batch_size=20)
    batch = next(iter(build_loader(data, "eval", 0, 1)))
    with torch.inference_mode():
        expected = model.eval().forward_features(model_input(batch, "cpu", data)).mean(1)
    row = {key: i for i, key in enumerate(features.keys)}
    order = [row[k] for k in batch["key"]]
    torch.testing.assert_close(features.features[order], expected)
    assert features.labels[order].tolist() == batch["label"].tolist()


def test_view_features_have_one_row_per_view(encoder_file, tiny_model_cfg, tiny_data_cfg, tmp_path):
    cfg = ExtractConfig(model=tiny_model_cfg(), weights=str(encoder_file[0]), mode="views",
                        data=tiny_data_cfg("val", num_test_clips=2, num_test_crops=3),
                        dtype="float16", out=str(tmp_path / "views.safetensors"))
    features = load_features(run(cfg)["out"])
    assert features.features.shape == (120, 64) and features.features.dtype == torch.float16
    for key in set(features.keys):
        views = sorted(v for k, v in zip(features.keys, features.views.tolist()) if k == key)
        assert views == list(range(6))


def test_sliding_windows_cover_each_video(encoder_file, tiny_model_cfg, tiny_data_cfg, tmp_path):
    # 16-frame videos, windows of 8 frames 1 apart every 4 frames: starts 0, 4, 8
    cfg = ExtractConfig(model=tiny_model_cfg(), weights=str(encoder_file[0]),
                        mode="sliding_window", window_stride=4,
                        data=tiny_data_cfg("val", sampling_rate=1),
                        out=str(tmp_path / "windows.safetensors"))
    features = load_features(run(cfg)["out"])
    assert features.features.shape == (60, 64)
    centres = features.extra["window_center"]
    for key in set(features.keys):
        rows = [i for i, k in enumerate(features.keys) if k == key]
        assert features.views[rows].tolist() == [0, 1, 2]
        # fps 8: window k covers frames [4k, 4k + 8), its centre is (4k + 4) / 8 seconds
        torch.testing.assert_close(centres[rows], torch.tensor([0.5, 1.0, 1.5]))


def test_feature_files_reject_foreign_safetensors_and_mismatched_rows(tmp_path):
    foreign = tmp_path / "weights.safetensors"
    atomic_save_safetensors({"w": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="weights.safetensors is not a feature file"):
        load_features(foreign)
    with pytest.raises(ValueError, match="mismatched rows"):
        FeatureSet(["a", "b"], torch.zeros(2, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                   torch.zeros(2, 4))
    saved = FeatureSet(["a"], torch.tensor([3]), torch.tensor([0]), torch.ones(1, 4),
                       {"window_center": torch.tensor([0.5])}, {"note": "x"})
    loaded = load_features(save_features(saved, tmp_path / "f.safetensors"))
    assert loaded.keys == ["a"] and loaded.info == {"note": "x"}
    torch.testing.assert_close(loaded.extra["window_center"], torch.tensor([0.5]))
