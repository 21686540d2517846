"""Sliding-window features: which frames each window sees, and where it sits in time."""
import pytest
import torch
from torch import nn

from data_tools.decode import open_video
from data_tools.video_io import write_mp4
from finetune.detection.features import FeatureGrid, sliding_window_features
from models import ModelConfig, build_encoder


class FrameLevelEncoder(nn.Module):
    """An encoder whose tokens are the frames' mean pixel value: features = the mean level
    of a window's frames, which identifies the frames it used."""

    def forward_features(self, x):
        return x.mean(dim=(1, 3, 4))[..., None]  # (B, T, 1)


def test_feature_grid_maps_steps_to_window_centres_and_back():
    grid = FeatureGrid.for_video(num_video_frames=20, fps=10.0, num_frames=4,
                                 sampling_rate=2, window_stride=3)
    # windows start at 0, 3, ..., 15 (the last reaches frame 19)
    assert (grid.span, grid.num_steps) == (7, 6)
    assert grid.to_seconds(torch.tensor([0.0, 1.0])).tolist() == pytest.approx([0.35, 0.65])
    assert grid.to_steps(grid.to_seconds(torch.tensor([2.5]))).item() == pytest.approx(2.5)
    assert grid.window_indices(5, 4, 2, 20) == [15, 17, 19, 19]
    short = FeatureGrid.for_video(num_video_frames=3, fps=10.0, num_frames=4,
                                  sampling_rate=2, window_stride=3)
    assert short.num_steps == 1
    with pytest.raises(ValueError, match=">= 1"):
        FeatureGrid.for_video(20, 10.0, 4, 0, 3)


def test_windows_see_the_right_frames():
    frames = torch.arange(20, dtype=torch.uint8)[:, None, None, None].expand(20, 8, 8, 3)
    frames = frames.contiguous()
    features, grid = sliding_window_features(FrameLevelEncoder(), frames, fps=10.0, num_frames=4,
                                             sampling_rate=2, window_stride=3, size=8,
                                             mean=(0, 0, 0), std=(1, 1, 1), batch_size=4)
    levels = (features[:, 0] * 255).tolist()
    assert levels == pytest.approx([3, 6, 9, 12, 15, (15 + 17 + 19 + 19) / 4], abs=1e-3)
    assert grid.num_steps == 6


def test_real_encoder_on_a_decoded_video_matches_the_frame_tensor():
    torch.manual_seed(0)
    encoder = build_encoder(ModelConfig(size="micro", img_size=32, patch_size=16, num_frames=4))
    # (decord 0.6 fails on width 48)
    frames = torch.randint(0, 255, (18, 40, 64, 3), dtype=torch.uint8)
    reader = open_video(write_mp4(frames.numpy(), 8.0))
    decoded = reader.get_frames(list(range(reader.num_frames)))
    from_reader, grid = sliding_window_features(encoder, reader, reader.fps, num_frames=4,
                                                window_stride=4, size=32, batch_size=3)
    from_tensor, _ = sliding_window_features(encoder, decoded, reader.fps, num_frames=4,
                                             window_stride=4, size=32, batch_size=5)
    assert from_reader.shape == (grid.num_steps, 64) == (5, 64)
    assert torch.allclose(from_reader, from_tensor, atol=1e-5)
    assert encoder.training is False
