"""Position embeddings for (t, h, w) token grids, and their resizing to another grid.

Tables are ``(1, N, D)`` with ``N = T' * H' * W'`` in (t, h, w) order. Resizing always works
on the grid, never on the flattened index: a spatial table is resampled as an ``H' x W'``
image (per time slice for a full table) and a temporal table along ``T'`` (per spatial
position for a full table).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

Grid = tuple[int, int, int]


def sinusoid_table(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """VideoMAE's sinusoid: ``(P,)`` positions -> ``(P, dim)``.

    Channel ``j`` has angle ``pos / 10000 ** (2 * (j // 2) / dim)``; sin on even, cos on odd
    channels. Computed in float64 like the original numpy code, returned as float32.
    """
    j = torch.arange(dim, dtype=torch.float64)
    rates = torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / dim)
    angles = positions.to(torch.float64)[:, None] / rates
    table = torch.empty_like(angles)
    table[:, 0::2] = torch.sin(angles[:, 0::2])
    table[:, 1::2] = torch.cos(angles[:, 1::2])
    return table.float()


def sincos_1d_table(num_tokens: int, dim: int) -> torch.Tensor:
    """The fixed VideoMAE table over the flattened token index: ``(1, num_tokens, dim)``."""
    return sinusoid_table(torch.arange(num_tokens), dim)[None]


def sincos_spatial_table(height: int, width: int, dim: int) -> torch.Tensor:
    """2-D sinusoid (first half of the channels encode h, second half w): ``(1, H*W, dim)``."""
    if dim % 2:
        raise ValueError(f"separable_sincos needs an even width, got {dim}")
    hh, ww = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    table = torch.cat(
        [sinusoid_table(hh.flatten(), dim // 2), sinusoid_table(ww.flatten(), dim // 2)], dim=1)
    return table[None]


def resize_spatial(table: torch.Tensor, src_hw: tuple[int, int],
                   dst_hw: tuple[int, int]) -> torch.Tensor:
    """``(B, H0*W0, D)`` -> ``(B, H*W, D)``, bicubic over the spatial grid (antialiased, as
    timm's ``resample_abs_pos_embed``, which only takes one table at a time)."""
    if tuple(src_hw) == tuple(dst_hw):
        return table
    batch, num, dim = table.shape
    if num != src_hw[0] * src_hw[1]:
        raise ValueError(f"spatial table has {num} positions, not {src_hw[0]}x{src_hw[1]}")
    image = table.float().reshape(batch, src_hw[0], src_hw[1], dim).permute(0, 3, 1, 2)
    image = F.interpolate(image, size=tuple(dst_hw), mode="bicubic", align_corners=False,
                          antialias=True)
    return image.permute(0, 2, 3, 1).reshape(batch, -1, dim).to(table.dtype)


def resize_temporal(table: torch.Tensor, src_t: int, dst_t: int) -> torch.Tensor:
    """``(B, T0, D)`` -> ``(B, T, D)``, linear along time."""
    if src_t == dst_t:
        return table
    if table.shape[1] != src_t:
        raise ValueError(f"temporal table has {table.shape[1]} rows, expected {src_t}")
    out = F.interpolate(table.transpose(1, 2).float(), size=dst_t, mode="linear",
                        align_corners=False)
    return out.transpose(1, 2).to(table.dtype)


def resize_full_table(table: torch.Tensor, src: Grid, dst: Grid) -> torch.Tensor:
    """``(1, T0*H0*W0, D)`` -> ``(1, T*H*W, D)``: spatially per time slice, then temporally
    per spatial position."""
    if tuple(src) == tuple(dst):
        return table
    (t0, h0, w0), (t1, h1, w1) = src, dst
    if table.shape[1] != t0 * h0 * w0:
        raise ValueError(f"position table has {table.shape[1]} tokens, not {t0}x{h0}x{w0}")
    dim = table.shape[-1]
    per_slice = resize_spatial(table.reshape(t0, h0 * w0, dim), (h0, w0), (h1, w1))  # (T0, HW, D)
    per_position = resize_temporal(per_slice.transpose(0, 1), t0, t1)  # (HW, T, D)
    return per_position.transpose(0, 1).reshape(1, t1 * h1 * w1, dim)


def square_side(num: int, what: str) -> int:
    side = math.isqrt(num)
    if side * side != num:
        raise ValueError(f"{what} has {num} positions, which is not a square grid")
    return side


class PositionEmbedding(nn.Module):
    """Position table for a ``(T', H', W')`` grid.

    ``sincos_1d`` keeps one fixed ``table`` buffer (not saved in state dicts, like the
    original); the separable kinds keep ``spatial (1, H'W', D)`` and ``temporal (1, T', D)``
    tables, learned parameters for ``separable_learned`` and fixed buffers otherwise.
    ``source_grid`` builds a fixed table at that grid and resizes it to ``grid``.
    ``time_invariant`` gives every time slice the same code (no temporal component: the 1-D
    table's first slice, the spatial table alone), as TimeSformer's space-only model, which
    has no time embedding: a per-frame model must not learn when a frame was.
    """

    def __init__(self, kind: str, grid: Grid, dim: int, source_grid: Grid | None = None,
                 time_invariant: bool = False):
        super().__init__()
        self.kind, self.grid, self.dim = kind, tuple(grid), dim
        self.time_invariant = time_invariant
        src = tuple(source_grid) if source_grid else self.grid
        t, h, w = self.grid
        if kind == "sincos_1d":
            table = resize_full_table(sincos_1d_table(src[0] * src[1] * src[2], dim),
                                      src, self.grid)
            if time_invariant:
                table = table[:, :h * w].repeat(1, t, 1)
            self.register_buffer("table", table, persistent=False)
        elif kind == "separable_sincos":
            spatial = resize_spatial(sincos_spatial_table(src[1], src[2], dim), src[1:], (h, w))
            self.register_buffer("spatial", spatial, persistent=False)
            if not time_invariant:
                temporal = resize_temporal(sinusoid_table(torch.arange(src[0]), dim)[None],
                                           src[0], t)
                self.register_buffer("temporal", temporal, persistent=False)
        elif kind == "separable_learned":
            self.spatial = nn.Parameter(torch.zeros(1, h * w, dim))
            trunc_normal_(self.spatial, std=0.02)
            if not time_invariant:
                self.temporal = nn.Parameter(torch.zeros(1, t, dim))
                trunc_normal_(self.temporal, std=0.02)
        else:
            raise ValueError(f"unknown position embedding {kind!r}")

    @property
    def learned(self) -> bool:
        return self.kind == "separable_learned"

    def forward(self) -> torch.Tensor:
        """Full table ``(1, T'*H'*W', D)`` in (t, h, w) order."""
        if self.kind == "sincos_1d":
            return self.table
        t = self.grid[0]
        full = self.spatial[:, None, :, :].expand(1, t, -1, -1)  # (1, T', H'W', D)
        if not self.time_invariant:
            full = self.temporal[:, :, None, :] + full
        return full.reshape(1, t * self.spatial.shape[1], self.dim)

    def extra_repr(self) -> str:
        extra = ", time_invariant" if self.time_invariant else ""
        return f"kind={self.kind}, grid={self.grid}, dim={self.dim}{extra}"


def resize_separable_state(state: dict, prefix: str, grid: Grid) -> list[str]:
    """Resize learned ``{prefix}spatial`` / ``{prefix}temporal`` entries of ``state`` in place to
    ``grid``; the source grid is read from their shapes (square spatial grid). Returns notes."""
    notes = []
    spatial_key, temporal_key = prefix + "spatial", prefix + "temporal"
    if spatial_key in state and state[spatial_key].shape[1] != grid[1] * grid[2]:
        src_side = square_side(state[spatial_key].shape[1], spatial_key)
        state[spatial_key] = resize_spatial(state[spatial_key], (src_side, src_side), grid[1:])
        notes.append(f"resized {spatial_key} from {src_side}x{src_side} to {grid[1]}x{grid[2]}")
    if temporal_key in state and state[temporal_key].shape[1] != grid[0]:
        src_t = state[temporal_key].shape[1]
        state[temporal_key] = resize_temporal(state[temporal_key], src_t, grid[0])
        notes.append(f"resized {temporal_key} from {src_t} to {grid[0]} time slices")
    return notes
