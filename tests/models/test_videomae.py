"""VideoMAE pretraining model: targets, loss, decoder masking, reconstruction."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import VideoMAEPretrain
from runtime.constants import IMAGENET_MEAN, IMAGENET_STD


def _reference_patches(x, tubelet=2, patch=16):
    """Undo ImageNet normalisation and cut tubelets with explicit loops:
    (B, N, tubelet*patch*patch, C)."""
    mean = torch.tensor(IMAGENET_MEAN)[None, :, None, None, None]
    std = torch.tensor(IMAGENET_STD)[None, :, None, None, None]
    pixels = x * std + mean
    b, c, t, h, w = pixels.shape
    tokens = []
    for ti in range(t // tubelet):
        for hi in range(h // patch):
            for wi in range(w // patch):
                cube = pixels[:, :, ti * tubelet:(ti + 1) * tubelet, hi * patch:(hi + 1) * patch,
                              wi * patch:(wi + 1) * patch]
                tokens.append(cube.permute(0, 2, 3, 4, 1).reshape(b, -1, c))
    return torch.stack(tokens, dim=1)


@pytest.mark.parametrize("norm_target", ["patch_channel", "patch", "none"])
def test_target_matches_reference_on_masked_tokens(norm_target, tiny_cfg, clip, tube_mask):
    cfg = tiny_cfg(norm_target=norm_target)
    model = VideoMAEPretrain(cfg)
    x, mask = clip(cfg), tube_mask(cfg, hidden=2)
    loss, pred, target = model(x, mask)
    ref = _reference_patches(x)
    if norm_target == "patch_channel":  # VideoMAE: per patch and channel, unbiased std + 1e-6
        ref = (ref - ref.mean(2, keepdim=True)) / (ref.std(2, keepdim=True) + 1e-6)
    elif norm_target == "patch":  # MAE: whole patch, (var + 1e-6) ** .5
        flat = ref.flatten(2)
        flat = (flat - flat.mean(-1, keepdim=True)) / (flat.var(-1, keepdim=True) + 1e-6).sqrt()
        ref = flat.reshape(ref.shape)
    expected = ref.flatten(2)[mask].reshape(2, -1, cfg.patch_dim)
    assert pred.shape == target.shape == (2, 4, cfg.patch_dim)  # only the 2 x 2 masked tokens
    torch.testing.assert_close(target, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loss, F.mse_loss(pred, expected), atol=1e-5, rtol=1e-4)


def test_loss_ignores_visible_tokens_pixels(tiny_cfg, clip):
    cfg = tiny_cfg(attention="space_only", norm_target="none", depth=1)
    model = VideoMAEPretrain(cfg).eval()
    x = clip(cfg, batch=1)
    mask = torch.tensor([[True, False, False, False] * 2])  # hide spatial position 0 in both slices
    changed = x.clone()
    changed[:, :, :, :16, :16] += 1.0  # only the hidden tubelets' pixels
    loss_a, pred_a, _ = model(x, mask)
    loss_b, pred_b, _ = model(changed, mask)
    torch.testing.assert_close(pred_a, pred_b)  # predictions never see hidden pixels
    assert not torch.isclose(loss_a, loss_b)  # but the target does


def _running_cell_decoder_mask(cfg, batch):
    """VideoMAE V2 running cell at ratio 0.5: True = not reconstructed."""
    t, h, w = cfg.grid
    keep = torch.zeros(t, h, w, dtype=torch.bool)
    for ti in range(t):
        for hi in range(h):
            for wi in range(w):
                keep[ti, hi, wi] = ((hi % 2) * 2 + (wi % 2) + ti) % 4 < 2
    return (~keep).reshape(1, -1).expand(batch, -1).clone()


def test_decoder_masking_reconstructs_the_kept_subset(tiny_cfg, clip, tube_mask):
    cfg = tiny_cfg(decoder_mask_ratio=0.5)
    model = VideoMAEPretrain(cfg).eval()
    x, mask = clip(cfg), tube_mask(cfg, hidden=2)
    decoder_mask = _running_cell_decoder_mask(cfg, 2)
    loss, pred, target = model(x, mask, decoder_mask)
    assert pred.shape == (2, 4, cfg.patch_dim)  # half of the 8 tokens
    kept = ~decoder_mask
    per_token = (pred - target).pow(2).mean(-1)
    weight = mask[kept].reshape(2, -1).float()  # loss only where the encoder saw nothing
    torch.testing.assert_close(loss, (per_token * weight).sum() / weight.sum())
    # decoding exactly the masked tokens is the same as no decoder mask
    full = model(x, mask)[0]
    torch.testing.assert_close(model(x, mask, ~mask)[0], full)


def test_decoder_mask_errors(tiny_cfg, clip, tube_mask):
    cfg = tiny_cfg()
    model = VideoMAEPretrain(cfg)
    x, mask = clip(cfg), tube_mask(cfg)
    bad = torch.zeros(2, 8, dtype=torch.bool)
    bad[0, 0] = True
    with pytest.raises(ValueError, match=r"same, non-zero number of tokens, got \[7, 8\]"):
        model(x, mask, bad)
    with pytest.raises(ValueError, match="decoder_mask must be a bool tensor"):
        model(x, mask, torch.zeros(2, 8))


@pytest.mark.parametrize("norm_target", ["patch_channel", "none"])
def test_reconstruct_with_true_stats_keeps_visible_tubelets_and_fills_masked_ones(
        norm_target, tiny_cfg, clip, tube_mask):
    cfg = tiny_cfg(norm_target=norm_target)
    model = VideoMAEPretrain(cfg).eval()
    x, mask = clip(cfg), tube_mask(cfg, hidden=2)
    out, target = model.reconstruct(x, mask, stats="true")
    assert out.shape == target.shape == x.shape
    out_patches, in_patches = model.patchify(out), model.patchify(x)
    torch.testing.assert_close(out_patches[~mask], in_patches[~mask])
    # with the true statistics the target view is the clip itself
    torch.testing.assert_close(target, x, atol=1e-4, rtol=1e-4)
    _, pred, _ = model(x, mask)
    ref = _reference_patches(x)[mask].reshape(2, -1, cfg.patch_dim // 3, 3)
    pred = pred.reshape(ref.shape)
    if norm_target == "patch_channel":  # back to pixels with the true patch statistics
        pred = pred * (ref.std(2, keepdim=True) + 1e-6) + ref.mean(2, keepdim=True)
    pixels = (pred - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    filled = out_patches[mask].reshape(2, -1, cfg.patch_dim)
    torch.testing.assert_close(filled, pixels.flatten(2), atol=1e-4, rtol=1e-4)


def test_reconstruct_with_visible_stats_draws_a_zero_prediction_flat(tiny_cfg, clip, tube_mask):
    """The honest view: a model predicting zeros (one that learnt nothing) fills every hidden
    tubelet with one flat colour per clip - the visible tubelets' mean - while the target view
    keeps the hidden patches' structure; the true-statistics view would draw each hidden
    patch's own mean and look like a blurry reconstruction."""
    cfg = tiny_cfg()
    model = VideoMAEPretrain(cfg).eval()
    torch.nn.init.zeros_(model.decoder.head.weight)
    torch.nn.init.zeros_(model.decoder.head.bias)
    x, mask = clip(cfg), tube_mask(cfg, hidden=2)
    pred, target = model.reconstruct(x, mask)
    hidden_pred = model.patchify(pred)[mask].reshape(2, -1, cfg.patch_dim // 3, 3)
    visible = _reference_patches(x)[~mask].reshape(2, -1, cfg.patch_dim // 3, 3)
    colour = (visible.mean(2).mean(1) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(hidden_pred, colour[:, None, None, :].expand_as(hidden_pred),
                               atol=1e-5, rtol=1e-5)
    hidden_target = model.patchify(target)[mask].reshape(hidden_pred.shape)
    assert hidden_target.std(2).mean() > 0.1  # the target view shows structure
    true_view, _ = model.reconstruct(x, mask, stats="true")  # each hidden patch's own mean
    hidden = _reference_patches(x)[mask].reshape(hidden_pred.shape)
    own_mean = ((hidden.mean(2, keepdim=True) - torch.tensor(IMAGENET_MEAN))
                / torch.tensor(IMAGENET_STD))
    torch.testing.assert_close(model.patchify(true_view)[mask].reshape(hidden_pred.shape),
                               own_mean.expand_as(hidden_pred), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="stats"):
        model.reconstruct(x, mask, stats="oracle")


def test_pretrain_model_layout_and_no_weight_decay(tiny_cfg):
    model = VideoMAEPretrain(tiny_cfg(pos_embed="separable_learned"))
    keys = set(model.state_dict())
    assert {"encoder.patch_embed.proj.weight", "encoder.blocks.0.attn.q_bias",
            "encoder.norm.weight", "encoder_to_decoder.weight", "mask_token",
            "decoder.blocks.0.attn.qkv.weight", "decoder.norm.weight",
            "decoder.head.weight"} <= keys
    assert "encoder_to_decoder.bias" not in keys and "encoder.head.weight" not in keys
    assert model.no_weight_decay() == {"mask_token", "encoder.pos_embed.spatial",
                                       "encoder.pos_embed.temporal", "decoder_pos_embed.spatial",
                                       "decoder_pos_embed.temporal"}
    assert model.decoder.head.out_features == 2 * 16 * 16 * 3


def test_compiled_pretraining_step_has_one_graph_break_and_eager_numbers(tiny_cfg, clip, tube_mask):
    """The data-dependent index building (mask checks, nonzero) runs eagerly outside the
    compiled graph: one graph break for the whole forward instead of one per check."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cfg = tiny_cfg()
    video, mask = clip(cfg), tube_mask(cfg)
    torch.manual_seed(0)
    model = VideoMAEPretrain(cfg)
    loss_eager = model(video, mask)[0]
    loss_compiled = torch.compile(model, backend="eager")(video, mask)[0]
    assert sum(counters["graph_break"].values()) == 1
    torch.testing.assert_close(loss_compiled, loss_eager)
