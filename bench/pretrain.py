"""Pretraining throughput through the real training engine: clips/s, peak memory per rank and,
on a GPU, model FLOPs utilisation.

Each configuration builds ``VideoMAEPretrain``, wraps it with ``runtime.engine.create_engine``
(DeepSpeed, client AdamW, per-group lr, non-finite check) and times the step the training loop
runs - forward under ``engine.autocast()``, ``engine.step(loss)`` - on in-memory clips with
90% tube masks, so the loader is not part of the figure (``bench/e2e.py`` times both).
Configurations run one after another, smallest first; each reports the median step of
``--repeats`` after ``--warmup`` untimed steps, in wall-clock and in process CPU time (the
latter is the steadier figure on a shared CPU).

Model FLOPs are counted analytically per clip (a multiply-add = 2 FLOPs), r = MLP ratio:

    block(L, D) = (8 + 4 r) L D^2 + 4 L^2 D        qkv, proj, MLP + QK^T, AV
    encoder     = 2 Nv P D + depth * block(Nv, D)   tubelet embedding and blocks on the Nv
                                                    visible tokens
    bridge      = 2 Nv D Dd                         encoder_to_decoder
    decoder     = depth_d * block(Nv + Nd, Dd) + 2 Nd Dd P
                                                    Nd = reconstructed tokens (all masked ones,
                                                    or those kept by a decoder mask)
    step        = 3 x forward                       backward = 2 x forward; activation
                                                    recomputation is not counted

ViT-B, 16x224, 90% tube masking (Nv = 160, Nd = 1408): encoder 28.5 + bridge 0.09 + decoder
39.0 = 67.6 GFLOPs forward, 203 GFLOPs per clip and step (facts.md: about 70 / 207).
MFU = achieved model FLOP/s per GPU / the measured dense bf16 matmul peak of the device
(``bench.common.peak_matmul_tflops``).

    python bench/pretrain.py                          # CPU fp32: tiny and ViT-S
    python bench/pretrain.py --device cuda            # + ViT-B 16x224 bf16, MFU
    torchrun --nproc_per_node 2 bench/pretrain.py     # per-rank memory of a data-parallel run
"""
from __future__ import annotations

import argparse
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as torch_dist

from bench.common import (add_common_args, benchmark, finish, machine_info, peak_matmul_tflops,
                          setup, tube_masks)
from bench.decoder_mask import decoder_flops
from models import ModelConfig, VideoMAEPretrain
from runtime.dist import init_distributed
from runtime.engine import EngineConfig, create_engine
from runtime.optim import OptimConfig

MASK_RATIO = 0.9


@dataclass(frozen=True)
class Case:
    name: str
    model: ModelConfig
    cpu_batch: int
    gpu_batch: int
    gpu_only: bool = False


CASES = {
    "tiny": Case("tiny",
                 ModelConfig(size="micro", img_size=32, patch_size=8, num_frames=16), 8, 256),
    "vit_s": Case("vit_s", ModelConfig(size="small"), 2, 64),
    "vit_b": Case("vit_b", ModelConfig(size="base"), 1, 32, gpu_only=True),
}


def pretrain_flops(cfg: ModelConfig, num_visible: int, num_predict: int) -> dict[str, float]:
    """Forward FLOPs per clip by part (see the module docstring), and ``step`` = 3 x forward."""
    enc, dec = cfg.encoder_dims(), cfg.decoder_dims()
    block = ((8 + 4 * enc.mlp_ratio) * num_visible * enc.embed_dim ** 2
             + 4 * num_visible ** 2 * enc.embed_dim)
    parts = {
        "encoder": 2 * num_visible * cfg.patch_dim * enc.embed_dim + enc.depth * block,
        "bridge": 2 * num_visible * enc.embed_dim * dec.embed_dim,
        "decoder": decoder_flops(num_visible + num_predict, num_predict, dec.embed_dim, dec.depth,
                                 dec.mlp_ratio, cfg.patch_dim),
    }
    parts["forward"] = sum(parts.values())
    parts["step"] = 3 * parts["forward"]
    return parts


def peak_memory_mib(device: torch.device) -> float:
    """Peak allocated GPU memory, or on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def per_rank(value: float) -> list[float]:
    if not torch_dist.is_initialized() or torch_dist.get_world_size() == 1:
        return [value]
    values: list = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(values, value)
    return values


def measure(case: Case, args: argparse.Namespace, device: torch.device, world_size: int) -> dict:
    cfg = case.model
    batch = args.batch or (case.gpu_batch if device.type == "cuda" else case.cpu_batch)
    engine_cfg = EngineConfig(precision=args.dtype, zero_stage=args.zero_stage)
    optim_cfg = OptimConfig(warmup_epochs=0.0, epochs=1)
    engine = create_engine(VideoMAEPretrain(cfg), engine_cfg, optim_cfg, batch, world_size,
                           out_dir=None, steps_per_epoch=10 ** 6)
    video = torch.randn(batch, cfg.in_chans, cfg.num_frames, cfg.img_size, cfg.img_size,
                        device=device)
    # a host mask, as the loader delivers it (the model builds token indices there: no device sync)
    mask = tube_masks(batch, cfg.grid, MASK_RATIO)

    def step() -> None:
        with engine.autocast():
            loss = engine(video, mask)[0]
        engine.step(loss)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timing = benchmark({case.name: step}, device, args.warmup, args.repeats)[case.name]
    visible = int((~mask[0]).sum())
    flops = pretrain_flops(cfg, visible, cfg.num_tokens - visible)
    clips_per_s = batch * world_size / timing.median
    row = {"config": case.name, "model": cfg.size, "input": f"{cfg.num_frames}x{cfg.img_size}",
           "batch_per_rank": batch, "ranks": world_size, "precision": args.dtype,
           "zero": args.zero_stage, "step_ms": timing.median * 1e3, "clips_s": clips_per_s,
           "step_cpu_s": timing.cpu_median,
           "peak_mem_mib_per_rank": per_rank(round(peak_memory_mib(device), 1)),
           "gflop_fwd_per_clip": flops["forward"] / 1e9,
           "gflop_step_per_clip": flops["step"] / 1e9,
           "tflops": flops["step"] * clips_per_s / 1e12,
           "timing": timing.as_dict()}
    if args.peak_tflops:
        row["mfu"] = row["tflops"] / world_size / args.peak_tflops
    return row


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, warmup=2, repeats=5)
    parser.add_argument("--configs", nargs="+", choices=sorted(CASES), default=None,
                        help="default: tiny vit_s on CPU, tiny vit_s vit_b on CUDA")
    parser.add_argument("--batch", type=int, default=None,
                        help="clips per rank (default per config)")
    parser.add_argument("--zero-stage", type=int, default=1, choices=(0, 1, 2))
    args = parser.parse_args(argv)
    env = init_distributed()
    device = setup(args)
    if device.type == "cuda":
        torch.cuda.set_device(env.local_rank)
        device = torch.device("cuda", env.local_rank)
    if args.quick:
        args.configs, args.warmup, args.repeats = ["tiny"], 1, 2
    names = args.configs or [n for n, c in CASES.items() if device.type == "cuda" or not c.gpu_only]
    args.peak_tflops = peak_matmul_tflops(device) if device.type == "cuda" else None
    rows = [measure(CASES[name], args, device, env.world_size) for name in names]
    if env.rank != 0:
        return None
    extra = {"peak_bf16_matmul_tflops": args.peak_tflops, "mask_ratio": MASK_RATIO}
    columns = ["config", "input", "batch_per_rank", "ranks", "precision", "zero", "step_ms",
               "step_cpu_s", "clips_s", "peak_mem_mib_per_rank", "gflop_step_per_clip", "tflops"]
    if args.peak_tflops:
        columns.append("mfu")
    return finish("pretrain", args, machine_info(device), rows, columns, extra=extra)


if __name__ == "__main__":
    main()
