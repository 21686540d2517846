"""VideoViT: shapes, masking rules, attention types, training, optimiser helpers."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import VideoMAEPretrain, VideoViT
from models.attention_blocks import NEEDS_FULL_GRID
from models.config import ATTENTION_TYPES

# the types that run on tube-masked tokens (the others: tests/models/test_attention_family.py)
MASKABLE = [a for a in ATTENTION_TYPES if a not in NEEDS_FULL_GRID]


@pytest.mark.parametrize("attention", MASKABLE)
def test_forward_shapes_full_and_tube_masked(attention, tiny_cfg, clip, tube_mask):
    cfg = tiny_cfg(attention=attention, num_classes=5)
    model = VideoViT(cfg).eval()
    x, mask = clip(cfg), tube_mask(cfg, hidden=1)
    assert model.forward_features(x).shape == (2, 8, 64)
    assert model.forward_features(x, mask).shape == (2, 6, 64)
    assert model(x).shape == model(x, mask).shape == (2, 5)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 64)


def test_masked_embedding_equals_full_embedding_gathered(tiny_cfg, clip, tube_mask):
    cfg = tiny_cfg(pos_embed="separable_learned")
    model = VideoViT(cfg).eval()
    x, mask = clip(cfg), tube_mask(cfg, hidden=2)
    full = model.patch_embed(x) + model.pos_embed()
    expected = model.forward_tokens(full[~mask].reshape(2, -1, 64))
    torch.testing.assert_close(model.forward_features(x, mask), expected, atol=1e-5, rtol=1e-5)


def test_return_grid_is_b_c_t_h_w(tiny_cfg, clip):
    cfg = tiny_cfg(img_size=48)  # grid 2 x 3 x 3
    model = VideoViT(cfg).eval()
    x = clip(cfg)
    tokens, grid = model.forward_features(x), model.forward_features(x, return_grid=True)
    assert grid.shape == (2, 64, 2, 3, 3)
    t, h, w = 1, 2, 0
    torch.testing.assert_close(grid[:, :, t, h, w], tokens[:, t * 9 + h * 3 + w])
    with pytest.raises(ValueError, match="without a mask"):
        model.forward_features(x, torch.zeros(2, 18, dtype=torch.bool), return_grid=True)


def test_joint_accepts_any_mask_with_equal_counts(tiny_cfg, clip):
    cfg = tiny_cfg()
    mask = torch.tensor([[1, 0, 0, 0, 0, 1, 1, 0], [0, 1, 1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    assert VideoViT(cfg)(clip(cfg), mask).shape == (2, 64)


@pytest.mark.parametrize("attention", ["divided", "space_only", "mixing"])
def test_factorised_attention_rejects_non_tube_masks(attention, tiny_cfg, clip):
    cfg = tiny_cfg(attention=attention)
    # slice 0 hides 0, slice 1 hides 1
    mask = torch.tensor([[1, 0, 0, 0, 0, 1, 0, 0]] * 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="needs a tube mask"):
        VideoViT(cfg)(clip(cfg), mask)


def test_bad_inputs_get_clear_errors(tiny_cfg, clip):
    cfg = tiny_cfg()
    model = VideoViT(cfg)
    x = clip(cfg)
    unequal = torch.zeros(2, 8, dtype=torch.bool)
    unequal[0, :2] = True
    with pytest.raises(ValueError, match=r"same number of visible tokens, got \[6, 8\]"):
        model(x, unequal)
    with pytest.raises(ValueError, match=r"mask must be a bool tensor \(B, 8\)"):
        model(x, torch.zeros(2, 8))
    with pytest.raises(ValueError, match=r"expected video .* = \(B, 3, 4, 32, 32\)"):
        model(torch.randn(2, 3, 6, 32, 32))
    with pytest.raises(ValueError, match="hides every token"):
        model(x, torch.ones(2, 8, dtype=torch.bool))


@pytest.mark.parametrize("attention", ATTENTION_TYPES)
def test_every_attention_type_trains_on_full_grids(attention, tiny_cfg, clip, train):
    torch.manual_seed(0)
    cfg = tiny_cfg(attention=attention, num_classes=4, drop_path_rate=0.1)
    model = VideoViT(cfg).train()
    x, labels = clip(cfg, batch=4), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        model.head.weight.normal_(0, 0.02)  # the 0.001-scaled init barely moves in 12 steps
    losses = train(model, lambda: F.cross_entropy(model(x), labels))
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("attention", MASKABLE)
def test_every_attention_type_pretrains_on_tube_masked_tokens(attention, tiny_cfg, clip, tube_mask,
                                                               train):
    torch.manual_seed(0)
    cfg = tiny_cfg(attention=attention)
    model = VideoMAEPretrain(cfg).train()
    x, mask = clip(cfg, batch=2), tube_mask(cfg, hidden=2)
    losses = train(model, lambda: model(x, mask)[0])
    assert losses[-1] < 0.8 * losses[0], losses


def test_grad_checkpointing_gives_the_same_gradients(tiny_cfg, clip, tube_mask):
    cfg = tiny_cfg(attention="divided")
    plain = VideoViT(cfg)
    ckpt = VideoViT(tiny_cfg(attention="divided", grad_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    x, mask = clip(cfg), tube_mask(cfg)
    for model in (plain, ckpt):
        model(x, mask).square().sum().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_layer_ids_and_weight_decay_exclusions(tiny_cfg):
    model = VideoViT(tiny_cfg(num_classes=3, pos_embed="separable_learned"))
    assert model.num_layers() == 4
    ids = {name: model.get_layer_id(name) for name, _ in model.named_parameters()}
    assert ids["patch_embed.proj.weight"] == 0 and ids["pos_embed.spatial"] == 0
    assert ids["blocks.0.attn.qkv.weight"] == 1 and ids["blocks.1.mlp.fc2.bias"] == 2
    assert ids["fc_norm.weight"] == 3 and ids["head.weight"] == 3
    assert model.get_layer_id("encoder.blocks.1.norm1.weight") == 2
    assert model.no_weight_decay() == {"pos_embed.spatial", "pos_embed.temporal"}
    assert VideoViT(tiny_cfg()).no_weight_decay() == set()


def test_final_norm_layouts(tiny_cfg):
    with_head = VideoViT(tiny_cfg(num_classes=3))
    without = VideoViT(tiny_cfg())
    forced = VideoViT(tiny_cfg(final_norm="fc_norm"))
    assert "fc_norm.weight" in with_head.state_dict()
    assert "norm.weight" not in with_head.state_dict()
    assert "norm.weight" in without.state_dict() and "fc_norm.weight" not in without.state_dict()
    assert "fc_norm.weight" in forced.state_dict() and "head.weight" not in forced.state_dict()
    # trunc-normal .02 scaled by 0.001
    assert 0 < abs(with_head.head.weight).max() < 0.001 * 0.02 * 6


@pytest.mark.parametrize("pos_embed", ["sincos_1d", "separable_sincos", "separable_learned"])
def test_space_only_cannot_tell_frame_order_but_joint_can(pos_embed, tiny_cfg, clip):
    """space_only has no temporal position code (as TimeSformer's space-only model): with
    mean pooling its logits do not change when the time slices are shuffled. joint (with its
    time code and attention across slices) does change."""
    x = clip(tiny_cfg(tubelet_size=1), batch=2)
    shuffled = x[:, :, [2, 0, 3, 1]]
    for attention, invariant in (("space_only", True), ("joint", False)):
        torch.manual_seed(0)
        model = VideoViT(tiny_cfg(tubelet_size=1, attention=attention, pos_embed=pos_embed,
                                  num_classes=3)).eval()
        torch.nn.init.normal_(model.head.weight)  # the default head is near zero
        with torch.no_grad():
            logits, logits_shuffled = model(x), model(shuffled)
        assert logits.abs().mean() > 0.1
        same = torch.allclose(logits, logits_shuffled, atol=1e-4)
        assert same == invariant, (attention, pos_embed)
    assert "pos_embed.temporal" not in VideoViT(tiny_cfg(
        attention="space_only", pos_embed=pos_embed)).state_dict()
