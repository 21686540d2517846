"""The demo pipeline (``launch/demo.py``) for several seeds: mean and spread of every figure.

Each seed is one full ``make demo``-equivalent run in its own process and folder
(``<out>/seed_<s>``: its own demo data, pretraining, probes, fine-tuning and detection, all
seeded by ``--seed s``). A seed whose ``results.json`` already exists is reused, so an
interrupted run continues where it stopped. Prints JSON and a table; ``--results-md`` replaces
the section between the markers below in bench/RESULTS.md (added at the end if missing)::

    python bench/demo_seeds.py                       # seeds 0 1 2, about 3 x 13 min on 2 cores
    python bench/demo_seeds.py --seeds 0 1 2 3 4 --results-md bench/RESULTS.md
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

from bench.common import machine_info, markdown_table  # noqa: E402
from launch.demo import format_value, result_rows  # noqa: E402
from runtime.io import atomic_write_text  # noqa: E402

BEGIN, END = "<!-- demo_seeds:begin -->", "<!-- demo_seeds:end -->"


def run_seed(out: Path, seed: int, extra: list[str]) -> dict:
    """One demo run (reused when its results.json exists); returns its results."""
    folder = out / f"seed_{seed}"
    results = folder / "results.json"
    if not results.is_file():
        cmd = [sys.executable, str(ROOT / "launch" / "demo.py"), "--out", str(folder),
               "--seed", str(seed), *extra]
        print("running:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
    return json.loads(results.read_text())


def summarise(runs: dict[int, dict]) -> list[dict]:
    """One row per demo figure: each seed's value, mean, sample std, min and max."""
    per_seed = {seed: result_rows(results) for seed, results in runs.items()}
    first = next(iter(per_seed.values()))
    rows = []
    for i, row in enumerate(first):
        values = [per_seed[s][i]["value"] for s in runs]
        if any(v is None for v in values):
            continue
        values = [float(v) for v in values]
        rows.append({"stage": row["stage"], "encoder": row["encoder"], "metric": row["metric"],
                     **{f"seed {s}": format_value(row["metric"], v) for s, v in zip(runs, values)},
                     "mean": format_value(row["metric"], statistics.fmean(values)),
                     "std": format_value(row["metric"], statistics.stdev(values))
                     if len(values) > 1 else "",
                     "min": format_value(row["metric"], min(values)),
                     "max": format_value(row["metric"], max(values))})
    return rows


def update_results_md(path: Path, section: str) -> None:
    text = path.read_text() if path.is_file() else ""
    block = f"{BEGIN}\n{section}\n{END}"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    atomic_write_text(path, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "demo_seeds")
    parser.add_argument("--json", type=Path, default=None, help="write the summary here too")
    parser.add_argument("--results-md", type=Path, default=None,
                        help="replace the demo_seeds section of this Markdown file")
    parser.add_argument("--demo-args", nargs=argparse.REMAINDER, default=[],
                        help="passed to launch/demo.py (e.g. --skip-detection)")
    args = parser.parse_args(argv)

    runs = {seed: run_seed(args.out, seed, args.demo_args) for seed in args.seeds}
    rows = summarise(runs)
    info = machine_info()
    seconds = {s: round(sum(r.get("seconds", {}).values())) for s, r in runs.items()}
    table = markdown_table(rows)
    print(f"\ndemo over seeds {args.seeds} ({info['cpu']}, {info['cpu_count']} cores):\n")
    print(table)
    print(f"\nwall seconds per seed (sum of stages): {seconds}")
    summary = {"bench": "demo_seeds", "machine": info, "seeds": args.seeds, "rows": rows,
               "stage_seconds": {s: r.get("seconds") for s, r in runs.items()}}
    if args.json:
        atomic_write_text(args.json, json.dumps(summary, indent=1, default=str) + "\n")
    if args.results_md:
        section = (f"Command: `python bench/demo_seeds.py --seeds {' '.join(map(str, args.seeds))} "
                   f"--results-md {args.results_md}`; machine: {info['cpu']}, "
                   f"{info['cpu_count']} cores, torch {info['torch']}; wall seconds per seed "
                   f"(sum of stages): {seconds}. std = sample standard deviation over seeds.\n\n"
                   + table)
        update_results_md(args.results_md, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
