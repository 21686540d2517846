"""Position tables: the VideoMAE sinusoid, separable tables, grid-aware resizing."""
from __future__ import annotations

import pytest
import torch
from transformers.models.videomae.modeling_videomae import get_sinusoid_encoding_table

from models.pos_embed import (PositionEmbedding, resize_full_table, resize_spatial, resize_temporal,
                              sincos_1d_table)


def test_sincos_1d_matches_videomae_table():
    ours = sincos_1d_table(392, 96)
    reference = get_sinusoid_encoding_table(392, 96)  # the original numpy formula, as kept by HF
    assert ours.shape == (1, 392, 96)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)


def test_sincos_1d_is_a_buffer_not_in_state_dict():
    pos = PositionEmbedding("sincos_1d", (2, 3, 3), 16)
    assert list(pos.parameters()) == [] and pos.state_dict() == {}


def test_separable_table_is_temporal_plus_spatial():
    pos = PositionEmbedding("separable_learned", (3, 2, 2), 8)
    table = pos().reshape(3, 4, 8)
    for t in range(3):
        for s in range(4):
            torch.testing.assert_close(table[t, s], pos.temporal[0, t] + pos.spatial[0, s])
    assert set(dict(pos.named_parameters())) == {"spatial", "temporal"}


def _slice_constant_table(values, hw):
    """(1, T*H*W, D) table whose slice t is the constant values[t] everywhere."""
    t = len(values)
    table = torch.tensor(values, dtype=torch.float32)[:, None, None].expand(t, hw, 4)
    return table.reshape(1, -1, 4)


def test_spatial_resize_stays_within_each_time_slice():
    table = _slice_constant_table([1.0, 5.0, 9.0], 4)  # grid 3 x 2 x 2
    resized = resize_full_table(table, (3, 2, 2), (3, 4, 4)).reshape(3, 16, 4)
    # interpolating the flattened index would blend neighbouring slices; per-slice resizing cannot
    for t, value in enumerate([1.0, 5.0, 9.0]):
        torch.testing.assert_close(resized[t], torch.full((16, 4), value))


def test_temporal_resize_keeps_each_spatial_pattern():
    spatial = torch.randn(1, 9, 4)
    table = spatial.expand(2, 9, 4).reshape(1, 18, 4)  # same spatial pattern in both slices
    resized = resize_full_table(table, (2, 3, 3), (5, 3, 3)).reshape(5, 9, 4)
    for t in range(5):
        torch.testing.assert_close(resized[t], spatial[0])


def test_resize_full_table_composes_spatial_and_temporal():
    table = torch.randn(1, 2 * 3 * 3, 6)
    resized = resize_full_table(table, (2, 3, 3), (4, 5, 5))
    per_slice = resize_spatial(table.reshape(2, 9, 6), (3, 3), (5, 5))
    expected = resize_temporal(per_slice.transpose(0, 1), 2, 4).transpose(0, 1).reshape(1, -1, 6)
    torch.testing.assert_close(resized, expected)
    assert resized.shape == (1, 4 * 25, 6)
    with pytest.raises(ValueError, match="not 3x3x3"):
        resize_full_table(table, (3, 3, 3), (4, 5, 5))


def test_source_grid_builds_the_table_there_and_resizes():
    default = PositionEmbedding("sincos_1d", (4, 4, 4), 16)
    from_source = PositionEmbedding("sincos_1d", (4, 4, 4), 16, source_grid=(2, 2, 2))
    expected = resize_full_table(sincos_1d_table(8, 16), (2, 2, 2), (4, 4, 4))
    torch.testing.assert_close(from_source(), expected)
    assert not torch.allclose(default(), from_source())
    same = PositionEmbedding("sincos_1d", (4, 4, 4), 16, source_grid=(4, 4, 4))
    torch.testing.assert_close(same(), default())
