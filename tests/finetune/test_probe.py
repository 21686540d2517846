"""Linear and attentive probes: from a real pretraining run folder to metrics, with the
feature cache reused while the encoder and data settings are unchanged; the probe heads and
their grid."""
from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from finetune.config import ProbeConfig, ProbeHeadConfig, ValConfig
from finetune.extract import FeatureSet, load_features
from finetune.probe import AttentiveProbe, LinearProbe, ProbeGrid, run
from finetune.probe_train import (GridTrainer, cached_epochs, feature_batches, grid_logits,
                                  steps_per_epoch, train_grid)
from pretrain.config import PretrainConfig
from pretrain.train import run as pretrain
from runtime.config import parse_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def pretrain_run(demo_root, tmp_path_factory) -> Path:
    """A real 2-step pretraining run of configs/pretrain/demo_tiny.yaml on 8-frame clips."""
    out = tmp_path_factory.mktemp("pretrain_for_probe")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pretrain(parse_config(PretrainConfig, [
            "--config", str(REPO / "configs/pretrain/demo_tiny.yaml"),
            f"data.shards={demo_root / 'train'}", f"out_dir={out}", "model.num_frames=8",
            "data.num_frames=8", "data.batch_size=4", "data.num_workers=0", "max_steps=2",
            "model.img_size=32", "data.input_size=32", "model.tubelet_size=2",
            "data.tubelet_size=2", "data.sampling_rate=2", "checkpoint.every_steps=2",
            "log.vis_every_steps=-1", "log.tensorboard=false"]))
    finally:
        torch.set_num_threads(before)
    return out


@pytest.fixture
def probe_cfg(pretrain_run, tiny_model_cfg, tiny_data_cfg, tmp_path):
    """Probe of the pretraining run's encoder (8x8 patches, as pretrained), 2 views per video."""
    model = tiny_model_cfg(patch_size=8)
    return ProbeConfig(
        model=model, weights=str(pretrain_run),
        data=tiny_data_cfg("train", patch_size=8, num_test_clips=2),
        val=ValConfig(shards=tiny_data_cfg("val").shards, test_views=True),
        probe=ProbeHeadConfig(epochs=4, batch_size=8, warmup_epochs=1),
        out_dir=str(tmp_path / "probe"))


def test_linear_probe_runs_from_a_pretraining_run_and_reuses_its_cache(probe_cfg, tmp_path):
    metrics = run(probe_cfg)
    assert metrics["num_videos"] == 20 and metrics["num_views"] == 2.0
    assert 0.0 <= metrics["top1"] <= metrics["top5"] <= 1.0
    out = Path(probe_cfg.out_dir)
    rows = list(csv.DictReader((out / "eval" / "predictions.csv").open()))
    assert len(rows) == 20 and {r["num_views"] for r in rows} == {"2"}
    assert json.loads((out / "eval" / "metrics.json").read_text())["top1"] == metrics["top1"]

    train_file = out / "features" / "train-mean.safetensors"
    val_file = out / "features" / "val-mean.safetensors"
    train, val = load_features(train_file), load_features(val_file)
    assert train.features.shape == (30, 64) and len(set(train.keys)) == 30
    assert val.features.shape == (40, 64) and sorted(set(val.views.tolist())) == [0, 1]
    stamps = {p: p.stat().st_mtime_ns for p in (train_file, val_file)}

    again = run(
        dataclasses.replace(probe_cfg, probe=dataclasses.replace(probe_cfg.probe, epochs=2)))
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # same encoder: cache reused
    assert again["num_videos"] == 20

    random_init = run(dataclasses.replace(probe_cfg, weights=""))
    assert train_file.stat().st_mtime_ns != stamps[train_file]  # other weights: re-extracted
    assert not torch.equal(load_features(train_file).features, train.features)
    assert random_init["num_videos"] == 20


def test_attentive_probe_grid_trains_on_cached_tokens_and_reports_every_head(probe_cfg):
    probe = dataclasses.replace(probe_cfg.probe, kind="attentive", blocks=2,
                                lrs=[1e-3, 3e-3], weight_decays=[0.0, 0.05])
    cfg = dataclasses.replace(probe_cfg, probe=probe,
                              val=dataclasses.replace(probe_cfg.val, test_views=False))
    metrics = run(cfg)
    assert metrics["num_videos"] == 20 and metrics["num_views"] == 1.0
    tokens = load_features(Path(cfg.out_dir) / "features" / "train-tokens.safetensors")
    assert tokens.features.shape == (30, 64, 64) and tokens.features.dtype == torch.float16

    heads = metrics["heads"]
    assert [(h["lr"], h["weight_decay"]) for h in heads] == probe.grid
    best = heads[metrics["best_head"]]
    assert best["top1"] == max(h["top1"] for h in heads) == metrics["top1"]
    assert (metrics["best_lr"], metrics["best_weight_decay"]) == (best["lr"],
                                                                   best["weight_decay"])
    assert metrics["mean_top1"] == pytest.approx(sum(h["top1"] for h in heads) / 4)
    saved = json.loads((Path(cfg.out_dir) / "eval" / "metrics.json").read_text())
    assert saved["blocks"] == 2 and saved["heads"] == heads and saved["top1"] == metrics["top1"]
    logged = [json.loads(line) for line in (Path(cfg.out_dir) / "metrics.jsonl").open()]
    assert {f"loss_h{i}" for i in range(4)} <= set(logged[0])
    assert logged[-1]["tag"] == "val" and logged[-1]["top1_h3"] == heads[3]["top1"]


def separable_features(num_per_class=40, num_classes=3, dim=16, tokens=0, seed=0) -> FeatureSet:
    """Gaussian clusters (or token sets whose mean is the cluster centre) with an offset and
    scale a BatchNorm has to undo."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=gen) * 3
    labels = torch.arange(num_classes).repeat_interleave(num_per_class)
    shape = (len(labels), tokens, dim) if tokens else (len(labels), dim)
    noise = torch.randn(*shape, generator=gen)
    centre = centres[labels][:, None] if tokens else centres[labels]
    features = 50.0 + 10.0 * (centre + noise)
    return FeatureSet([f"v{i}" for i in range(len(labels))], labels,
                      torch.zeros(len(labels), dtype=torch.long), features)


def train_on(features: FeatureSet, cfg: ProbeHeadConfig, seed: int = 0) -> ProbeGrid:
    grid = ProbeGrid(cfg.grid, seed, kind=cfg.kind, dim=features.features.shape[-1],
                     num_classes=int(features.labels.max()) + 1, num_heads=2, blocks=cfg.blocks)
    trainer = GridTrainer(grid, cfg, steps_per_epoch(len(features), cfg.batch_size),
                          torch.device("cpu"))
    return train_grid(trainer, cached_epochs(features, cfg.batch_size, seed),
                      features.features.shape[1:])


def grid_outputs(grid: ProbeGrid, features: FeatureSet) -> list[torch.Tensor]:
    per_head = grid_logits(grid, feature_batches(features, 32), torch.device("cpu"))
    return [torch.cat([logits for _, _, logits in batches]) for batches in per_head]


@pytest.mark.parametrize("kind,blocks", [("linear", 1), ("attentive", 1), ("attentive", 3)])
def test_probe_training_separates_separable_features(kind, blocks):
    train = separable_features(tokens=4 if kind == "attentive" else 0)
    cfg = ProbeHeadConfig(kind=kind, blocks=blocks, epochs=30, batch_size=16, lrs=[3e-3],
                          warmup_epochs=2)
    (logits,) = grid_outputs(train_on(train, cfg), train)
    assert (logits.argmax(1) == train.labels).float().mean() > 0.9


@pytest.mark.parametrize("kind,blocks", [("linear", 1), ("attentive", 2)])
def test_each_head_of_a_grid_computes_what_a_single_head_run_computes(kind, blocks):
    train = separable_features(tokens=4 if kind == "attentive" else 0, num_per_class=12)
    grid_cfg = ProbeHeadConfig(kind=kind, blocks=blocks, epochs=3, batch_size=8,
                               lrs=[1e-3, 1e-2], weight_decays=[0.0, 0.3], warmup_epochs=1)
    together = grid_outputs(train_on(train, grid_cfg), train)
    for index, (lr, weight_decay) in enumerate(grid_cfg.grid):
        single = dataclasses.replace(grid_cfg, lrs=[lr], weight_decays=[weight_decay])
        (alone,) = grid_outputs(train_on(train, single), train)
        torch.testing.assert_close(together[index], alone, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(together[0], together[3], atol=1e-3)  # the grid does differ


def test_attentive_probe_depth_is_self_attention_blocks_then_cross_attention_pooling():
    one = AttentiveProbe(64, 10, num_heads=4, blocks=1)
    four = AttentiveProbe(64, 10, num_heads=4, blocks=4)
    assert len(one.blocks) == 0 and len(four.blocks) == 3
    assert all(block.attn.num_heads == 4 for block in four.blocks)
    # one block is the single cross-attention layer the probe had before depth existed
    assert {k.split(".")[0] for k in one.state_dict()} == {"pool", "norm", "head"}
    assert {k.split(".")[0] for k in four.state_dict()} == {"blocks", "blocks_norm", "pool",
                                                             "norm", "head"}
    assert four(torch.randn(2, 12, 64)).shape == (2, 10)


def test_probe_config_names_what_is_wrong(tiny_model_cfg):
    from runtime.config import ConfigError, load_config

    base = ["val.shards=x", "model.size=micro"]
    with pytest.raises(ConfigError, match="probe.heads=3 does not divide the encoder width 64"):
        load_config(ProbeConfig, None, [*base, "probe.kind=attentive", "probe.heads=3"])
    with pytest.raises(ConfigError, match="probe: kind=knn .* features=cached"):
        load_config(ProbeConfig, None, [*base, "probe.kind=knn", "probe.features=online"])
    with pytest.raises(ConfigError, match="probe: lrs must be a non-empty list"):
        load_config(ProbeConfig, None, [*base, "probe.lrs=[]"])


def test_linear_probe_is_an_affine_free_batch_norm_and_a_small_linear_layer():
    probe = LinearProbe(256, 400)
    assert not probe.norm.affine and probe.norm.eps == 1e-6
    assert probe.head.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert torch.count_nonzero(probe.head.bias) == 0
