import numpy as np
import pytest
import torch

from data_tools.masking import (RandomMaskGenerator, RunningCellMaskGenerator,
                                TubeMaskGenerator, build_decoder_mask_generator,
                                build_mask_generator)


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
