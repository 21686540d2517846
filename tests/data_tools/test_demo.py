"""The demo action dataset: determinism, balance, time-reversed pairs that a bag of frames
cannot separate, and the rendering primitives."""
from __future__ import annotations

import io
import json

import decord
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from threadpoolctl import threadpool_limits

from data_tools.demo import DemoConfig, clip_rng, render_demo_clip
from data_tools.demo_backgrounds import make_background
from data_tools.demo_render import (DEMO_CLASSES, MOTIONS, Actor, Pose, Track, load_digit_sprites,
                                    render_clip, render_frame)
from data_tools.manifest import load_manifest
from data_tools.video_io import keyframe_indices, write_mp4
from tests.data_tools.build_fixtures import TINY_DEMO_SEED, make_tiny_demo, tiny_demo  # noqa: F401

PAIRS = [(name, m.reverse_of) for name, m in MOTIONS.items() if m.reverse_of]


def test_same_seed_gives_the_same_files(tiny_demo, tmp_path):
    # Clip i of a split depends only on (seed, split, i), so a smaller set made with the same
    # seed reproduces the first clips byte for byte; another seed changes them.
    make_tiny_demo(tmp_path / "same", train_per_class=1, val_per_class=1)
    make_tiny_demo(tmp_path / "other", seed=TINY_DEMO_SEED + 1, train_per_class=1,
                   val_per_class=1)
    clips = sorted(p.relative_to(tmp_path / "same") for p in (tmp_path / "same").rglob("*.mp4"))
    assert len(clips) == 2 * len(DEMO_CLASSES)
    for clip in clips:
        assert (tmp_path / "same" / clip).read_bytes() == (tiny_demo / clip).read_bytes()
        assert (tmp_path / "other" / clip).read_bytes() != (tiny_demo / clip).read_bytes()


def test_splits_are_balanced_and_val_digits_held_out(tiny_demo):
    cfg = DemoConfig.tiny()
    for split, per_class in (("train", cfg.train_per_class), ("val", cfg.val_per_class)):
        manifest = load_manifest(tiny_demo / split)
        assert manifest.classes == list(DEMO_CLASSES)
        assert manifest.extra["class_counts"] == [per_class] * len(DEMO_CLASSES)
        assert manifest.num_samples == per_class * len(DEMO_CLASSES)
        assert manifest.extra["num_rejects"] == 0
        listed = (tiny_demo / f"{split}.txt").read_text().splitlines()
        assert len(listed) == manifest.num_samples
    import webdataset as wds

    for split, held_out in (("train", False), ("val", True)):
        urls = load_manifest(tiny_demo / split).urls()
        for sample in wds.WebDataset(urls, shardshuffle=False):
            meta = json.loads(sample["json"])
            assert (meta["sprite_index"] % 5 == 0) == held_out
            assert meta["label_name"] == DEMO_CLASSES[meta["label"]]
            assert (meta["width"], meta["height"], meta["num_frames"]) == (32, 32, 16)


@pytest.mark.parametrize("forward,backward", PAIRS)
def test_reversed_class_is_the_forward_clip_played_backwards(forward, backward):
    cfg = DemoConfig.tiny()
    frames_fwd, extra_fwd = render_demo_clip(forward, clip_rng(7, "train", 0), cfg)
    frames_bwd, extra_bwd = render_demo_clip(backward, clip_rng(7, "train", 0), cfg)
    assert extra_fwd == extra_bwd
    np.testing.assert_array_equal(frames_bwd, frames_fwd[::-1])
    assert not np.array_equal(frames_fwd, frames_fwd[::-1])  # the order carries the class


@pytest.mark.parametrize("forward,backward", [("move_right", "move_left"), ("grow", "shrink")])
def test_bag_of_frames_cannot_separate_a_pair_but_order_can(forward, backward):
    """A linear classifier on order-free clip features (mean frame, mean row/column
    profiles) is near chance; the same features taken as late-minus-early halves separate."""
    cfg = DemoConfig.tiny()
    clips, labels = [], []
    for label, name in enumerate((forward, backward)):
        for i in range(40):
            frames, _ = render_demo_clip(name, clip_rng(11, "train", 2 * i + label), cfg)
            clips.append(frames.astype(np.float32) / 255)
            labels.append(label)
    clips, labels = np.stack(clips), np.array(labels)  # (N, T, H, W, 3)

    def features(x):  # (N, T', H, W, 3) -> (N, F), order-free over T'
        n, _, h, w, c = x.shape
        pooled = x.mean(1).reshape(n, 8, h // 8, 8, w // 8, c).mean((2, 4))  # 8x8 mean frame
        return np.concatenate([x.mean((1, 2, 4)), x.mean((1, 3, 4)), pooled.reshape(n, -1)], 1)

    half = clips.shape[1] // 2
    bag = features(clips)
    ordered = features(clips[:, half:]) - features(clips[:, :half])
    model = LogisticRegression(max_iter=1000)
    with threadpool_limits(1):  # BLAS threads only oversubscribe the test workers
        bag_accuracy = cross_val_score(model, bag, labels, cv=5).mean()
        ordered_accuracy = cross_val_score(model, ordered, labels, cv=5).mean()
    assert bag_accuracy < 0.7, bag_accuracy
    assert ordered_accuracy > 0.9, ordered_accuracy


def test_render_frame_boxes_and_clockwise_rotation():
    sprites, _ = load_digit_sprites()
    sprite = sprites[0]
    white = (1.0, 1.0, 1.0)
    upright, boxes = render_frame(64, [Actor(sprite, Pose(0.5, 0.5, 0.5), white)])
    x1, y1, x2, y2 = boxes[0]
    assert 14 <= x1 < x2 <= 50 and 14 <= y1 < y2 <= 50  # 32 px sprite + bilinear fringe
    ink_rows, ink_cols = np.nonzero(upright[..., 0] >= 0.2 * 255)
    assert (ink_cols.min(), ink_rows.min(), ink_cols.max() + 1, ink_rows.max() + 1) == (
        x1, y1, x2, y2)
    turned, _ = render_frame(64, [Actor(sprite, Pose(0.5, 0.5, 0.5, angle=90), white)])
    assert np.abs(turned.astype(int) - np.rot90(upright, k=-1)).max() <= 1  # k=-1: clockwise
    _, gone = render_frame(64, [Actor(sprite, Pose(2.0, 0.5, 0.3), white)])
    assert np.isnan(gone).all()


def test_motions_keep_the_digit_on_canvas_and_reverse_in_time():
    sprites, _ = load_digit_sprites()
    for name in DEMO_CLASSES:
        motion = MOTIONS[name]
        for seed in range(10):
            params = motion.sample_params(np.random.default_rng(seed))
            if motion.reverse_of:
                forward = MOTIONS[motion.reverse_of]
                for t in (0.0, 0.3, 1.0):
                    assert motion.pose(t, params) == forward.pose(1.0 - t, params)
            _, boxes = render_clip(48, [Track(sprites[8], name, params, (1.0, 1.0, 1.0))], 9)
            assert not np.isnan(boxes).any(), (name, seed)
            assert boxes[..., :2].min() >= 0 and boxes[..., 2:].max() <= 48


def test_write_mp4_round_trip():
    rng = np.random.default_rng(0)
    smooth = np.cumsum(rng.integers(-3, 4, (20, 1, 1, 3)), 0) + np.linspace(
        60, 180, 32)[None, :, None, None]
    frames = np.broadcast_to(smooth, (20, 32, 32, 3)).clip(0, 255).astype(np.uint8)
    data = write_mp4(frames, fps=10, gop=4)
    assert keyframe_indices(data) == [0, 4, 8, 12, 16]
    reader = decord.VideoReader(io.BytesIO(data))
    decoded = reader.get_batch(range(len(reader))).asnumpy()
    assert decoded.shape == frames.shape and reader.get_avg_fps() == 10
    assert np.abs(decoded.astype(int) - frames).mean() < 3
    assert write_mp4(frames, fps=10, gop=4) == data


def test_background_kinds():
    rng = np.random.default_rng(0)
    flat = make_background(rng, 32, grain=0.0, kind="flat")
    assert flat.shape == (32, 32, 3) and np.ptp(flat.reshape(-1, 3), axis=0).max() == 0
    smooth = make_background(rng, 32, grain=0.0, kind="smooth")
    assert np.ptp(smooth.reshape(-1, 3), axis=0).max() > 0.01
    assert (smooth.min() >= 0) and (smooth.max() <= 0.35)
    with pytest.raises(ValueError, match="flat"):
        make_background(rng, 32, kind="noise")
    with pytest.raises(ValueError, match="background"):
        DemoConfig(background="noise").validate()
    frames, _ = render_demo_clip("move_right", clip_rng(0, "train", 0),
                                 DemoConfig.tiny(background="flat", max_distractors=0))
    corners = frames[:, [0, 0, -1, -1], [0, -1, 0, -1]].reshape(-1, 3)
    assert np.ptp(corners, axis=0).max() == 0  # one colour wherever the digit is not


def test_photo_background_is_textured_and_pans():
    """Bundled photographs seen by a camera: deterministic per seed, textured in most 8x8
    cells, still without a pan and moving with one."""
    from data_tools.demo_backgrounds import photo_frames, textured_fraction

    still = photo_frames(np.random.default_rng(3), 32, 6, pan=0.0)
    assert still.shape == (6, 32, 32, 3) and still.dtype == np.float32
    assert 0.0 <= still.min() and still.max() <= 1.0
    np.testing.assert_array_equal(still[0], still[-1])
    assert textured_fraction(still[0]) >= 0.75
    moving = photo_frames(np.random.default_rng(4), 32, 6, pan=1.0)
    np.testing.assert_array_equal(moving, photo_frames(np.random.default_rng(4), 32, 6, pan=1.0))
    assert np.abs(moving[0] - moving[-1]).mean() > 0.01
    frames, _ = render_demo_clip("move_right", clip_rng(0, "train", 0),
                                 DemoConfig.tiny(background="photo"))
    assert frames.shape == (16, 32, 32, 3)
