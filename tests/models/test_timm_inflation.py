"""Initialising the video encoder from a timm image ViT (I3D inflation).

Compared features: for a clip made of one image repeated over all frames, every time slice of
the video encoder's ``forward_features`` tokens (after its final norm) must equal timm's
``forward_features`` patch tokens on the image, and the logits must equal timm's logits, in
float32 to ``|a - b| <= 1e-5 + 1e-5 * |b|`` (un-normalised tokens of these random-weight
models reach magnitudes of ~10, where float32 rounding alone is ~1e-6).
"""
from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from models import VideoViT, load_encoder_weights
from models.timm_inflate import inflate_timm

ATOL = RTOL = 1e-5


def random_timm_vit(**kwargs) -> VisionTransformer:
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=16, embed_dim=64, depth=2, num_heads=4,
                            num_classes=7, **kwargs)
    with torch.no_grad():
        for param in vit.parameters():
            param.normal_(0, 0.2)
    return vit.eval()


@pytest.mark.parametrize("attention", ["joint", "space_only", "divided"])
@pytest.mark.parametrize("layout", ["fc_norm", "norm"])
def test_static_clip_gives_the_image_features(attention, layout, tiny_cfg):
    # no class token: with one, timm's patch tokens would also attend to it
    vit = random_timm_vit(class_token=False, global_pool="avg", fc_norm=layout == "fc_norm")
    cfg = tiny_cfg(attention=attention, pos_embed="separable_learned", num_classes=7,
                   final_norm=layout)
    video_model = VideoViT(cfg).eval()
    report = load_encoder_weights(video_model, vit.state_dict())
    assert any("inflated patch_embed" in note for note in report.notes)
    image = torch.randn(2, 3, 32, 32)
    clip = image[:, :, None].expand(-1, -1, cfg.num_frames, -1, -1)
    with torch.no_grad():
        image_tokens = vit.forward_features(image)  # (B, H'W', D), after timm's final norm
        video_tokens = video_model.forward_features(clip).reshape(2, cfg.grid[0], -1, 64)
        for t in range(cfg.grid[0]):
            torch.testing.assert_close(video_tokens[:, t], image_tokens, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(video_model(clip), vit(image), atol=ATOL, rtol=RTOL)


def test_inflation_of_kernel_bias_and_prefix_tokens():
    vit = random_timm_vit(class_token=True, global_pool="token", init_values=0.1)
    state = vit.state_dict()
    out, notes = inflate_timm(state, grid=(2, 2, 2), tubelet=2)
    kernel = out["patch_embed.proj.weight"]
    assert kernel.shape == (64, 3, 2, 16, 16)
    torch.testing.assert_close(kernel.sum(2), state["patch_embed.proj.weight"])
    # class slot dropped
    torch.testing.assert_close(out["pos_embed.spatial"], state["pos_embed"][:, 1:])
    assert torch.equal(out["pos_embed.temporal"], torch.zeros(1, 2, 64))
    torch.testing.assert_close(out["blocks.0.attn.q_bias"], state["blocks.0.attn.qkv.bias"][:64])
    torch.testing.assert_close(out["blocks.0.attn.v_bias"], state["blocks.0.attn.qkv.bias"][128:])
    torch.testing.assert_close(out["blocks.1.gamma_2"], state["blocks.1.ls2.gamma"])
    assert "cls_token" not in out and any("dropped cls_token" in n for n in notes)


def test_inflating_into_a_fixed_table_model_fails_strictly_with_a_hint(tiny_cfg):
    vit = random_timm_vit(class_token=False, global_pool="avg")
    model = VideoViT(tiny_cfg(num_classes=7))  # sincos_1d has nowhere to put timm's learned table
    with pytest.raises(ValueError, match="pos_embed='separable_learned'"):
        load_encoder_weights(model, vit.state_dict())
    report = load_encoder_weights(model, vit.state_dict(), strict=False)
    assert report.unexpected == ["pos_embed.spatial", "pos_embed.temporal"]
