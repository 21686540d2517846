"""The shipped configs parse, the demo configs stay in step, bad values fail clearly."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from data_tools.config import GEOMETRY_MODEL_KEYS
from finetune.config import ExtractConfig, FinetuneConfig, ProbeConfig, eval_data_config
from runtime.config import ConfigError, load_config, parse_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "finetune"
KIND = {"probe_demo.yaml": ProbeConfig, "extract_demo.yaml": ExtractConfig}
FINETUNE_CONFIGS = sorted(p.name for p in CONFIGS.glob("*.yaml") if p.name not in KIND
                          and p.name not in ("detect_demo.yaml", "tad_demo.yaml"))


@pytest.mark.parametrize("name", FINETUNE_CONFIGS + sorted(KIND))
def test_shipped_configs_load(name):
    cfg = load_config(KIND.get(name, FinetuneConfig), CONFIGS / name)
    assert not set(GEOMETRY_MODEL_KEYS) & set(yaml.safe_load((CONFIGS / name).read_text())["data"])
    assert cfg.model.num_frames == cfg.data.num_frames  # derived from the model section
    assert cfg.data.token_grid == cfg.model.grid


@pytest.mark.parametrize("name", ["demo_joint.yaml", *sorted(KIND)])
def test_data_geometry_follows_the_model_section(name):
    kind = KIND.get(name, FinetuneConfig)
    cfg = load_config(kind, CONFIGS / name, ["model.num_frames=16", "model.img_size=64"])
    assert (cfg.data.num_frames, cfg.data.input_size, cfg.data.patch_size) == (16, 64, 8)
    assert cfg.resolve() == cfg
    agreeing = load_config(kind, CONFIGS / name, ["data.num_frames=8", "data.tubelet_size=1"])
    assert agreeing == load_config(kind, CONFIGS / name)
    with pytest.raises(ConfigError, match="data.patch_size=16 disagrees with model.patch_size=8"):
        load_config(kind, CONFIGS / name, ["data.patch_size=16"])


def test_demo_configs_differ_only_in_attention():
    base = yaml.safe_load((CONFIGS / "demo_joint.yaml").read_text())
    for attention in ("divided", "space_only", "mixing"):
        other = yaml.safe_load((CONFIGS / f"demo_{attention}.yaml").read_text())
        assert other["model"].pop("attention") == attention
        assert other.pop("out_dir") == f"runs/finetune_demo_{attention}"
        expected = {**base, "model": {k: v for k, v in base["model"].items() if k != "attention"}}
        expected.pop("out_dir")
        assert other == expected


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit) as info:
        parse_config(FinetuneConfig, ["--help"], prog="python -m finetune")
    assert info.value.code == 0
    text = capsys.readouterr().out
    for name in ("mixup.cutmix", "ema.decay", "optim.layer_decay", "val.test_views",
                 "head_init_scale", "model.attention", "checkpoint.resume"):
        assert name in text


@pytest.mark.parametrize("override, message", [
    (["data.batch_size=7", "mixup.mixup=0.8"], "needs an even data.batch_size"),
    (["data.num_frames=4"], "data.num_frames=4 disagrees with model.num_frames=8"),
    (["val.shards="], "val.shards must be set"),
    (["mixup.label_smoothing=1.5"], "label_smoothing must be in"),
    (["ema.decay=1.0"], "decay must be in"),
])
def test_invalid_finetune_configs_fail_clearly(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(FinetuneConfig, CONFIGS / "demo_joint.yaml", override)


def test_eval_workers_are_lowered_to_the_shard_count(demo_root, tiny_data_cfg):
    data = tiny_data_cfg("val", num_workers=4)  # 3 shards
    assert eval_data_config(data, data.shards, 1).num_workers == 3
    assert eval_data_config(data, data.shards, 2, batch_size=16).num_workers == 1
    assert eval_data_config(data, data.shards, 2, batch_size=16).batch_size == 16
    with pytest.raises(ValueError, match="has 3 shard\\(s\\) but 4 ranks"):
        eval_data_config(data, data.shards, 4)
