"""VideoMAE pretraining model: asymmetric encoder / decoder reconstructing masked tubelets."""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from .config import ModelConfig
from .layers import Block, gather_tokens, layer_norm, patchify, unpatchify
from .pos_embed import PositionEmbedding
from .vit import (REGISTERED_SIZES, VideoViT, index_to_device, init_transformer_weights,
                  register_sizes, run_blocks)

STD_EPS = 1e-6


class VideoMAEDecoder(nn.Module):
    """Joint-attention blocks, ``norm`` and a linear ``head`` to the pixels of one tubelet,
    applied only to the last ``num_predict`` tokens (the ones to reconstruct)."""

    def __init__(self, embed_dim: int, depth: int, num_heads: int, mlp_ratio: float, patch_dim: int,
                 drop_path_rate: float = 0.0, init_values: float = 0.0,
                 grad_checkpointing: bool = False):
        super().__init__()
        drop_path = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, drop_path[i], init_values)
            for i in range(depth))
        self.norm = layer_norm(embed_dim)
        self.head = nn.Linear(embed_dim, patch_dim)
        self.grad_checkpointing = grad_checkpointing

    def forward(self, x: torch.Tensor, num_predict: int) -> torch.Tensor:
        """``(B, L, Dd)`` -> ``(B, num_predict, patch_dim)``."""
        x = run_blocks(self.blocks, x, 1, self.grad_checkpointing)
        return self.head(self.norm(x[:, -num_predict:]))


class VideoMAEPretrain(nn.Module):
    """VideoMAE / VideoMAE V2 pretraining model.

    The encoder sees only visible tokens; ``encoder_to_decoder`` projects them to the decoder
    width, ``mask_token`` + position embeddings stand in for the tokens to reconstruct, and the
    decoder predicts their pixels. Loss: MSE on reconstructed, encoder-masked tokens.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.encoder = VideoViT(replace(cfg, num_classes=0, final_norm="norm"))
        dec = cfg.decoder_dims()
        self.encoder_to_decoder = nn.Linear(self.encoder.embed_dim, dec.embed_dim, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec.embed_dim))
        self.decoder_pos_embed = PositionEmbedding(cfg.pos_embed, cfg.grid, dec.embed_dim,
                                                   cfg.pos_embed_grid or None)
        self.decoder = VideoMAEDecoder(dec.embed_dim, dec.depth, dec.num_heads, dec.mlp_ratio,
                                       cfg.patch_dim, cfg.drop_path_rate, cfg.layer_scale_init,
                                       cfg.grad_checkpointing)
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std), persistent=False)
        self.encoder_to_decoder.apply(init_transformer_weights)
        self.decoder.apply(init_transformer_weights)
        trunc_normal_(self.mask_token, std=0.02)

    # -- patches and targets --------------------------------------------------------------

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, T, H, W)`` -> ``(B, N, tubelet * patch * patch * C)`` (channel fastest)."""
        return patchify(x, self.cfg.tubelet_size, self.cfg.patch_size)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        return unpatchify(patches, self.cfg.grid, self.cfg.tubelet_size, self.cfg.patch_size)

    def _pixels(self, patches: torch.Tensor) -> torch.Tensor:
        """Normalised patches ``(B, M, P)`` -> pixels in [0, 1] as ``(B, M, P / C, C)``."""
        b, m, p = patches.shape
        patches = patches.reshape(b, m, p // self.cfg.in_chans, self.cfg.in_chans)
        return patches * self.pixel_std + self.pixel_mean

    def _target_stats(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Mean and scale the target is normalised with, broadcastable to ``(B, M, P / C, C)``."""
        if self.cfg.norm_target == "patch_channel":  # VideoMAE: per patch and channel
            return pixels.mean(-2, keepdim=True), pixels.var(-2, keepdim=True).sqrt() + STD_EPS
        if self.cfg.norm_target == "patch":  # MAE: over the whole patch
            flat = pixels.flatten(-2)
            mean, var = flat.mean(-1, keepdim=True), flat.var(-1, keepdim=True)
            return mean[..., None], (var + STD_EPS).sqrt()[..., None]
        return None

    def make_target(self, patches: torch.Tensor) -> torch.Tensor:
        """Normalised input patches ``(B, M, P)`` -> reconstruction target ``(B, M, P)``."""
        pixels = self._pixels(patches)
        stats = self._target_stats(pixels)
        if stats is not None:
            pixels = (pixels - stats[0]) / stats[1]
        return pixels.flatten(-2)

    # -- forward --------------------------------------------------------------------------

    def _decode_index(self, mask: torch.Tensor, decoder_mask: torch.Tensor | None) -> torch.Tensor:
        """Indices ``(B, Nd)`` of the tokens the decoder reconstructs: every masked token, or
        with ``decoder_mask`` (True = not reconstructed, VideoMAE V2) the tokens it keeps."""
        if decoder_mask is None:
            reconstruct = mask
        else:
            if decoder_mask.dtype != torch.bool or decoder_mask.shape != mask.shape:
                raise ValueError(f"decoder_mask must be a bool tensor {tuple(mask.shape)}, got "
                                 f"{decoder_mask.dtype} {tuple(decoder_mask.shape)}")
            reconstruct = ~decoder_mask
        counts = reconstruct.sum(1)
        if (counts != counts[0]).any() or counts[0] == 0:
            raise ValueError(f"every sample must reconstruct the same, non-zero number of tokens, "
                             f"got {counts.tolist()}")
        return reconstruct.nonzero()[:, 1].reshape(mask.shape[0], -1)

    @torch.compiler.disable  # data-dependent index building stays eager under torch.compile
    def _token_indices(self, mask: torch.Tensor, decoder_mask: torch.Tensor | None,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Visible ``(B, Nv)`` and reconstructed ``(B, Nd)`` token indices on ``device``, built
        where the masks live (see :meth:`VideoViT.visible_index`)."""
        visible_index = self.encoder.visible_index(mask)
        decode_index = self._decode_index(mask, decoder_mask)
        return index_to_device(visible_index, device), index_to_device(decode_index, device)

    def _patches(self, x: torch.Tensor) -> torch.Tensor:
        self.encoder.check_video(x)
        return self.patchify(x)

    def predict(self, patches: torch.Tensor, visible_index: torch.Tensor,
                decode_index: torch.Tensor) -> torch.Tensor:
        """Input patches ``(B, N, P)``, indices of visible ``(B, Nv)`` and of reconstructed
        tokens ``(B, Nd)`` -> predictions ``(B, Nd, P)``."""
        latent = self.encoder.forward_tokens(self.encoder.embed_visible(patches, visible_index))
        latent = self.encoder_to_decoder(latent)
        b, num_predict = decode_index.shape
        tokens = torch.cat((latent, self.mask_token.expand(b, num_predict, -1)), dim=1)
        # one gather puts every token's decoder position embedding in place
        order = torch.cat((visible_index, decode_index), dim=1)
        tokens = tokens + self.decoder_pos_embed()[0][order]
        return self.decoder(tokens, num_predict)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, decoder_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x (B, C, T, H, W)`` normalised, ``mask (B, N)`` True = hidden from the encoder,
        optional ``decoder_mask (B, N)`` True = not reconstructed (VideoMAE V2 running cell).

        Returns ``(loss, pred, target)``, ``pred`` and ``target`` ``(B, Nd, P)``. The loss is the
        MSE over reconstructed tokens that the encoder did not see. (With a decoder mask the
        decoder also predicts the few kept tokens the encoder saw, so every sample has the same
        count; the official V2 code counts them in the loss too, here they carry no weight.)
        """
        patches = self._patches(x)
        visible_index, decode_index = self._token_indices(mask, decoder_mask, x.device)
        pred = self.predict(patches, visible_index, decode_index)
        with torch.no_grad():
            target = self.make_target(gather_tokens(patches, decode_index))
        if decoder_mask is None:
            return F.mse_loss(pred, target), pred, target
        # encoder-visible tokens carry no loss (the loader's mask is pinned on CUDA machines)
        weight = mask.to(x.device, non_blocking=True).gather(1, decode_index).to(pred.dtype)
        per_token = (pred - target).pow(2).mean(-1)
        loss = (per_token * weight).sum() / weight.sum().clamp_min(1.0)
        return loss, pred, target

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, mask: torch.Tensor, stats: str = "visible"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip ``(B, C, T, H, W)`` in normalised input space -> ``(prediction, target)``, two
        clips in the same space: visible tubelets from ``x``; masked ones the model's prediction
        or the true reconstruction target, both mapped from target space to pixels with:

        - ``stats="visible"``: one mean and one scale per clip and channel, from the *visible*
          tubelets only (the mean of their patch means and of their patch standard deviations).
          A prediction of zeros - a model that learnt nothing - draws flat patches of the
          visible mean colour, so the picture shows only what the model predicts.
        - ``stats="true"``: each hidden patch's own mean and std (VideoMAE's visualisation);
          it draws the true patch mean even for a prediction of zeros, which flatters a model
          that learnt nothing.

        With ``norm_target="none"`` the prediction is already in pixels and ``stats`` is unused.
        """
        if stats not in ("visible", "true"):
            raise ValueError(f"stats must be 'visible' or 'true', got {stats!r}")
        patches = self._patches(x)
        visible_index, decode_index = self._token_indices(mask, None, x.device)
        pred = self.predict(patches, visible_index, decode_index)
        hidden = gather_tokens(patches, decode_index)
        hidden_pixels = self._pixels(hidden)  # (B, Nd, P / C, C)
        target = self.make_target(hidden).reshape(hidden_pixels.shape)
        pred = pred.float().reshape(hidden_pixels.shape)
        mapping = self._target_stats(hidden_pixels)
        if mapping is not None and stats == "visible":
            seen_mean, seen_scale = self._target_stats(
                self._pixels(gather_tokens(patches, visible_index)))
            mapping = seen_mean.mean(1, keepdim=True), seen_scale.mean(1, keepdim=True)
        index = decode_index[..., None].expand(-1, -1, patches.shape[-1])
        clips = []
        for values in (pred, target):
            pixels = values if mapping is None else values * mapping[1] + mapping[0]
            filled = ((pixels - self.pixel_mean) / self.pixel_std).flatten(-2).to(patches.dtype)
            clips.append(self.unpatchify(patches.scatter(1, index, filled)))
        return clips[0], clips[1]

    def no_weight_decay(self) -> set[str]:
        names = {"mask_token"} | {f"encoder.{n}" for n in self.encoder.no_weight_decay()}
        return names | {f"decoder_pos_embed.{n}"
                        for n, _ in self.decoder_pos_embed.named_parameters()}


def build_pretrain_model(cfg: ModelConfig) -> VideoMAEPretrain:
    return VideoMAEPretrain(cfg)


register_sizes("pretrain_videomae", VideoMAEPretrain,
               tuple(size for size in REGISTERED_SIZES if size[0] != "tiny"))
