"""``python -m pretrain --config configs/pretrain/<name>.yaml [key.sub=value ...] [--resume auto]``

Runs under a single process, ``torchrun``, the ``deepspeed`` launcher or SLURM ``srun``
(rank discovery: ``runtime.dist``). ``--help`` lists every config field.
"""
from __future__ import annotations

import logging
import sys

from pretrain.config import PretrainConfig
from pretrain.train import run
from runtime.config import parse_config
from runtime.dist import init_distributed
from runtime.errors import run_command
from runtime.logging import setup_logging

logger = logging.getLogger("pretrain")

DESCRIPTION = """VideoMAE self-supervised pretraining on DeepSpeed.

--resume auto|step_N|DIR is short for checkpoint.resume=...: 'auto' continues from the newest
complete checkpoint in out_dir (or starts fresh when there is none)."""


def expand_resume(argv: list[str]) -> list[str]:
    """``--resume X`` / ``--resume=X`` -> ``checkpoint.resume=X``."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--resume" and i + 1 < len(argv):
            out.append(f"checkpoint.resume={argv[i + 1]}")
            i += 2
            continue
        out.append("checkpoint.resume=" + argv[i][len("--resume="):]
                   if argv[i].startswith("--resume=") else argv[i])
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    argv = expand_resume(list(sys.argv[1:] if argv is None else argv))
    cfg = parse_config(PretrainConfig, argv, prog="python -m pretrain", description=DESCRIPTION)
    init_distributed()
    setup_logging()
    summary = run(cfg)  # a stop signal or non-finite values: run_command reports them
    logger.info("finished at step %d (loss %.4f); run folder %s", summary["step"],
                summary["loss"], summary["out_dir"])
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
