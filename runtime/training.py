"""Training-loop pieces shared by pretraining and fine-tuning.

- ``DataStream``: a rank's batches as segments that each start at a ``DataPosition``, with a
  loader seeded from that position, so a resumed run reads exactly the batches an
  uninterrupted one would, without decoding anything twice (any loader: the video clips of
  ``data_tools.stream``, the keyframes of AVA-style detection).
- ``timed``: batches with the time spent waiting for each (the data-wait fraction).
- ``Window``: sums since the last log line and their cross-rank summary.
- ``open_run``: the run folder, its checkpoints and the tag to resume from; ``resume_from``:
  the checkpoint loaded, the data position and the last step; ``open_loop`` /
  ``close_loop``: metrics file, progress bar and stop-signal handler.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as torch_dist

from runtime.checkpoint import CheckpointConfig, CheckpointManager, DataPosition, segment_seed
from runtime.config import save_resolved_config
from runtime.dist import is_initialized
from runtime.engine import TrainEngine
from runtime.errors import RunExistsError
from runtime.logging import RunLogger, progress
from runtime.preemption import PreemptionSignal


def open_run(cfg: Any, out_dir: str | Path, checkpoint: CheckpointConfig, is_main: bool
             ) -> tuple[Path, CheckpointManager, str | None]:
    """Set up a training run's folder: ``(out_dir, checkpoints, resume_tag)``.

    ``resume_tag`` is the checkpoint to continue from (None for a fresh start). A folder that
    already holds complete checkpoints is never trained over silently: without
    ``checkpoint.resume`` this raises. The main process writes the resolved ``config.yaml``.
    """
    out_dir = Path(out_dir)
    checkpoints = CheckpointManager(out_dir / "checkpoints", checkpoint.keep_last)
    resume_tag = checkpoints.resolve(checkpoint.resume)
    if resume_tag is None and checkpoints.complete_tags():
        raise RunExistsError(f"{out_dir} already holds checkpoints; pass checkpoint.resume=auto "
                              "to continue that run, or choose another out_dir")
    if is_main:
        save_resolved_config(cfg, out_dir)
    return out_dir, checkpoints, resume_tag


# ---------------------------------------------------------------------------------------
# Data


class DataStream:
    """Batches of one rank as segments that each start at a ``DataPosition`` with a loader
    seeded from it (``segment_seed(base_seed, epoch, batch)``), so a resumed run reads exactly
    the batches an uninterrupted one would, without decoding anything twice.

    Args:
        make_loader: ``seed -> iterable of batches`` (an endless or long enough stream of this
            rank's batches; a loader with a ``stats`` dict has it summed into ``self.stats``).
        base_seed: the run's data seed.
        batches: micro-batches per epoch per rank (equal on every rank).
        grad_accum_steps: micro-batches per optimizer step; an epoch is cut to whole steps, so
            accumulation never straddles an epoch end.
    """

    def __init__(self, make_loader: Callable[[int], Iterable[dict]], base_seed: int,
                 batches: int, grad_accum_steps: int):
        self.make_loader, self.base_seed = make_loader, base_seed
        self.stats: dict[str, int] = {}
        self.steps_per_epoch = batches // grad_accum_steps
        if self.steps_per_epoch < 1:
            raise ValueError(f"an epoch has {batches} batches per rank, fewer than "
                             f"engine.grad_accum_steps={grad_accum_steps}")
        self.batches_per_epoch = self.steps_per_epoch * grad_accum_steps

    def segment(self, position: DataPosition) -> Iterator[dict]:
        """Batches from ``position`` to the end of its epoch: the loader of the segment that
        starts at ``position.segment_start``, its first ``batch - segment_start`` batches
        skipped (none, unless resuming from a mid-segment checkpoint)."""
        start = position.segment_start
        if not 0 <= start <= position.batch:
            raise ValueError(f"data position {position} has a segment start after its batch")
        loader = self.make_loader(segment_seed(self.base_seed, position.epoch, start))
        return self._drain(loader, position.batch - start, self.batches_per_epoch - start)

    def _drain(self, loader: Iterable[dict], skip: int, stop: int) -> Iterator[dict]:
        try:
            yield from itertools.islice(loader, skip, stop)
        finally:
            for key, value in getattr(loader, "stats", {}).items():
                self.stats[key] = self.stats.get(key, 0) + value


def next_position(position: DataPosition, stream: DataStream) -> DataPosition:
    """``position``, or the start of the next epoch once ``position`` is at an epoch end."""
    if position.batch >= stream.batches_per_epoch:
        return DataPosition(position.epoch + 1, 0)
    return position


def resume_from(checkpoints: CheckpointManager, engine: TrainEngine, tag: str | None,
                max_steps: int) -> tuple[dict, DataPosition, int]:
    """Load checkpoint ``tag`` into ``engine`` (None: a fresh start): ``(client_state, data
    position, stop_at)``, ``stop_at`` being ``max_steps`` capped by the schedule's length."""
    client = checkpoints.load(engine, tag) if tag else {}
    stop_at = min(max_steps or engine.schedule.total_steps, engine.schedule.total_steps)
    data = client.get("data", {})
    # checkpoints written before segment_start existed were all taken at a segment start
    position = DataPosition(**{"segment_start": data.get("batch", 0), **data})
    return client, position, stop_at


def open_loop(out_dir: Path, is_main: bool, tensorboard: bool, engine: TrainEngine,
              stop_at: int, desc: str) -> tuple[RunLogger, Any, PreemptionSignal]:
    """What a training loop keeps open: the run's ``RunLogger``, a progress bar over optimizer
    steps (rank 0 only) and the installed stop-signal handler (SIGUSR1 / SIGTERM: checkpoint,
    then stop); ``close_loop`` closes them. Puts the engine in training mode and attaches the
    handler to it, so the stop flag rides on ``engine.step``'s collective."""
    run_log = RunLogger(out_dir, enabled=is_main, tensorboard=tensorboard)
    bar = progress(None, total=stop_at, initial=engine.global_step, desc=desc, enabled=is_main)
    engine.train()
    engine.stop_signal = PreemptionSignal().install()
    return run_log, bar, engine.stop_signal


def close_loop(run_log: RunLogger, bar: Any, preemption: PreemptionSignal) -> None:
    preemption.restore()
    bar.close()
    run_log.close()


def checkpoint_now(step: int, stop_at: int, every_steps: int, position: DataPosition,
                   preemption: PreemptionSignal) -> tuple[bool, bool]:
    """``(save, preempted)`` after optimizer step ``step`` (every rank, every step: asking
    ``preemption`` is collective, answered by the step's own all-reduce when the engine carries
    its flag). A checkpoint is due at the last step, every
    ``every_steps`` steps, or when a stop signal reached any rank; a scheduled one also marks
    ``position`` as the start of the next loader segment (the loop then starts a fresh one),
    a preemption checkpoint keeps the current segment so a resumed run skips into it."""
    preempted = preemption.requested()
    scheduled = step == stop_at or bool(every_steps and step % every_steps == 0)
    if scheduled:
        position.restart_here()
    return scheduled or preempted, preempted


# what the progress bar shows of a log window's summary: key -> (label, format)
BAR_FIELDS = {"loss": ("loss", "{:.4f}"), "zero_pred_loss": ("zero_pred", "{:.4f}"),
              "lr": ("lr", "{:.2e}"), "clips_per_s": ("clips_s", "{:.1f}"),
              "data_wait": ("wait", "{:.0%}")}


def log_window(window: "Window", engine: TrainEngine, world_size: int, run_log: RunLogger,
               bar: Any, step: int, epoch: int, shown: tuple[str, ...] = ("loss", "lr")) -> dict:
    """Write ``window``'s summary at ``step`` to the metrics file and show the ``shown`` keys
    (``BAR_FIELDS``) on the progress bar; returns the summary."""
    last = window.summary(engine, world_size)
    run_log.log(step, epoch=epoch, **last)
    bar.set_postfix(**{BAR_FIELDS[key][0]: BAR_FIELDS[key][1].format(last[key])
                       for key in shown}, refresh=False)
    return last


def validation_due(position: DataPosition, stream: DataStream, every_epochs: int, step: int,
                   stop_at: int) -> bool:
    """Whether the step that just ended closed an epoch after which the run validates (every
    ``every_epochs`` epochs, not after the last step: the final test follows it)."""
    return (position.batch == stream.batches_per_epoch and every_epochs > 0
            and (position.epoch + 1) % every_epochs == 0 and step < stop_at)


def timed(batches: Iterable[dict]) -> Iterator[tuple[dict, float]]:
    """Yield ``(batch, seconds spent waiting for it)``."""
    iterator = iter(batches)
    while True:
        start = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            return
        yield batch, time.perf_counter() - start


# ---------------------------------------------------------------------------------------
# Metrics


def global_mean(values: list[float], device: torch.device) -> list[float]:
    """Element-wise mean of ``values`` over ranks."""
    if not is_initialized() or torch_dist.get_world_size() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64,
                          device=device if torch_dist.get_backend() == "nccl" else "cpu")
    torch_dist.all_reduce(tensor)
    return (tensor / torch_dist.get_world_size()).tolist()


@dataclass
class Window:
    """Sums over the micro-batches since the last log line."""

    loss: float = 0.0
    finite: int = 0
    clips: int = 0
    data_wait: float = 0.0
    extras: dict[str, float] = field(default_factory=dict)
    start: float = field(default_factory=time.perf_counter)

    def add(self, loss: float | None, clips: int, data_wait: float, **extras: float) -> None:
        """``extras`` are further per-step scalars averaged like the loss (over the steps
        whose loss was finite)."""
        if loss is not None:
            self.loss += loss
            self.finite += 1
            for name, value in extras.items():
                self.extras[name] = self.extras.get(name, 0.0) + value
        self.clips += clips
        self.data_wait += data_wait

    def summary(self, engine: TrainEngine, world_size: int) -> dict[str, float]:
        """Mean loss and data-wait over ranks, clips/s over all ranks, the lr of the last
        step, the non-finite count and (when DeepSpeed computes it) the gradient norm."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        steps = max(self.finite, 1)
        names = sorted(self.extras)
        loss, wait, *extras = global_mean([self.loss / steps, self.data_wait,
                                           *(self.extras[n] / steps for n in names)], engine.device)
        scalars = {"loss": loss, **dict(zip(names, extras)),
                   "lr": engine.schedule.lr_at(engine.global_step - 1),
                   "clips_per_s": self.clips * world_size / elapsed,
                   "data_wait": min(wait / elapsed, 1.0),
                   "nonfinite_total": engine.nonfinite_total}
        if engine.grad_norm is not None:
            scalars["grad_norm"] = engine.grad_norm
        return scalars
