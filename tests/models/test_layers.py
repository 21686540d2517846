"""Tubelet embedding, patch layout, attention and block variants against direct references."""
from __future__ import annotations

import pytest
import torch

from models.layers import (Attention, Block, DividedBlock, TubeletEmbed, mix_time, patchify,
                           unpatchify)


def test_patchify_layout_is_t_h_w_tokens_with_channel_fastest():
    video = torch.randn(1, 2, 4, 8, 8)
    patches = patchify(video, tubelet=2, patch=4)
    assert patches.shape == (1, 2 * 2 * 2, 2 * 4 * 4 * 2)
    for t in range(2):
        for h in range(2):
            for w in range(2):
                n = t * 4 + h * 2 + w
                for dt in range(2):
                    for dy in range(4):
                        for dx in range(4):
                            for c in range(2):
                                j = ((dt * 4 + dy) * 4 + dx) * 2 + c
                                pixel = video[0, c, t * 2 + dt, h * 4 + dy, w * 4 + dx]
                                assert patches[0, n, j] == pixel
    torch.testing.assert_close(unpatchify(patches, (2, 2, 2), 2, 4), video)


def test_patch_projection_equals_conv3d():
    embed = TubeletEmbed(3, 24, patch_size=8, tubelet_size=2)
    video = torch.randn(2, 3, 4, 16, 16)
    torch.testing.assert_close(embed.embed_patches(patchify(video, 2, 8)), embed(video),
                               atol=1e-5, rtol=1e-5)


def test_attention_uses_q_and_v_bias_and_no_key_bias():
    torch.manual_seed(0)
    attn = Attention(16, num_heads=2)
    with torch.no_grad():
        attn.q_bias.normal_()
        attn.v_bias.normal_()
    x = torch.randn(3, 5, 16)
    w_q, w_k, w_v = attn.qkv.weight.chunk(3)
    q = (x @ w_q.T + attn.q_bias).reshape(3, 5, 2, 8).transpose(1, 2)
    k = (x @ w_k.T).reshape(3, 5, 2, 8).transpose(1, 2)
    v = (x @ w_v.T + attn.v_bias).reshape(3, 5, 2, 8).transpose(1, 2)
    weights = torch.softmax(q @ k.transpose(-1, -2) * 8 ** -0.5, dim=-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(3, 5, 16))
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)
    assert set(dict(attn.named_parameters())) == {"qkv.weight", "q_bias", "v_bias", "proj.weight",
                                                  "proj.bias"}


def test_mix_time_takes_channels_from_neighbouring_slices():
    b, t, heads, s, d, fold = 2, 3, 2, 4, 16, 2
    kv = torch.randn(2, b * t, heads, s, d)
    mixed = mix_time(kv, t, fold).reshape(2, b, t, heads, s, d)
    x = kv.reshape(2, b, t, heads, s, d)
    torch.testing.assert_close(mixed[..., 2 * fold:], x[..., 2 * fold:])
    torch.testing.assert_close(mixed[:, :, 1:, ..., :fold], x[:, :, :-1, ..., :fold])
    torch.testing.assert_close(mixed[:, :, :-1, ..., fold:2 * fold],
                               x[:, :, 1:, ..., fold:2 * fold])
    assert (mixed[:, :, 0, ..., :fold] == 0).all()
    assert (mixed[:, :, -1, ..., fold:2 * fold] == 0).all()


def _copy_weights(dst, src):
    dst.load_state_dict(src.state_dict(), strict=False)
    return dst


def test_space_only_block_equals_joint_block_per_slice():
    torch.manual_seed(0)
    joint = Block(16, 2, attention="joint")
    space = _copy_weights(Block(16, 2, attention="space_only"), joint)
    x = torch.randn(2, 3 * 4, 16)  # T' = 3 slices of 4 tokens
    per_slice = torch.cat([joint(x[:, i * 4:(i + 1) * 4], 1) for i in range(3)], dim=1)
    torch.testing.assert_close(space(x, 3), per_slice, atol=1e-5, rtol=1e-5)


def test_mixing_block_sees_only_neighbouring_slices():
    torch.manual_seed(0)
    block = Block(32, 2, attention="mixing").eval()
    x = torch.randn(1, 5 * 4, 32)
    base = block(x, 5)[:, :4]  # outputs of slice 0
    far = x.clone()
    far[:, 2 * 4:3 * 4] += torch.randn(1, 4, 32)  # slice 2: outside slice 0's window
    near = x.clone()
    near[:, 4:8] += torch.randn(1, 4, 32)  # slice 1: inside the window
    torch.testing.assert_close(block(far, 5)[:, :4], base)
    assert not torch.allclose(block(near, 5)[:, :4], base)


def test_divided_block_with_zero_temporal_fc_is_a_space_only_block():
    torch.manual_seed(0)
    divided = DividedBlock(16, 2)
    space = _copy_weights(Block(16, 2, attention="space_only"), divided)
    x = torch.randn(2, 3 * 4, 16)
    torch.testing.assert_close(divided(x, 3), space(x, 3))
    with torch.no_grad():
        divided.temporal_fc.weight.normal_()
    assert not torch.allclose(divided(x, 3), space(x, 3))


@pytest.mark.parametrize("attention", ["joint", "space_only", "mixing"])
def test_layer_scale_parameters_use_official_names(attention):
    block = Block(16, 2, init_values=0.1, attention=attention)
    assert torch.equal(block.gamma_1, torch.full((16,), 0.1))
    assert "gamma_2" in dict(block.named_parameters())
