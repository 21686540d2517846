"""VideoMAE V2 decoder masking (running cell, 50%): decoder time and pretraining step time.

With 90% tube masking on the 8x14x14 grid the encoder keeps 160 tokens and the decoder, in
VideoMAE V1, reconstructs all 1408 masked ones: 1568 decoder tokens. With the running-cell
decoder mask it reconstructs half of all positions (784), so it runs on 160 + 784 = 944
tokens: about 0.60 of the linear-layer work and 0.36 of the attention work. Measured
(alternating, median of repeats):

- ``decoder``: forward + backward of the decoder blocks, norm and head alone, on its input
  tokens;
- ``step``: the whole pretraining step (forward, backward, AdamW) with and without
  ``decoder_mask``.

    python bench/decoder_mask.py                      # ViT-S 16x224, batch 2, CPU fp32
    python bench/decoder_mask.py --device cuda --size base --batch 32
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.common import (add_common_args, autocast, benchmark, finish, machine_info, make_adamw,
                          ratio, setup, train_step, tube_masks)
from bench.vs_hf import MASK_RATIO, model_config
from data_tools.masking import RunningCellMaskGenerator
from models import VideoMAEPretrain

DECODER_MASK_RATIO = 0.5


def decoder_flops(tokens: int, predicted: int, width: int, depth: int, mlp_ratio: float,
                  patch_dim: int) -> float:
    """Forward FLOPs of the decoder on ``tokens`` inputs, predicting ``predicted`` of them:
    per block ``(8 + 4 * mlp_ratio) * L * D^2`` (qkv, proj, MLP) + ``4 * L^2 * D`` (QK^T, AV),
    then the head ``2 * Nd * D * P``."""
    block = (8 + 4 * mlp_ratio) * tokens * width ** 2 + 4 * tokens ** 2 * width
    return depth * block + 2 * predicted * width * patch_dim


def running_cell_masks(batch: int, grid: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    generator, rng = (RunningCellMaskGenerator(grid, DECODER_MASK_RATIO),
                      torch.Generator().manual_seed(seed))
    return torch.stack([generator(rng) for _ in range(batch)])


def decoder_call(model: VideoMAEPretrain, num_tokens: int, num_predict: int, batch: int,
                 device: torch.device, dtype: str):
    """Forward + backward of ``model.decoder`` on random input tokens ``(B, L, Dd)``."""
    width = model.mask_token.shape[-1]
    tokens = torch.randn(batch, num_tokens, width, device=device, requires_grad=True)
    grad = torch.randn(batch, num_predict, model.cfg.patch_dim, device=device)

    def call() -> None:
        model.zero_grad(set_to_none=True)
        tokens.grad = None
        with autocast(device, dtype):
            pred = model.decoder(tokens, num_predict)
        pred.backward(grad.to(pred.dtype))

    return call


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, warmup=2, repeats=7)
    parser.add_argument("--size", default="small", help="model size preset (16x224 input)")
    parser.add_argument("--batch", type=int, default=None,
                        help="clips per step (default: 2 on CPU, 32 on CUDA)")
    args = parser.parse_args(argv)
    device = setup(args)
    if args.quick:
        args.warmup, args.repeats = 1, 2
    args.batch = args.batch or (32 if device.type == "cuda" else 2)
    cfg = model_config(args.size, args.quick)
    model = VideoMAEPretrain(cfg).to(device)
    video = torch.randn(args.batch, cfg.in_chans, cfg.num_frames, cfg.img_size, cfg.img_size,
                        device=device)
    mask = tube_masks(args.batch, cfg.grid, MASK_RATIO)  # host masks, as in training
    decoder_mask = running_cell_masks(args.batch, cfg.grid)

    visible = int((~mask[0]).sum())
    predicted = {"all masked": int(mask[0].sum()), "running cell": int((~decoder_mask[0]).sum())}
    optimizer = make_adamw(model, device)
    cases = {}
    for name, count in predicted.items():
        cases[f"decoder/{name}"] = decoder_call(model, visible + count, count, args.batch,
                                                device, args.dtype)
    cases["step/all masked"] = train_step(model, optimizer, lambda m: m(video, mask)[0],
                                          device, args.dtype)
    cases["step/running cell"] = train_step(model, optimizer,
                                            lambda m: m(video, mask, decoder_mask)[0], device,
                                            args.dtype)
    timings = benchmark(cases, device, args.warmup, args.repeats)

    dec = cfg.decoder_dims()
    rows = []
    for name, count in predicted.items():
        flops = decoder_flops(visible + count, count, dec.embed_dim, dec.depth, dec.mlp_ratio,
                              cfg.patch_dim)
        rows.append({"decoder_mask": name, "decoder_tokens": visible + count,
                     "reconstructed": count, "decoder_gflop_fwd_per_clip": flops / 1e9,
                     "decoder_ms": timings[f"decoder/{name}"].median * 1e3,
                     "step_ms": timings[f"step/{name}"].median * 1e3,
                     "clips_s": args.batch / timings[f"step/{name}"].median})
    full, cell = rows
    summary = {
        "decoder_time_ratio": ratio(cell["decoder_ms"], full["decoder_ms"]),
        "decoder_flop_ratio": ratio(cell["decoder_gflop_fwd_per_clip"],
                                    full["decoder_gflop_fwd_per_clip"]),
        "step_time_ratio": ratio(cell["step_ms"], full["step_ms"]),
        "step_speedup": ratio(full["step_ms"], cell["step_ms"]),
        "decoder_share_of_step": ratio(full["decoder_ms"], full["step_ms"]),
        "timings": {name: t.as_dict() for name, t in timings.items()},
    }
    result = finish("decoder_mask", args, machine_info(device), rows,
                    ["decoder_mask", "decoder_tokens", "reconstructed",
                     "decoder_gflop_fwd_per_clip", "decoder_ms", "step_ms",
                     "clips_s"], extra={"summary": summary})
    print(f"\nrunning cell / all masked: decoder time x{summary['decoder_time_ratio']:.2f} (FLOPs "
          f"x{summary['decoder_flop_ratio']:.2f}), step time x{summary['step_time_ratio']:.2f} "
          f"(speed-up {summary['step_speedup']:.2f}x); the decoder was "
          f"{summary['decoder_share_of_step']:.0%} of the unmasked step")
    return result


if __name__ == "__main__":
    main()
