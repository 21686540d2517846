"""Temporal action detection in untrimmed videos: ``python -m finetune.tad --config FILE``.

See ``finetune.detection.train_tad`` for what runs and what is written; ``--help`` lists
every field. The demo data comes from ``python -m finetune.detection.demo_data tad --out DIR``.
"""
from __future__ import annotations

import json
import sys

from finetune.detection.train_tad import TADConfig, run_tad
from runtime.config import parse_config
from runtime.logging import setup_logging


def main(argv: list[str] | None = None) -> dict[str, float]:
    cfg = parse_config(TADConfig, argv, description=__doc__, prog="python -m finetune.tad")
    setup_logging()
    metrics = run_tad(cfg)
    json.dump(metrics, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return metrics


if __name__ == "__main__":
    main()
