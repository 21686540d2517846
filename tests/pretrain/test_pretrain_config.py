"""Shipped pretraining configs load, validate and carry the recipes they claim."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pretrain.config import PretrainConfig
from runtime.config import ConfigError, format_help, load_config, save_resolved_config
from tests.pretrain.helpers import DEMO_CONFIG

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "pretrain").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_load_and_validate(path):
    cfg = load_config(PretrainConfig, path)
    assert cfg.data.mask_type == "tube" and cfg.data.mask_ratio == 0.9
    assert cfg.data.token_grid == cfg.model.grid  # the geometry, stated under model: only
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


def geometry(data) -> tuple:
    return data.num_frames, data.input_size, data.patch_size, data.tubelet_size


def test_data_geometry_is_derived_from_the_model(tmp_path):
    assert "num_frames" not in yaml.safe_load(DEMO_CONFIG.read_text())["data"]
    cfg = load_config(PretrainConfig, DEMO_CONFIG)
    assert geometry(cfg.data) == (8, 48, 8, 1)
    saved = yaml.safe_load(save_resolved_config(cfg, tmp_path).read_text())["data"]
    assert [saved[key] for key in ("num_frames", "input_size", "patch_size", "tubelet_size")] \
        == [8, 48, 8, 1]
    assert load_config(PretrainConfig, tmp_path / "config.yaml") == cfg
    # a model override on the command line moves the derived values with it
    cfg = load_config(PretrainConfig, DEMO_CONFIG, ["model.num_frames=16", "model.img_size=32",
                                                    "model.patch_size=16", "model.tubelet_size=2"])
    assert geometry(cfg.data) == (16, 32, 16, 2)


def test_old_yaml_with_data_geometry_must_agree(tmp_path):
    raw = yaml.safe_load(DEMO_CONFIG.read_text())
    raw["data"].update(num_frames=8, input_size=48, patch_size=8, tubelet_size=1)
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump(raw))
    assert load_config(PretrainConfig, old) == load_config(PretrainConfig, DEMO_CONFIG)
    with pytest.raises(ConfigError, match="data.num_frames=8 disagrees with model.num_frames=16: "
                                          "remove data.num_frames"):
        load_config(PretrainConfig, old, ["model.num_frames=16"])
    with pytest.raises(ConfigError, match="data.input_size=32 disagrees with model.img_size=48"):
        load_config(PretrainConfig, DEMO_CONFIG, ["data.input_size=32"])


def test_model_and_data_settings_must_agree():
    with pytest.raises(ValueError, match="decoder masking"):
        load_config(PretrainConfig, DEMO_CONFIG, ["data.decoder_mask_type=running_cell"])
    ok = load_config(PretrainConfig, DEMO_CONFIG, ["data.decoder_mask_type=running_cell",
                                                   "model.decoder_mask_ratio=0.5"])
    assert ok.model.decoder_mask_ratio == 0.5


@pytest.mark.parametrize("attention", ["axial", "sparse_local_global", "window"])
def test_grid_only_attention_types_are_refused_for_pretraining_at_config_time(attention):
    with pytest.raises(ConfigError, match=f"attention='{attention}' cannot pretrain"):
        load_config(PretrainConfig, DEMO_CONFIG, [f"model.attention={attention}"])
