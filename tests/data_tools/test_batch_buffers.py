"""Pooled shared-memory batch buffers: workers refill only what the consumer has let go of.

Real tar shards of real H.264 files, real DataLoader worker processes; the synthetic clips
carry their frame index in their pixels, so a buffer refilled while still in use would show
as frames of the wrong clip.
"""
import copy
import gc

import numpy as np
import torch
from torch.multiprocessing.reductions import init_reductions
from multiprocessing.reduction import ForkingPickler

from data_tools.batch_buffers import BatchBuffers, LeasedBatch
from data_tools.config import DataConfig
from data_tools.loader import build_loader

TINY = dict(num_frames=8, sampling_rate=2, input_size=32, patch_size=16, tubelet_size=2,
            batch_size=4, mask_type="tube", epoch_samples=1000)


def pretrain_loader(shards, workers: int, **overrides):
    cfg = DataConfig(shards=str(shards), num_workers=workers, **{**TINY, **overrides})
    return build_loader(cfg, "pretrain", rank=0, world_size=1)


def assert_clip_frames(video: torch.Tensor, clip_tools) -> None:
    """Each clip of a uint8 ``(B, C, T, H, W)`` batch holds 8 frames 2 apart of one video."""
    for clip in video:
        index = clip_tools.frame_index_of(clip.permute(1, 2, 3, 0).float().numpy())
        np.testing.assert_array_equal(np.diff(index), np.full(7, 2))


def test_workers_refill_the_buffers_a_consumer_lets_go(synthetic_shards, clip_tools):
    """A training loop that drops each batch after use: two workers make a few buffers each
    and refill them, instead of one segment per batch (data.batch_buffers=0), and the batches
    are the same."""
    received = {}
    for slots in (6, 0):
        loader = pretrain_loader(synthetic_shards, workers=2, batch_buffers=slots)
        received[slots] = []
        for batch in loader:
            assert_clip_frames(batch["video"], clip_tools)
            received[slots].append((batch["key"], batch["video"].clone(), batch["mask"]))
            batch = None  # the model input is a copy (model_input); the batch goes here
            if len(received[slots]) == 30:
                break
        if slots:
            made = loader.batch_buffers.made.tolist()
            assert all(1 <= n <= slots for n in made) and sum(made) < 30 / 2, made
        else:
            assert loader.batch_buffers is None
    for (keys, video, mask), (keys0, video0, mask0) in zip(received[6], received[0]):
        assert keys == keys0 and torch.equal(video, video0) and torch.equal(mask, mask0)


def test_a_batch_still_in_use_is_never_refilled(synthetic_shards, clip_tools):
    """Batches kept whole, or only through a view of their video, keep their memory: after
    20 more batches every kept video equals its copy taken on arrival."""
    loader = pretrain_loader(synthetic_shards, workers=1)
    kept = []
    for number, batch in enumerate(loader):
        video = batch["video"]
        held = video if number % 2 else video[1:3, :, 2:]  # the whole batch, or a view
        kept.append((held, held.clone()))
        del batch, video, held
        if number == 20:
            break
    gc.collect()
    for held, copy_on_arrival in kept:
        assert torch.equal(held, copy_on_arrival)
    assert_clip_frames(kept[1][0], clip_tools)
    # every batch was still held when the next ones were made: no buffer could be reused
    assert int(loader.batch_buffers.made.sum()) >= 20


def test_a_lease_frees_its_slot_when_the_last_tensor_on_its_memory_goes():
    """The consuming side of a lease, in one process: unpickling a LeasedBatch gives a plain
    dict; its slot frees when the video's storage is freed - a view keeps it held - and only
    with the batch's own id (a batch of an earlier worker in the same slot frees nothing)."""
    init_reductions()
    pool = BatchBuffers(num_workers=1, slots=2)
    pool.held[0, 1] = 1234  # a worker lent slot 1 to batch 1234
    batch = LeasedBatch({"video": torch.zeros(2, 3, 4, 8, 8, dtype=torch.uint8),
                         "key": ["a", "b"]}, (pool.token, 0, 1, 1234))
    assert copy.copy(batch).lease == batch.lease  # the DataLoader's default_convert copies
    received = ForkingPickler.loads(ForkingPickler.dumps(batch))
    del batch
    assert type(received) is dict and received["key"] == ["a", "b"]
    view = received["video"][0]
    del received
    gc.collect()
    assert pool.held[0, 1] == 1234  # the view still reads the memory
    del view
    gc.collect()
    assert pool.held[0, 1] == 0

    pool.held[0, 0] = 99  # a successor's batch 99 in slot 0 ...
    stale = LeasedBatch({"video": torch.zeros(1, dtype=torch.uint8)}, (pool.token, 0, 0, 98))
    received = ForkingPickler.loads(ForkingPickler.dumps(stale))
    del stale, received  # ... is not freed by the predecessor's batch 98
    gc.collect()
    assert pool.held[0, 0] == 99
