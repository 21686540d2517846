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
- ``MultiblockMaskGenerator``: one V-JEPA multiblock 3D mask group - the union of
  ``num_blocks`` space-time blocks with exactly ``num_visible`` tokens left visible (below).
  ``MultiblockMasker`` is the worker stage that masks whole batches with one of several
  groups (V-JEPA: 8 blocks at scale 0.15, 2 blocks at 0.7).

Randomness comes from ``generator`` (a ``torch.Generator``) when given, else from torch's
global RNG, which DataLoader seeds differently in every worker.

Multiblock visible count. The union of random blocks hides a varying number of tokens, but
the encoder needs the same number of visible tokens in every sample of a micro-batch. V-JEPA
trims every sample's visible set to the minimum over its batch. Here each group has a fixed
count instead, ``num_visible`` = the 5th percentile of the visible count over 1024 draws of
its blocks (seeded, so the same on every process): a draw leaving fewer visible tokens is
redrawn, one leaving more has its surplus visible tokens (chosen at random) masked too. The
fixed count is about V-JEPA's batch minimum at its 24 clips per GPU, and unlike a batch
minimum it does not depend on which clips share a micro-batch: a rank that concatenates the
batches of several data streams (``data_tools.stream``) gets equal counts, and a global batch
is the same whichever number of ranks reads it (exact elastic resume). The surplus is dropped
at random positions rather than V-JEPA's last ones in ``(t, h, w)`` order, which would
always hide the end of the clip.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Iterator, Literal, get_args

import numpy as np
import torch
from torch.utils.data import get_worker_info

from data_tools.seeding import stream_seed


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


class MultiblockMaskGenerator(MaskGenerator):
    """One V-JEPA multiblock 3D mask group (``src/masks/multiblock3d.py``).

    Per sample one block size is drawn as V-JEPA draws it: ``t = max(1, int(T' * s_t))``
    slices, a spatial area of ``int(H' * W' * s)`` tokens with aspect ratio ``a`` (height
    ``round(sqrt(area * a))``, width ``round(sqrt(area / a))``, clipped to the grid), with
    ``s_t``, ``s`` and ``a`` uniform in their ranges; ``num_blocks`` blocks of that size are
    placed uniformly and their union is masked, then the count is fixed at ``num_visible``
    (module docstring). With ``temporal_scale=(1, 1)`` every block spans the whole clip.
    """

    DRAWS_FOR_COUNT = 1024
    VISIBLE_QUANTILE = 0.05
    MAX_REDRAWS = 100

    def __init__(self, input_size: tuple[int, int, int], num_blocks: int,
                 spatial_scale: tuple[float, float] = (0.15, 0.15),
                 aspect_ratio: tuple[float, float] = (0.75, 1.5),
                 temporal_scale: tuple[float, float] = (1.0, 1.0)):
        super().__init__(input_size, 0.0)
        if num_blocks < 1:
            raise ValueError(f"a multiblock group needs >= 1 block, got {num_blocks}")
        for name, (low, high), top in (("spatial_scale", spatial_scale, 1.0),
                                       ("aspect_ratio", aspect_ratio, math.inf),
                                       ("temporal_scale", temporal_scale, 1.0)):
            if not 0 < low <= high <= top:
                raise ValueError(f"multiblock {name} must be a range 0 < min <= max"
                                 f"{' <= 1' if top == 1.0 else ''}, got {(low, high)}")
        self.num_blocks = num_blocks
        self.spatial_scale, self.aspect_ratio = tuple(spatial_scale), tuple(aspect_ratio)
        self.temporal_scale = tuple(temporal_scale)
        self.num_visible = _visible_count(self._settings())
        if self.num_visible < 1:
            raise ValueError(f"{num_blocks} blocks at spatial scale {spatial_scale} hide every "
                             f"token of a {(self.frames, self.height, self.width)} grid in over "
                             f"{self.VISIBLE_QUANTILE:.0%} of draws: use fewer or smaller blocks")

    def _settings(self) -> tuple:
        return ((self.frames, self.height, self.width), self.num_blocks, self.spatial_scale,
                self.aspect_ratio, self.temporal_scale)

    @property
    def num_masked(self) -> int:
        return self.num_tokens - self.num_visible

    def blocks(self, generator: torch.Generator | None = None, draws: int = 1) -> torch.Tensor:
        """``draws`` unions of blocks before the count is fixed: bool ``(draws, T', H', W')``,
        True = inside a block."""
        return _block_unions(self._settings(), draws, generator)

    def __call__(self, generator: torch.Generator | None = None) -> torch.Tensor:
        for _ in range(self.MAX_REDRAWS):
            mask = self.blocks(generator)[0].flatten()
            if self.num_tokens - int(mask.sum()) >= self.num_visible:
                break
        visible = (~mask).nonzero()[:, 0]
        surplus = len(visible) - self.num_visible
        if surplus > 0:
            mask[visible[torch.randperm(len(visible), generator=generator)[:surplus]]] = True
        elif surplus < 0:  # MAX_REDRAWS short draws in a row (p < 0.05^100): reveal a few
            hidden = mask.nonzero()[:, 0]
            mask[hidden[torch.randperm(len(hidden), generator=generator)[:-surplus]]] = False
        return mask


def _uniform(low: float, high: float, n: int, generator: torch.Generator | None) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


def _block_unions(settings: tuple, draws: int, generator: torch.Generator | None) -> torch.Tensor:
    """Bool ``(draws, T', H', W')``: per draw one block size, ``num_blocks`` blocks placed
    uniformly, their union True."""
    (frames, height, width), num_blocks, spatial, aspect, temporal = settings
    t = (frames * _uniform(*temporal, draws, generator)).long().clamp(1, frames)
    area = (height * width * _uniform(*spatial, draws, generator)).long()
    ratio = _uniform(*aspect, draws, generator)
    h = (area * ratio).sqrt().round().long().clamp(1, height)
    w = (area / ratio).sqrt().round().long().clamp(1, width)

    def starts(room: torch.Tensor) -> torch.Tensor:  # uniform in [0, room] per block: (D, K)
        u = torch.rand(draws, num_blocks, generator=generator, dtype=torch.float64)
        return (u * (room.view(-1, 1) + 1)).long()

    def inside(size: torch.Tensor, start: torch.Tensor, extent: int) -> torch.Tensor:
        index = torch.arange(extent).view(1, 1, -1)  # (D, K, extent)
        return (index >= start.unsqueeze(-1)) & (index < (start + size.view(-1, 1)).unsqueeze(-1))

    in_t = inside(t, starts(frames - t), frames)
    in_h = inside(h, starts(height - h), height)
    in_w = inside(w, starts(width - w), width)
    blocks = in_t[..., :, None, None] & in_h[..., None, :, None] & in_w[..., None, None, :]
    return blocks.any(dim=1)


@lru_cache(maxsize=32)
def _visible_count(settings: tuple) -> int:
    """The group's fixed visible count: a low quantile of the visible tokens left by
    ``DRAWS_FOR_COUNT`` seeded draws (the same on every process)."""
    cls = MultiblockMaskGenerator
    unions = _block_unions(settings, cls.DRAWS_FOR_COUNT, torch.Generator().manual_seed(0))
    visible = np.sort((~unions).flatten(1).sum(1).numpy())
    return int(visible[int(cls.VISIBLE_QUANTILE * len(visible))])


class MultiblockMasker:
    """Worker pipeline stage after batching: adds ``mask`` bool ``(B, N)`` to each batch,
    every sample masked by one group of ``groups`` (``MultiblockMaskGenerator``), so every
    sample keeps that group's ``num_visible`` tokens.

    The group is drawn per batch from ``(seed, the batch's number in the loader)`` only: the
    loaders of several data streams built with one seed (``data_tools.stream``) pick the same
    group for their ``i``-th batches, which a rank concatenates into one micro-batch. (A
    DataLoader with ``W`` workers takes its batch ``i`` from worker ``i % W``, so a worker's
    ``k``-th batch is batch ``k * W + worker``.) Block positions come from a per-rank, per-worker
    generator (``seeding.stream_seed`` stage 3).
    """

    def __init__(self, groups: list[MultiblockMaskGenerator], seed: int, rank: int):
        if not groups:
            raise ValueError("MultiblockMasker needs at least one mask group")
        self.groups, self.seed, self.rank, self.passes = groups, seed, rank, 0

    def group_for(self, batch_number: int) -> MultiblockMaskGenerator:
        """The group of the loader's batch ``batch_number``."""
        rng = np.random.default_rng([self.seed, batch_number])
        return self.groups[int(rng.integers(len(self.groups)))]

    def __call__(self, batches: Iterator[dict]) -> Iterator[dict]:
        self.passes += 1
        positions = torch.Generator().manual_seed(stream_seed(self.seed, self.rank, 3,
                                                              self.passes))
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for k, batch in enumerate(batches):
            group = self.group_for(k * workers + worker)
            batch["mask"] = torch.stack([group(positions) for _ in range(len(batch["key"]))])
            yield batch


def multiblock_groups(input_size: tuple[int, int, int], block_counts: tuple[int, ...],
                      block_scales: tuple[tuple[float, float], ...],
                      aspect_ratio: tuple[float, float],
                      temporal_scale: tuple[float, float]) -> list[MultiblockMaskGenerator]:
    """One ``MultiblockMaskGenerator`` per entry of ``block_counts`` / ``block_scales``."""
    if len(block_counts) != len(block_scales):
        raise ValueError(f"block_counts {block_counts} and block_scales {block_scales} must "
                         "have one entry per mask group")
    return [MultiblockMaskGenerator(input_size, count, scale, aspect_ratio, temporal_scale)
            for count, scale in zip(block_counts, block_scales)]


MaskType = Literal["tube", "random", "multiblock", "none"]
DecoderMaskType = Literal["none", "running_cell"]
MASK_TYPES = get_args(MaskType)
DECODER_MASK_TYPES = get_args(DecoderMaskType)


def build_mask_generator(mask_type: str, input_size: tuple[int, int, int],
                         mask_ratio: float) -> MaskGenerator | None:
    """Per-clip encoder mask generator by name (``"none"`` -> None; ``"multiblock"`` masks
    whole batches: ``MultiblockMasker``)."""
    if mask_type == "tube":
        return TubeMaskGenerator(input_size, mask_ratio)
    if mask_type == "random":
        return RandomMaskGenerator(input_size, mask_ratio)
    if mask_type == "none":
        return None
    if mask_type == "multiblock":
        raise ValueError("multiblock masks are made per batch: build MultiblockMasker "
                         "(multiblock_groups) instead of a per-clip generator")
    raise ValueError(f"unknown mask_type {mask_type!r}; choose one of {list(MASK_TYPES)}")


def build_decoder_mask_generator(mask_type: str, input_size: tuple[int, int, int],
                                 mask_ratio: float) -> MaskGenerator | None:
    if mask_type == "running_cell":
        return RunningCellMaskGenerator(input_size, mask_ratio)
    if mask_type == "none":
        return None
    raise ValueError(f"unknown decoder_mask_type {mask_type!r}; "
                     f"choose one of {list(DECODER_MASK_TYPES)}")
