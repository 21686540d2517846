"""Building blocks: tubelet embedding, attention with VideoMAE's bias layout, block variants.

Blocks take tokens ``(B, N, D)`` laid out as a ``(T', S)`` grid flattened time-major, where
``S`` is the number of (visible) spatial positions per time slice; ``num_frames`` is ``T'``.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import nn

LN_EPS = 1e-6


def layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=LN_EPS)


def patchify(video: torch.Tensor, tubelet: int, patch: int) -> torch.Tensor:
    """``(B, C, T, H, W)`` -> ``(B, N, tubelet * patch * patch * C)``.

    Tokens in (t, h, w) order; inside a token the pixels are ordered (dt, dy, dx, c), channel
    fastest, as VideoMAE's target ``b (t h w) (p0 p1 p2 c)``.
    """
    b, c, t, h, w = video.shape
    x = video.reshape(b, c, t // tubelet, tubelet, h // patch, patch, w // patch, patch)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)
    return x.reshape(b, (t // tubelet) * (h // patch) * (w // patch), tubelet * patch * patch * c)


def gather_tokens(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tokens (B, N, P)``, ``index (B, M)`` -> ``(B, M, P)``, each sample's indexed tokens."""
    return tokens.gather(1, index[..., None].expand(-1, -1, tokens.shape[-1]))


def unpatchify(patches: torch.Tensor, grid: tuple[int, int, int], tubelet: int,
               patch: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``(B, N, P)`` -> ``(B, C, T, H, W)``."""
    b, n, p = patches.shape
    t, h, w = grid
    c = p // (tubelet * patch * patch)
    x = patches.reshape(b, t, h, w, tubelet, patch, patch, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(b, c, t * tubelet, h * patch, w * patch)


class TubeletEmbed(nn.Module):
    """Conv3d with kernel = stride = ``(tubelet, patch, patch)``:
    ``(B, C, T, H, W) -> (B, N, D)``."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, tubelet_size: int):
        super().__init__()
        kernel = (tubelet_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=kernel, stride=kernel)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.proj(video).flatten(2).transpose(1, 2)

    def embed_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """The same projection on :func:`patchify` output ``(..., P) -> (..., D)``, so masked
        tokens are never embedded."""
        weight = self.proj.weight.permute(0, 2, 3, 4, 1).reshape(self.proj.out_channels, -1)
        return F.linear(patches, weight, self.proj.bias)


class Attention(nn.Module):
    """Multi-head self-attention as stored by VideoMAE: ``qkv`` without bias plus separate
    ``q_bias`` / ``v_bias`` (the key has none); one fused matmul and SDPA."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.v_bias = None
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, L, D)`` -> ``(3, B, heads, L, head_dim)``."""
        bias = None
        if self.q_bias is not None:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias)
        qkv = qkv.reshape(x.shape[0], x.shape[1], 3, self.num_heads, self.head_dim)
        return qkv.permute(2, 0, 3, 1, 4)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(..., heads, L, head_dim)`` each -> projected output ``(..., L, D)``; ``attn_mask``
        (boolean, True = may attend, or additive) broadcasts to ``(..., heads, L, L)``."""
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(out.transpose(-3, -2).flatten(-2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_heads(x).unbind(0)
        return self.attend(q, k, v)


def mix_time(kv: torch.Tensor, num_frames: int, fold: int) -> torch.Tensor:
    """XViT space-time mixing of keys/values ``(..., B*T', heads, S, head_dim)``: in every head
    the first ``fold`` channels come from slice t-1 and the next ``fold`` from t+1 (zeros past
    the ends); the rest stay at t."""
    *lead, bt, heads, s, d = kv.shape
    x = kv.reshape(*lead, bt // num_frames, num_frames, heads, s, d)
    zeros = x.new_zeros(*lead, bt // num_frames, 1, heads, s, fold)
    from_prev = torch.cat((zeros, x[..., :-1, :, :, :fold]), dim=-4)
    from_next = torch.cat((x[..., 1:, :, :, fold:2 * fold], zeros), dim=-4)
    return torch.cat((from_prev, from_next, x[..., 2 * fold:]), dim=-1).reshape(kv.shape)


class Block(nn.Module):
    """Pre-norm transformer block (VideoMAE keys: norm1, attn, norm2, mlp, gamma_1/gamma_2).

    ``attention`` picks which tokens each query sees: ``joint`` all of them, ``space_only``
    the tokens of its own time slice, ``mixing`` its own slice with keys/values channel-mixed
    from the neighbouring slices (XViT).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 init_values: float = 0.0, attention: str = "joint"):
        super().__init__()
        if attention not in ("joint", "space_only", "mixing"):
            raise ValueError(
                f"Block attention must be joint, space_only or mixing, got {attention!r}")
        self.attention = attention
        self.norm1 = layer_norm(dim)
        self.attn = Attention(dim, num_heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        if init_values > 0:
            self.gamma_1 = nn.Parameter(init_values * torch.ones(dim))
            self.gamma_2 = nn.Parameter(init_values * torch.ones(dim))
        else:
            self.gamma_1 = self.gamma_2 = None

    def token_attention(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        if self.attention == "joint":
            return self.attn(x)
        b, n, d = x.shape
        per_slice = x.reshape(b * num_frames, n // num_frames, d)
        if self.attention == "space_only":
            return self.attn(per_slice).reshape(b, n, d)
        q, kv = self.attn.qkv_heads(per_slice).split((1, 2))
        k, v = mix_time(kv, num_frames, self.attn.head_dim // 8).unbind(0)
        return self.attn.attend(q[0], k, v).reshape(b, n, d)

    def init_extra(self) -> None:
        """The block's own init, re-applied after the model-wide one (``VideoViT.init_weights``):
        nothing here; zero branch projections, position-bias tables in subclasses."""

    @staticmethod
    def _scale(x: torch.Tensor, gamma: torch.Tensor | None) -> torch.Tensor:
        return x if gamma is None else x * gamma

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        x = x + self.drop_path(
            self._scale(self.token_attention(self.norm1(x), num_frames), self.gamma_1))
        return x + self.drop_path(self._scale(self.mlp(self.norm2(x)), self.gamma_2))


class BranchBlock(Block):
    """A block with extra attention steps before its own (TimeSformer's layout): each branch
    ``p`` in ``branches`` has ``p_norm1``, ``p_attn`` and a zero-initialised ``p_fc`` and adds
    ``p_fc(drop_path(p_attn over its token groups(p_norm1(x))))``; then the block's ``norm1``
    / ``attn`` step (``token_attention``) and the MLP. With every ``p_fc`` at zero the block
    is its last step alone."""

    branches: tuple[str, ...] = ()

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 init_values: float = 0.0, attention: str = "space_only"):
        super().__init__(dim, num_heads, mlp_ratio, drop_path, init_values, attention=attention)
        for prefix in self.branches:
            setattr(self, f"{prefix}_norm1", layer_norm(dim))
            setattr(self, f"{prefix}_attn", Attention(dim, num_heads))
            setattr(self, f"{prefix}_fc", nn.Linear(dim, dim))
        self.init_extra()

    def init_extra(self) -> None:
        for prefix in self.branches:
            nn.init.zeros_(getattr(self, f"{prefix}_fc").weight)
            nn.init.zeros_(getattr(self, f"{prefix}_fc").bias)

    def branch_attention(self, prefix: str, num_frames: int
                         ) -> Callable[[Attention, torch.Tensor], torch.Tensor]:
        """``(attn, tokens (B, N, D)) -> (B, N, D)``: branch ``prefix``'s attention pattern."""
        raise NotImplementedError

    def branch_residual(self, prefix: str, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Branch ``prefix``'s residual ``(B, N, D)`` for tokens ``x (B, N, D)``."""
        attend = self.branch_attention(prefix, num_frames)
        out = attend(getattr(self, f"{prefix}_attn"), getattr(self, f"{prefix}_norm1")(x))
        return getattr(self, f"{prefix}_fc")(self.drop_path(out))

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        for prefix in self.branches:
            x = x + self.branch_residual(prefix, x, num_frames)
        return super().forward(x, num_frames)


def along_time(attn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
               num_frames: int) -> torch.Tensor:
    """``attn`` (e.g. an ``Attention``) over the ``T'`` tokens of each spatial position of
    ``(B, T' * S, D)``."""
    b, n, d = x.shape
    s = n // num_frames
    per_position = x.reshape(b, num_frames, s, d).transpose(1, 2).reshape(b * s, num_frames, d)
    return attn(per_position).reshape(b, s, num_frames, d).transpose(1, 2).reshape(b, n, d)


class DividedBlock(BranchBlock):
    """TimeSformer divided space-time block: temporal attention over each spatial position
    (``temporal_norm1``, ``temporal_attn``, ``temporal_fc``), then spatial attention within each
    time slice, then the MLP. ``temporal_fc`` starts at zero, so a fresh block is a per-frame one.
    Runs on tube-masked tokens too (``S`` = visible positions per slice).
    """

    branches = ("temporal",)

    def branch_attention(self, prefix: str, num_frames: int
                         ) -> Callable[[Attention, torch.Tensor], torch.Tensor]:
        return lambda attn, x: along_time(attn, x, num_frames)

    def branch_residual(self, prefix: str, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        # TimeSformer's order: drop path and projection in the per-position layout, so
        # stochastic depth drops one position's temporal residual at a time, as in its code
        return along_time(lambda group: self.temporal_fc(self.drop_path(self.temporal_attn(
            self.temporal_norm1(group)))), x, num_frames)


def build_block(attention: str, dim: int, num_heads: int, mlp_ratio: float, drop_path: float,
                init_values: float, grid: tuple[int, int, int] = (0, 0, 0), index: int = 0,
                window_size: Sequence[int] = ()) -> Block:
    """Block ``index`` of an encoder with ``attention`` on a ``grid`` = (T', H', W') of tokens
    (the grid and ``window_size`` matter to the types of ``models.attention_blocks`` only)."""
    if attention == "divided":
        return DividedBlock(dim, num_heads, mlp_ratio, drop_path, init_values)
    if attention in ("joint", "space_only", "mixing"):
        return Block(dim, num_heads, mlp_ratio, drop_path, init_values, attention=attention)
    from .attention_blocks import build_grid_block  # it builds on this module's blocks
    return build_grid_block(attention, dim, num_heads, mlp_ratio, drop_path, init_values, grid,
                            index, window_size)
