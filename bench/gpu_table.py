"""The GPU suite's JSON (``bench/gpu_suite.py``) as the Markdown tables of bench/RESULTS.md.

MFU = model FLOP/s (the formulas' FLOPs per clip x clips/s; a multiply-add = 2 FLOPs; backward
counted as 2 x forward) / the bf16 matmul TFLOP/s the same run measured (median of the best
size). Parts that did not run show their recorded reason instead of figures.

    python bench/gpu_table.py OUT/gpu_suite.json            # prints the Markdown
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import markdown_table


def tflops(gflop_per_clip: float | None, clips_s: float | None) -> float | None:
    if gflop_per_clip is None or clips_s is None:
        return None
    return gflop_per_clip * clips_s / 1e3


def fraction(value: float | None, peak: float | None) -> float | None:
    return value / peak if value is not None and peak else None


def derive(result: dict) -> dict:
    """Achieved TFLOP/s and MFU per measured row, from the figures in ``result``."""
    parts = result.get("parts", {})
    peak = parts.get("peak", {}).get("peak_tflops")
    rows: dict[str, list[dict]] = {}
    for row in parts.get("pretrain_step", {}).get("rows", []):
        if "ours_clips_s" in row and row.get("gflop_per_clip"):
            achieved = {impl: tflops(row["gflop_per_clip"], row[f"{impl}_clips_s"])
                        for impl in ("ours", "hf")}
            rows.setdefault("pretrain_step", []).append(
                {"mode": row["mode"], "batch": row["batch"],
                 **{f"{impl}_tflops": v for impl, v in achieved.items()},
                 **{f"{impl}_mfu": fraction(v, peak) for impl, v in achieved.items()}})
    for row in parts.get("compile", {}).get("rows", []):
        achieved = {kind: tflops(row["gflop_per_clip"], row[f"{kind}_clips_s"])
                    for kind in ("eager", "compiled")}
        rows.setdefault("compile", []).append(
            {"impl": row["impl"], **{f"{k}_tflops": v for k, v in achieved.items()},
             **{f"{k}_mfu": fraction(v, peak) for k, v in achieved.items()}})
    for row in parts.get("decoder_mask", {}).get("rows", []):
        achieved = tflops(row["gflop_per_clip"], row["clips_s"])
        rows.setdefault("decoder_mask", []).append(
            {"decoder_mask": row["decoder_mask"], "tflops": achieved,
             "mfu": fraction(achieved, peak)})
    for row in parts.get("attention", {}).get("rows", []):
        if "fwd_bwd_ms" in row:  # gflops_fwd covers the batch; backward = 2 x forward
            achieved = 3 * row["gflops_fwd"] / row["fwd_bwd_ms"]
            rows.setdefault("attention", []).append(
                {"attention": row["attention"], "frames": row["frames"], "tflops": achieved,
                 "mfu": fraction(achieved, peak)})
    return {"peak_tflops": peak, "rows": rows}


def lookup(derived: dict, part: str, **key: Any) -> dict:
    for row in derived["rows"].get(part, []):
        if all(row.get(k) == v for k, v in key.items()):
            return row
    return {}


def pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}%"


def section(title: str, part: dict | None, body: str) -> str:
    if not part:
        return f"### {title}\n\nnot run"
    if part.get("status") != "ok":
        note = f"**{part.get('status')}**: {part.get('reason')}"
        return f"### {title}\n\n{note}" + (f"\n\n{body}" if body else "")
    return f"### {title}\n\n{body}"


def machine_line(result: dict) -> str:
    m = result.get("machine") or {}
    gpu = f"{m['gpu']} ({m.get('gpu_memory_gib')} GiB), " if m.get("gpu") else "no GPU, "
    return (f"{gpu}CPU {m.get('cpu')} x {m.get('cpu_count')}; torch {m.get('torch')}, CUDA "
            f"{m.get('cuda')}, transformers {m.get('transformers')}, timm {m.get('timm')}")


def parts_table(result: dict) -> str:
    rows = [{"part": name, "status": p.get("status"), "wall s": p.get("wall_s"),
             "budget s": p.get("budget_s"), "reason": (p.get("reason") or "")[:160]}
            for name, p in result.get("parts", {}).items()]
    return markdown_table(rows) if rows else "no parts ran"


def peak_body(part: dict) -> str:
    rows = [{"matmul": f"{r['size']}^3 bf16", "ms": r["ms_per_product"],
             "TFLOP/s (median)": r["tflops"], "TFLOP/s (best)": r["tflops_best"]}
            for r in part.get("matmul", [])]
    copy = part.get("copy")
    text = markdown_table(rows) if rows else ""
    if copy:
        text += (f"\n\nDevice-to-device copy of {copy['mib']} MiB: {copy['gb_s']:.0f} GB/s "
                 f"(read + write; best {copy['gb_s_best']:.0f})")
    return text


def pretrain_body(part: dict, derived: dict) -> str:
    rows = []
    for r in part.get("rows", []):
        if "skipped" in r:
            rows.append({"mode": "pretrain step", "batch": r["batch"], "ours ms": r["skipped"]})
            continue
        d = lookup(derived, "pretrain_step", mode=r["mode"], batch=r["batch"])
        rows.append({"mode": r["mode"], "batch": r["batch"], "ours ms": r["ours_ms"],
                     "HF ms": r["hf_ms"], "HF / ours": r["speedup"],
                     "ours clips/s": r["ours_clips_s"], "HF clips/s": r["hf_clips_s"],
                     "ours MFU": pct(d.get("ours_mfu")), "HF MFU": pct(d.get("hf_mfu")),
                     "max diff": r.get("pred_max_abs_diff", r.get("logits_max_abs_diff"))})
    return markdown_table(rows) if rows else ""


def compile_body(part: dict, derived: dict) -> str:
    rows = []
    for r in part.get("rows", []):
        d = lookup(derived, "compile", impl=r["impl"])
        rows.append({"impl": r["impl"], "batch": r["batch"], "backend": r["backend"],
                     "eager ms": r["eager_ms"], "compiled ms": r["compiled_ms"],
                     "speed-up": r["speedup"], "compile s": r["compile_s"],
                     "eager MFU": pct(d.get("eager_mfu")),
                     "compiled MFU": pct(d.get("compiled_mfu"))})
    return markdown_table(rows) if rows else ""


def decoder_body(part: dict, derived: dict) -> str:
    rows = [{"decoder": r["decoder_mask"], "decoder tokens": r["decoder_tokens"],
             "decoder ms": r["decoder_ms"], "step ms": r["step_ms"], "clips/s": r["clips_s"],
             "MFU": pct(lookup(derived, "decoder_mask", decoder_mask=r["decoder_mask"])
                        .get("mfu"))} for r in part.get("rows", [])]
    text = markdown_table(rows) if rows else ""
    s = part.get("summary")
    if s:
        text += (f"\n\nRunning cell / full: decoder time x{s['decoder_time_ratio']:.2f} (FLOPs "
                 f"x{s['decoder_flop_ratio']:.2f}), step speed-up {s['step_speedup']:.2f}x.")
    return text


def attention_body(part: dict, derived: dict) -> str:
    """Types x frames: ms per forward + backward (factor over the fewest frames), then
    achieved TFLOP/s and peak memory."""
    rows = part.get("rows", [])
    frames = sorted({r["frames"] for r in rows})
    by = {(r["attention"], r["frames"]): r for r in rows}
    header = ["attention"] + [f"{f} fr" for f in frames]

    def table(cell) -> str:
        lines = []
        for kind in dict.fromkeys(r["attention"] for r in rows):
            lines.append({"attention": kind, **{f"{f} fr": cell(kind, f, by.get((kind, f)))
                                                for f in frames}})
        return markdown_table(lines, header)

    def ms(kind, f, r):
        if r is None or "fwd_bwd_ms" not in r:
            return "OOM" if r and "out of memory" in r.get("skipped", "") else "-"
        base = by.get((kind, frames[0]), {}).get("fwd_bwd_ms")
        return f"{r['fwd_bwd_ms']:.1f} ms" + (f" (x{r['fwd_bwd_ms'] / base:.1f})" if base else "")

    def achieved(kind, f, r):
        d = lookup(derived, "attention", attention=kind, frames=f)
        return f"{d['tflops']:.0f} ({pct(d.get('mfu'))})" if d else "-"

    def memory(kind, f, r):
        return f"{r['peak_mib'] / 1024:.1f}" if r and "peak_mib" in r else "-"

    if not rows:
        return ""
    s = part.get("setting", {})
    return (f"Width {s.get('width')}, depth {s.get('depth')}, {s.get('heads')} heads, "
            f"{s.get('img_size')} px, batch {s.get('batch')}, {s.get('dtype')}.\n\n"
            f"Forward + backward:\n\n{table(ms)}\n\nTFLOP/s (MFU):\n\n{table(achieved)}\n\n"
            f"Peak memory (GiB):\n\n{table(memory)}")


def loader_body(part: dict) -> str:
    texts = []
    videos = part.get("videos")
    if videos:
        texts.append(f"{videos['count']} synthetic videos {videos['size']}, {videos['frames']} "
                     f"frames at {videos['fps']} fps, GOP {videos['gop']}, "
                     f"{videos['mean_mbit_s']} Mbit/s, in {videos['shards']} shards; decoder "
                     f"{part.get('backend')}." + (f" {part['note']}." if part.get("note") else ""))
    for run in part.get("runs", []):
        rows = [{"setting": r["setting"], "workers": r["workers"], "clips/s": r["clips_s"],
                 "step ms": r.get("step_ms"), "data wait": pct(r.get("data_wait")),
                 "vs model alone": r.get("vs_model_alone"),
                 "batches pinned / channels-last": (
                     f"{r['pinned_batches']} / {r['channels_last_batches']} of {r['batches']}"
                     if "batches" in r else None),
                 "segments made per worker": r.get("buffers_made_per_worker")}
                for r in run["rows"]]
        s = run["summary"]
        texts.append(f"repeat {run['repeat']} ({run['model']}):\n\n{markdown_table(rows)}\n\n"
                     f"One worker core: {s['loader_clips_per_worker_cpu_s']:.1f} clips/s; "
                     f"worker cores to keep the model busy: {s['workers_needed']:.1f}.")
    return "\n\n".join(texts)


def profile_body(part: dict) -> str:
    rows = [{"impl": r["impl"], "op": r["op"][:60], "calls": r["calls"], "self ms": r["self_ms"],
             "self %": r["self_pct"]} for r in part.get("rows", [])]
    return markdown_table(rows) if rows else ""


def render(result: dict) -> str:
    derived = result.get("derived") or derive(result)
    parts = result.get("parts", {})
    title = "GPU suite" + (" (dry run: CPU, tiny sizes, not figures)"
                           if result.get("dry_run") else "")
    head = (f"## {title}\n\n{machine_line(result)}. Started {result.get('started')}, "
            f"{result.get('wall_s')} s in all.\n\n{parts_table(result)}")
    sections = [
        section("Ceilings", parts.get("peak"), peak_body(parts.get("peak", {}))),
        section("Pretraining step: ours vs HF", parts.get("pretrain_step"),
                pretrain_body(parts.get("pretrain_step", {}), derived)),
        section("Decoder masking", parts.get("decoder_mask"),
                decoder_body(parts.get("decoder_mask", {}), derived)),
        section("Attention types (fine-tuning)", parts.get("attention"),
                attention_body(parts.get("attention", {}), derived)),
        section("Loader feeding the model", parts.get("loader"),
                loader_body(parts.get("loader", {}))),
        section("torch.compile", parts.get("compile"),
                compile_body(parts.get("compile", {}), derived)),
        section("Profile (top operators per step)", parts.get("profile"),
                profile_body(parts.get("profile", {}))),
    ]
    return "\n\n".join([head, *sections])


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", type=Path, help="gpu_suite.json")
    args = parser.parse_args(argv)
    text = render(json.loads(args.json.read_text()))
    print(text)
    return text


if __name__ == "__main__":
    main()
