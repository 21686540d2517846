"""A decoder that hangs inside a real DataLoader worker cannot hang training: with
``data.timeout_s`` the loader stops with an error naming the shard and key being decoded,
and the stuck worker is shut down."""
from __future__ import annotations

import multiprocessing
import os
import time

import psutil
import pytest

import data_tools.clips
from data_tools.config import DataConfig
from data_tools.loader import build_loader
from data_tools.worker_watch import LoaderTimeoutError, WorkerWatch

HANGING_KEY = "vid005"

pytestmark = pytest.mark.skipif(multiprocessing.get_start_method() != "fork",
                                reason="the stand-in decoder is patched in before the workers fork")


def _hang_on_one_key(real_open_video):
    def open_video(data, *args, **kwargs):
        if data == _hang_on_one_key.blocked_bytes:
            read_end, _ = os.pipe()
            os.read(read_end, 1)  # blocks in a system call forever: nothing is ever written
        return real_open_video(data, *args, **kwargs)
    return open_video


@pytest.mark.parametrize("mode", ["eval", "pretrain"])  # pretrain: persistent workers
def test_hanging_decoder_stops_the_loader_naming_shard_and_key(synthetic_shards, mode,
                                                               synthetic_videos, monkeypatch):
    _hang_on_one_key.blocked_bytes = next(v["mp4"] for v in synthetic_videos
                                          if v["__key__"] == HANGING_KEY)
    monkeypatch.setattr(data_tools.clips, "open_video",
                        _hang_on_one_key(data_tools.clips.open_video))
    cfg = DataConfig(shards=str(synthetic_shards), num_frames=4, sampling_rate=2, input_size=32,
                     patch_size=8, tubelet_size=2, batch_size=2, num_workers=1, timeout_s=2.0,
                     backend="pyav", epoch_samples=1000, shuffle_buffer=1)
    loader = build_loader(cfg, mode, rank=0, world_size=1)
    others = set(psutil.Process().children())  # e.g. persistent workers of earlier tests
    batches = iter(loader)
    start = time.monotonic()
    keys = []
    with pytest.raises(LoaderTimeoutError) as info:
        for batch in batches:
            keys += batch["key"]
    assert time.monotonic() - start < 60
    message = str(info.value)
    assert f"sample {HANGING_KEY!r}" in message and "data-000002.tar" in message
    assert "data.timeout_s" in message
    if mode == "eval":
        assert keys == [f"vid{i:03d}" for i in range(4)]  # the batches before the hung one
    del batches
    deadline = time.monotonic() + 30  # the DataLoader terminates the stuck worker
    while set(psutil.Process().children()) - others and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not set(psutil.Process().children()) - others


def test_loader_without_hang_is_unaffected_by_the_timeout(synthetic_shards):
    cfg = DataConfig(shards=str(synthetic_shards), num_frames=4, sampling_rate=2, input_size=32,
                     patch_size=8, tubelet_size=2, batch_size=4, num_workers=2, timeout_s=30.0,
                     backend="pyav")
    loader = build_loader(cfg, "eval", rank=0, world_size=1)
    assert sorted(k for batch in loader for k in batch["key"]) == [f"vid{i:03d}"
                                                                  for i in range(12)]
    assert loader.stats["decoded"] == 12


def test_watch_describes_the_longest_running_sample_first():
    watch = WorkerWatch(2)
    assert "no worker is inside a sample" in watch.describe()
    watch.start("shard-a.tar", "k1")
    watch.started[1], watch.text[1] = watch.started[0] - 5, watch.text[0]
    watch.text[1, :11] = watch.text[1, :11].new_tensor(list(b"shard-b.tar"))
    text = watch.describe()
    assert text.index("worker 1") < text.index("worker 0") and "'k1' of shard shard-b.tar" in text
    watch.finish()  # the main process is row 0
    assert "worker 0" not in watch.describe()
    with pytest.raises(ValueError, match="data.timeout_s"):
        DataConfig(timeout_s=-1).validate()
