"""Summarise a shard set from its ``<key>.json`` records: samples, classes, durations,
resolutions, frame rates. Videos are not decoded (use ``verify`` for that)."""
from __future__ import annotations

import json
import statistics
from collections import Counter
from pathlib import Path

from data_tools.manifest import find_manifest, resolve_shards


def _iter_records(url: str):
    from webdataset.tariterators import tar_file_iterator

    with open(url, "rb") as handle:
        for member in tar_file_iterator(handle, select_files=lambda name: name.endswith(".json")):
            yield json.loads(member["data"])


def _stats(values: list[float]) -> dict:
    if not values:
        return {}
    return {"min": min(values), "mean": statistics.fmean(values),
            "median": statistics.median(values), "max": max(values), "total": sum(values)}


def summarize_shards(spec, max_shards: int | None = None) -> dict:
    """A JSON-ready summary of the shards named by ``spec`` (first ``max_shards`` only if set)."""
    urls = resolve_shards(spec)
    manifest = find_manifest(spec) if isinstance(spec, (str, Path)) else None
    read = urls[:max_shards] if max_shards else urls
    classes, class_order, durations, frames = Counter(), {}, [], []
    resolutions, rates = Counter(), Counter()
    for url in read:
        for meta in _iter_records(url):
            name = meta.get("label_name") or (str(meta["label"]) if meta.get("label", -1) >= 0
                                              else "<unlabeled>")
            classes[name] += 1
            class_order.setdefault(name, int(meta.get("label", -1)))
            durations.append(float(meta["duration"]))
            frames.append(int(meta["num_frames"]))
            resolutions[f"{meta['width']}x{meta['height']}"] += 1
            rates[f"{float(meta['fps']):g}"] += 1
    summary = {
        "shards": len(urls), "shards_read": len(read),
        "bytes": sum(Path(u).stat().st_size for u in read if Path(u).is_file()),
        "samples": len(durations),
        "classes": {name: classes[name] for name in sorted(classes, key=lambda n: (
            class_order[n] < 0, class_order[n], n))},  # label order, unlabeled last
        "duration_s": _stats(durations), "num_frames": _stats(frames),
        "resolutions": dict(resolutions.most_common()), "fps": dict(rates.most_common()),
    }
    if manifest is not None:
        summary["manifest"] = {"samples": manifest.num_samples, "classes": manifest.num_classes,
                               "rejects": manifest.extra.get("num_rejects")}
    return summary


def _top(counts: dict, limit: int = 8) -> str:
    items = list(counts.items())
    text = ", ".join(f"{k}: {v}" for k, v in items[:limit])
    return text + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def format_summary(summary: dict, max_classes: int = 50) -> str:
    """A human-readable table of ``summarize_shards``'s output."""
    partial_read = summary["shards_read"] != summary["shards"]
    lines = [f"shards      {summary['shards']} ({summary['bytes'] / 2**20:.1f} MiB"
             + (f" in the {summary['shards_read']} read)" if partial_read else ")")]
    samples = f"samples     {summary['samples']}"
    if "manifest" in summary:
        m = summary["manifest"]
        samples += (f" (manifest: {m['samples']} samples, {m['classes']} classes, "
                    f"{m['rejects']} rejects)")
    lines.append(samples)
    classes = summary["classes"]
    lines.append(f"classes     {len(classes)}")
    width = max((len(name) for name in classes), default=0)
    for name, count in list(classes.items())[:max_classes]:
        lines.append(f"  {name:<{width}}  {count}")
    if len(classes) > max_classes:
        lines.append(f"  ... {len(classes) - max_classes} more")
    for label, key, unit in (("duration", "duration_s", "s"), ("frames", "num_frames", "")):
        s = summary[key]
        if s:
            lines.append(f"{label:<12}min {s['min']:.4g}{unit} / mean {s['mean']:.4g}{unit} / "
                         f"median {s['median']:.4g}{unit} / max {s['max']:.4g}{unit} "
                         f"(total {s['total']:.6g}{unit})")
    lines.append(f"resolution  {_top(summary['resolutions'])}")
    lines.append(f"fps         {_top(summary['fps'])}")
    return "\n".join(lines)
