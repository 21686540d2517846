"""bench/attention.py: the forward FLOP formula of every attention type against torch's FLOP
counter, and how each type's cost grows with the number of frames (formula, not timing)."""
from __future__ import annotations

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from models import ModelConfig, VideoViT
from models.config import ATTENTION_TYPES

FRAMES = (4, 8, 16, 32, 64)


def bench_cfg(attention: str, frames: int) -> ModelConfig:
    """bench/attention.py's default model: width 192, 3 heads, 2 blocks, 224 px, 10 classes."""
    return ModelConfig(size="custom", embed_dim=192, depth=2, num_heads=3, img_size=224,
                       num_frames=frames, attention=attention, num_classes=10)


@pytest.mark.parametrize("attention", ATTENTION_TYPES)
@pytest.mark.parametrize("img_size, frames, window", [
    (64, 8, [2, 7, 7]),   # grid 4 x 4 x 4: windows clipped to the grid
    (112, 6, [2, 4, 4]),  # grid 3 x 7 x 7: sparse and window groups padded
])
def test_formula_matches_torch_flop_counter(bench, attention, img_size, frames, window):
    cfg = ModelConfig(size="micro", img_size=img_size, num_frames=frames, attention=attention,
                      num_classes=3, window_size=window)
    model = VideoViT(cfg).eval()
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, frames, img_size, img_size))
    assert counter.get_total_flops() == pytest.approx(bench("attention").attention_flops(cfg),
                                                      rel=1e-9)


def doublings(bench, attention: str) -> list[float]:
    flops = [bench("attention").attention_flops(bench_cfg(attention, f)) for f in FRAMES]
    return [b / a for a, b in zip(flops, flops[1:])]


@pytest.mark.parametrize("attention", ["axial", "window", "divided", "mixing", "space_only"])
def test_factorised_and_windowed_cost_is_near_linear_in_frames(bench, attention):
    assert all(factor < 2.05 for factor in doublings(bench, attention)), doublings(bench, attention)


def test_joint_and_sparse_local_global_cost_is_quadratic_in_frames(bench):
    """Joint attention pairs every token with all N; TimeSformer's L+G pairs each with its
    T' x H'/2 x W'/2 local window and its stride-2 group (N/8): 3/8 of joint's pairs at every
    clip length, so it grows like joint, at a lower constant (not near-linearly)."""
    attention = bench("attention")
    for frames in FRAMES:
        cfg = bench_cfg("sparse_local_global", frames)
        steps, _ = attention.attention_steps(cfg, 0)
        pairs = sum(padded * group for padded, group in steps)
        assert pairs == 3 / 8 * cfg.num_tokens ** 2
    for kind in ("joint", "sparse_local_global"):
        factors = doublings(bench, kind)
        assert factors == sorted(factors) and factors[-1] > 2.7, (kind, factors)


def test_bench_quick_reports_flops_for_chosen_types(bench, tmp_path):
    out = tmp_path / "attention.json"
    bench("attention").main(["--quick", "--threads", "0", "--attention", "window",
                             "--img-size", "64", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["attention"], r["frames"]) for r in rows] == [("window", 4), ("window", 8)]
    expected = [bench("attention").attention_flops(
        ModelConfig(size="custom", embed_dim=192, depth=2, num_heads=3, img_size=64,
                    num_frames=f, attention="window", num_classes=10)) / 1e9 for f in (4, 8)]
    assert [r["gflops_fwd"] for r in rows] == pytest.approx(expected)
