"""bench/attention_table.py --quick: every attention type fine-tuned from one encoder, and the
table's columns (the figures of a 2-step run mean nothing; only that they are reported)."""
from __future__ import annotations

import dataclasses
import json

import pytest

from data_tools.demo import DemoConfig, generate_demo
from finetune.config import FinetuneConfig
from models import VideoViT
from models.checkpoint import save_project_checkpoint
from models.config import ATTENTION_TYPES
from runtime.config import load_config


@pytest.mark.slow
def test_quick_table_fine_tunes_every_type_from_one_encoder(bench, tmp_path, capsys):
    table = bench("attention_table")
    generate_demo(tmp_path / "data", DemoConfig.tiny(), workers=1, progress=False)
    model_cfg = load_config(FinetuneConfig, table.CONFIG).model  # the demo's encoder geometry
    encoder = save_project_checkpoint(VideoViT(dataclasses.replace(model_cfg, num_classes=0)),
                                      tmp_path / "encoder.safetensors")
    out = tmp_path / "table.json"
    result = table.main(["--quick", "--pretrained", str(encoder), "--data",
                         str(tmp_path / "data"), "--out", str(tmp_path / "runs"),
                         "--json", str(out), "--set", "data.batch_size=4"])  # 30 clips
    assert json.loads(out.read_text())["rows"] == result["rows"]
    rows = {r["attention"]: r for r in result["rows"]}
    assert list(rows) == list(ATTENTION_TYPES)
    assert all(r["steps"] == 2 and 0 <= r["top1"] <= 100 and r["finetune_s"] > 0
               for r in rows.values())
    params = {a: r["params"] for a, r in rows.items()}
    # one extra attention + projection per branch; window adds only its bias tables
    assert params["joint"] == params["space_only"] == params["mixing"] < params["window"]
    assert params["window"] < params["divided"] == params["sparse_local_global"] < params["axial"]
    assert rows["sparse_local_global"]["timesformer_k400"] == 75.9
    assert rows["window"]["timesformer_k400"] is None
    printed = capsys.readouterr().out
    assert "| axial | 196.4K |" in printed and "| 73.5 / 56.2 |" in printed
