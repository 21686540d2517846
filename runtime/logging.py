"""Run logging: rank-0 progress bars, JSON-lines metrics, TensorBoard scalars and, inside a
``runtime.trackers.tracked`` stage run, its W&B / MLflow runs."""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator, TypeVar

from tqdm.auto import tqdm

from runtime.dist import is_main_process
from runtime.trackers import active_session

T = TypeVar("T")
METRICS_FILE = "metrics.jsonl"


def setup_logging(level: int = logging.INFO) -> None:
    """Configure the root logger once: rank-prefixed lines on stderr, quieter on non-zero ranks."""
    from runtime.dist import get_rank

    rank = get_rank()
    logging.basicConfig(
        level=level if rank == 0 else max(level, logging.WARNING), stream=sys.stderr,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", force=True)


class RunLogger:
    """Writes scalars to ``<out_dir>/metrics.jsonl`` and TensorBoard, on the main process only,
    and to the experiment trackers of the stage run in progress (``runtime.trackers``: W&B /
    MLflow as ``<tag>/<name>``, when its config switches them on).

    Each JSON line is ``{"step": int, "time": float, "tag": str, <name>: value, ...}``;
    non-finite values are written as strings ("nan", "inf") so the file stays valid JSON.
    """

    def __init__(self, out_dir: str | Path, enabled: bool | None = None, tensorboard: bool = True):
        self.out_dir = Path(out_dir)
        self.enabled = is_main_process() if enabled is None else enabled
        self._writer = None
        self._file = None
        if self.enabled:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._file = open(self.out_dir / METRICS_FILE, "a", encoding="utf-8")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))

    def log(self, step: int, tag: str = "train", **scalars: float) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "time": round(time.time(), 3), "tag": tag}
        for name, value in scalars.items():
            value = float(value)
            record[name] = value if math.isfinite(value) else str(value)
            if self._writer is not None:
                self._writer.add_scalar(f"{tag}/{name}", value, int(step))
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        trackers = active_session()
        if trackers is not None:
            trackers.log(step, tag, scalars)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: str | Path, tag: str | None = None) -> list[dict]:
    """Records of a metrics.jsonl file, optionally only those with ``tag``."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in rows if tag is None or r.get("tag") == tag]


class PlainProgress:
    """tqdm's interface for batch jobs (stderr is a file, not a terminal): one plain line per
    ``set_postfix`` call - a training loop's log step - with the step, the given values and
    the ETA, and a last line at ``close``; no carriage-return redraws."""

    def __init__(self, iterable: Iterable[T] | None = None, total: int | None = None,
                 desc: str = "", enabled: bool = True, initial: int = 0, **_: object):
        self.iterable, self.total, self.desc, self.enabled = iterable, total, desc, enabled
        self.n = self.initial = initial
        self.start = time.perf_counter()
        self.closed = False

    def __iter__(self) -> Iterator[T]:
        for item in self.iterable:
            yield item
            self.n += 1
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n

    def _write(self, text: str) -> None:
        if self.enabled:
            sys.stderr.write(f"{self.desc}: {text}\n")
            sys.stderr.flush()

    def _eta(self) -> str:
        elapsed, done = time.perf_counter() - self.start, self.n - self.initial
        if not self.total or done <= 0:
            return ""
        remaining = (self.total - self.n) * elapsed / done
        return f" eta {time.strftime('%H:%M:%S', time.gmtime(max(remaining, 0.0)))}"

    def set_postfix(self, refresh: bool = True, **values: object) -> None:
        total = f"/{self.total}" if self.total else ""
        fields = " ".join(f"{name}={value}" for name, value in values.items())
        self._write(f"step {self.n}{total} {fields}{self._eta()}")

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            elapsed = time.perf_counter() - self.start
            self._write(f"{self.n - self.initial} done in {elapsed:.1f} s")


def progress(iterable: Iterable[T] | None, total: int | None = None, desc: str = "",
             enabled: bool | None = None, **kwargs) -> Iterator[T]:
    """A progress bar on the main process: tqdm when stderr is a terminal, else
    ``PlainProgress`` lines (batch jobs' log files); nothing on the other ranks."""
    enabled = is_main_process() if enabled is None else enabled
    if not sys.stderr.isatty():
        return PlainProgress(iterable, total=total, desc=desc, enabled=enabled, **kwargs)
    return tqdm(iterable, total=total, desc=desc, disable=not enabled, dynamic_ncols=True,
                mininterval=1.0, **kwargs)
