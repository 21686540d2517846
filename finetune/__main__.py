"""``python -m finetune --config configs/finetune/<name>.yaml [key.sub=value ...]``

Fine-tune a (pretrained) video ViT for recognition (``finetune.train``). Runs under a single
process, ``torchrun``, the ``deepspeed`` launcher or SLURM ``srun``, with the same command
line. ``--help`` lists every config field.
"""
from __future__ import annotations

import json
import logging
import sys

from finetune.config import FinetuneConfig
from finetune.train import run
from runtime.config import parse_config
from runtime.dist import init_distributed, is_main_process
from runtime.errors import run_command
from runtime.logging import setup_logging

logger = logging.getLogger("finetune")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(FinetuneConfig, argv, prog="python -m finetune",
                       description="Fine-tune a video ViT for recognition (VideoMAE recipe).")
    init_distributed()
    setup_logging()
    metrics = run(cfg)  # a stop signal or non-finite values: run_command reports them
    if is_main_process():
        print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
