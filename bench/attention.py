"""Forward + backward time and peak memory of the attention types against clip length, and
their forward FLOPs (:func:`attention_flops`).

One small encoder (default: ViT-Ti width 192, 3 heads, 2 blocks, 224 px: 196 tokens per time
slice) with a classification head, full token grid, cross-entropy backward; frames from 4 to 64
(tubelet 2, patch 16). Every
(attention, frames) case runs in a fresh subprocess so its peak memory is its own: on CPU the
growth of the peak resident size (``ru_maxrss``) over the size just before the first step, on
CUDA ``max_memory_allocated`` over the allocation before it. Times are medians after warm-up
(``bench.common.benchmark``), wall clock and process CPU time; CPU time is the steadier figure
on a shared machine.

    python bench/attention.py --threads 1         # CPU, as recorded in bench/RESULTS.md
    python bench/attention.py --img-size 112      # 49 instead of 196 tokens per time slice
    python bench/attention.py --device cuda --batch 8

    python bench/attention.py --attention axial sparse_local_global window

Expected: joint attention grows quadratically with the number of frames (all tokens attend to
all), divided (temporal + spatial) and mixing (spatial with shifted keys / values) near-linearly,
space_only is the linear floor; axial (T' + H' + W' keys per query) and window (Tw M M keys)
near-linearly; sparse_local_global quadratically at a fraction of joint's attention cost (its
T' x H'/2 x W'/2 local windows and stride-2 global groups both grow with T').

Forward FLOPs per clip (a multiply-add = 2 FLOPs), counted as the code computes them: N tokens,
width D, MLP ratio r, P pixels per tubelet. Every attention step runs on Np tokens (N padded to
whole groups) in groups of L tokens: qkv + proj 8 Np D^2, QK^T and AV 4 Np L D; a branch adds
its zero-initialised projection, 2 N D^2; the MLP is 4 r N D^2 per block:

    joint L = N; space_only, mixing L = H'W'; divided T' (branch) + H'W'
    axial T' + W' (branches) + H'; sparse_local_global T' ceil(H'/2) ceil(W'/2) (branch) +
    Np / 8 (stride 2: Np / (2 * 2 * 2)); window Tw M M (clipped to the grid)
    encoder = 2 N P D + depth * block + 2 D classes (head)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.common import add_common_args, autocast, benchmark, finish, machine_info, setup
from models import ModelConfig, VideoViT
from models.attention_blocks import axial_sizes, padded_grid, sparse_sizes, window_geometry
from models.config import ATTENTION_TYPES


def attention_steps(cfg: ModelConfig, index: int) -> tuple[list[tuple[int, int]], int]:
    """Block ``index``'s attention steps as ``(padded tokens, tokens per group)``, and how
    many of them are branches (with their own output projection)."""
    grid = cfg.grid
    t, h, w = grid
    n = t * h * w
    kind = cfg.attention
    if kind == "joint":
        return [(n, n)], 0
    if kind in ("space_only", "mixing"):
        return [(n, h * w)], 0
    if kind == "divided":
        return [(n, t), (n, h * w)], 1
    if kind == "axial":
        return [(n, math.prod(size)) for size in axial_sizes(grid).values()], 2
    if kind == "sparse_local_global":
        local, stride = sparse_sizes(grid)
        global_tokens = math.prod(padded_grid(grid, stride))
        return [(math.prod(padded_grid(grid, local)), math.prod(local)),
                (global_tokens, global_tokens // math.prod(stride))], 1
    if kind == "window":
        window, _ = window_geometry(grid, cfg.window_size, shifted=index % 2 == 1)
        return [(math.prod(padded_grid(grid, window)), math.prod(window))], 0
    raise ValueError(f"no FLOP formula for attention={kind!r}")


def attention_flops(cfg: ModelConfig) -> float:
    """Forward FLOPs of ``VideoViT(cfg)`` on one full clip (the module docstring's formula)."""
    dims = cfg.encoder_dims()
    d, n = dims.embed_dim, cfg.num_tokens
    total = 2 * n * cfg.patch_dim * d + 2 * d * cfg.num_classes
    for index in range(dims.depth):
        steps, branches = attention_steps(cfg, index)
        total += 4 * dims.mlp_ratio * n * d ** 2 + branches * 2 * n * d ** 2
        total += sum(8 * padded * d ** 2 + 4 * padded * group * d for padded, group in steps)
    return total


def memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2 ** 20
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(attention: str, frames: int, args: argparse.Namespace, device: torch.device) -> dict:
    """One case, in this (fresh) process."""
    cfg = ModelConfig(size="custom", embed_dim=args.width, depth=args.depth, num_heads=args.heads,
                      img_size=args.img_size, num_frames=frames, attention=attention,
                      num_classes=10)
    with device:  # initialised where it runs: a ViT-B is built in seconds on the CPU
        model = VideoViT(cfg).to(device).train()
    video = torch.randn(args.batch, 3, frames, args.img_size, args.img_size, device=device)
    labels = torch.zeros(args.batch, dtype=torch.long, device=device)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with autocast(device, args.dtype):
            loss = torch.nn.functional.cross_entropy(model(video), labels)
        loss.backward()

    before = memory_mib(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timing = benchmark({"step": step}, device, args.warmup, args.repeats)["step"]
    return {"attention": attention, "frames": frames, "tokens": cfg.num_tokens,
            "gflops_fwd": attention_flops(cfg) * args.batch / 1e9,
            "fwd_bwd_ms": timing.median * 1e3, "cpu_ms": timing.cpu_median * 1e3,
            "peak_mib": peak_mib(device) - before, "timing": timing.as_dict()}


def growth_table(rows: list[dict], key: str, unit: str, digits: int = 0) -> str:
    """Attention types x frames, ``key`` per cell, with the factor over the fewest frames."""
    frames = sorted({r["frames"] for r in rows})
    by = {(r["attention"], r["frames"]): r for r in rows}
    lines = ["| attention | " + " | ".join(f"{f} fr" for f in frames) + " |",
             "|" + "---|" * (len(frames) + 1)]
    for attention in dict.fromkeys(r["attention"] for r in rows):
        base = by[(attention, frames[0])][key]
        cells = [f"{by[(attention, f)][key]:.{digits}f}{' ' + unit if unit else ''} "
                 f"(x{by[(attention, f)][key] / base:.1f})"
                 for f in frames]
        lines.append(f"| {attention} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, warmup=2, repeats=5)
    parser.add_argument("--frames", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--attention", nargs="+", choices=ATTENTION_TYPES,
                        default=list(ATTENTION_TYPES), help="the types to run (default: all)")
    parser.add_argument("--case", nargs=2, metavar=("ATTENTION", "FRAMES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = setup(args)
    if args.quick:
        args.frames, args.warmup, args.repeats = [4, 8], 1, 2

    if args.case:  # child process: one measurement, as one JSON line
        print(json.dumps(measure(args.case[0], int(args.case[1]), args, device)))
        return None

    rows = []
    for frames in args.frames:
        for attention in args.attention:
            child = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv, "--case",
                                    attention, str(frames)], capture_output=True, text=True)
            if child.returncode:
                raise SystemExit(f"case {attention} / {frames} frames failed:\n{child.stderr}")
            row = json.loads(child.stdout.strip().splitlines()[-1])
            print(json.dumps(row), flush=True)
            rows.append(row)
    setting = (f"width {args.width}, depth {args.depth}, heads {args.heads}, {args.img_size} px, "
               f"batch {args.batch}, {args.dtype}, tubelet 2 x patch 16, median of {args.repeats} "
               f"after {args.warmup} warm-up")
    result = finish("attention", args, machine_info(device), rows,
                    ["attention", "frames", "tokens", "gflops_fwd", "fwd_bwd_ms", "cpu_ms",
                     "peak_mib"],
                    extra={"setting": setting})
    print(f"\n{setting}\n\nforward GFLOPs (formula; factor over {args.frames[0]} frames):\n")
    print(growth_table(rows, "gflops_fwd", "", digits=2))
    print(f"\nforward+backward CPU time (factor over {args.frames[0]} frames):\n")
    print(growth_table(rows, "cpu_ms", "ms"))
    print("\npeak memory growth:\n")
    print(growth_table(rows, "peak_mib", "MiB"))
    return result


if __name__ == "__main__":
    main()
