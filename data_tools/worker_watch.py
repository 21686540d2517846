"""What each DataLoader worker is working on, so a worker that hangs can be named.

A decoder that blocks (a damaged file, a library deadlock) would stall training forever: the
loader gives the DataLoader a ``timeout`` (``data.timeout_s``), and when no batch arrives
in time it raises ``LoaderTimeoutError`` with what ``WorkerWatch.describe()`` reports: for
each worker, the shard and key of the sample it started and for how long it has been on it.
The DataLoader then shuts its workers down (terminating one that does not stop).

The state lives in shared memory, written by the workers (``start``/``finish`` around each
sample) and read by the main process: per worker, the start time of the current sample (0 =
between samples) and ``"<shard>\\t<key>"`` in a fixed-size byte row.
"""
from __future__ import annotations

import time

import torch
from torch.utils.data import get_worker_info

_TEXT_BYTES = 1024


class LoaderTimeoutError(RuntimeError):
    """No batch arrived within ``data.timeout_s``; the message names the samples being read."""


class WorkerWatch:
    def __init__(self, num_workers: int):
        rows = max(num_workers, 1)
        self.started = torch.zeros(rows, dtype=torch.float64).share_memory_()
        self.text = torch.zeros(rows, _TEXT_BYTES, dtype=torch.uint8).share_memory_()

    @staticmethod
    def _row() -> int:
        info = get_worker_info()
        return info.id if info is not None else 0

    def start(self, url: str, key: str) -> None:
        """Called by a worker before it decodes a sample."""
        row = self._row()
        data = f"{url}\t{key}".encode("utf-8", "replace")[:_TEXT_BYTES]
        self.text[row].zero_()
        self.text[row, :len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        self.started[row] = time.time()

    def finish(self) -> None:
        self.started[self._row()] = 0.0

    def describe(self, now: float | None = None) -> str:
        """One clause per worker that is inside a sample, the longest first."""
        now = time.time() if now is None else now
        busy = []
        for worker in range(len(self.started)):
            started = float(self.started[worker])
            if started > 0:
                raw = bytes(self.text[worker].tolist()).rstrip(b"\0").decode("utf-8", "replace")
                url, _, key = raw.partition("\t")
                busy.append((now - started, f"worker {worker} has been on sample {key!r} of "
                                            f"shard {url} for {now - started:.1f} s"))
        if not busy:
            return "no worker is inside a sample (the time went to reading shards)"
        return "; ".join(text for _, text in sorted(busy, reverse=True))
