"""ModelConfig presets and validation errors."""
from __future__ import annotations

import pytest

from models import ModelConfig, VideoViT, create_model
from models.config import SIZES
from models.vit import MODEL_REGISTRY


@pytest.mark.parametrize("size, width, depth, heads, dec_width", [
    ("small", 384, 12, 6, 192), ("base", 768, 12, 12, 384), ("large", 1024, 24, 16, 512),
    ("huge", 1280, 32, 16, 640), ("giant", 1408, 40, 16, 512)])
def test_size_presets_match_videomae(size, width, depth, heads, dec_width):
    cfg = ModelConfig(size=size)
    assert cfg.encoder_dims()[:3] == (width, depth, heads)
    assert cfg.decoder_dims().embed_dim == dec_width
    assert cfg.decoder_dims().depth == 4


def test_explicit_dims_override_preset():
    cfg = ModelConfig(size="base", depth=6, decoder_embed_dim=256)
    assert cfg.encoder_dims()[:3] == (768, 6, 12)
    assert cfg.decoder_dims().embed_dim == 256


def test_derived_grid_and_tokens():
    cfg = ModelConfig()
    assert cfg.grid == (8, 14, 14) and cfg.num_tokens == 1568 and cfg.patch_dim == 1536


@pytest.mark.parametrize("overrides, message", [
    ({"num_frames": 15}, "num_frames=15 is not divisible by model.tubelet_size=2"),
    ({"img_size": 100}, "img_size=100 is not divisible by model.patch_size=16"),
    ({"attention": "strided"}, "model.attention='strided' is unknown"),
    ({"window_size": [2, 7]}, "window_size must be 3 positive ints [Tw, M, M], got [2, 7]"),
    ({"pos_embed": "rope"}, "model.pos_embed='rope' is unknown"),
    ({"norm_target": "zca"}, "model.norm_target='zca' is unknown"),
    ({"size": "enormous"}, "model.size='enormous' is unknown"),
    ({"size": "custom"}, "needs positive model.embed_dim"),
    ({"size": "custom", "embed_dim": 64, "depth": 2, "num_heads": 5},
     "embed_dim=64 is not divisible by model.num_heads=5"),
    ({"size": "micro", "num_heads": 16, "attention": "mixing"}, "head width 4 must be >= 8"),
    ({"drop_path_rate": 1.0}, "drop_path_rate must be in [0, 1)"),
    ({"pixel_mean": [0.5]}, "pixel_mean has 1 values but model.in_chans=3"),
    ({"pos_embed_grid": [8, 14]}, "pos_embed_grid must be empty or 3 positive ints"),
])
def test_validate_names_the_problem(overrides, message):
    with pytest.raises(ValueError) as err:
        ModelConfig(**overrides).validate()
    assert message in str(err.value)


def test_model_construction_validates(tiny_cfg):
    with pytest.raises(ValueError, match="not divisible by model.tubelet_size"):
        VideoViT(tiny_cfg(num_frames=5))


def test_registry_builds_named_factories():
    expected = {"vit_base_patch16_224", "vit_giant_patch14_224",
                "pretrain_videomae_base_patch16_224"}
    assert expected <= set(MODEL_REGISTRY)
    model = create_model("vit_micro_patch16", img_size=32, num_frames=4, num_classes=3)
    assert isinstance(model, VideoViT) and model.head.out_features == 3
    assert set(SIZES) >= {"tiny", "small", "base", "large", "huge", "giant"}
    with pytest.raises(ValueError, match="unknown model 'vit_nope'"):
        create_model("vit_nope")
