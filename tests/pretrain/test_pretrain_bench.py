"""bench/pretrain.py: the analytic FLOP count against torch's FLOP counter and the anchors."""
from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bench.common import tube_masks
from bench.pretrain import pretrain_flops
from models import ModelConfig, VideoMAEPretrain


def test_flop_formula_matches_torch_flop_counter():
    cfg = ModelConfig(size="micro", img_size=32, patch_size=8, num_frames=8)
    model = VideoMAEPretrain(cfg)
    mask = tube_masks(2, cfg.grid, 0.75)
    visible = int((~mask[0]).sum())
    # The math attention kernel runs as bmm calls, which the counter sees.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randn(2, 3, 8, 32, 32), mask)
    analytic = pretrain_flops(cfg, visible, cfg.num_tokens - visible)
    assert counter.get_total_flops() / 2 == pytest.approx(analytic["forward"], rel=1e-6)


def test_vit_b_counts_match_the_published_anchor():
    parts = pretrain_flops(ModelConfig(size="base"), num_visible=160, num_predict=1408)
    assert parts["encoder"] / 1e9 == pytest.approx(28, rel=0.03)
    assert parts["decoder"] / 1e9 == pytest.approx(37, rel=0.06)
    assert parts["step"] == 3 * parts["forward"]
