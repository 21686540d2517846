"""This project's VideoMAE against HF transformers' on the same sizes, weights and masks.

Two measurements per size, each alternating the two implementations in one process (median
of ``--repeats``, after ``--warmup`` untimed calls each):

- ``pretrain step``: forward + backward + AdamW step of ``VideoMAEPretrain`` against
  ``VideoMAEForPreTraining`` (90% tube masking, normalised-pixel target, identical weights
  copied through ``models.hf.project_to_hf``, identical masks, the same
  ``torch.optim.AdamW`` settings on both sides);
- ``inference``: forward of ``VideoViT`` with a 400-class head against
  ``VideoMAEForVideoClassification`` on every token (mean pooling + ``fc_norm``).

HF runs with ``attn_implementation="sdpa"`` (its fastest without the flash-attn package) and
``layer_norm_eps=1e-6``; before timing, the two models' losses / logits are compared so the
figures are known to describe the same computation. ``--compile`` wraps both in
``torch.compile``.

    python bench/vs_hf.py                                  # CPU, fp32: tiny and small, 16x224
    python bench/vs_hf.py --device cuda --sizes base --batch 32   # GPU, bf16
    python bench/vs_hf.py --quick                          # micro model, 32 px (smoke test)
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from transformers import VideoMAEConfig, VideoMAEForPreTraining, VideoMAEForVideoClassification

from bench.common import (add_common_args, autocast, benchmark, finish, machine_info, make_adamw,
                          ratio, setup, train_step, tube_masks)
from models import ModelConfig, VideoMAEPretrain, VideoViT
from models.hf import hf_config, project_to_hf

MASK_RATIO = 0.9
NUM_CLASSES = 400


def model_config(size: str, quick: bool) -> ModelConfig:
    if quick:
        return ModelConfig(size="micro", img_size=32, num_frames=4)
    return ModelConfig(size=size)


def to_hf(ours: torch.nn.Module, hf_class: type, kind: str, attn: str) -> torch.nn.Module:
    """An HF model holding ``ours``'s weights (through the converter)."""
    hf = hf_class(VideoMAEConfig(**hf_config(ours.cfg, kind), attn_implementation=attn))
    hf.load_state_dict(project_to_hf(ours.state_dict(), kind), strict=True)
    for module in hf.modules():  # HF builds fc_norm / decoder.norm with LayerNorm's eps 1e-5
        if isinstance(module, torch.nn.LayerNorm):
            module.eps = 1e-6
    return hf


def compiled(model: torch.nn.Module, args) -> torch.nn.Module:
    """``torch.compile`` with ``--compile-backend`` (inductor unless told otherwise)."""
    return torch.compile(model, backend=args.compile_backend)


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def pretrain_pair(cfg: ModelConfig, args, device: torch.device) -> tuple[dict, dict]:
    """Step closures of both implementations, and how far their first outputs differ."""
    ours = VideoMAEPretrain(cfg).to(device)
    hf = to_hf(ours, VideoMAEForPreTraining, "pretrain", args.hf_attn).to(device)
    video = torch.randn(args.batch, cfg.in_chans, cfg.num_frames, cfg.img_size, cfg.img_size,
                        device=device)
    video_hf = video.transpose(1, 2).contiguous()  # HF takes (B, T, C, H, W)
    mask = tube_masks(args.batch, cfg.grid, MASK_RATIO)  # ours takes the loader's host mask
    mask_hf = mask.to(device)  # HF indexes with the mask on the device
    with torch.no_grad(), autocast(device, args.dtype):
        loss, pred, _ = ours(video, mask)
        out = hf(video_hf, bool_masked_pos=mask_hf)
    check = {"loss_ours": loss.item(), "loss_hf": out.loss.item(),
             "pred_max_abs_diff": max_difference(pred, out.logits)}
    run_ours, run_hf = (compiled(ours, args), compiled(hf, args)) if args.compile else (ours, hf)
    steps = {
        "ours": train_step(run_ours, make_adamw(ours, device), lambda m: m(video, mask)[0], device,
                           args.dtype),
        "hf": train_step(run_hf, make_adamw(hf, device),
                         lambda m: m(video_hf, bool_masked_pos=mask_hf).loss, device, args.dtype),
    }
    return steps, check


def inference_pair(cfg: ModelConfig, args, device: torch.device) -> tuple[dict, dict]:
    ours = VideoViT(replace(cfg, num_classes=NUM_CLASSES)).to(device).eval()
    hf = to_hf(ours, VideoMAEForVideoClassification, "encoder", args.hf_attn).to(device).eval()
    video = torch.randn(args.batch, cfg.in_chans, cfg.num_frames, cfg.img_size, cfg.img_size,
                        device=device)
    video_hf = video.transpose(1, 2).contiguous()
    run_ours, run_hf = (compiled(ours, args), compiled(hf, args)) if args.compile else (ours, hf)

    def forward(model, x):
        def call():
            with torch.inference_mode(), autocast(device, args.dtype):
                return model(x)
        return call

    calls = {"ours": forward(run_ours, video), "hf": forward(lambda x: run_hf(x).logits, video_hf)}
    check = {"logits_max_abs_diff": max_difference(calls["ours"](), calls["hf"]())}
    return calls, check


def measure(size: str, mode: str, args, device: torch.device) -> dict:
    cfg = model_config(size, args.quick)
    torch.manual_seed(0)
    make = pretrain_pair if mode == "pretrain step" else inference_pair
    cases, check = make(cfg, args, device)
    timings = benchmark(cases, device, args.warmup, args.repeats)
    ours, hf = timings["ours"], timings["hf"]
    return {"size": "micro" if args.quick else size, "mode": mode,
            "input": f"{cfg.num_frames}x{cfg.img_size}", "batch": args.batch, "dtype": args.dtype,
            "compile": args.compile, "ours_ms": ours.median * 1e3, "hf_ms": hf.median * 1e3,
            "speedup": ratio(hf.median, ours.median),
            "speedup_cpu_time": ratio(hf.cpu_median, ours.cpu_median),
            "ours_clips_s": args.batch / ours.median, "hf_clips_s": args.batch / hf.median,
            "ours_timing": ours.as_dict(), "hf_timing": hf.as_dict(), **check}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, warmup=2, repeats=7)
    parser.add_argument("--sizes", nargs="+", default=None,
                        help="model sizes (default: tiny small on CPU, base on CUDA)")
    parser.add_argument("--batch", type=int, default=None,
                        help="clips per step (default: 2 on CPU, 32 on CUDA)")
    parser.add_argument("--modes", nargs="+", choices=["pretrain step", "inference"],
                        default=["pretrain step", "inference"])
    parser.add_argument("--hf-attn", default="sdpa",
                        help="HF attn_implementation (sdpa is its fastest built-in)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend (eager / aot_eager only trace: smoke tests)")
    args = parser.parse_args(argv)
    device = setup(args)
    if args.quick:
        args.sizes, args.warmup, args.repeats = ["micro"], 1, 2
    args.sizes = args.sizes or (["base"] if device.type == "cuda" else ["tiny", "small"])
    args.batch = args.batch or (32 if device.type == "cuda" else 2)
    rows = [measure(size, mode, args, device) for size in args.sizes for mode in args.modes]
    columns = ["size", "mode", "input", "batch", "dtype", "ours_ms", "hf_ms", "speedup",
               "speedup_cpu_time", "ours_clips_s", "hf_clips_s"]
    return finish("vs_hf", args, machine_info(device), rows, columns)


if __name__ == "__main__":
    main()
