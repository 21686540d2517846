"""torch.profiler trace of pretraining steps (forward, backward, AdamW): the top operators by
self time, and the time per region (encoder blocks, decoder, forward, backward, optimizer),
per step, averaged over ``--repeats`` profiled steps.

Profiles this project's ``VideoMAEPretrain`` and, with ``--impl ours hf``, HF transformers'
``VideoMAEForPreTraining`` on the same weights and masks, after ``--warmup`` unprofiled
steps. Writes a Chrome trace per implementation (open in chrome://tracing or Perfetto) under
``--out`` (default ``bench/out/profile_step``, git-ignored) and the tables as JSON::

    python bench/profile_step.py                         # ViT-S 16x224, batch 2, CPU fp32
    python bench/profile_step.py --impl ours hf --rows 20
    python bench/profile_step.py --device cuda --size base --batch 32   # CPU + CUDA activity
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile
from transformers import VideoMAEForPreTraining

from bench.common import (add_common_args, autocast, finish, machine_info, make_adamw, setup,
                          tube_masks)
from bench.vs_hf import MASK_RATIO, model_config, to_hf
from models import VideoMAEPretrain

# Forward regions of each implementation: (first submodule entered, last submodule left).
# This project's model calls its encoder's parts directly, so the encoder region runs from
# the first block to the final norm (the tubelet embedding is outside, in "forward").
REGIONS = {
    "ours": {"encoder blocks": ("encoder.blocks.0", "encoder.norm"),
             "decoder": ("decoder", "decoder")},
    "hf": {"encoder blocks": ("videomae.encoder", "videomae.layernorm"),
           "decoder": ("decoder", "decoder")},
}


def label_regions(model: torch.nn.Module, regions: dict[str, tuple[str, str]]) -> list:
    """Forward hooks that open a named profiler range when ``first`` is entered and close it
    when ``last`` returns."""
    handles = []
    for label, (first, last) in regions.items():
        ranges: list = []

        def enter(_module, _inputs, label=label, ranges=ranges):
            ranges.append(record_function(f"region::{label}"))
            ranges[-1].__enter__()

        def leave(_module, _inputs, _output, ranges=ranges):
            ranges.pop().__exit__(None, None, None)

        handles += [model.get_submodule(first).register_forward_pre_hook(enter),
                    model.get_submodule(last).register_forward_hook(leave)]
    return handles


def build(impl: str, args, device: torch.device):
    """Model and a loss closure for ``impl``; HF gets the weights of a same-seeded ours."""
    cfg = model_config(args.size, args.quick)
    torch.manual_seed(0)
    ours = VideoMAEPretrain(cfg)
    video = torch.randn(args.batch, cfg.in_chans, cfg.num_frames, cfg.img_size, cfg.img_size,
                        device=device)
    mask = tube_masks(args.batch, cfg.grid, MASK_RATIO)  # ours: the loader's host mask
    if impl == "ours":
        return ours.to(device), lambda m: m(video, mask)[0]
    mask = mask.to(device)
    hf = to_hf(ours, VideoMAEForPreTraining, "pretrain", args.hf_attn).to(device)
    video_hf = video.transpose(1, 2).contiguous()
    return hf, lambda m: m(video_hf, bool_masked_pos=mask).loss


def profile_step(impl: str, args, device: torch.device, out_dir: Path) -> tuple[list[dict], dict]:
    model, loss_fn = build(impl, args, device)
    optimizer = make_adamw(model, device)

    def step() -> None:
        with record_function("region::step"):
            optimizer.zero_grad(set_to_none=True)
            with record_function("region::forward"), autocast(device, args.dtype):
                loss = loss_fn(model)
            with record_function("region::backward"):
                loss.backward()
            with record_function("region::optimizer"):
                optimizer.step()

    for _ in range(args.warmup):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    handles = label_regions(model, REGIONS[impl])
    try:
        with profile(activities=activities, record_shapes=True) as prof:
            for _ in range(args.repeats):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    finally:
        for handle in handles:
            handle.remove()
    trace = out_dir / f"{impl}_step_trace.json"
    trace.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(trace))

    events = prof.key_averages()
    on_gpu = device.type == "cuda"
    self_time = ((lambda e: e.self_device_time_total) if on_gpu
                 else (lambda e: e.self_cpu_time_total))
    ops = [e for e in events if not e.key.startswith(("region::", "Optimizer."))]
    total_us = sum(self_time(e) for e in ops)
    top = sorted(ops, key=self_time, reverse=True)[:args.rows]
    per_step_ms = 1e-3 / args.repeats
    rows = [{"impl": impl, "op": e.key, "calls": e.count // args.repeats,
             "self_ms": self_time(e) * per_step_ms,
             "self_pct": 100 * self_time(e) / total_us if total_us else 0.0,
             "total_ms": (e.device_time_total if on_gpu else e.cpu_time_total) * per_step_ms}
            for e in top]
    regions = {e.key.removeprefix("region::"): e.cpu_time_total * per_step_ms
               for e in events if e.key.startswith("region::")}
    summary = {"impl": impl, "trace": str(trace), "op_self_total_ms": total_us * per_step_ms,
               "regions_ms": regions}
    return rows, summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, warmup=2, repeats=3)
    parser.add_argument("--size", default="small", help="model size preset (16x224 input)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--impl", nargs="+", choices=["ours", "hf"], default=["ours", "hf"])
    parser.add_argument("--hf-attn", default="sdpa")
    parser.add_argument("--rows", type=int, default=15,
                        help="top operators listed per implementation")
    parser.add_argument("--out", type=Path, default=Path("bench/out/profile_step"),
                        help="trace folder")
    args = parser.parse_args(argv)
    device = setup(args)
    if args.quick:
        args.warmup, args.repeats, args.rows = 1, 1, 5
    rows, summaries = [], []
    for impl in args.impl:
        impl_rows, summary = profile_step(impl, args, device, args.out)
        rows += impl_rows
        summaries.append(summary)
    result = finish("profile_step", args, machine_info(device), rows,
                    ["impl", "op", "calls", "self_ms", "self_pct", "total_ms"],
                    extra={"summaries": summaries}, default_json=args.out / "profile_step.json")
    print()
    for s in summaries:
        regions = ", ".join(f"{k} {v:.0f} ms" for k, v in s["regions_ms"].items())
        print(f"{s['impl']}: operators' self time {s['op_self_total_ms']:.0f} ms; {regions}; "
              f"trace {s['trace']}")
    return result


if __name__ == "__main__":
    main()
