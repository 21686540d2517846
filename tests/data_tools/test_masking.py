import numpy as np
import pytest
import torch

from data_tools.config import DataConfig
from data_tools.masking import (MultiblockMasker, MultiblockMaskGenerator, RandomMaskGenerator,
                                RunningCellMaskGenerator, TubeMaskGenerator,
                                build_decoder_mask_generator, build_mask_generator,
                                multiblock_groups)


@pytest.mark.parametrize("grid,ratio", [((8, 14, 14), 0.9), ((2, 3, 4), 0.75), ((4, 2, 2), 0.5)])
def test_tube_mask_has_exact_count_and_is_identical_over_time(grid, ratio):
    generator = TubeMaskGenerator(grid, ratio)
    frames, height, width = grid
    per_frame = int(ratio * height * width)
    masks = [generator(torch.Generator().manual_seed(i)) for i in range(20)]
    for mask in masks:
        assert mask.dtype == torch.bool and tuple(mask.shape) == (frames * height * width,)
        slices = mask.view(frames, height * width)  # (t, h, w) order: time is outermost
        assert torch.all(slices == slices[0])
        assert int(slices[0].sum()) == per_frame
        assert int(mask.sum()) == generator.num_masked == per_frame * frames
    assert len({tuple(m.tolist()) for m in masks}) > 1  # random, not a fixed pattern
    if grid == (8, 14, 14):
        assert int((~masks[0]).sum()) == 160  # VideoMAE: 160 visible of 1568


def test_generators_are_reproducible_with_a_seeded_generator():
    generator = TubeMaskGenerator((8, 14, 14), 0.9)
    a = generator(torch.Generator().manual_seed(3))
    b = generator(torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_random_mask_has_exact_count_and_varies_over_time():
    generator = RandomMaskGenerator((8, 14, 14), 0.9)
    mask = generator(torch.Generator().manual_seed(0))
    assert int(mask.sum()) == generator.num_masked == int(0.9 * 1568)
    slices = mask.view(8, 196)
    assert not torch.all(slices == slices[0])


def _videomae_v2_running_cell(frames, height, width, ratio, phase):
    """VideoMAE V2's RunningCellMaskingGenerator written out step by step (numpy)."""
    num_masks = int(4 * ratio)
    queue = np.hstack([np.ones(num_masks), np.zeros(4 - num_masks)])
    pointer = phase
    out = []
    for _ in range(frames):
        pointer += 1  # run_cell() before get_cell()
        cell = queue[(np.arange(4) + pointer) % 4].reshape(2, 2)
        out.append(np.tile(cell, [height // 2, width // 2]).flatten())
    return np.stack(out).flatten().astype(bool)


def test_running_cell_mask_matches_videomae_v2():
    generator = RunningCellMaskGenerator((8, 14, 14), 0.5)
    expected = {tuple(_videomae_v2_running_cell(8, 14, 14, 0.5, p)) for p in range(4)}
    produced = {tuple(generator(torch.Generator().manual_seed(i)).tolist()) for i in range(40)}
    assert produced == expected
    mask = generator(torch.Generator().manual_seed(0)).view(8, 14, 14)
    assert all(int(mask[t].sum()) == 98 for t in range(8))
    assert not torch.equal(mask[0], mask[1])  # the cell runs over time


def test_running_cell_rejects_odd_grid_and_bad_ratio():
    with pytest.raises(ValueError, match="even token grid"):
        RunningCellMaskGenerator((8, 3, 4), 0.5)
    with pytest.raises(ValueError, match="1-3 masked cells"):
        RunningCellMaskGenerator((8, 4, 4), 0.2)


def test_builders_by_name():
    assert isinstance(build_mask_generator("tube", (2, 2, 2), 0.5), TubeMaskGenerator)
    assert isinstance(build_mask_generator("random", (2, 2, 2), 0.5), RandomMaskGenerator)
    assert build_mask_generator("none", (2, 2, 2), 0.5) is None
    assert build_decoder_mask_generator("none", (2, 2, 2), 0.5) is None
    with pytest.raises(ValueError, match="unknown mask_type"):
        build_mask_generator("block", (2, 2, 2), 0.5)
    with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\)"):
        TubeMaskGenerator((2, 2, 2), 1.0)


# -- multiblock (V-JEPA) -------------------------------------------------------------------

VJEPA_GRID = (8, 14, 14)  # 16 frames of 224x224, tubelets of 2, 16x16 patches


def vjepa_groups(grid=VJEPA_GRID, temporal_scale=(1.0, 1.0)):
    """V-JEPA's configs/pretrain/vitl16.yaml: 8 blocks at 0.15 and 2 blocks at 0.7."""
    return multiblock_groups(grid, (8, 2), ((0.15, 0.15), (0.7, 0.7)), (0.75, 1.5),
                             temporal_scale)


def expected_block_coverage(grid, num_blocks, scale, aspect_ratio, steps=400):
    """Mean fraction of a frame covered by the union of ``num_blocks`` blocks placed
    uniformly, computed exactly per position for each block size (V-JEPA's size formula) and
    averaged over the aspect-ratio range."""
    _, height, width = grid
    area = int(height * width * scale)
    total = 0.0
    for ratio in np.linspace(*aspect_ratio, steps):
        h = min(max(int(round(np.sqrt(area * ratio))), 1), height)
        w = min(max(int(round(np.sqrt(area / ratio))), 1), width)

        def hit(extent, size):  # P(a block of `size` at a uniform start covers each index)
            starts = np.arange(extent - size + 1)
            return np.array([np.mean((starts <= i) & (i < starts + size)) for i in range(extent)])

        single = np.outer(hit(height, h), hit(width, w))
        total += np.mean(1 - (1 - single) ** num_blocks)
    return total / steps


def test_multiblock_masks_have_the_shape_and_the_fixed_visible_count():
    for group in vjepa_groups():
        masks = torch.stack([group(torch.Generator().manual_seed(i)) for i in range(50)])
        assert masks.dtype == torch.bool and tuple(masks.shape) == (50, 8 * 14 * 14)
        assert ((~masks).sum(1) == group.num_visible).all()
        assert int(masks[0].sum()) == group.num_masked
        assert len({tuple(m.tolist()) for m in masks}) == 50


def test_multiblock_blocks_span_the_whole_clip_or_the_temporal_scale():
    group = vjepa_groups()[0]
    unions = group.blocks(torch.Generator().manual_seed(0), draws=64)  # (D, T', H', W')
    assert torch.equal(unions, unions[:, :1].expand_as(unions))  # every block spans all T'
    half = vjepa_groups(temporal_scale=(0.5, 0.5))[0]
    unions = half.blocks(torch.Generator().manual_seed(0), draws=64)
    assert not torch.equal(unions, unions[:, :1].expand_as(unions))
    # each hidden column is hidden for a whole number of 4-slice blocks, never all 8 with one
    depth = unions.sum(1)
    assert depth.max() <= 8 and set(depth.unique().tolist()) <= {0, 4, 5, 6, 7, 8}


@pytest.mark.parametrize("index, num_blocks, scale", [(0, 8, 0.15), (1, 2, 0.7)])
def test_multiblock_masked_fraction_matches_the_block_geometry(index, num_blocks, scale):
    group = vjepa_groups()[index]
    unions = group.blocks(torch.Generator().manual_seed(1), draws=2000)
    coverage = unions.float().mean().item()
    assert coverage == pytest.approx(
        expected_block_coverage(VJEPA_GRID, num_blocks, scale, (0.75, 1.5)), abs=0.01)
    # the fixed count leaves the visible tokens of a draw at the 5th percentile: a masked
    # fraction a little above the mean coverage
    visible = (~unions).flatten(1).sum(1).float()
    assert (visible >= group.num_visible).float().mean().item() == pytest.approx(0.95, abs=0.02)
    assert coverage < group.num_masked / group.num_tokens < coverage + 0.15


def test_multiblock_masker_is_deterministic_and_picks_one_group_per_batch():
    groups = vjepa_groups()
    counts = {g.num_visible for g in groups}

    def batches(seed, rank):
        masker = MultiblockMasker(groups, seed, rank)
        return [b["mask"] for b in masker({"key": ["k"] * 6} for _ in range(12))]

    first, again, other_rank = batches(5, 0), batches(5, 0), batches(5, 1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    used = set()
    for mask, mask_other_rank in zip(first, other_rank):
        visible = (~mask).sum(1)
        assert (visible == visible[0]).all() and int(visible[0]) in counts
        used.add(int(visible[0]))
        # another rank (or data stream) uses the same group, with its own block positions
        assert torch.equal((~mask_other_rank).sum(1), visible)
        assert not torch.equal(mask, mask_other_rank)
    assert used == counts  # both groups over 12 batches
    assert not all(torch.equal(a, b) for a, b in zip(first, batches(6, 0)))


def test_multiblock_settings_are_checked():
    with pytest.raises(ValueError, match="hide every token .* use fewer or smaller blocks"):
        MultiblockMaskGenerator((4, 4, 4), 2, (0.7, 0.7))
    with pytest.raises(ValueError, match="spatial_scale must be a range"):
        MultiblockMaskGenerator((4, 8, 8), 2, (0.5, 0.2))
    with pytest.raises(ValueError, match="per-clip generator"):
        build_mask_generator("multiblock", (4, 8, 8), 0.9)
    with pytest.raises(ValueError, match="data.block_counts .* one entry per mask group"):
        DataConfig(block_counts=(8,)).validate()
    with pytest.raises(ValueError, match=r"data.block_aspect_ratio must be a range"):
        DataConfig(block_aspect_ratio=(0.0, 1.0)).validate()
    with pytest.raises(ValueError, match=r"data.block_scales\[1\] must be a range"):
        DataConfig(block_scales=((0.15, 0.15), (0.7, 1.2))).validate()
