"""Bad-data accounting for the loader: skip reasons, shared counters, failure checks.

A sample that cannot be read is skipped, never replaced. ``LoaderStats`` counts decoded and
skipped samples per DataLoader worker in a shared-memory ``int64`` tensor of shape
``(num_workers, 1 + len(SKIP_REASONS) + len(EVENTS))`` (column 0 = decoded, then one column
per reason, then one per event), so the main process sees what its workers counted. A loader
over several weighted shard sets also counts the samples taken from each set
(``samples/<name>``: drawn from the set's tar files, before decoding: workers read ahead of the
batches consumed, and a loader rebuilt at a checkpoint refills its shuffle buffer, so the
counts exceed the clips trained on; their proportions are the mixture's). ``SampleError``
carries the reason of a per-sample failure; ``SkipHandler`` is the WebDataset handler for
tar-level errors.
"""
from __future__ import annotations

import logging

import torch
from torch.utils.data import get_worker_info

logger = logging.getLogger(__name__)

SKIP_REASONS = ("tar_error", "missing_video", "missing_json", "bad_json", "empty_video",
                "decode_error")
# Counted, not failures: a sample the first decoder of backend "auto" could not read, handed
# to the next one (which decoded it, or also failed: then it is skipped as well)
EVENTS = ("decoder_fallback",)
WORKER_CHECK_MIN_SAMPLES = 100  # a worker checks its own failure fraction from this many on


_SAMPLE_COLUMNS = 1 + len(SKIP_REASONS)


class LoaderStats:
    """Per-worker counters in shared memory: column 0 = decoded, then one per skip reason,
    then one per event. ``worker_counts()`` returns the samples part (decoded + reasons)."""

    def __init__(self, num_workers: int, set_names: tuple[str, ...] = ()):
        self.counts = torch.zeros(max(num_workers, 1), _SAMPLE_COLUMNS + len(EVENTS),
                                  dtype=torch.int64).share_memory_()
        self.set_names = set_names
        self.taken = torch.zeros(max(num_workers, 1), len(set_names),
                                 dtype=torch.int64).share_memory_()

    def worker_counts(self) -> torch.Tensor:
        """The calling worker's row (the main process uses row 0 without workers)."""
        return self._row()[:_SAMPLE_COLUMNS]

    def _row(self) -> torch.Tensor:
        info = get_worker_info()
        return self.counts[info.id if info is not None else 0]

    def add_decoded(self) -> None:
        self._row()[0] += 1

    def add_skipped(self, reason: str) -> None:
        self._row()[1 + SKIP_REASONS.index(reason)] += 1

    def add_event(self, event: str, count: int = 1) -> None:
        self._row()[_SAMPLE_COLUMNS + EVENTS.index(event)] += count

    def add_taken(self, set_index: int) -> None:
        """One sample taken from shard set ``set_index`` (a mixture's ``WeightedMix``)."""
        info = get_worker_info()
        self.taken[info.id if info is not None else 0, set_index] += 1

    def taken_by_set(self) -> dict[str, int]:
        """``{"samples/<name>": n}`` for each shard set of a mixture (empty otherwise)."""
        totals = self.taken.sum(0)
        return {f"samples/{name}": int(n) for name, n in zip(self.set_names, totals)}

    def snapshot(self) -> torch.Tensor:
        """All workers summed: decoded, the skip reasons, then the events."""
        return self.counts.sum(0).clone()

    @staticmethod
    def as_dict(totals: torch.Tensor) -> dict[str, int]:
        skipped = totals[1:_SAMPLE_COLUMNS]
        out = {"decoded": int(totals[0]), "skipped": int(skipped.sum())}
        out.update({f"skipped/{r}": int(n) for r, n in zip(SKIP_REASONS, skipped)})
        out.update({event: int(n) for event, n in zip(EVENTS, totals[_SAMPLE_COLUMNS:])})
        return out

    def check(self, totals: torch.Tensor, max_fraction: float, where: str) -> None:
        """Raise when the failed fraction of ``totals`` exceeds ``max_fraction``."""
        totals = totals[:_SAMPLE_COLUMNS]
        failed, seen = int(totals[1:].sum()), int(totals.sum())
        if seen and failed / seen > max_fraction:
            reasons = {k: v for k, v in self.as_dict(totals).items()
                       if k.startswith("skipped/") and v}
            raise RuntimeError(
                f"{where}: {failed} of {seen} samples failed ({failed / seen:.1%} > "
                f"data.max_failure_fraction={max_fraction}); by reason: {reasons}. The "
                f"warnings above name each shard and key.")


class SkipHandler:
    """WebDataset handler for tar-level errors: count, warn, go on with the next shard.

    WebDataset appends the shard to the exception's arguments. A truncated or damaged tar
    usually reports two events (the damaged member, then the broken stream); the samples
    after the damage are lost and cannot be counted.
    """

    def __init__(self, stats: LoaderStats):
        self.stats = stats

    def __call__(self, exn: Exception) -> bool:
        self.stats.add_skipped("tar_error")
        logger.warning("unreadable tar data, skipping the rest of the shard: %s: %s",
                       type(exn).__name__, exn)
        return True


class SampleError(Exception):
    """A sample to skip; ``reason`` is one of ``SKIP_REASONS``."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
