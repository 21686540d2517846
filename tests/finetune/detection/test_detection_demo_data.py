"""Demo detection sets: AVA-layout files that parse, boxes on the rendered digits,
multi-label actors, proposals around them; untrimmed videos whose segments are actions."""
import json

import numpy as np
import pytest
import torch
import webdataset as wds
from torchvision.ops import box_iou

from data_tools.decode import open_video
from finetune.detection.annotations import (parse_segments, read_ava_annotations, read_label_map,
                                            read_proposals)
from finetune.detection.demo_data import (AVADemoConfig, TADDemoConfig, generate_ava_demo,
                                          generate_tad_demo)


@pytest.fixture(scope="module")
def ava_demo(tmp_path_factory):
    cfg = AVADemoConfig(canvas_size=32, train_videos=4, val_videos=2, spin_probability=0.5, seed=3)
    return cfg, generate_ava_demo(tmp_path_factory.mktemp("ava_demo"), cfg)


def shard_samples(folder):
    return list(wds.WebDataset(sorted(str(p) for p in folder.glob("*.tar")), shardshuffle=False))


def test_ava_demo_files_parse_and_actors_have_one_or_two_labels(ava_demo):
    cfg, paths = ava_demo
    label_map = read_label_map(paths.label_map)
    assert label_map.names == cfg.classes
    assert label_map.action_ids == tuple(range(1, len(cfg.classes) + 1))
    frames = read_ava_annotations(paths.annotations["train"], label_map)
    assert {ts for _, ts in frames} == {1.0, 2.0}
    labels = torch.cat([a.labels for a in frames.values()])
    # two keyframes per video (an actor may hide)
    assert labels.shape[0] >= 2 * 4 * cfg.min_actors - 2
    num_base = len(cfg.base_motions)
    assert (labels[:, :num_base].sum(1) == 1).all()  # exactly one base motion each
    assert labels[:, num_base:].sum(1).max() == 1 and labels[:, num_base:].any()  # some also spin


def test_ava_demo_boxes_sit_on_the_digits_and_proposals_find_them(ava_demo):
    cfg, paths = ava_demo
    label_map = read_label_map(paths.label_map)
    frames = read_ava_annotations(paths.annotations["val"], label_map)
    proposals = read_proposals(paths.proposals["val"])
    for sample in shard_samples(paths.shards["val"]):
        meta = json.loads(sample["json"])
        reader = open_video(sample["mp4"])
        assert reader.num_frames == cfg.duration_s * cfg.fps and meta["timestamps"] == [1, 2]
        for ts in meta["timestamps"]:
            truth = frames[(meta["video_id"], float(ts))]
            frame = reader.get_frames([int(ts * cfg.fps)])[0].float().mean(-1)  # (H, W)
            for x1, y1, x2, y2 in (truth.boxes * cfg.canvas_size).round().long().tolist():
                inside = frame[y1:y2, x1:x2]
                # The digit's ink (bright colours) is inside its box; the background is dark.
                assert inside.max() > frame.median() + 40
            boxes, scores = proposals[(meta["video_id"], float(ts))]
            best = box_iou(truth.boxes, boxes).max(dim=1)
            assert (best.values > 0.5).all() and (scores[best.indices] >= 0.85).all()


def test_ava_demo_is_deterministic(ava_demo, tmp_path):
    cfg, paths = ava_demo
    again = generate_ava_demo(tmp_path,
                              AVADemoConfig(**{**cfg.__dict__, "train_videos": 1, "val_videos": 0}))
    first_lines = paths.annotations["train"].read_text().splitlines()
    again_lines = again.annotations["train"].read_text().splitlines()
    assert again_lines and first_lines[: len(again_lines)] == again_lines
    with pytest.raises(FileExistsError):
        generate_ava_demo(tmp_path, cfg)


def test_tad_demo_segments_are_actions_between_still_gaps(tmp_path):
    cfg = TADDemoConfig(canvas_size=32, duration_s=14.0, train_videos=2, val_videos=1,
                        max_distractors=0, jitter=0.0)
    shards = generate_tad_demo(tmp_path, cfg)
    samples = shard_samples(shards["train"])
    assert len(samples) == 2
    for sample in samples:
        meta = json.loads(sample["json"])
        segments, labels = parse_segments(meta["segments"], list(cfg.classes), "demo",
                                          meta["duration"])
        assert len(segments) >= 2 and meta["duration"] == pytest.approx(cfg.duration_s)
        lengths = segments[:, 1] - segments[:, 0]
        gaps = segments[1:, 0] - segments[:-1, 1]
        assert (lengths >= cfg.action_s[0] - 0.2).all() and (lengths <= cfg.action_s[1] + 0.2).all()
        assert (gaps >= cfg.gap_s[0] - 0.2).all()
        assert segments[0, 0] > 0 and segments[-1, 1] < cfg.duration_s
        # Frame-to-frame change: the digit moves inside actions and stands still in gaps.
        num_frames = int(cfg.duration_s * cfg.fps)
        frames = open_video(sample["mp4"]).get_frames(list(range(num_frames))).float()
        change = (frames[1:] - frames[:-1]).abs().mean(dim=(1, 2, 3))
        times = (torch.arange(len(change)) + 1) / cfg.fps
        in_action = ((times[:, None] > segments[:, 0] + 0.2)
                     & (times[:, None] < segments[:, 1] - 0.2)).any(1)
        in_gap = ~((times[:, None] > segments[:, 0] - 0.2)
                   & (times[:, None] < segments[:, 1] + 0.2)).any(1)
        assert change[in_action].mean() > 3 * change[in_gap].mean()
    rows = (tmp_path / "train_segments.csv").read_text().splitlines()
    assert len(rows) == sum(len(json.loads(s["json"])["segments"]) for s in samples)
    assert np.isin([r.split(",")[3] for r in rows], cfg.classes).all()
