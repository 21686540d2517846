"""Checkpoints and the data position they store, for exact resume.

- ``CheckpointConfig``: the ``checkpoint`` config section (save interval, how many to keep,
  what to resume from).
- ``DataPosition`` / ``segment_seed``: the data position a checkpoint stores, and the seed of
  the loader segment starting there, so a resumed run reads exactly the same batches.
- ``CheckpointManager``: DeepSpeed checkpoints under ``step_<N>`` tags, each made visible
  only by a ``COMPLETE`` marker written after every rank finished, then ``latest``, then
  pruning to the last K. Per-rank RNG states are saved beside DeepSpeed's files.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from runtime.config import help_text
from runtime.dist import barrier, get_rank, get_world_size, is_main_process
from runtime.engine import NonFiniteWeightsError, TrainEngine
from runtime.io import atomic_torch_save, atomic_write_text, load_state_dict
from runtime.seed import rng_state, set_rng_state

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
LATEST_FILE = "latest"
TAG_PATTERN = re.compile(r"^step_(\d+)$")
ZERO_PARTITION_GLOB = "zero_pp_rank_*_optim_states.pt"  # ZeRO-1/2 optimizer partitions
UNIVERSAL_DIR = "universal"  # converted checkpoints, for a resume on another rank count


@dataclass
class CheckpointConfig:
    every_steps: int = field(default=1000, metadata=help_text(
        "save a checkpoint every N optimizer steps (0 = only at the end)"))
    keep_last: int = field(default=3, metadata=help_text("number of complete checkpoints kept"))
    resume: str = field(default="", metadata=help_text(
        "'' = fresh start, 'auto' = newest complete checkpoint of this run if any, "
        "or a checkpoint folder (…/checkpoints/step_N) or tag (step_N)"))

    def validate(self) -> None:
        if self.every_steps < 0 or self.keep_last < 1:
            raise ValueError("every_steps must be >= 0 and keep_last >= 1")


# ---------------------------------------------------------------------------------------
# Data position (exact resume)


@dataclass
class DataPosition:
    """Where a run's data stream stands: ``batch`` micro-batches of ``epoch`` consumed, read
    by a loader that started at micro-batch ``segment_start`` of the epoch. Stored in the
    checkpoint's client state as ``asdict(position)``."""

    epoch: int = 0
    batch: int = 0
    segment_start: int = 0

    def restart_here(self) -> "DataPosition":
        """Mark that the next batch comes from a fresh loader started at ``batch`` (what a
        stage does after a scheduled checkpoint); returns ``self``."""
        self.segment_start = self.batch
        return self


def segment_seed(seed: int, epoch: int, start: int) -> int:
    """Loader seed of the stream segment that starts at micro-batch ``start`` of ``epoch``.

    A stage rebuilds its loader at every epoch start and after every scheduled checkpoint,
    seeded from that position; a run resumed from such a checkpoint then reads exactly the
    batches an uninterrupted run reads without decoding anything twice. A checkpoint taken
    mid-segment (on a preemption signal) resumes by rebuilding that segment's loader and
    skipping the batches already consumed: at most one checkpoint interval decoded twice.
    """
    return int(np.random.SeedSequence([seed, epoch, start]).generate_state(1)[0])



# ---------------------------------------------------------------------------------------
# Checkpoints


def _rank_state_name(rank: int) -> str:
    return f"rank_{rank:05d}_state.pt"


class CheckpointManager:
    """Complete, prunable DeepSpeed checkpoints under ``<dir>/step_<N>``.

    A checkpoint counts only once ``<dir>/step_<N>/COMPLETE`` exists: it is written after every
    rank finished its DeepSpeed files, its per-rank RNG file and the exports, so a run killed
    mid-save leaves the previous checkpoint as the newest complete one. ``<dir>/latest`` (the
    same format as DeepSpeed's) is rewritten after the marker. All ranks must call ``save``
    and ``load``; the folder must be shared by all nodes.
    """

    def __init__(self, directory: str | Path, keep_last: int = 3):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.dir = Path(directory)
        self.keep_last = keep_last

    @staticmethod
    def tag_for(step: int) -> str:
        return f"step_{step}"

    def _tags(self) -> list[tuple[int, str]]:
        if not self.dir.is_dir():
            return []
        found = []
        for child in self.dir.iterdir():
            match = TAG_PATTERN.match(child.name)
            if match and child.is_dir():
                found.append((int(match.group(1)), child.name))
        return sorted(found)

    def is_complete(self, tag: str | Path) -> bool:
        return (self._tag_dir(tag) / COMPLETE_MARKER).is_file()

    def complete_tags(self) -> list[str]:
        """Complete checkpoint tags, oldest first."""
        return [tag for _, tag in self._tags() if self.is_complete(tag)]

    def _tag_dir(self, tag: str | Path) -> Path:
        tag = Path(tag)
        return tag if tag.is_absolute() or len(tag.parts) > 1 else self.dir / tag

    # --- save
    def marker(self, tag: str | Path) -> dict:
        """What the ``COMPLETE`` marker of ``tag`` records: ``step``, ``world_size``, ``time``
        and the ``meta`` given to ``save`` (e.g. the run's data ``streams``)."""
        return json.loads((self._tag_dir(tag) / COMPLETE_MARKER).read_text())

    def recorded(self, tag: str | None, key: str) -> Any:
        """``marker(tag)[key]``, or None for a fresh start or an older marker without it."""
        return self.marker(tag).get(key) if tag else None

    def save(self, engine: TrainEngine, step: int, client_state: Mapping | None = None,
             exports: Mapping[str, Callable[[Path], Any]] | None = None,
             meta: Mapping[str, Any] | None = None) -> Path:
        """Write checkpoint ``step_<step>`` on all ranks; returns its folder. ``meta`` (plain
        JSON values) goes into the completion marker (``marker``), readable before an engine
        exists.

        ``client_state`` (plain Python values and tensors) is stored by DeepSpeed beside the
        engine's own counters; ``exports`` maps a file name to a
        function called by the main process with the path to write inside the checkpoint
        folder (e.g. an encoder-only safetensors). Raises ``NonFiniteWeightsError`` (before
        writing anything) when any weight is NaN/inf.
        """
        if not engine.weights_are_finite():
            raise NonFiniteWeightsError(
                f"refusing to save checkpoint at step {step}: the model has non-finite weights")
        rank_rng = rng_state()  # before anything below can draw random numbers
        tag = self.tag_for(step)
        tag_dir = self.dir / tag
        if self.is_complete(tag):
            return tag_dir
        if is_main_process():
            if tag_dir.exists():  # left over from an interrupted save
                shutil.rmtree(tag_dir)
            self.dir.mkdir(parents=True, exist_ok=True)
        barrier()
        state = {"client": dict(client_state or {}), "engine": engine.state_dict()}
        engine.ds_engine.save_checkpoint(str(self.dir), tag=tag, client_state=state,
                                         save_latest=False)
        atomic_torch_save({"rng": rank_rng, "world_size": get_world_size()},
                          tag_dir / _rank_state_name(get_rank()))
        if is_main_process():
            for name, export in (exports or {}).items():
                export(tag_dir / name)
        barrier()
        if is_main_process():
            atomic_write_text(tag_dir / COMPLETE_MARKER, json.dumps(
                {"step": step, "world_size": get_world_size(), "time": time.time(),
                 **(meta or {})}))
            atomic_write_text(self.dir / LATEST_FILE, tag)
            self._prune()
        barrier()
        logger.info("saved checkpoint %s", tag_dir)
        return tag_dir

    def _prune(self) -> None:
        """Keep the newest ``keep_last`` complete checkpoints; drop older incomplete ones."""
        tags = self._tags()
        complete = [(s, t) for s, t in tags if self.is_complete(t)]
        keep = {t for _, t in complete[-self.keep_last:]}
        newest = complete[-1][0] if complete else -1
        for step, tag in tags:
            if tag not in keep and step <= newest:
                shutil.rmtree(self.dir / tag, ignore_errors=True)
                shutil.rmtree(self.dir / UNIVERSAL_DIR / tag, ignore_errors=True)

    def _universal(self, tag_dir: Path) -> Path:
        """``tag_dir`` converted by DeepSpeed's ``ds_to_universal`` (once, by the main
        process) into ``universal/<tag>``: ZeRO-1/2 optimizer states partitioned by rank become
        one file per parameter, which any rank count loads."""
        target = self.dir / UNIVERSAL_DIR / tag_dir.name
        if is_main_process() and not (target / COMPLETE_MARKER).is_file():
            from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

            shutil.rmtree(target, ignore_errors=True)
            logger.info("converting %s to a universal checkpoint in %s", tag_dir, target)
            ds_to_universal(argparse.Namespace(
                input_folder=str(tag_dir), output_folder=str(target), num_extract_workers=1,
                num_merge_workers=1, keep_temp_folder=False, strict=True,
                inject_missing_state=True))
            for name in [COMPLETE_MARKER, *(p.name for p in tag_dir.glob("rank_*_state.pt"))]:
                shutil.copy2(tag_dir / name, target / name)
        barrier()
        return target

    # --- resume
    def resolve(self, resume: str) -> str | None:
        """Checkpoint to resume from: ``""`` -> None, ``"auto"`` -> newest complete tag in this
        folder (None when there is none), a tag or a checkpoint folder -> itself (must be
        complete)."""
        if not resume:
            return None
        if resume == "auto":
            tags = self.complete_tags()
            return tags[-1] if tags else None
        tag_dir = self._tag_dir(resume)
        if not tag_dir.is_dir():
            raise FileNotFoundError(f"checkpoint {tag_dir} does not exist")
        if not self.is_complete(tag_dir):
            raise ValueError(f"checkpoint {tag_dir} is incomplete (no {COMPLETE_MARKER} marker): "
                             "the run writing it was interrupted; use an earlier one")
        return str(resume)

    def load(self, engine: TrainEngine, tag: str) -> dict:
        """Restore weights, optimizer, DeepSpeed counters, engine counters and this rank's RNG
        from ``tag``; returns the ``client_state`` given to ``save``."""
        tag_dir = self._tag_dir(tag)
        if not self.is_complete(tag_dir):
            raise ValueError(f"checkpoint {tag_dir} is incomplete or missing")
        saved_world = self.marker(tag_dir).get("world_size")
        load_dir = tag_dir
        if saved_world != get_world_size():
            logger.warning("%s was written by %s ranks and is resumed on %d: per-rank random "
                           "streams (dropout, drop path) differ from an uninterrupted run",
                           tag_dir, saved_world, get_world_size())
            if any(tag_dir.glob(ZERO_PARTITION_GLOB)):
                load_dir = self._universal(tag_dir)
                engine.ds_engine._config.load_universal_checkpoint = True
        load_path, client_state = engine.ds_engine.load_checkpoint(
            str(load_dir.parent), tag=load_dir.name, load_optimizer_states=True,
            load_lr_scheduler_states=False)
        engine.ds_engine._config.load_universal_checkpoint = False
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {tag_dir}")
        engine.load_state_dict(client_state.get("engine", {}))
        rank_file = tag_dir / _rank_state_name(get_rank())
        if rank_file.is_file():
            set_rng_state(load_state_dict(rank_file)["rng"])
        else:
            logger.warning("%s has no RNG state for rank %d", tag_dir, get_rank())
        logger.info("resumed from %s at step %d", tag_dir, engine.global_step)
        return dict(client_state.get("client", {}))
