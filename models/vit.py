"""Video ViT encoder (VideoMAE layout) with a mean-pooling classification head."""
from __future__ import annotations

from typing import Callable

import torch
from timm.layers import trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention_blocks import NEEDS_FULL_GRID
from .config import ModelConfig
from .layers import TubeletEmbed, build_block, gather_tokens, layer_norm, patchify
from .pos_embed import PositionEmbedding


def init_transformer_weights(module: nn.Module) -> None:
    """VideoMAE's init: xavier-uniform Linear weights, zero biases, LayerNorm 1 / 0."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, num_frames: int,
               use_checkpoint: bool) -> torch.Tensor:
    for block in blocks:
        if use_checkpoint and torch.is_grad_enabled():
            x = checkpoint(block, x, num_frames, use_reentrant=False)
        else:
            x = block(x, num_frames)
    return x


def index_to_device(index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move token indices built on the host to ``device`` without blocking the host (through
    pinned memory on CUDA); a no-op when they are there already."""
    if index.device == device:
        return index
    if device.type == "cuda":
        index = index.pin_memory()
    return index.to(device, non_blocking=True)


class VideoViT(nn.Module):
    """Video ViT: tubelet embedding, position table, ``depth`` blocks, final norm, head.

    State-dict keys follow the official VideoMAE checkpoints: ``patch_embed.proj``,
    ``blocks.{i}.{norm1,attn.qkv,attn.q_bias,attn.v_bias,attn.proj,norm2,mlp.fc1,mlp.fc2}``,
    ``norm`` or ``fc_norm``, ``head``. No class token: the head mean-pools the tokens.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        dims = cfg.encoder_dims()
        self.embed_dim = self.num_features = dims.embed_dim
        self.depth = dims.depth
        self.grid = cfg.grid
        self.grad_checkpointing = cfg.grad_checkpointing

        self.patch_embed = TubeletEmbed(cfg.in_chans, dims.embed_dim, cfg.patch_size,
                                        cfg.tubelet_size)
        # space_only has no temporal position code (TimeSformer's space-only model has no
        # time embedding): with one, per-frame tokens plus pooling could still tell frame order
        self.pos_embed = PositionEmbedding(cfg.pos_embed, cfg.grid, dims.embed_dim,
                                           cfg.pos_embed_grid or None,
                                           time_invariant=cfg.attention == "space_only")
        drop_path = torch.linspace(0, cfg.drop_path_rate, dims.depth).tolist()
        self.blocks = nn.ModuleList(
            build_block(cfg.attention, dims.embed_dim, dims.num_heads, dims.mlp_ratio, drop_path[i],
                        cfg.layer_scale_init, grid=cfg.grid, index=i, window_size=cfg.window_size)
            for i in range(dims.depth))
        self.norm = nn.Identity() if cfg.uses_fc_norm else layer_norm(dims.embed_dim)
        self.fc_norm = layer_norm(dims.embed_dim) if cfg.uses_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(cfg.head_drop_rate)
        self.head = nn.Linear(dims.embed_dim, cfg.num_classes) if cfg.num_classes else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        self.apply(init_transformer_weights)
        if isinstance(self.head, nn.Linear):  # fine-tuning head: trunc normal .02 scaled by 0.001
            trunc_normal_(self.head.weight, std=0.02)
            self.head.weight.data.mul_(0.001)
        for block in self.blocks:  # zero branch projections, position-bias tables
            block.init_extra()

    # -- inputs ---------------------------------------------------------------------------

    def check_video(self, video: torch.Tensor) -> None:
        cfg = self.cfg
        expected = (cfg.in_chans, cfg.num_frames, cfg.img_size, cfg.img_size)
        if video.ndim != 5 or tuple(video.shape[1:]) != expected:
            raise ValueError("expected video (B, C, T, H, W) = (B, "
                             f"{', '.join(map(str, expected))}) for this model config, got "
                             f"{tuple(video.shape)}")

    @torch.compiler.disable  # host-side checks and nonzero: one graph break, not several
    def visible_index(self, mask: torch.Tensor) -> torch.Tensor:
        """Boolean mask ``(B, N)`` (True = hidden) -> indices of visible tokens ``(B, N_visible)``
        in (t, h, w) order. Every sample must keep the same number of tokens; factorised
        attention types also need a tube mask (the same spatial mask in every time slice), and
        the types of ``NEEDS_FULL_GRID`` (axial, sparse_local_global, window) every token.

        Computed on the mask's device: the checks and ``nonzero`` need the host, so a mask
        still on the host (as the loader delivers it) costs the accelerator no sync; the
        forward passes copy the indices over with :func:`index_to_device`."""
        n = self.cfg.num_tokens
        if mask.dtype != torch.bool or mask.ndim != 2 or mask.shape[1] != n:
            raise ValueError(
                f"mask must be a bool tensor (B, {n}), got {mask.dtype} {tuple(mask.shape)}")
        visible = ~mask
        counts = visible.sum(1)
        if (counts != counts[0]).any():
            raise ValueError(f"every sample must keep the same number of visible tokens, got "
                             f"{counts.tolist()}")
        if counts[0] == 0:
            raise ValueError("mask hides every token")
        if self.cfg.attention in NEEDS_FULL_GRID:
            raise ValueError(f"attention={self.cfg.attention!r} cannot run on masked tokens: "
                             f"{NEEDS_FULL_GRID[self.cfg.attention]}; call it without a mask, "
                             "or use joint, divided, space_only or mixing")
        if self.cfg.attention != "joint":
            slices = mask.reshape(mask.shape[0], self.grid[0], -1)
            if (slices != slices[:, :1]).any():
                raise ValueError(f"attention={self.cfg.attention!r} needs a tube mask (the same "
                                 "spatial mask in every time slice); use attention='joint' for "
                                 "other masks")
        return visible.nonzero()[:, 1].reshape(mask.shape[0], -1)

    # -- forward --------------------------------------------------------------------------

    def embed_visible(self, patches: torch.Tensor, visible_index: torch.Tensor) -> torch.Tensor:
        """:func:`patchify` output ``(B, N, P)`` + visible indices ``(B, Nv)`` -> tokens
        ``(B, Nv, D)`` with position embeddings; hidden tubelets are never projected."""
        visible = gather_tokens(patches, visible_index)
        return self.patch_embed.embed_patches(visible) + self.pos_embed()[0][visible_index]

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Blocks + final norm on embedded tokens ``(B, T' * S, D)``."""
        x = run_blocks(self.blocks, x, self.grid[0], self.grad_checkpointing)
        return self.norm(x)

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                         return_grid: bool = False) -> torch.Tensor:
        """``x (B, C, T, H, W)``, optional ``mask (B, N)`` -> tokens ``(B, N_visible, D)`` after
        the final norm, or ``(B, D, T', H', W')`` with ``return_grid`` (no mask)."""
        self.check_video(x)
        if mask is None:
            tokens = self.patch_embed(x) + self.pos_embed()
        else:
            if return_grid:
                raise ValueError("return_grid=True needs every token: call it without a mask")
            cfg = self.cfg
            visible_index = index_to_device(self.visible_index(mask), x.device)
            tokens = self.embed_visible(patchify(x, cfg.tubelet_size, cfg.patch_size),
                                        visible_index)
        tokens = self.forward_tokens(tokens)
        if return_grid:
            return tokens.transpose(1, 2).reshape(tokens.shape[0], self.embed_dim, *self.grid)
        return tokens

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``(B, N, D)`` -> mean pool -> ``fc_norm`` -> dropout -> ``head``:
        ``(B, num_classes)``."""
        x = self.head_drop(self.fc_norm(tokens.mean(1)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, mask))

    # -- optimiser helpers ----------------------------------------------------------------

    def no_weight_decay(self) -> set[str]:
        """Learned position tables and window attention's relative position bias tables
        (Video Swin excludes them from weight decay too)."""
        names = {f"pos_embed.{name}" for name, _ in self.pos_embed.named_parameters()}
        return names | {name for name, _ in self.named_parameters()
                        if name.endswith("relative_position_bias_table")}

    def num_layers(self) -> int:
        """Layer-decay depth: embeddings = 0, blocks 1..depth, head = depth + 1."""
        return self.depth + 2

    def get_layer_id(self, param_name: str) -> int:
        name = param_name.removeprefix("module.").removeprefix("encoder.")
        if name.startswith(("patch_embed.", "pos_embed.")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.num_layers() - 1


# -- named factories ------------------------------------------------------------------------

MODEL_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    MODEL_REGISTRY[factory.__name__] = factory
    return factory


def create_model(name: str, **overrides) -> nn.Module:
    """Build a registered model; ``overrides`` are :class:`ModelConfig` fields."""
    if name not in MODEL_REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered: {sorted(MODEL_REGISTRY)}")
    return MODEL_REGISTRY[name](**overrides)


def build_encoder(cfg: ModelConfig) -> VideoViT:
    return VideoViT(cfg)


# timm-style names ``<family>_<size>_<patch>``; each factory takes ModelConfig overrides.
REGISTERED_SIZES: tuple[tuple[str, str, dict], ...] = (
    ("micro", "patch16", {}),  # 64 wide, 2 blocks: for tests
    ("tiny", "patch16_224", {}), ("small", "patch16_224", {}), ("base", "patch16_224", {}),
    ("large", "patch16_224", {}), ("huge", "patch16_224", {}),
    ("giant", "patch14_224", {"patch_size": 14}))


def register_sizes(family: str, model_class: Callable[[ModelConfig], nn.Module],
                   sizes: tuple[tuple[str, str, dict], ...] = REGISTERED_SIZES) -> None:
    """Register ``<family>_<size>_<patch>`` for every size, e.g. ``vit_base_patch16_224``."""
    for size, patch, fixed in sizes:
        def factory(_size: str = size, _fixed: dict = fixed, **overrides) -> nn.Module:
            return model_class(ModelConfig(**{"size": _size, **_fixed, **overrides}))
        factory.__name__ = factory.__qualname__ = f"{family}_{size}_{patch}"
        factory.__doc__ = f"{model_class.__name__} of size {size!r}; kwargs are ModelConfig fields."
        register_model(factory)


register_sizes("vit", VideoViT)
