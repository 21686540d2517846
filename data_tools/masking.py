"""Token mask generators, called once per clip inside the DataLoader workers.

Every generator returns a bool tensor ``(N,)`` with ``N = T' * H' * W'`` in ``(t, h, w)``
order and True = masked. The number of masked tokens is fixed by the generator's settings,
so every sample of a batch has the same number of visible tokens.

- ``TubeMaskGenerator``: VideoMAE tube masking - ``int(ratio * H' * W')`` spatial positions
  masked, the same positions in every one of the ``T'`` slices.
- ``RandomMaskGenerator``: mae_st random space-time masking - ``int(ratio * N)`` tokens
  drawn independently of their position.
- ``RunningCellMaskGenerator``: VideoMAE V2 decoder masking - a 2x2 cell pattern with
  ``int(4 * ratio)`` masked cells, tiled over the grid and shifted by one cell position per
  time slice. True = not reconstructed by the decoder (V2's ``decode_masked_pos``).

Randomness comes from ``generator`` (a ``torch.Generator``) when given, else from torch's
global RNG, which DataLoader seeds differently in every worker.
"""
from __future__ import annotations

from typing import Literal, get_args

import torch


class MaskGenerator:
    """Base class: a ``(T', H', W')`` token grid and a mask ratio."""

    def __init__(self, input_size: tuple[int, int, int], mask_ratio: float):
        frames, height, width = (int(v) for v in input_size)
        if min(frames, height, width) < 1:
            raise ValueError(f"token grid (T', H', W') must be positive, got {input_size}")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.frames, self.height, self.width = frames, height, width
        self.mask_ratio = mask_ratio
        self.num_tokens = frames * height * width

    @property
    def num_masked(self) -> int:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(grid={(self.frames, self.height, self.width)}, "
                f"masked={self.num_masked}/{self.num_tokens})")


def _random_subset(n: int, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """Bool ``(n,)`` with exactly ``k`` True entries at random positions."""
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=generator)[:k]] = True
    return mask


class TubeMaskGenerator(MaskGenerator):
    """One random spatial mask repeated over all ``T'`` slices."""

    @property
    def num_masked(self) -> int:
        return int(self.mask_ratio * self.height * self.width) * self.frames

    def __call__(self, generator: torch.Generator | None = None) -> torch.Tensor:
        per_frame = self.height * self.width
        spatial = _random_subset(per_frame, int(self.mask_ratio * per_frame), generator)
        return spatial.repeat(self.frames)


class RandomMaskGenerator(MaskGenerator):
    """``int(ratio * N)`` tokens masked anywhere in space-time."""

    @property
    def num_masked(self) -> int:
        return int(self.mask_ratio * self.num_tokens)

    def __call__(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return _random_subset(self.num_tokens, self.num_masked, generator)


class RunningCellMaskGenerator(MaskGenerator):
    """VideoMAE V2 running-cell mask; needs even ``H'`` and ``W'`` so the 2x2 cells tile the
    grid exactly (otherwise the masked count would depend on the cell's phase)."""

    def __init__(self, input_size: tuple[int, int, int], mask_ratio: float = 0.5):
        super().__init__(input_size, mask_ratio)
        masked_cells = int(4 * mask_ratio)
        if not 0 < masked_cells < 4:
            raise ValueError(f"running-cell mask_ratio must give 1-3 masked cells of 4, "
                             f"got ratio {mask_ratio}")
        if self.height % 2 or self.width % 2:
            raise ValueError(f"running-cell masking needs an even token grid, got "
                             f"H'={self.height}, W'={self.width}")
        self.masked_cells = masked_cells
        pattern = torch.arange(4) < masked_cells  # e.g. [1, 1, 0, 0]
        # phases[p, t] is the 2x2 cell of slice t when the sample starts at phase p.
        shifts = (torch.arange(4).view(4, 1, 1) + torch.arange(1, self.frames + 1).view(1, -1, 1)
                  + torch.arange(4).view(1, 1, 4)) % 4
        cells = pattern[shifts].view(4, self.frames, 2, 2)
        self._phases = cells.repeat(1, 1, self.height // 2, self.width // 2).reshape(4, -1)

    @property
    def num_masked(self) -> int:
        return self.num_tokens * self.masked_cells // 4

    def __call__(self, generator: torch.Generator | None = None) -> torch.Tensor:
        phase = int(torch.randint(4, (1,), generator=generator))
        return self._phases[phase].clone()


MaskType = Literal["tube", "random", "none"]
DecoderMaskType = Literal["none", "running_cell"]
MASK_TYPES = get_args(MaskType)
DECODER_MASK_TYPES = get_args(DecoderMaskType)


def build_mask_generator(mask_type: str, input_size: tuple[int, int, int],
                         mask_ratio: float) -> MaskGenerator | None:
    """Encoder mask generator by name (``"none"`` -> None)."""
    if mask_type == "tube":
        return TubeMaskGenerator(input_size, mask_ratio)
    if mask_type == "random":
        return RandomMaskGenerator(input_size, mask_ratio)
    if mask_type == "none":
        return None
    raise ValueError(f"unknown mask_type {mask_type!r}; choose one of {list(MASK_TYPES)}")


def build_decoder_mask_generator(mask_type: str, input_size: tuple[int, int, int],
                                 mask_ratio: float) -> MaskGenerator | None:
    if mask_type == "running_cell":
        return RunningCellMaskGenerator(input_size, mask_ratio)
    if mask_type == "none":
        return None
    raise ValueError(f"unknown decoder_mask_type {mask_type!r}; "
                     f"choose one of {list(DECODER_MASK_TYPES)}")
