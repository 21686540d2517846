"""The online probe (frozen encoder in the loop, nothing cached) computes what the cached
probe computes, and two real ranks (gloo) compute what one rank computes."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from finetune.config import ProbeConfig, ProbeHeadConfig, ValConfig
from finetune.probe import run
from runtime.dist import free_port

# 30 training videos: a batch of 32 holds all of them, so both modes take the same steps
# (one per epoch) whatever order they read the videos in.
FULL_BATCH = 32


@pytest.fixture
def online_cfg(tiny_model_cfg, tiny_data_cfg, tmp_path):
    def make(kind: str, name: str, **probe) -> ProbeConfig:
        return ProbeConfig(
            model=tiny_model_cfg(), data=tiny_data_cfg("train", num_test_clips=2),
            val=ValConfig(shards=tiny_data_cfg("val").shards, test_views=True),
            probe=ProbeHeadConfig(kind=kind, features="online", epochs=3,
                                  batch_size=FULL_BATCH, warmup_epochs=1, lrs=[1e-3, 1e-2],
                                  **probe),
            out_dir=str(tmp_path / name))

    return make


def scores(cfg: ProbeConfig) -> dict[str, tuple[str, float]]:
    rows = csv.DictReader((Path(cfg.out_dir) / "eval" / "predictions.csv").open())
    return {row["key"]: (row["pred"], float(row["score"])) for row in rows}


def assert_same_results(metrics: dict, reference: dict, a: ProbeConfig, b: ProbeConfig) -> None:
    assert metrics["num_videos"] == reference["num_videos"] == 20
    for head, ref in zip(metrics["heads"], reference["heads"], strict=True):
        for name in ("top1", "top5", "mean_class_acc"):
            assert head[name] == pytest.approx(ref[name], abs=1e-6)
    assert metrics["best_head"] == reference["best_head"]
    got, expected = scores(a), scores(b)
    assert got.keys() == expected.keys()
    for key, (pred, score) in expected.items():
        assert got[key][0] == pred and got[key][1] == pytest.approx(score, abs=1e-4)


def test_online_probe_equals_the_cached_probe(online_cfg):
    online = online_cfg("linear", "online")
    cached = dataclasses.replace(online, out_dir=online.out_dir + "_cached", probe=dataclasses
                                 .replace(online.probe, features="cached"))
    online_metrics, cached_metrics = run(online), run(cached)
    assert_same_results(online_metrics, cached_metrics, online, cached)
    assert not (Path(online.out_dir) / "features").exists()  # nothing stored
    logged = [json.loads(line) for line in (Path(online.out_dir) / "metrics.jsonl").open()]
    reference = [json.loads(line) for line in (Path(cached.out_dir) / "metrics.jsonl").open()]
    assert [r["tag"] for r in logged] == [r["tag"] for r in reference] == ["probe"] * 3 + ["val"]
    for row, ref in zip(logged[:3], reference[:3]):
        assert row["loss_h1"] == pytest.approx(ref["loss_h1"], rel=1e-5)


def _probe_rank(rank: int, world: int, port: int, configs: list[ProbeConfig]) -> None:
    """One rank of the online probe over gloo, started by ``torch.multiprocessing``."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                  world_size=world)
    for cfg in configs:
        metrics = run(cfg)
        with open(os.path.join(cfg.out_dir, f"rank{rank}.json"), "w") as handle:
            json.dump(metrics, handle)
    torch_dist.destroy_process_group()


@pytest.mark.slow
def test_two_rank_online_probe_equals_one_rank(online_cfg):
    """Rank 0 encodes 16 training videos, rank 1 14; the linear probe's BatchNorm uses the
    statistics of all 30 and the attentive probe's gradients are summed over ranks."""
    configs = [online_cfg("linear", "linear_two"),
               online_cfg("attentive", "attentive_two", blocks=2, weight_decays=[0.0, 0.05])]
    mp.start_processes(_probe_rank, args=(2, free_port(), configs), nprocs=2, join=True,
                       start_method="spawn")
    for cfg in configs:
        one = dataclasses.replace(cfg, out_dir=cfg.out_dir.replace("_two", "_one"))
        reference = run(one)
        ranks = [json.loads((Path(cfg.out_dir) / f"rank{r}.json").read_text()) for r in (0, 1)]
        assert ranks[0]["heads"] == ranks[1]["heads"]
        assert_same_results(ranks[0], reference, cfg, one)


def test_augmented_online_probe_draws_new_clips_every_epoch(online_cfg, monkeypatch):
    """probe.augment=true: the probe trains on clips drawn and cropped anew every epoch
    (loader mode train), one step per batch of 10 of the 30 videos; without it every epoch
    sees the same centred clips."""
    import finetune.probe as probe_module

    original = probe_module.encoded_batches
    seen: list[list[float]] = []

    def recording(encoder, loader, data, *args, **kwargs):
        batches = list(loader)
        seen.append(sorted(float(b["video"].float().sum()) for b in batches))
        return original(encoder, batches, data, *args, **kwargs)

    monkeypatch.setattr(probe_module, "encoded_batches", recording)
    sums = {}
    for augment in (False, True):
        seen.clear()
        cfg = online_cfg("linear", f"augment_{augment}", augment=augment)
        cfg = dataclasses.replace(cfg, probe=dataclasses.replace(cfg.probe, batch_size=10))
        metrics = run(cfg)
        assert metrics["num_videos"] == 20 and 0.0 <= metrics["top1"] <= 1.0
        sums[augment] = [epoch for epoch in seen[:3]]  # the training epochs (then validation)
        logged = [json.loads(line) for line in (Path(cfg.out_dir) / "metrics.jsonl").open()]
        assert [r["step"] for r in logged if r["tag"] == "probe"] == [3, 6, 9]
    assert sums[False][0] == sums[False][1] == sums[False][2]
    assert sums[True][0] != sums[True][1] and sums[True][1] != sums[True][2]
    with pytest.raises(ValueError, match="augment=true needs features=online"):
        ProbeHeadConfig(augment=True).validate()
