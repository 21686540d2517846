"""Keyframe-centred clips from real shards: frame positions, layouts, boxes, errors."""
import json

import numpy as np
import pytest
import torch
import webdataset as wds

from data_tools.video_io import write_mp4
from finetune.detection.annotations import AnnotationError, FrameAnnotation
from finetune.detection.data import (AVADataConfig, KeyframeClips, build_keyframe_loader,
                                     keyframe_indices)

FPS, NUM_FRAMES, SIZE = 10.0, 40, 64


def indexed_video() -> bytes:
    """Frame t has grey level 16 + 5 t; the left half of every frame is brighter (+30) on
    the red channel, so a horizontal flip is visible."""
    frames = np.zeros((NUM_FRAMES, SIZE, SIZE, 3), np.uint8)
    for t in range(NUM_FRAMES):
        frames[t] = 16 + 5 * t
        frames[t, :, : SIZE // 2, 0] += 30
    return write_mp4(frames, FPS, gop=8)


def frame_levels(video: torch.Tensor) -> list[int]:
    """Frame indices read back from a uint8 clip (C, T, H, W) (green channel)."""
    green = video[1].float() / 255
    return [round((float(level) * 255 - 16) / 5) for level in green.mean(dim=(1, 2))]


def annotation(*boxes, labels=None):
    boxes = torch.tensor(boxes, dtype=torch.float32)
    labels = (torch.tensor(labels) if labels is not None
              else torch.eye(2, dtype=torch.bool)[: len(boxes)])
    return FrameAnnotation(boxes, labels)


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    """Three samples: a cut clip (source_start 100 s, one keyframe), a whole video with a
    timestamps list, a video without timestamps."""
    path = tmp_path_factory.mktemp("shards") / "det-000000.tar"
    data = indexed_video()
    with wds.TarWriter(str(path)) as writer:
        cut = {"video_id": "movie", "timestamp": 101.5, "source_start": 100.0}
        writer.write({"__key__": "cut", "mp4": data, "json": json.dumps(cut).encode()})
        writer.write({"__key__": "whole", "mp4": data,
                      "json": json.dumps({"video_id": "clip", "timestamps": [0.2, 3]}).encode()})
        writer.write({"__key__": "plain", "mp4": data, "json": json.dumps({}).encode()})
    return path


def samples(path):
    return list(wds.WebDataset(str(path), shardshuffle=False))


CFG = AVADataConfig(num_frames=4, sampling_rate=3, input_size=32, num_workers=0, batch_size=2,
                    box_jitter=0.0)
ANNOTATIONS = {
    ("movie", 101.5): annotation([0.1, 0.1, 0.4, 0.5], labels=[[True, True]]),
    # another cut of the movie: not in this sample
    ("movie", 900.0): annotation([0.1, 0.1, 0.4, 0.5]),
    ("clip", 0.2): annotation([0.5, 0.5, 0.9, 0.9]),
    ("clip", 3.0): annotation([0.0, 0.0, 1.0, 1.0], [0.2, 0.2, 0.3, 0.3]),
    ("plain", 1.0): annotation([0.2, 0.2, 0.6, 0.6]),
    ("plain", 9.0): annotation([0.2, 0.2, 0.6, 0.6]),  # past the end of this video: skipped
}


def test_keyframe_indices_centre_and_clamp():
    assert keyframe_indices(15, 4, 3, 40) == [9, 12, 15, 18]
    assert keyframe_indices(2, 4, 3, 40) == [0, 0, 2, 5]
    assert keyframe_indices(39, 4, 3, 40) == [33, 36, 39, 39]


def test_training_examples_are_centred_on_their_keyframes(shard):
    stage = KeyframeClips(CFG, ANNOTATIONS, None, train=True, seed=0)
    examples = {e["key"]: e for s in samples(shard) for e in stage.examples(s, torch.Generator())}
    assert set(examples) == {("movie", 101.5), ("clip", 0.2), ("clip", 3.0), ("plain", 1.0)}
    # (101.5 - 100) s x 10 fps
    assert frame_levels(examples[("movie", 101.5)]["video"]) == [9, 12, 15, 18]
    assert frame_levels(examples[("clip", 0.2)]["video"]) == [0, 0, 2, 5]
    assert frame_levels(examples[("clip", 3.0)]["video"]) == [24, 27, 30, 33]
    assert examples[("clip", 0.2)]["video"].shape == (3, 4, 32, 32)
    assert examples[("movie", 101.5)]["labels"].tolist() == [[1.0, 1.0]]
    assert examples[("clip", 3.0)]["boxes"].shape == (2, 4)


def test_flipped_clips_flip_their_boxes(shard):
    cfg = AVADataConfig(**{**CFG.__dict__, "flip": True})
    stage = KeyframeClips(cfg, ANNOTATIONS, None, train=True, seed=0)
    seen = set()
    for seed in range(6):
        for example in stage.examples(samples(shard)[1], torch.Generator().manual_seed(seed)):
            if example["key"] != ("clip", 0.2):
                continue
            red = example["video"][0].float().mean(dim=(0, 1))  # (W,)
            flipped = bool(red[-4:].mean() > red[:4].mean())  # the bright half moved right
            expected = [0.1, 0.5, 0.5, 0.9] if flipped else [0.5, 0.5, 0.9, 0.9]
            assert example["boxes"][0].tolist() == pytest.approx(expected)
            seen.add(flipped)
    assert seen == {True, False}


def test_evaluation_yields_frames_with_boxes_to_classify(shard):
    test_boxes = {("clip", 0.2): torch.tensor([[0.1, 0.1, 0.2, 0.2]]),
                  ("clip", 3.0): torch.zeros(0, 4)}
    stage = KeyframeClips(CFG, ANNOTATIONS, test_boxes, train=False, seed=0)
    examples = [e for s in samples(shard) for e in stage.examples(s, torch.Generator())]
    assert [e["key"] for e in examples] == [("clip", 0.2)]
    assert torch.equal(examples[0]["boxes"], test_boxes[("clip", 0.2)])
    assert "labels" not in examples[0]


def test_loader_batches_across_the_shard(shard):
    loader, batches = build_keyframe_loader(CFG, str(shard), ANNOTATIONS, True, rank=0,
                                            world_size=1, seed=0)
    # 6 annotated keyframes // batch 2 (the stream resamples the shard: frames outside it,
    # like movie @ 900 s, count towards the epoch but never appear).
    assert batches == 3
    got = list(loader)
    assert len(got) == 3 and got[0]["video"].shape == (2, 3, 4, 32, 32)
    assert got[0]["labels"].shape[0] == sum(b.shape[0] for b in got[0]["boxes"])
    test_boxes = {key: a.boxes for key, a in ANNOTATIONS.items()}
    loader, _ = build_keyframe_loader(CFG, str(shard), ANNOTATIONS, False, rank=0, world_size=1,
                                      seed=0, test_boxes=test_boxes)
    keys = sorted(tuple(k) for batch in loader for k in batch["key"])
    assert keys == sorted([("movie", 101.5), ("clip", 0.2), ("clip", 3.0), ("plain", 1.0)])
    assert build_keyframe_loader(CFG, str(shard), ANNOTATIONS, False, rank=1, world_size=2, seed=0,
                                 test_boxes=test_boxes)[0] == []


def test_bad_samples_name_shard_and_key(tmp_path):
    path = tmp_path / "bad-000000.tar"
    with wds.TarWriter(str(path)) as writer:
        writer.write({"__key__": "late", "mp4": indexed_video(),
                      "json": json.dumps({"video_id": "clip", "timestamp": 30}).encode()})
        writer.write({"__key__": "nojson", "mp4": b"x"})
        writer.write({"__key__": "badts", "mp4": b"x",
                      "json": json.dumps({"video_id": "clip", "timestamps": 5}).encode()})
    annotations = {("clip", 30.0): annotation([0.1, 0.1, 0.2, 0.2]),
                   ("clip", 5.0): annotation([0.1, 0.1, 0.2, 0.2])}
    stage = KeyframeClips(CFG, annotations, None, train=True, seed=0)
    late, nojson, badts = samples(path)
    with pytest.raises(AnnotationError,
                       match=r"bad-000000\.tar:late: keyframe 30.0 s is outside the clip"):
        stage.examples(late, torch.Generator())
    with pytest.raises(AnnotationError, match=r"bad-000000\.tar:nojson: sample needs a video "
                                              r"member .* and a \.json member"):
        stage.examples(nojson, torch.Generator())
    with pytest.raises(AnnotationError, match=r"badts: timestamps must be numbers"):
        stage.examples(badts, torch.Generator())
