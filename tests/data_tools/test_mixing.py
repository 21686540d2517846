"""Several weighted shard sets in one resampled loader, on real tar shards of real H.264 clips:
realised proportions, per-set counts, the stream split, and refusals."""
from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from data_tools.config import DataConfig
from data_tools.loader import build_loader
from data_tools.shard_set import WeightedMix, resolve_shards, shard_sources
from data_tools.stream import rank_data_config, video_stream
from runtime.checkpoint import DataPosition
from runtime.errors import InputError

TINY = dict(num_frames=4, sampling_rate=2, input_size=32, patch_size=16, tubelet_size=2,
            batch_size=4)


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory, synthetic_videos, clip_tools) -> dict[str, Path]:
    """Set ``small`` (4 videos ``small*``, 2 shards) and set ``large`` (12 videos
    ``large*``, 4 shards, other labels): sizes in the opposite ratio to the weights below."""
    root = tmp_path_factory.mktemp("mix")
    sets = {}
    for name, count, per_shard in (("small", 4, 2), ("large", 12, 3)):
        samples = [{**video, "__key__": f"{name}{i:03d}",
                    "json": {**video["json"], "label": i % 3 + (10 if name == "large" else 0)}}
                   for i, video in enumerate(synthetic_videos[:count])]
        sets[name] = clip_tools.write_shards(root / name, samples, per_shard).parent
    return sets


def mixture(sets: dict[str, Path], **weights: float) -> dict:
    return {name: {"path": str(sets[name]), "weight": w} for name, w in weights.items()}


def set_of(key: str) -> str:
    return key.rstrip("0123456789")


def test_a_mixed_epoch_takes_each_set_in_proportion_to_its_weight(two_sets):
    """Stated tolerance: round-robin by weight gives every worker's stream of n samples
    n * w samples of each set up to one, so without a shuffle buffer an epoch of 48 clips on
    2 workers is within 2 clips of the weights (0.75 / 0.25), whatever the sets' sizes."""
    cfg = DataConfig(shards=mixture(two_sets, small=3.0, large=1.0), num_workers=2,
                     shuffle_buffer=0, epoch_samples=48, **TINY)
    loader = build_loader(cfg, "pretrain", rank=0, world_size=1)
    keys = [key for batch in loader for key in batch["key"]]
    assert len(keys) == 48
    counts = Counter(map(set_of, keys))
    assert abs(counts["small"] - 36) <= 2 and abs(counts["large"] - 12) <= 2, counts
    stats = loader.stats  # taken in the workers (they may read ahead of the batches consumed)
    assert stats["samples/small"] >= counts["small"] and stats["samples/large"] >= counts["large"]
    taken = stats["samples/small"] + stats["samples/large"]
    assert abs(stats["samples/small"] - 0.75 * taken) <= 2
    assert counts.total() <= stats["decoded"] <= taken and stats["skipped"] == 0


def test_with_a_shuffle_buffer_the_proportions_hold_and_labels_pass_through(two_sets):
    """Tolerance: the shuffle buffer (8 samples per worker) holds drawn samples back, so the
    consumed clips may differ from the weights by the buffers' contents plus one per worker."""
    cfg = DataConfig(shards=mixture(two_sets, small=1.0, large=1.0), num_workers=1,
                     shuffle_buffer=8, epoch_samples=64, **TINY)
    batches = list(build_loader(cfg, "pretrain", rank=0, world_size=1))
    keys = [key for batch in batches for key in batch["key"]]
    labels = torch.cat([batch["label"] for batch in batches]).tolist()
    counts = Counter(map(set_of, keys))
    assert abs(counts["small"] - 32) <= 8 + 1, counts
    assert all((label >= 10) == (set_of(key) == "large") for key, label in zip(keys, labels))


def test_weighted_mix_follows_the_weights_in_every_window():
    sources = [iter(lambda name=name: {"set": name}, None) for name in "abc"]
    mix = WeightedMix(sources, [0.5, 0.3, 0.2])
    drawn = [sample["set"] for _, sample in zip(range(1000), mix)]
    for start in range(0, 1000, 37):  # any window of n draws holds n * w of each set up to 2
        window = drawn[start:start + 50]
        for name, weight in zip("abc", (0.5, 0.3, 0.2)):
            assert abs(window.count(name) - weight * len(window)) <= 2


def test_two_streams_partition_every_set_and_merge_into_the_two_rank_batches(two_sets):
    """Multiblock masks too: the streams' loaders pick the same mask group for their i-th
    batches (taken from their workers in turn), so a merged micro-batch keeps one visible
    count."""
    cfg = DataConfig(shards=mixture(two_sets, small=1.0, large=2.0), num_workers=2,
                     shuffle_buffer=4, seed=3, mask_type="multiblock", block_counts=(1, 3),
                     block_scales=((0.15, 0.15), (0.3, 0.3)), decoder_mask_type="running_cell",
                     **{**TINY, "input_size": 64})  # groups of 28 and 8 visible tokens
    parts = [rank_data_config(cfg, stream, 2) for stream in (0, 1)]
    assert parts[0].epoch_samples == parts[1].epoch_samples == 16  # both sets together
    cfg = replace(cfg, epoch_samples=48)  # 6 batches per stream
    for name in ("small", "large"):
        urls = [set(resolve_shards(p.shards[name]["path"]).urls) for p in parts]
        assert not urls[0] & urls[1]
        assert urls[0] | urls[1] == set(resolve_shards(str(two_sets[name])).urls)
        assert parts[0].shards[name]["weight"] == cfg.shards[name]["weight"]

    def first_batches(rank: int, world_size: int) -> list[dict]:
        stream = video_stream(cfg, seed=0, rank=rank, world_size=world_size,
                              grad_accum_steps=1, streams=2)
        return list(stream.segment(DataPosition(0, 0)))[:6]

    ranks = [first_batches(rank, 2) for rank in (0, 1)]
    merged = first_batches(0, 1)  # one rank reading both streams
    assert {int((~b["mask"][0]).sum()) for b in merged} == {28, 8}  # both groups used
    for step, batch in enumerate(merged):
        assert batch["key"] == ranks[0][step]["key"] + ranks[1][step]["key"]
        assert torch.equal(batch["mask"], torch.cat([r[step]["mask"] for r in ranks]))
        assert len(set((~batch["mask"]).sum(1).tolist())) == 1
        assert torch.equal(batch["decoder_mask"],
                           torch.cat([r[step]["decoder_mask"] for r in ranks]))
    # each stream reads only its own shards
    shard_keys = [{key for name in ("small", "large") for key in
                   _keys_in(resolve_shards(parts[s].shards[name]["path"]).urls)} for s in (0, 1)]
    for stream in (0, 1):
        assert {k for b in ranks[stream] for k in b["key"]} <= shard_keys[stream]


def _keys_in(urls: list[str]) -> set[str]:
    import webdataset as wds
    return {sample["__key__"] for sample in wds.DataPipeline(
        wds.SimpleShardList(urls), wds.tarfile_to_samples())}


def test_a_mixture_is_refused_where_one_set_is_read_and_checked_at_config_time(two_sets):
    cfg = DataConfig(shards=mixture(two_sets, small=1.0, large=1.0), num_workers=0, **TINY)
    with pytest.raises(InputError, match="several weighted shard sets .small, large."):
        build_loader(cfg, "eval", rank=0, world_size=1)
    with pytest.raises(InputError, match="several weighted shard sets"):
        resolve_shards(cfg.shards)
    with pytest.raises(InputError, match=r"data.shards.small.path .* 2 shard\(s\); 3 data streams"):
        rank_data_config(cfg, 0, 3)
    bad = {"data.shards.large.weight must be a number > 0": {"path": "x", "weight": 0},
           "exactly the keys 'path' and 'weight'": {"path": "x"},
           "data.shards.large.path must be a non-empty": {"path": "", "weight": 1}}
    for message, entry in bad.items():
        with pytest.raises(ValueError, match=message):
            replace(cfg, shards={"small": cfg.shards["small"], "large": entry}).validate()
    with pytest.raises(ValueError, match="empty mapping"):
        replace(cfg, shards={}).validate()
    with pytest.raises(InputError, match=r"data.shards.small.path='/nowhere'"):
        build_loader(replace(cfg, shards={**cfg.shards, "small": {"path": "/nowhere",
                                                                  "weight": 1}}),
                     "pretrain", 0, 1)
    assert [s.name for s in shard_sources(cfg.shards)] == ["small", "large"]
    assert shard_sources("a/b") == shard_sources("a/b")  # a plain string is one unnamed set


def test_an_override_changes_one_set_of_a_mixture_and_keeps_the_others():
    """``data.shards.<set>.path=...`` on the command line (as the shipped mixture config
    documents) changes that entry only; a value for ``data.shards`` itself replaces it."""
    from pretrain.config import PretrainConfig
    from runtime.config import load_config

    yaml_path = Path(__file__).resolve().parents[2] / "configs/pretrain/vit_base_mix.yaml"
    cfg = load_config(PretrainConfig, yaml_path, ["data.shards.ssv2.path=/fast/ssv2",
                                                  "data.shards.k710.weight=0.5"])
    assert cfg.data.shards == {"k710": {"path": "data/k710/train", "weight": 0.5},
                               "ssv2": {"path": "/fast/ssv2", "weight": 0.1},
                               "howto100m": {"path": "data/howto100m/train", "weight": 0.565}}
    replaced = load_config(PretrainConfig, yaml_path,
                           ["data.shards={only: {path: /x, weight: 1}}"])
    assert replaced.data.shards == {"only": {"path": "/x", "weight": 1}}
    with pytest.raises(ValueError, match="data.shards.extra.path=... and data.shards.extra.weight"):
        load_config(PretrainConfig, yaml_path, ["data.shards.extra.path=/y"])
