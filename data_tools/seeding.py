"""Seeds for the loader's random stages, distinct per rank, DataLoader worker, stage and pass.

``stream_seed`` mixes ``data.seed``, the rank, the worker's base seed (which the DataLoader
draws from the loader's seeded generator), a stage number and a pass counter, so each stage
of each worker draws its own reproducible stream; ``WorkerSeed`` (for
``wds.ResampledShards``) and ``Shuffle`` (a seeded ``wds.shuffle``) are the pipeline stages
built on it. Stage numbers: 0 shard resampling, 1 shuffle buffer, 2 clips and masks.
"""
from __future__ import annotations

import random

import numpy as np
from torch.utils.data import get_worker_info


def stream_seed(seed: int, rank: int, stage: int, counter: int) -> int:
    """A seed distinct per (seed, rank, DataLoader worker and its base seed, stage, pass)."""
    info = get_worker_info()
    worker_seed = info.seed if info is not None else 0
    entropy = [seed, rank, worker_seed % 2**63, stage, counter]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)


class WorkerSeed:
    """``ResampledShards(worker_seed=...)``: deterministic per rank and worker."""

    def __init__(self, seed: int, rank: int):
        self.seed, self.rank = seed, rank

    def __call__(self) -> int:
        return stream_seed(self.seed, self.rank, stage=0, counter=0)


class Shuffle:
    """``wds.shuffle`` with an RNG seeded per worker and per pass."""

    def __init__(self, bufsize: int, seed: int, rank: int):
        self.bufsize, self.seed, self.rank, self.passes = bufsize, seed, rank, 0

    def __call__(self, src):
        self.passes += 1
        rng = random.Random(stream_seed(self.seed, self.rank, 1, self.passes))
        import webdataset as wds  # here: masks (which use stream_seed) import without it

        return wds.shuffle(self.bufsize, initial=self.bufsize // 2 + 1, rng=rng)(src)
