"""The ``make demo`` driver's results table (the pipeline stages are tested in their packages)."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_demo_module():
    spec = importlib.util.spec_from_file_location("launch_demo", ROOT / "launch" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_results_table_reports_every_stage_that_ran():
    demo = load_demo_module()
    results = {
        "chance": 0.1,
        "probe_pretrained": {"top1": 0.4},
        "probe_random": {"top1": 0.125},
        "attentive_pretrained": {"top1": 0.45},
        "attentive4_random": {"top1": 0.1},
        "pretrain": {"loss": 0.97123, "zero_pred_loss": 0.98437, "out_dir": "x"},
        "finetune_joint": {"top1": 0.5},
        "finetune_joint_random": {"top1": 0.375},
        "detection_pretrained": {"tad/average_mAP": 0.3051,
                                 "tad/whole_video_baseline_average_mAP": 0.0},
        "detection_random": {"tad/average_mAP": 0.2},
    }
    table = demo.results_table(results).splitlines()
    assert table[0].startswith("| stage |")
    rows = [tuple(cell.strip() for cell in line.strip("|").split("|")) for line in table[2:]]
    assert ("linear probe", "pretrained (VideoMAE)", "val top-1 %", "40.0") in rows
    assert ("linear probe", "random init", "val top-1 %", "12.5") in rows
    assert ("attentive probe, 1 block", "pretrained (VideoMAE)", "val top-1 %", "45.0") in rows
    assert not any(r[:2] == ("attentive probe, 1 block", "random init") for r in rows)
    assert ("attentive probe, 4 blocks, 2 epochs", "random init", "val top-1 %", "10.0") in rows
    assert not any(r[:2] == ("attentive probe, 4 blocks, 2 epochs", "pretrained (VideoMAE)")
                   for r in rows)
    assert ("fine-tune", "joint, pretrained", "val top-1 %", "50.0") in rows
    assert ("fine-tune", "joint, random init", "val top-1 %", "37.5") in rows
    pretraining = [r for r in rows if r[0] == "pretraining"]
    assert [r[-1] for r in pretraining] == ["0.9712", "0.9844", "0.9867"]  # loss, zeros, ratio
    assert "predicting zeros" in pretraining[1][1]
    detection = [r for r in rows if r[0] == "detection"]
    assert [(r[1].split(", ")[-1], r[-1]) for r in detection] == [
        ("pretrained", "30.5"), ("baseline: whole video", "0.0"), ("random init", "20.0")]
    assert ("(chance)", "", "top-1 %", "10.0") in rows
    # stages that did not run get no row
    assert not any(r[1] in ("space_only", "divided") for r in rows)
    assert not any("AVA" in r[2] for r in rows)
