"""bench/gpu_suite.sh: the one-shot GPU suite runs every part (here on the CPU with
``--dry-run``), records why a part could not run instead of stopping, and its JSON turns into
the RESULTS.md tables.

The dry run is the real command (the shell script, forked parts, real mp4 shards, real
loader workers), with DeepSpeed made unimportable as on the GPU machine. No timing is
asserted.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from models.config import ATTENTION_TYPES

REPO = Path(__file__).resolve().parents[2]
# what each part must have measured
FIGURES = {"peak": "matmul", "pretrain_step": "rows", "decoder_mask": "rows",
           "attention": "rows", "loader": "runs", "compile": "rows", "profile": "rows"}
# packages the GPU machine's image lacks (the loader's travel as wheels)
ABSENT_ON_GPU = ("deepspeed", "webdataset", "decord", "av")


def blocking_env(tmp_path: Path, names: tuple[str, ...]) -> dict[str, str]:
    """An environment whose Python processes cannot import ``names`` (a sitecustomize sets
    ``sys.modules[name] = None``), as on a machine without them."""
    site = tmp_path / f"block_{'_'.join(names)}"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in names))
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env.update(PYTHON=sys.executable, PYTHONPATH=str(site))
    return env


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_suite")
    out = tmp / "out"
    done = subprocess.run(["bash", "bench/gpu_suite.sh", "--dry-run", "--out", str(out)],
                          cwd=REPO, env=blocking_env(tmp, ("deepspeed",)), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, json.loads((out / "gpu_suite.json").read_text()), done.stdout


def test_dry_run_measures_every_part(dry_run):
    out, result, stdout = dry_run
    parts = result["parts"]
    assert list(parts) == list(FIGURES)
    for name, key in FIGURES.items():
        assert parts[name]["status"] == "ok", (name, parts[name].get("reason"),
                                               parts[name].get("traceback"))
        assert parts[name][key], name
    step = next(r for r in parts["pretrain_step"]["rows"] if r["mode"] == "pretrain step")
    assert step["loss_ours"] == pytest.approx(step["loss_hf"], abs=1e-4)  # the same computation
    attention = {(r["attention"], r["frames"]) for r in parts["attention"]["rows"]}
    assert attention == {(kind, frames) for kind in ATTENTION_TYPES
                         for frames in result["sizes"]["attention"]["frames"]}
    assert [row["impl"] for row in parts["compile"]["rows"]] == ["ours", "hf"]
    loader_rows = parts["loader"]["runs"][0]["rows"]
    assert {r["workers"] for r in loader_rows if r["setting"] == "loader + model"} == set(
        result["sizes"]["loader"]["workers"])
    assert parts["loader"]["videos"]["count"] == result["sizes"]["loader"]["videos"]
    mfu = [row[key] for rows in result["derived"]["rows"].values() for row in rows
           for key in row if key.endswith("mfu")]
    assert mfu and all(math.isfinite(v) and v > 0 for v in mfu)
    # the log holds the whole output; the tables are printed last and written as Markdown
    assert "part compile: ok" in (out / "gpu_suite.log").read_text()
    assert (out / "gpu_suite.md").read_text().strip() in stdout


def test_table_script_renders_the_json(dry_run, bench):
    out, result, _ = dry_run
    text = bench("gpu_table").main([str(out / "gpu_suite.json")])
    for title in ("Ceilings", "Pretraining step: ours vs HF", "Decoder masking",
                  "Attention types", "Loader feeding the model", "torch.compile", "Profile"):
        assert f"### {title}" in text
    assert "ours MFU" in text and "not run" not in text
    # a part that did not run shows its reason instead of figures
    result["parts"]["loader"] = {"status": "skipped", "reason": "webdataset missing"}
    result.pop("derived")
    assert "**skipped**: webdataset missing" in bench("gpu_table").render(result)


def test_suite_imports_without_the_packages_the_gpu_machine_lacks(tmp_path):
    code = ("import bench.gpu_suite, models, data_tools.masking, importlib.util\n"
            "assert all(importlib.util.find_spec(n) is None for n in "
            f"{ABSENT_ON_GPU!r})")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, env=blocking_env(tmp_path, ABSENT_ON_GPU), timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


def test_loader_part_skips_with_the_reason_when_packages_are_missing(bench, monkeypatch,
                                                                     tmp_path):
    parts = bench("gpu_parts")
    real = parts.importlib.util.find_spec
    monkeypatch.setattr(parts.importlib.util, "find_spec",
                        lambda name: None if name in ABSENT_ON_GPU else real(name))
    with pytest.raises(parts.Skip, match=r"webdataset, av not installed.*\.whl"):
        parts.loader(parts.DRY_RUN, tmp_path, lambda partial: None)


# -- one part's failure is recorded, the suite goes on ----------------------------------------


def _raises(save):
    save({"rows": [1]})
    raise RuntimeError("CUDA error: an illegal memory access")


def _skips(save):
    from bench.gpu_parts import Skip

    raise Skip("nothing to measure here")


def _dies(save):
    os.kill(os.getpid(), signal.SIGKILL)


def _hangs_with_a_helper(save):
    helper = subprocess.Popen(["sleep", "60"])
    save({"rows": [1, 2], "helper": helper.pid})
    time.sleep(60)


def process_gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "State:\tZ" in state  # ended, not yet reaped by its new parent


@pytest.mark.parametrize("target, status, reason, kept", [
    (_raises, "failed", "RuntimeError: CUDA error: an illegal memory access", [1]),
    (_skips, "skipped", "nothing to measure here", None),
    (_dies, "failed", "signal SIGKILL", None),
])
def test_run_part_records_what_went_wrong(bench, tmp_path, target, status, reason, kept):
    bench("gpu_parts")
    record = bench("gpu_suite").run_part(target, 30, tmp_path / "part.json")
    assert record["status"] == status
    assert reason in record["reason"]
    assert record.get("rows") == kept


def test_run_part_stops_a_part_at_its_budget_and_keeps_its_figures(bench, tmp_path):
    record = bench("gpu_suite").run_part(_hangs_with_a_helper, 3, tmp_path / "part.json")
    assert record["status"] == "timed_out" and "3 s budget" in record["reason"]
    assert record["rows"] == [1, 2]
    assert "time.sleep(60)" in record["traceback"]  # where the part was when it was stopped
    deadline = time.monotonic() + 10
    while not process_gone(record["helper"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert process_gone(record["helper"])  # the part's helper processes are stopped too
