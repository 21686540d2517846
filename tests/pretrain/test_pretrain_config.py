"""Shipped pretraining configs load, validate and carry the recipes they claim."""
from __future__ import annotations

from pathlib import Path

import pytest

from pretrain.config import PretrainConfig
from runtime.config import format_help, load_config
from tests.pretrain.helpers import DEMO_CONFIG

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "pretrain").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_load_and_validate(path):
    cfg = load_config(PretrainConfig, path)
    assert cfg.data.mask_type == "tube" and cfg.data.mask_ratio == 0.9
    assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.weight_decay == 0.05


def test_vit_base_k400_is_the_official_recipe():
    cfg = load_config(PretrainConfig, CONFIGS[[p.stem for p in CONFIGS].index("vit_base_k400")])
    assert (cfg.model.size, cfg.model.img_size, cfg.model.num_frames, cfg.data.sampling_rate) == (
        "base", 224, 16, 4)
    assert (cfg.optim.base_lr, cfg.optim.min_lr, cfg.optim.warmup_epochs, cfg.optim.epochs) == (
        1.5e-4, 1e-5, 40, 800)
    assert cfg.data.batch_size == 32 and cfg.data.flip is False
    assert cfg.model.norm_target == "patch_channel"


def test_every_field_has_help():
    text = format_help(PretrainConfig)
    for name in ("optim.base_lr", "engine.zero_stage", "checkpoint.resume", "log.vis_every_steps",
                 "max_steps", "data.mask_ratio", "model.decoder_depth"):
        assert name in text


def test_model_and_data_settings_must_agree():
    with pytest.raises(ValueError, match="num_frames"):
        load_config(PretrainConfig, DEMO_CONFIG, ["model.num_frames=16"])
    with pytest.raises(ValueError, match="decoder masking"):
        load_config(PretrainConfig, DEMO_CONFIG, ["data.decoder_mask_type=running_cell"])
    ok = load_config(PretrainConfig, DEMO_CONFIG, ["data.decoder_mask_type=running_cell",
                                                   "model.decoder_mask_ratio=0.5"])
    assert ok.model.decoder_mask_ratio == 0.5
