"""Sanity checks that the pretraining objective can be learnt, measured against the trivial
solution: predicting zeros, i.e. each patch's mean for a normalised target."""
from __future__ import annotations

import pytest
import torch

from data_tools.config import DataConfig
from data_tools.masking import build_mask_generator
from models import ModelConfig, VideoMAEPretrain
from pretrain.train import pretrain_step
from runtime.dist import init_distributed
from runtime.engine import EngineConfig, create_engine
from runtime.optim import OptimConfig


def _smooth_clips(cfg: ModelConfig, batch: int, seed: int) -> torch.Tensor:
    """Normalised clips with spatial structure inside each patch (random noise blurred 3x3)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, cfg.num_frames, cfg.img_size + 2, cfg.img_size + 2, generator=gen)
    return torch.nn.functional.avg_pool3d(x, (1, 3, 3), stride=1)


def _tube_masks(cfg: ModelConfig, batch: int, ratio: float, seed: int) -> torch.Tensor:
    generator = build_mask_generator("tube", cfg.grid, ratio)
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([generator(gen) for _ in range(batch)])


def test_model_loss_and_optimizer_overfit_one_batch_far_below_the_trivial_loss():
    """Model + loss + optimizer can learn: 300 AdamW steps on one fixed batch take the loss
    from above the predict-the-mean level to well below it."""
    torch.manual_seed(0)
    cfg = ModelConfig(size="micro", img_size=32, patch_size=8, num_frames=4, tubelet_size=1)
    model = VideoMAEPretrain(cfg)
    x, mask = _smooth_clips(cfg, 4, seed=0), _tube_masks(cfg, 4, 0.75, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    losses = []
    for _ in range(300):
        loss, _, target = model(x, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    trivial = target.pow(2).mean().item()
    assert 0.9 < trivial <= 63 / 64 + 1e-6  # unbiased per-patch-channel std: (n - 1) / n, n = 64
    assert losses[0] > trivial  # a fresh decoder predicts noise
    assert losses[-1] < 0.7 * trivial, (losses[0], losses[-1], trivial)


@pytest.fixture(scope="module")
def process_group():
    """The single-process group the engine needs (kept: DeepSpeed caches it, so later tests
    in this worker reuse it, as tests/runtime/test_engine.py does)."""
    init_distributed()


def test_a_zero_prediction_scores_exactly_the_logged_zero_pred_loss(tmp_path, process_group):
    """``pretrain_step`` logs ``zero_pred_loss`` as the loss of predicting zeros: a model whose
    decoder head outputs exact zeros gets that loss, to the last bit."""
    torch.manual_seed(0)
    cfg = ModelConfig(size="micro", img_size=32, patch_size=8, num_frames=4, tubelet_size=1)
    model = VideoMAEPretrain(cfg)
    torch.nn.init.zeros_(model.decoder.head.weight)
    torch.nn.init.zeros_(model.decoder.head.bias)
    engine = create_engine(model, EngineConfig(precision="fp32", zero_stage=0),
                           OptimConfig(base_lr=1e-3, warmup_epochs=0, epochs=1), 4, 1, tmp_path, 1)
    batch = {"video": _smooth_clips(cfg, 4, seed=1), "mask": _tube_masks(cfg, 4, 0.9, seed=1)}
    loss, zero_loss = pretrain_step(engine, batch, DataConfig())  # float: as is
    assert zero_loss > 0.5
    assert loss == zero_loss
