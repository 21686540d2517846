import numpy as np
import pytest

from data_tools.sampling import (dense_indices, dense_span, multi_view_indices,
                                 segment_indices, train_indices)


def test_dense_clip_has_fixed_stride_and_random_start():
    rng = np.random.default_rng(0)
    starts = set()
    for _ in range(200):
        idx = dense_indices(100, 16, 4, rng)
        assert len(idx) == 16 and np.all(np.diff(idx) == 4)
        assert 0 <= idx[0] and idx[-1] <= 99
        starts.add(int(idx[0]))
    # every start in [0, 100 - 61] is possible; 200 draws hit both ends' neighbourhoods
    assert min(starts) <= 3 and max(starts) >= 36 and max(starts) <= 100 - dense_span(16, 4)


def test_dense_clip_on_short_video_clamps_to_last_frame():
    idx = dense_indices(30, 16, 4, np.random.default_rng(0))
    assert idx[0] == 0 and len(idx) == 16
    np.testing.assert_array_equal(idx[:8], np.arange(0, 32, 4)[:8])
    assert np.all(idx[8:] == 29)


def test_dense_without_rng_is_centred():
    idx = dense_indices(101, 16, 4)
    assert idx[0] == (101 - 61) // 2


def test_segment_sampling_takes_one_frame_per_segment():
    rng = np.random.default_rng(0)
    for _ in range(50):
        idx = segment_indices(64, 16, rng)
        assert len(idx) == 16
        np.testing.assert_array_equal(idx // 4, np.arange(16))
    middle = segment_indices(64, 16)
    np.testing.assert_array_equal(middle, np.arange(16) * 4 + 2)


def test_segment_sampling_on_short_video_repeats_frames():
    idx = segment_indices(5, 16, np.random.default_rng(0))
    assert len(idx) == 16 and idx.min() >= 0 and idx.max() <= 4
    assert np.all(np.diff(idx) >= 0) and len(set(idx.tolist())) == 5


def test_dense_test_views_are_evenly_spaced_over_the_video():
    views = multi_view_indices(200, 16, 4, 5)
    starts = [int(v[0]) for v in views]
    assert starts[0] == 0 and starts[-1] == 200 - 61
    assert np.ptp(np.diff(starts)) <= 1
    assert all(np.all(np.diff(v) == 4) for v in views)
    assert [int(v[0]) for v in multi_view_indices(200, 16, 4, 1)] == [(200 - 61) // 2]


def test_segment_test_views_interleave():
    views = multi_view_indices(64, 8, 0, 2, sampling="segment")
    a, b = views
    assert np.all(a < b) and np.all(b < np.append(a[1:], 64))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown sampling"):
        train_indices(10, 4, 1, "uniform", np.random.default_rng(0))
    with pytest.raises(ValueError, match="0 frames"):
        dense_indices(0, 4, 1)
