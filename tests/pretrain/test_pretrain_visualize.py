"""pretrain.visualize: token masks mapped to pixels, and the figures written as PNG."""
from __future__ import annotations

import torch

from pretrain.visualize import save_loss_curve, save_reconstruction_grid, token_mask_to_pixels
from runtime.logging import RunLogger


def test_token_mask_covers_its_tubelet_only():
    grid, tubelet, patch = (2, 3, 4), 2, 5
    mask = torch.zeros(1, 24, dtype=torch.bool)
    t, h, w = 1, 2, 3
    mask[0, t * 12 + h * 4 + w] = True  # token order (t, h, w)
    pixels = token_mask_to_pixels(mask, grid, tubelet, patch)
    assert pixels.shape == (1, 4, 15, 20)
    expected = torch.zeros_like(pixels)
    expected[0, 2:4, 10:15, 15:20] = True
    assert torch.equal(pixels, expected)


def test_figures_are_png(tmp_path):
    video = torch.randn(2, 3, 4, 16, 16)
    mask = torch.rand(2, 2 * 2 * 2) > 0.5
    path = save_reconstruction_grid(video, mask, video, tmp_path / "grid.png", (2, 2, 2), 2, 8,
                                    (0.5, 0.5, 0.5), (0.2, 0.2, 0.2), target=video)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with RunLogger(tmp_path, enabled=True, tensorboard=False) as log:
        for step in range(1, 4):
            log.log(step, loss=1.0 / step, lr=1e-3)
    curve = save_loss_curve(tmp_path / "metrics.jsonl", tmp_path / "curve.png")
    assert curve.read_bytes()[:4] == b"\x89PNG"
