"""``python -m finetune.tad --config configs/finetune/tad_demo.yaml [key.sub=value ...]``

Temporal action detection in untrimmed videos: ``finetune.detection.train_tad.run`` trains a
1-D head on frozen sliding-window features and scores segment mAP; ``--help`` lists every
field. Single process. The demo data comes from
``python -m finetune.detection.demo_data tad --out DIR``.
"""
from __future__ import annotations

import json
import sys

from finetune.detection.config import TADConfig
from finetune.detection.train_tad import run
from runtime.config import parse_config
from runtime.errors import run_command
from runtime.logging import setup_logging


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(TADConfig, argv, prog="python -m finetune.tad",
                       description="Temporal action detection: a 1-D head on frozen "
                                   "sliding-window features, scored with segment mAP.")
    setup_logging()
    metrics = run(cfg)  # a stop signal: run_command reports it
    print(json.dumps(metrics, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
