"""Pretraining on a weighted mixture of shard sets (exact resume, per-set counts in
metrics.jsonl) and with V-JEPA multiblock masks (a few steps; refused with factorised
attention at config time)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_tools.manifest import load_manifest
from pretrain.config import PretrainConfig
from runtime.config import ConfigError, load_config
from runtime.logging import METRICS_FILE, read_metrics
from tests.pretrain.helpers import DEMO_CONFIG, losses_by_step, run_in_process, tiny_args

STEPS = 6  # an epoch of the 30 demo videos x 2 repeats is 15 steps of 4 clips
# two sets from the demo shards, weighted against their sizes (8 and 22 videos)
WEIGHTS = {"first": 0.7, "rest": 0.3}


@pytest.fixture(scope="module")
def demo_sets(demo_shards, tmp_path_factory) -> str:
    """``data.shards`` naming two sets: the demo's first shard and its other three, each a
    manifest folder whose shard URLs are absolute paths to the demo's tars."""
    manifest = load_manifest(demo_shards)
    root = tmp_path_factory.mktemp("demo_sets")
    sets = {}
    for name, shards in (("first", manifest.shards[:1]), ("rest", manifest.shards[1:])):
        folder = root / name
        folder.mkdir()
        entries = [{"url": str(demo_shards / s.url), "num_samples": s.num_samples}
                   for s in shards]
        (folder / "manifest.json").write_text(json.dumps(
            {"shards": entries, "num_samples": sum(s.num_samples for s in shards),
             "classes": manifest.classes}))
        sets[name] = {"path": str(folder), "weight": WEIGHTS[name]}
    return json.dumps(sets)  # JSON is YAML: the override's value


def mixed_args(shards: str, out_dir: Path, **extra) -> list[str]:
    return tiny_args(Path("unused"), out_dir, **{"data.shards": shards, **extra})


def test_a_resumed_mixed_run_reproduces_the_uninterrupted_one(demo_sets, tmp_path):
    reference = tmp_path / "reference"
    run_in_process(mixed_args(demo_sets, reference, max_steps=STEPS))
    resumed = tmp_path / "resumed"
    assert run_in_process(mixed_args(demo_sets, resumed, max_steps=3))["step"] == 3
    assert run_in_process(mixed_args(demo_sets, resumed, max_steps=STEPS))["step"] == STEPS
    expected, got = losses_by_step(reference), losses_by_step(resumed)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step

    # per-set counts: one "data" record per loader segment (checkpoints every 3 steps)
    records = read_metrics(reference / METRICS_FILE, "data")
    assert [r["step"] for r in records] == [3, 6]
    last = records[-1]
    taken = last["samples/first"] + last["samples/rest"]
    assert taken >= STEPS * 4 // 2  # 2 clips per decoded video (data.repeat)
    assert last["samples/first"] / taken == pytest.approx(WEIGHTS["first"], abs=0.05)
    summary = json.loads((reference / "ranks" / "rank_00000.json").read_text())
    assert len(summary["shards"]) == 4 and summary["loader"]["samples/rest"] > 0


def test_multiblock_pretraining_runs_with_joint_attention(demo_shards, tmp_path):
    # a 4x4x4 token grid: 2 blocks at 0.7 of a 4x4 frame would often hide everything
    result = run_in_process(tiny_args(demo_shards, tmp_path, max_steps=3, **{
        "data.mask_type": "multiblock", "data.block_scales": "[[0.15, 0.15], [0.4, 0.4]]"}))
    assert result["step"] == 3
    losses = losses_by_step(tmp_path)
    assert sorted(losses) == [1, 2, 3] and all(0 < v < 10 for v in losses.values())


@pytest.mark.parametrize("mask_type", ["multiblock", "random"])
def test_non_tube_masks_are_refused_with_factorised_attention_at_config_time(mask_type):
    with pytest.raises(ConfigError, match=f"mask_type='{mask_type}' .* needs a tube mask"):
        load_config(PretrainConfig, DEMO_CONFIG, [f"data.mask_type={mask_type}",
                                                  "model.attention=divided"])
    assert load_config(PretrainConfig, DEMO_CONFIG,
                       [f"data.mask_type={mask_type}"]).data.mask_type == mask_type
