"""``python -m finetune.detect --config configs/finetune/detect_demo.yaml [key.sub=value ...]``

Spatio-temporal action detection (AVA layout): ``finetune.detection.train_ava.run`` fine-tunes
an encoder with an RoI head and scores frame mAP; ``--help`` lists every field. Runs under a
single process, ``torchrun``, the ``deepspeed`` launcher or SLURM ``srun``. The demo data
comes from ``python -m finetune.detection.demo_data ava --out DIR``.
"""
from __future__ import annotations

import json
import sys

from finetune.detection.config import DetectConfig
from finetune.detection.train_ava import run
from runtime.config import parse_config
from runtime.dist import init_distributed, is_main_process
from runtime.errors import run_command
from runtime.logging import setup_logging


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(DetectConfig, argv, prog="python -m finetune.detect",
                       description="Spatio-temporal action detection (AVA layout): fine-tune an "
                                   "encoder with an RoI head, then score frame mAP.")
    init_distributed()
    setup_logging()
    metrics = run(cfg)  # a stop signal or non-finite values: run_command reports them
    if is_main_process():
        print(json.dumps(metrics, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
