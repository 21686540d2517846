"""Spatio-temporal action detection (AVA layout): ``python -m finetune.detect --config FILE``.

See ``finetune.detection.train_ava`` for what runs and what is written; ``--help`` lists
every field. The demo data comes from ``python -m finetune.detection.demo_data ava --out DIR``.
"""
from __future__ import annotations

import json
import sys

from finetune.detection.train_ava import DetectConfig, run_ava
from runtime.config import parse_config
from runtime.dist import is_main_process
from runtime.logging import setup_logging


def main(argv: list[str] | None = None) -> dict[str, float]:
    cfg = parse_config(DetectConfig, argv, description=__doc__, prog="python -m finetune.detect")
    setup_logging()
    metrics = run_ava(cfg)
    if is_main_process():
        json.dump(metrics, sys.stdout, indent=1)
        sys.stdout.write("\n")
    return metrics


if __name__ == "__main__":
    main()
