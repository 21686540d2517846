"""``python -m finetune.predict``: a tiny fine-tuned run scores the demo's validation clips
as its single-view evaluation does; CSV / JSON outputs; unreadable files; missing names."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from data_tools.loader import build_loader
from finetune.config import eval_data_config
from finetune.evaluate import evaluate
from finetune.predict import load_predictor, main, run
from models import ModelConfig, VideoViT
from models.checkpoint import save_project_checkpoint
from tests.finetune.helpers import extract_val_videos, tiny_classifier_run
from runtime.errors import InputError, run_command

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_run(demo_root, tmp_path_factory) -> Path:
    """A fine-tuning run folder of a micro classifier on the tiny demo set (two steps), its
    exported weights then randomised so that the demo clips get different, well separated
    predictions (two steps from scratch predict one class for all)."""
    out = tmp_path_factory.mktemp("predict_run")
    return tiny_classifier_run(out, demo_root)


@pytest.fixture(scope="module")
def val_videos(demo_root, tmp_path_factory) -> Path:
    """The validation shards' mp4 members as files ``<key>.mp4``."""
    out = tmp_path_factory.mktemp("predict_videos")
    return extract_val_videos(demo_root, out)


def test_predictions_equal_the_single_view_evaluation(tiny_run, demo_root, val_videos,
                                                      tmp_path):
    predictor = load_predictor(tiny_run, "cpu")
    loader = build_loader(eval_data_config(predictor.data, str(demo_root / "val"), 1, 4, 0),
                          "eval", 0, 1)
    evaluation = evaluate(predictor.model, loader, 10, data=predictor.data).scores
    expected = dict(zip(evaluation.keys, evaluation.scores))
    result = run(val_videos, tiny_run, topk=3, out=tmp_path / "p.json", device="cpu")
    assert len(result["rows"]) == len(expected) == 20 and not result["unreadable"]
    assert result["views"] == 1 and result["class_names_known"]
    classes = json.loads((demo_root / "val" / "manifest.json").read_text())["classes"]
    for row in result["rows"]:
        scores = expected[row["video"].removesuffix(".mp4")]
        best = row["top_k"][0]
        assert best["index"] == int(scores.argmax()), row["video"]
        assert best["label"] == classes[best["index"]]
        assert best["score"] == pytest.approx(float(scores.max()), abs=1e-5)
    # not one class for every clip: the check above is not vacuous
    assert len({int(s.argmax()) for s in evaluation.scores}) > 2


def test_csv_and_json_outputs(tiny_run, val_videos, tmp_path):
    names = sorted(p.name for p in val_videos.glob("*.mp4"))[:3]
    folder = tmp_path / "videos"
    folder.mkdir()
    for name in names:
        shutil.copy(val_videos / name, folder / name)
    as_csv = run(folder, tiny_run / "model.safetensors", topk=4, out=tmp_path / "p.csv",
                 device="cpu")
    with (tmp_path / "p.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["video"] for r in rows] == [n for n in names for _ in range(4)]
    assert [int(r["rank"]) for r in rows] == [1, 2, 3, 4] * 3
    scores = [float(r["score"]) for r in rows[:4]]
    assert scores == sorted(scores, reverse=True)
    assert rows[0]["label"] == as_csv["rows"][0]["top_k"][0]["label"]
    run(folder, tiny_run, topk=2, out=tmp_path / "p.json", device="cpu")
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved["class_names_known"] and saved["views_per_video"] == 1
    assert [v["video"] for v in saved["videos"]] == names
    assert [len(v["top_k"]) for v in saved["videos"]] == [2, 2, 2]
    assert saved["videos"][0]["top_k"][0]["score"] == pytest.approx(scores[0], abs=1e-6)
    with pytest.raises(InputError, match=".csv or .json"):
        run(folder, tiny_run, out=tmp_path / "p.txt")


def test_more_test_views_and_the_table(tiny_run, val_videos, capsys):
    video = sorted(val_videos.glob("*.mp4"))[0]
    result = run(video, tiny_run, topk=2, device="cpu", num_test_clips=2, num_test_crops=3)
    assert result["views"] == 6 and result["rows"][0]["num_views"] == 6
    assert run_command(main, [str(video), "--model", str(tiny_run), "--topk", "2",
                              "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["video", "#", "label", "score"]
    assert lines[1].startswith(video.name) and len(lines) == 3


def test_unreadable_files_are_skipped_counted_and_named(tiny_run, val_videos, tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = sorted(val_videos.glob("*.mp4"))[:2]
    for path in good:
        shutil.copy(path, folder / path.name)
    (folder / "broken.mp4").write_bytes(b"not a video" * 100)
    (folder / "empty.avi").write_bytes(b"")
    argv = [str(folder), "--model", str(tiny_run), "--device", "cpu"]
    assert run_command(main, argv) == 0
    err = capsys.readouterr().err
    assert "2 of 4 video(s) could not be read and were skipped: broken.mp4, empty.avi" in err
    for path in good:
        (folder / path.name).unlink()
    assert run_command(main, argv) == 2  # nothing readable: one error line, non-zero exit
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: none of the 2 video(s)") and "broken.mp4" in err


def test_without_run_config_classes_are_indices(tiny_run, val_videos, tmp_path, capsys):
    alone = tmp_path / "alone.safetensors"
    shutil.copy(tiny_run / "model.safetensors", alone)
    video = sorted(val_videos.glob("*.mp4"))[0]
    assert load_predictor(alone, "cpu").class_names is None
    assert run_command(main, [str(video), "--model", str(alone), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "class names not found" in captured.err and "showing class indices" in captured.err
    assert captured.out.splitlines()[1].split()[2].isdigit()
    encoder = save_project_checkpoint(
        VideoViT(ModelConfig(size="micro", img_size=32, patch_size=16, num_frames=8)),
        tmp_path / "encoder.safetensors")
    with pytest.raises(InputError, match="without a classification head"):
        load_predictor(encoder, "cpu")
    with pytest.raises(FileNotFoundError, match="holds no model.safetensors"):
        load_predictor(tmp_path, "cpu")


@pytest.mark.slow
def test_command_line_reports_a_missing_input_in_one_line(tiny_run, tmp_path):
    result = subprocess.run([sys.executable, "-m", "finetune.predict", str(tmp_path / "no.mp4"),
                             "--model", str(tiny_run)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith(f"error: {tmp_path / 'no.mp4'} does not")
