"""Shared-memory batch buffers that DataLoader workers reuse once the consumer lets go of them.

A worker hands its batch to the main process through shared memory. A new segment per batch
is the default (``default_collate``'s way) and costs more than filling it: a 4-clip 16x224x224
uint8 batch took 1.9 CPU ms per clip to allocate and fill for the first time, 0.1 ms to refill
one already mapped (bench/RESULTS.md, "Reused batch buffers"). ``BatchBuffers`` keeps up to
``slots`` buffers per worker and refills one only when no tensor in the consuming process
still uses its memory:

- a shared ``int64`` table ``held`` of shape ``(num_workers, slots)``, made in the main
  process before the workers start, says per slot: 0 = free, else the id of the batch in it;
- a worker takes a free slot holding a buffer of the right shape (else makes one in an empty
  or free slot; when every slot is held, an unpooled one), writes a new id into the table,
  fills it, and returns the batch as a ``LeasedBatch``: a dict that carries
  ``(pool, worker, slot, id)`` through pickling;
- the process that unpickles it (the main process, or its pin-memory thread) gets a plain
  dict whose video is the same memory seen through a numpy array (``torch.from_numpy``)
  whose base object writes 0 back when it is collected, i.e. when that tensor's storage is
  freed - not when the dict is dropped: a view, a slice or an autograd graph that still reads
  the memory keeps the slot held.

A lease unpickled where its pool is unknown never frees its slot: the worker makes new
buffers, slower but never wrong. Slots free only by the id they were given, so a batch of an
earlier worker process (same worker number) cannot free a slot of its successor.
"""
from __future__ import annotations

import math
import os
import secrets
import weakref
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

_POOLS: "weakref.WeakValueDictionary[str, BatchBuffers]" = weakref.WeakValueDictionary()


def new_shared(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous tensor in a new shared-memory segment (torch's sharing
    strategy: a file descriptor, or a named file with ``file_system``)."""
    template = torch.empty(0, dtype=dtype)
    storage = template._typed_storage()._new_shared(math.prod(shape), device=template.device)
    return template.new(storage).resize_(shape)


def batch_memory(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous tensor for one batch: a new shared-memory segment inside a
    DataLoader worker (handing it to the main process copies nothing, as ``default_collate``
    does), ordinary memory elsewhere."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    return new_shared(shape, dtype)


class LeasedBatch(dict):
    """A batch dict whose ``video`` lies in a pooled buffer; pickles into a plain dict whose
    video storage frees the slot when it is freed. ``copy.copy`` (the DataLoader's
    ``default_convert``) keeps the lease."""

    def __init__(self, items: dict[str, Any], lease: tuple[str, int, int, int]):
        super().__init__(items)
        self.lease = lease

    def __copy__(self) -> "LeasedBatch":
        return LeasedBatch(self, self.lease)

    def __reduce__(self):
        return _unpickle_batch, (dict(self), self.lease)


def _unpickle_batch(items: dict[str, Any], lease: tuple[str, int, int, int]) -> dict[str, Any]:
    token, worker, slot, batch_id = lease
    pool = _POOLS.get(token)
    if pool is not None:
        items["video"] = _SlotRelease(items["video"], pool, worker, slot, batch_id).watched()
    return items


class _SlotRelease:
    """Holds a received video's shared memory and frees its slot when collected. ``watched``
    gives the video through a numpy array whose base is this object, so it goes when that
    tensor's storage is freed (a C++ reference count, reliable on every torch version: a
    weakref finaliser on a torch storage's Python object is not)."""

    def __init__(self, video: torch.Tensor, pool: BatchBuffers, worker: int, slot: int,
                 batch_id: int):
        self.video = video  # keeps the received shared memory mapped
        self.lease = (pool, worker, slot, batch_id)
        storage = video.untyped_storage()
        self.__array_interface__ = {"shape": (storage.nbytes(),), "typestr": "|u1",
                                    "data": (storage.data_ptr(), False), "version": 3}

    def watched(self) -> torch.Tensor:
        """The video (same memory, shape and strides) with this object as its numpy base."""
        memory = torch.from_numpy(np.asarray(self))  # (bytes,) uint8
        return memory.view(self.video.dtype).as_strided(
            self.video.shape, self.video.stride(), self.video.storage_offset())

    def __del__(self) -> None:
        pool, worker, slot, batch_id = self.lease
        pool.release(worker, slot, batch_id)


class BatchBuffers:
    """Per-worker pools of shared-memory batch buffers (see the module docstring).

    Args:
        num_workers: the DataLoader's workers (rows of the table; 0 = no workers, where
            ``take`` returns ordinary memory).
        slots: pooled buffers per worker (``data.batch_buffers``; the DataLoader's prefetch
            of 2 per worker, the batch in use and one in transit need 4).
    """

    def __init__(self, num_workers: int, slots: int):
        rows = max(num_workers, 1)
        self.slots = slots
        self.token = secrets.token_hex(8)
        self.held = torch.zeros(rows, slots, dtype=torch.int64).share_memory_()
        self.made = torch.zeros(rows, dtype=torch.int64).share_memory_()  # segments per worker
        self._worker: dict[str, Any] | None = None
        _POOLS[self.token] = self

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_worker": None}  # a spawned worker starts with no buffers

    def take(self, shape: tuple[int, ...],
             dtype: torch.dtype) -> tuple[torch.Tensor, tuple[str, int, int, int] | None]:
        """An uninitialised contiguous ``shape`` tensor to fill, and its lease (``None`` for
        memory nobody shares: outside a worker, or an unpooled segment)."""
        info = get_worker_info()
        if info is None:
            return batch_memory(shape, dtype), None
        state = self._worker_state()
        held = self.held[info.id].numpy()
        buffers = state["buffers"]
        free = [s for s in range(self.slots) if held[s] == 0]
        fitting = [s for s in free if buffers[s] is not None
                   and buffers[s].shape == shape and buffers[s].dtype == dtype]
        if fitting:
            slot = fitting[0]
        else:
            self.made[info.id] += 1
            if not free:
                return new_shared(shape, dtype), None
            empty = [s for s in free if buffers[s] is None]
            slot = (empty or free)[0]
            buffers[slot] = new_shared(shape, dtype)
        state["next_id"] += 1
        held[slot] = state["next_id"]
        return buffers[slot], (self.token, info.id, slot, state["next_id"])

    def _worker_state(self) -> dict[str, Any]:
        """This process's buffers; a forked worker starts with none of its parent's."""
        if self._worker is None or self._worker["pid"] != os.getpid():
            self._worker = {"pid": os.getpid(), "buffers": [None] * self.slots,
                            "next_id": secrets.randbits(62)}  # ids unique across workers' lives
        return self._worker

    def release(self, worker: int, slot: int, batch_id: int) -> None:
        """Frees ``slot`` of ``worker`` if batch ``batch_id`` still holds it (``_SlotRelease`` in
        the consuming process calls this)."""
        held = self.held[worker].numpy()
        if held[slot] == batch_id:
            held[slot] = 0
