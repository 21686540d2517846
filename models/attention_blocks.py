"""The attention types that need the whole ``(T', H', W')`` token grid: axial, sparse
local-global (TimeSformer's T+W+H and L+G) and 3D shifted windows (Video Swin).

Each runs attention inside equal groups of tokens cut from the grid (:class:`TokenGroups`):

- ``axial`` (:class:`AxialBlock`): temporal attention over the ``T'`` tokens of each spatial
  position (``temporal_norm1``, ``temporal_attn``, ``temporal_fc``), then width attention over
  the ``W'`` tokens of each row (``width_norm1``, ``width_attn``, ``width_fc``), then height
  attention over the ``H'`` tokens of each column with the block's own ``norm1`` / ``attn``,
  then the MLP. ``temporal_fc`` and ``width_fc`` start at zero (TimeSformer's ``temporal_fc``
  init), so a fresh block, and a converted joint / space_only / mixing checkpoint, computes
  exactly its ``norm1`` / ``attn`` / MLP with each token attending to the ``H'`` tokens of its
  own column (same t and w) and nothing else: neither the joint nor a space-only model.
- ``sparse_local_global`` (:class:`SparseLocalGlobalBlock`): local attention in
  non-overlapping windows of ``T' x ceil(H'/2) x ceil(W'/2)`` tokens (``local_norm1``,
  ``local_attn``, zero-initialised ``local_fc``), then global attention with a stride of 2
  along t, h and w (the block's ``norm1`` / ``attn``): each token attends to the tokens whose
  (t, h, w) equal its own modulo 2, a ``T'/2 x H'/2 x W'/2`` sub-grid spanning the clip. These
  sizes are our reading of the TimeSformer paper's L+G as we remember it (a local
  neighbourhood of F x H/2 x W/2 patches, then global attention with a stride of 2 patches in
  time and in both spatial dimensions): the paper text could not be retrieved here to check
  it, and TimeSformer's public code has no L+G (nor axial) model, so whether the
  neighbourhood is centred on the query or a fixed block is our choice (fixed blocks).
  A converted single-attention checkpoint computes its blocks with global (strided)
  attention only. The cost of both steps is a fixed fraction of joint attention's (about 3/8
  of the query-key pairs), so it stays quadratic in the number of frames.
- ``window`` (:class:`WindowBlock`): Video Swin's 3D windows of ``Tw x M x M`` tokens
  (``model.window_size``, clipped to the grid: an axis no longer than its window is one
  window and never shifted, as torchvision's Video Swin, ``_get_window_and_shift_size``),
  shifted by half a window in every odd block (cyclic roll, and an attention mask so that
  tokens wrapped around an edge attend only to tokens that were contiguous with them; checked
  against torchvision's ``ShiftedWindowAttention3d``), with a learned relative position
  bias ``attn.relative_position_bias_table`` of ``(2Tw-1)(2M-1)(2M-1)`` rows x heads for the
  configured (unclipped) window, trunc-normal .02 as Video Swin. A converted joint checkpoint
  keeps every weight and gets zero tables: it computes exactly the joint blocks with each
  token attending to the tokens of its (shifted) window.

A grid whose side is not a multiple of a group's side is padded at the end with tokens that
are never attended to (a padded query sees only itself; its output is cut away).
None of the three runs on masked (visible-only) tokens: :data:`NEEDS_FULL_GRID` says why,
and ``VideoViT.visible_index`` raises with it.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from .layers import Attention, Block, BranchBlock

Grid = tuple[int, int, int]

NEEDS_FULL_GRID: dict[str, str] = {
    "axial": "its width and height attention run along whole rows and columns of the grid",
    "sparse_local_global": "its local windows and strided global groups are cut from the "
                           "whole grid",
    "window": "its Tw x M x M windows and their shift are cut from the whole grid",
}
SPARSE_STRIDE = 2  # sparse_local_global: global attention stride along t, h and w


def axial_sizes(grid: Grid) -> dict[str, Grid]:
    """Group sizes of the three axial steps: temporal, width, height (in that order)."""
    t, h, w = grid
    return {"temporal": (t, 1, 1), "width": (1, 1, w), "height": (1, h, 1)}


def sparse_sizes(grid: Grid) -> tuple[Grid, Grid]:
    """``(local window, global stride)`` of sparse_local_global on ``grid``."""
    t, h, w = grid
    return (t, math.ceil(h / 2), math.ceil(w / 2)), tuple(min(SPARSE_STRIDE, g) for g in grid)


def window_geometry(grid: Grid, window_size: Sequence[int], shifted: bool) -> tuple[Grid, Grid]:
    """``(window, shift)`` of a window block: the configured window clipped to the grid, and
    half of it on the axes longer than their window in a shifted block."""
    window = tuple(min(g, s) for g, s in zip(grid, window_size))
    shift = tuple(s // 2 if shifted and g > s else 0 for g, s in zip(grid, window_size))
    return window, shift


def padded_grid(grid: Grid, size: Grid) -> Grid:
    return tuple(math.ceil(g / s) * s for g, s in zip(grid, size))


class TokenGroups(nn.Module):
    """Attention inside equal groups of a ``(t, h, w)``-ordered token grid.

    ``strided=False``: the groups are the non-overlapping windows of ``size``; with ``shift``
    the grid is first rolled by ``-shift`` (Swin's cyclic shift) and tokens of one window that
    were not contiguous before the roll do not attend to each other. ``strided=True``: the
    groups are the tokens with equal coordinates modulo ``size`` (a dilated sub-grid each).
    Holds no parameters: the attention module is passed to :meth:`forward`.
    """

    def __init__(self, grid: Grid, size: Grid, strided: bool = False,
                 shift: Grid = (0, 0, 0)):
        super().__init__()
        self.grid, self.size, self.strided, self.shift = tuple(grid), tuple(size), strided, shift
        self.padded = padded_grid(grid, size)
        self.register_buffer("allowed", self._allowed(), persistent=False)

    def split(self, vol: torch.Tensor) -> torch.Tensor:
        """``(B, Tp, Hp, Wp, D)`` -> groups ``(B, G, L, D)``."""
        b, d = vol.shape[0], vol.shape[-1]
        outer = [p // s for p, s in zip(self.padded, self.size)]
        x = vol.reshape(b, outer[0], self.size[0], outer[1], self.size[1], outer[2],
                        self.size[2], d)
        inner, across = (2, 4, 6), (1, 3, 5)
        x = x.permute(0, *(inner + across if self.strided else across + inner), 7)
        return x.reshape(b, math.prod(x.shape[1:4]), math.prod(x.shape[4:7]), d)

    def join(self, groups: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`split`."""
        b, d = groups.shape[0], groups.shape[-1]
        outer = [p // s for p, s in zip(self.padded, self.size)]
        first, second = (self.size, outer) if self.strided else (outer, self.size)
        x = groups.reshape(b, *first, *second, d)
        order = (0, 4, 1, 5, 2, 6, 3, 7) if self.strided else (0, 1, 4, 2, 5, 3, 6, 7)
        return x.permute(order).reshape(b, *self.padded, d)

    def _allowed(self) -> torch.Tensor | None:
        """``(G, 1, L, L)`` bool, True where a query may attend to a key; None when every
        token of a group may (no padding, no shift)."""
        if self.padded == self.grid and not any(self.shift):
            return None
        regions, real = [], []
        for g, p, s, w in zip(self.grid, self.padded, self.shift, self.size):
            pos = torch.arange(p)  # position after the roll; it holds token (pos + s) % p
            regions.append((pos >= p - w).long() + (pos >= p - s).long() if s else 0 * pos)
            real.append((pos + s) % p < g)
        region = (regions[0][:, None, None] * 9 + regions[1][None, :, None] * 3
                  + regions[2][None, None, :])
        valid = real[0][:, None, None] & real[1][None, :, None] & real[2][None, None, :]
        region, valid = (self.split(x[None, ..., None])[0, ..., 0] for x in (region, valid))
        same = region[:, :, None] == region[:, None, :]
        itself = torch.eye(region.shape[1], dtype=torch.bool)
        return (same & (valid[:, None, :] | itself))[:, None]

    def forward(self, attn: Attention, x: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x (B, N, D)`` -> ``attn`` within each group ``(B, N, D)``; ``bias (heads, L, L)``
        is added to the attention logits."""
        b, n, d = x.shape
        t, h, w = self.grid
        if n != t * h * w:
            raise ValueError(f"this block needs all {t}x{h}x{w} = {t * h * w} tokens of its "
                             f"grid, got {n}")
        vol = x.reshape(b, t, h, w, d)
        pad = [p - g for p, g in zip(self.padded, self.grid)]
        if any(pad):
            vol = F.pad(vol, (0, 0, 0, pad[2], 0, pad[1], 0, pad[0]))
        if any(self.shift):
            vol = vol.roll([-s for s in self.shift], dims=(1, 2, 3))
        groups = self.split(vol)
        g, length = groups.shape[1:3]
        q, k, v = attn.qkv_heads(groups.reshape(b * g, length, d)).unbind(0)
        mask = self.allowed  # (G, 1, L, L); with a bias (G or 1, heads, L, L)
        if bias is not None:
            bias = bias.to(q.dtype)
            mask = bias if mask is None else torch.where(mask, bias, float("-inf"))
        if mask is not None and mask.ndim == 4 and b > 1:  # per group -> per (sample, group)
            mask = mask.expand(b, *mask.shape).reshape(b * mask.shape[0], *mask.shape[1:])
        # 4-D inputs keep SDPA on its fused kernels (5-D ones fall back to the math one)
        vol = self.join(attn.attend(q, k, v, mask).reshape(b, g, length, d))
        if any(self.shift):
            vol = vol.roll(list(self.shift), dims=(1, 2, 3))
        return vol[:, :t, :h, :w].reshape(b, n, d)


class GridBranchBlock(BranchBlock):
    """A :class:`BranchBlock` whose branches and own step attend within :class:`TokenGroups`
    (``<branch>_groups`` and ``groups``)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float,
                 init_values: float, attention: str, groups: dict[str, TokenGroups]):
        super().__init__(dim, num_heads, mlp_ratio, drop_path, init_values)
        self.attention = attention
        for name, module in groups.items():
            setattr(self, name, module)

    def branch_attention(self, prefix: str, num_frames: int
                         ) -> Callable[[Attention, torch.Tensor], torch.Tensor]:
        return getattr(self, f"{prefix}_groups")

    def token_attention(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        return self.groups(self.attn, x)


class AxialBlock(GridBranchBlock):
    """TimeSformer's axial (T+W+H) block; see the module docstring."""

    branches = ("temporal", "width")

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 init_values: float = 0.0, grid: Grid = (1, 1, 1)):
        sizes = axial_sizes(grid)
        super().__init__(dim, num_heads, mlp_ratio, drop_path, init_values, "axial", {
            "temporal_groups": TokenGroups(grid, sizes["temporal"]),
            "width_groups": TokenGroups(grid, sizes["width"]),
            "groups": TokenGroups(grid, sizes["height"])})


class SparseLocalGlobalBlock(GridBranchBlock):
    """TimeSformer's sparse local-global (L+G) block; see the module docstring."""

    branches = ("local",)

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 init_values: float = 0.0, grid: Grid = (1, 1, 1)):
        local, stride = sparse_sizes(grid)
        super().__init__(dim, num_heads, mlp_ratio, drop_path, init_values,
                         "sparse_local_global", {
                             "local_groups": TokenGroups(grid, local),
                             "groups": TokenGroups(grid, stride, strided=True)})


class WindowAttention(Attention):
    """:class:`Attention` with Video Swin's 3D relative position bias: a table of
    ``(2Tw-1)(2Mh-1)(2Mw-1)`` rows (``table_window`` = the configured window) x heads, read at
    the offsets within a (possibly clipped) ``window``."""

    def __init__(self, dim: int, num_heads: int, window: Grid, table_window: Sequence[int]):
        super().__init__(dim, num_heads)
        spans = [2 * s - 1 for s in table_window]
        self.relative_position_bias_table = nn.Parameter(torch.zeros(math.prod(spans), num_heads))
        coords = torch.stack(torch.meshgrid(*(torch.arange(s) for s in window), indexing="ij"))
        rel = coords.flatten(1)[:, :, None] - coords.flatten(1)[:, None, :]
        index = ((rel[0] + table_window[0] - 1) * spans[1] * spans[2]
                 + (rel[1] + table_window[1] - 1) * spans[2] + rel[2] + table_window[2] - 1)
        self.register_buffer("relative_position_index", index, persistent=False)

    def position_bias(self) -> torch.Tensor:
        """``(heads, L, L)`` for the ``L`` tokens of a window."""
        length = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.flatten()]
        return bias.reshape(length, length, -1).permute(2, 0, 1)


class WindowBlock(Block):
    """Video Swin's (shifted) 3D window block on a plain ViT; see the module docstring."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 init_values: float = 0.0, grid: Grid = (1, 1, 1),
                 window_size: Sequence[int] = (2, 7, 7), shifted: bool = False):
        super().__init__(dim, num_heads, mlp_ratio, drop_path, init_values)
        self.attention = "window"
        window, shift = window_geometry(grid, window_size, shifted)
        self.attn = WindowAttention(dim, num_heads, window, window_size)
        self.groups = TokenGroups(grid, window, shift=shift)
        self.init_extra()

    def init_extra(self) -> None:
        trunc_normal_(self.attn.relative_position_bias_table, std=0.02)

    def token_attention(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        return self.groups(self.attn, x, self.attn.position_bias())


def build_grid_block(attention: str, dim: int, num_heads: int, mlp_ratio: float,
                     drop_path: float, init_values: float, grid: Grid, index: int,
                     window_size: Sequence[int]) -> Block:
    """Block ``index`` of type ``attention`` (a key of :data:`NEEDS_FULL_GRID`)."""
    args = (dim, num_heads, mlp_ratio, drop_path, init_values)
    if attention == "axial":
        return AxialBlock(*args, grid=grid)
    if attention == "sparse_local_global":
        return SparseLocalGlobalBlock(*args, grid=grid)
    if attention == "window":
        return WindowBlock(*args, grid=grid, window_size=window_size, shifted=index % 2 == 1)
    raise ValueError(f"unknown attention type {attention!r}")
