"""axial, sparse_local_global and window attention (models.attention_blocks): shapes, what a
converted joint checkpoint computes, training, and the receptive field of one block."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.video.swin_transformer import ShiftedWindowAttention3d

from models import VideoViT, load_encoder_weights
from models.hf import export_hf
from models.attention_blocks import NEEDS_FULL_GRID, WindowBlock
from models.layers import build_block

FAMILY = ["axial", "sparse_local_global", "window"]


def coords(grid) -> torch.Tensor:
    """``(N, 3)`` (t, h, w) of every token in (t, h, w) order."""
    return torch.cartesian_prod(*(torch.arange(g) for g in grid)).reshape(-1, 3)


def same(keys: torch.Tensor) -> torch.Tensor:
    """``(N, N)`` bool: tokens i and j have equal ``keys (N, k)``."""
    return (keys[:, None, :] == keys[None, :, :]).all(-1)


# The patterns, stated directly on token coordinates (independent of the implementation's
# padding, rolls and region labels).
def axis_pattern(grid, axis: int) -> torch.Tensor:
    """Attention along ``axis`` (0 = t, 1 = h, 2 = w): the other two coordinates agree."""
    c = coords(grid)
    return same(c[:, [a for a in range(3) if a != axis]])


def local_pattern(grid) -> torch.Tensor:
    """sparse_local_global's local step: same T' x ceil(H'/2) x ceil(W'/2) window."""
    c = coords(grid)
    size = torch.tensor([grid[0], -(-grid[1] // 2), -(-grid[2] // 2)])
    return same(c // size)


def strided_pattern(grid) -> torch.Tensor:
    """sparse_local_global's global step: equal coordinates modulo 2."""
    return same(coords(grid) % 2)


def window_pattern(grid, window_size, index: int) -> torch.Tensor:
    """Video Swin: the same window of the grid partitioned every ``window`` tokens from the
    origin, or (odd blocks) from ``-window // 2`` without wrapping around; an axis no longer
    than its window is one window."""
    c = coords(grid)
    window = torch.tensor([min(g, s) for g, s in zip(grid, window_size)])
    shift = torch.tensor([s // 2 if index % 2 and g > s else 0
                          for g, s in zip(grid, window_size)])
    return same(torch.div(c - shift, window, rounding_mode="floor"))


def compose(*patterns: torch.Tensor) -> torch.Tensor:
    """Receptive field of residual steps applied right to left (each includes the token)."""
    out = patterns[-1].double()
    for pattern in reversed(patterns[:-1]):
        out = pattern.double() @ out
    return out > 0


def converted_pattern(attention: str, grid, window_size, index: int) -> torch.Tensor:
    """What a joint checkpoint converted into ``attention`` attends to in block ``index``."""
    if attention == "axial":
        return axis_pattern(grid, 1)  # height: same t and w
    if attention == "sparse_local_global":
        return strided_pattern(grid)
    return window_pattern(grid, window_size, index)


def randomise(model: torch.nn.Module, std: float = 0.2) -> torch.nn.Module:
    """Every parameter random (biases, q/v biases and zero-initialised projections too)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim > 1:
                param.normal_(0, std)
            else:  # LayerNorm weights around 1, every bias around 0
                param.uniform_(-0.2, 0.2).add_(1.0 if "norm" in name and "weight" in name else 0)
    return model.eval()


# grid (4, 6, 6) with 2 x 4 x 4 windows: the window grid is padded to 4 x 8 x 8 and block 1 is
# shifted by (1, 2, 2), so padding, clipping-free shifts and wrapped tokens all occur
GEOMETRY = {"img_size": 96, "num_frames": 8, "window_size": [2, 4, 4]}


@pytest.mark.parametrize("attention", FAMILY)
@pytest.mark.parametrize("geometry", [GEOMETRY, {"img_size": 80, "num_frames": 6}])
def test_shapes_on_full_grids_and_masked_input_refused(attention, geometry, tiny_cfg, clip,
                                                       tube_mask):
    cfg = tiny_cfg(attention=attention, num_classes=5, **geometry)
    model = VideoViT(cfg).eval()
    x = clip(cfg)
    t, h, w = cfg.grid
    assert model.forward_features(x).shape == (2, t * h * w, 64)
    assert model.forward_features(x, return_grid=True).shape == (2, 64, t, h, w)
    assert model(x).shape == (2, 5)
    with pytest.raises(ValueError, match=f"attention='{attention}' cannot run on masked tokens: "
                                         f"{NEEDS_FULL_GRID[attention]}"):
        model(x, tube_mask(cfg, hidden=2))
    with pytest.raises(ValueError, match=f"needs all {t}x{h}x{w} = {t * h * w} tokens of its "
                                         f"grid, got {t * h * w - 8}"):
        model.forward_tokens(torch.randn(2, t * h * w - 8, 64))


@pytest.mark.parametrize("attention", FAMILY)
def test_joint_checkpoint_converts_to_joint_attention_restricted_to_the_pattern(
        attention, tiny_cfg, clip):
    joint = randomise(VideoViT(tiny_cfg(num_classes=3, **GEOMETRY)))
    model = VideoViT(tiny_cfg(attention=attention, num_classes=3, **GEOMETRY)).eval()
    report = load_encoder_weights(model, joint.state_dict())
    expected_notes = {"axial": ["temporal_fc zero", "width_fc zero"],
                      "sparse_local_global": ["local_fc zero"],
                      "window": ["relative_position_bias_table zero"]}[attention]
    assert all(any(n in note for note in report.notes) for n in expected_notes), report.notes
    x = clip(model.cfg)
    with torch.no_grad():  # reference: the joint blocks with an explicit (N, N) mask
        tokens = joint.patch_embed(x) + joint.pos_embed()
        for index, block in enumerate(joint.blocks):
            allowed = converted_pattern(attention, model.grid, GEOMETRY["window_size"], index)
            q, k, v = block.attn.qkv_heads(block.norm1(tokens)).unbind(0)
            tokens = tokens + block.attn.attend(q, k, v, allowed)
            tokens = tokens + block.mlp(block.norm2(tokens))
        expected = joint.forward_head(joint.norm(tokens))
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
        # the new parts move it away from that
        for block in model.blocks:
            for param in block.parameters():
                param.add_(0.05 * torch.randn_like(param))
        assert not torch.allclose(model(x), expected, atol=1e-3)


@pytest.mark.parametrize("attention", FAMILY)
def test_new_type_checkpoints_load_only_into_their_type(attention, tiny_cfg):
    state = VideoViT(tiny_cfg(attention=attention)).state_dict()
    for target in ("joint", "divided", *(a for a in FAMILY if a != attention)):
        with pytest.raises(ValueError, match=f"load it into attention='{attention}'"):
            load_encoder_weights(VideoViT(tiny_cfg(attention=target)), state)
    assert load_encoder_weights(VideoViT(tiny_cfg(attention=attention)), state).ok


@pytest.mark.parametrize("attention", FAMILY)
def test_hf_export_refuses_them(attention, tiny_cfg, tmp_path):
    with pytest.raises(ValueError, match=f"attention='{attention}' \\(HF has joint only\\)"):
        export_hf(VideoViT(tiny_cfg(attention=attention)), tmp_path / "hf")


def test_divided_checkpoint_into_axial_keeps_its_temporal_branch(tiny_cfg):
    divided = randomise(VideoViT(tiny_cfg(attention="divided")))
    axial = VideoViT(tiny_cfg(attention="axial"))
    report = load_encoder_weights(axial, divided.state_dict())
    assert report.notes[-1].startswith("blocks -> axial: width_norm1/width_attn copied")
    torch.testing.assert_close(axial.blocks[0].temporal_fc.weight,
                               divided.blocks[0].temporal_fc.weight)
    assert not axial.blocks[0].width_fc.weight.any()


def test_window_bias_table_size_weight_decay_and_checkpoints_of_another_window(tiny_cfg):
    model = VideoViT(tiny_cfg(attention="window", img_size=96, window_size=[2, 7, 7]))
    table = model.blocks[0].attn.relative_position_bias_table
    assert table.shape == (3 * 13 * 13, 4)  # (2Tw-1)(2M-1)(2M-1) x heads, whatever the clip
    assert 0 < table.std() < 0.03  # trunc normal .02, as Video Swin
    assert model.no_weight_decay() == {f"blocks.{i}.attn.relative_position_bias_table"
                                       for i in range(2)}
    other = VideoViT(tiny_cfg(attention="window", img_size=96, window_size=[2, 4, 4]))
    with pytest.raises(ValueError, match=r"relative_position_bias_table \(147, 4\) vs model"):
        load_encoder_weights(model, other.state_dict())


@pytest.mark.parametrize("shifted", [False, True])
def test_window_block_equals_torchvision_video_swin_attention(shifted):
    """Without padding our window attention is torchvision's ShiftedWindowAttention3d (Video
    Swin's), with our zero key bias (torchvision masks with -100 instead of -inf)."""
    grid, window, dim, heads = (4, 6, 6), [2, 3, 3], 32, 4
    block = randomise(WindowBlock(dim, heads, grid=grid, window_size=window, shifted=shifted))
    swin = ShiftedWindowAttention3d(dim, window, [1, 1, 1] if shifted else [0, 0, 0], heads)
    attn = block.attn
    with torch.no_grad():
        swin.qkv.weight.copy_(attn.qkv.weight)
        swin.qkv.bias.copy_(torch.cat((attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias)))
        swin.proj.load_state_dict(attn.proj.state_dict())
        swin.relative_position_bias_table.copy_(attn.relative_position_bias_table)
        assert torch.equal(swin.relative_position_index, attn.relative_position_index)
        x = torch.randn(2, 4 * 6 * 6, dim)
        ours = block.token_attention(x, grid[0])
        theirs = swin(x.reshape(2, *grid, dim)).reshape(2, -1, dim)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", FAMILY)
def test_trains_with_decreasing_loss(attention, tiny_cfg, clip, train):
    torch.manual_seed(0)
    cfg = tiny_cfg(attention=attention, img_size=64, num_frames=8, window_size=[2, 2, 2],
                   num_classes=4, drop_path_rate=0.1)  # grid 4 x 4 x 4
    model = VideoViT(cfg).train()
    x, labels = clip(cfg, batch=4), torch.tensor([3, 2, 1, 0])
    with torch.no_grad():
        model.head.weight.normal_(0, 0.02)
    losses = train(model, lambda: F.cross_entropy(model(x), labels))
    assert losses[-1] < 0.5 * losses[0], losses


GRID = (4, 6, 5)  # distinct sides; 5 pads to 6 (sparse) and to 8 (window 2 x 4 x 4)
RECEPTIVE_CASES = {  # id: (attention, block index, projections set to zero, expected pattern)
    "axial/temporal": ("axial", 0, ["width_fc", "attn.proj"], axis_pattern(GRID, 0)),
    "axial/width": ("axial", 0, ["temporal_fc", "attn.proj"], axis_pattern(GRID, 2)),
    "axial/height": ("axial", 0, ["temporal_fc", "width_fc"], axis_pattern(GRID, 1)),
    "axial/all": ("axial", 0, [], compose(axis_pattern(GRID, 1), axis_pattern(GRID, 2),
                                          axis_pattern(GRID, 0))),
    "sparse/local": ("sparse_local_global", 0, ["attn.proj"], local_pattern(GRID)),
    "sparse/global": ("sparse_local_global", 0, ["local_fc"], strided_pattern(GRID)),
    "sparse/all": ("sparse_local_global", 0, [],
                   compose(strided_pattern(GRID), local_pattern(GRID))),
    "window/plain": ("window", 0, [], window_pattern(GRID, (2, 4, 4), 0)),
    "window/shifted": ("window", 1, [], window_pattern(GRID, (2, 4, 4), 1)),
}


@pytest.mark.parametrize("case", RECEPTIVE_CASES)
def test_one_block_sees_exactly_its_receptive_field(case):
    """One block (no position embedding, eval mode, float64): perturbing input token j changes
    output token i exactly when j is in i's receptive field."""
    attention, index, silenced, expected = RECEPTIVE_CASES[case]
    block = build_block(attention, 32, 2, 2.0, 0.0, 0.0, grid=GRID, index=index,
                        window_size=(2, 4, 4))
    block = randomise(block).double()
    with torch.no_grad():
        for name in silenced:
            layer = block.get_submodule(name)
            layer.weight.zero_()
            layer.bias.zero_()
        n = expected.shape[0]
        x = torch.randn(1, n, 32, dtype=torch.float64)
        base = block(x, GRID[0])
        changed = torch.zeros(n, n, dtype=torch.bool)
        for j in range(n):
            moved = x.clone()
            moved[0, j] += torch.randn(32, dtype=torch.float64)
            changed[:, j] = (block(moved, GRID[0]) - base)[0].abs().amax(-1) > 1e-10
    if not case.endswith("/all"):
        assert not expected.all()  # a pattern that leaves something out
    mismatch = (changed != expected).nonzero().tolist()
    assert not mismatch, f"(query, key) pairs off the pattern: {mismatch[:10]}"
