"""Experiment trackers (runtime.trackers behind runtime.logging.RunLogger): W&B in offline
mode and MLflow with a file store, both read back from what they wrote; rank 0 only; closed on
errors and stop signals; a resumed run continues its tracker run; a missing package is one
clear error; a real tiny pretraining run records its config and summary."""
from __future__ import annotations

import dataclasses
import json
import re
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from finetune.config import LogConfig
from runtime.checkpoint import CheckpointConfig
from runtime.config import ConfigError, load_config
from runtime.logging import RunLogger
from runtime.preemption import Preempted
from runtime.trackers import (TRACKER_IDS_FILE, TRACKERS_INSTALL, MlflowConfig,
                              TrackerMissingError, WandbConfig, active_session, flatten,
                              open_session, tracked)

REPO = Path(__file__).resolve().parents[2]


@dataclass
class StageConfig:
    """The parts of a stage config the trackers read."""

    out_dir: str = ""
    depth: int = 2
    shards: list[str] = field(default_factory=lambda: ["a.tar", "b.tar"])
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


def train(cfg: StageConfig, losses: list[float], fail: BaseException | None = None) -> dict:
    """A stage's run: one metrics line per step through RunLogger, then its summary."""
    with RunLogger(cfg.out_dir, tensorboard=False) as run_log:
        start = run_log_start(cfg)
        for step, loss in enumerate(losses, start + 1):
            run_log.log(step, loss=loss, lr=0.1 * step)
            if fail is not None and step == start + 2:
                raise fail
        run_log.log(start + len(losses), tag="val", **{"top1": 0.5, "mAP@0.5": 0.25})
    return {"top1": 0.5, "mAP@0.5": 0.25, "steps": len(losses), "out_dir": cfg.out_dir,
            "per_class": {"a": 0.75}, "weights@start": "random init"}


def run_log_start(cfg: StageConfig) -> int:
    """Steps a resumed run has done already (its metrics file's training lines)."""
    path = Path(cfg.out_dir) / "metrics.jsonl"
    if not cfg.checkpoint.resume or not path.is_file():
        return 0
    return sum(json.loads(line)["tag"] == "train" for line in path.read_text().splitlines())


def run_stage(cfg: StageConfig, losses: list[float], fail: BaseException | None = None) -> dict:
    """``train`` as a tracked stage ``run(cfg)``."""
    return tracked(lambda c: train(c, losses, fail))(cfg)


# ---------------------------------------------------------------------------------------
# MLflow


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3: file stores opt-in
    uri = (tmp_path / "mlruns").as_uri()
    return uri, MlflowClient(tracking_uri=uri)


def mlflow_cfg(tmp_path, uri: str, **log) -> StageConfig:
    return StageConfig(out_dir=str(tmp_path / "run"), log=LogConfig(
        mlflow=MlflowConfig(experiment="tiny", tracking_uri=uri), **log))


def only_run(client, experiment: str = "tiny"):
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1
    return runs[0]


def history(client, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def test_mlflow_records_config_metrics_summary_and_status(tmp_path, mlflow_store):
    uri, client = mlflow_store
    cfg = mlflow_cfg(tmp_path, uri)
    summary = run_stage(cfg, [3.0, 2.0, 1.5])
    run = only_run(client)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    params = run.data.params
    assert params["depth"] == "2" and json.loads(params["shards"]) == ["a.tar", "b.tar"]
    assert params["log.mlflow.experiment"] == "tiny" and params["out_dir"] == cfg.out_dir
    assert history(client, run.info.run_id, "train/loss") == {1: 3.0, 2: 2.0, 3: 1.5}
    assert history(client, run.info.run_id, "train/lr") == pytest.approx({1: .1, 2: .2, 3: .3})
    # the summary: numbers as metrics at the last step (MLflow refuses '@' in names), text
    # and nested values as they are
    assert history(client, run.info.run_id, "val/mAP_0.5") == {3: 0.25}
    assert run.data.metrics["top1"] == summary["top1"] and run.data.metrics["mAP_0.5"] == 0.25
    assert run.data.metrics["steps"] == 3 and run.data.metrics["per_class.a"] == 0.75
    assert history(client, run.info.run_id, "top1") == {3: 0.5}
    assert run.data.tags["summary.out_dir"] == cfg.out_dir
    assert run.data.tags["summary.weights_start"] == "random init"
    ids = json.loads((tmp_path / "run" / TRACKER_IDS_FILE).read_text())
    assert ids == {"mlflow": run.info.run_id}
    assert active_session() is None


@pytest.mark.parametrize("error, status", [(RuntimeError("boom"), "FAILED"),
                                           (Preempted(2, "run"), "KILLED")])
def test_mlflow_run_is_closed_when_the_stage_stops(tmp_path, mlflow_store, error, status):
    uri, client = mlflow_store
    with pytest.raises(type(error)):
        run_stage(mlflow_cfg(tmp_path, uri), [3.0, 2.0, 1.0], fail=error)
    run = only_run(client)
    assert run.info.status == status
    assert history(client, run.info.run_id, "train/loss") == {1: 3.0, 2: 2.0}
    assert "top1" not in run.data.metrics  # no summary: the stage returned none
    assert active_session() is None


def test_a_resumed_run_continues_its_mlflow_run(tmp_path, mlflow_store):
    uri, client = mlflow_store
    cfg = mlflow_cfg(tmp_path, uri)
    cfg = dataclasses.replace(cfg, checkpoint=CheckpointConfig(resume="auto"))
    with pytest.raises(Preempted):  # the first run has nothing to resume: a new MLflow run
        run_stage(cfg, [3.0, 2.0, 1.0], fail=Preempted(2, cfg.out_dir))
    first = only_run(client)
    run_stage(cfg, [1.0, 0.5])  # requeued with checkpoint.resume=auto: steps 3 and 4
    run = only_run(client)
    assert run.info.run_id == first.info.run_id and run.info.status == "FINISHED"
    assert history(client, run.info.run_id, "train/loss") == {1: 3.0, 2: 2.0, 3: 1.0, 4: 0.5}
    assert run.data.metrics["top1"] == 0.5


def test_other_ranks_open_no_tracker(tmp_path, mlflow_store, monkeypatch):
    uri, client = mlflow_store
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    # rank from the environment even where an earlier test in this worker left a
    # single-process group initialised
    monkeypatch.setattr("runtime.dist.is_initialized", lambda: False)
    cfg = mlflow_cfg(tmp_path, uri)
    seen = []

    def rank_one(c):
        seen.append(active_session())
        return {"top1": 1.0}

    assert tracked(rank_one)(cfg) == {"top1": 1.0}
    assert seen == [None]
    assert client.get_experiment_by_name("tiny") is None and not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------
# Weights & Biases (offline run files)


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield
    wandb.teardown()  # stops the wandb-core service this test started


def wandb_records(run_dir: Path) -> list:
    """The records of an offline run's ``run-<id>.wandb`` file (W&B's LevelDB-style log: a
    7-byte ``:W&B`` header, then 32 KiB blocks of records with a 7-byte header - checksum,
    length, type full/first/middle/last - each a protobuf ``Record``)."""
    import wandb
    from wandb.proto import wandb_internal_pb2

    wandb.teardown()  # the wandb-core service writes the file: complete once it has stopped
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1), "not a W&B transaction log"
    block, header, position, pending, records = 32768, 7, 7, b"", []
    while position + header <= len(data):
        if block - position % block < header:  # a block's tail too short for a header
            position += block - position % block
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[position:position + header])
        pending += data[position + header:position + header + length]
        position += header + length
        if kind in (1, 4):  # full, last
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def decoded(items) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def test_wandb_offline_run_holds_config_metrics_and_summary(tmp_path, wandb_offline):
    out_dir = tmp_path / "run"
    cfg = StageConfig(out_dir=str(out_dir), log=LogConfig(wandb=WandbConfig(
        project="tiny", mode="offline", tags=["test"])))
    run_stage(cfg, [3.0, 2.0])
    records = wandb_records(out_dir)
    (run,) = [r.run for r in records if r.HasField("run")]
    config = decoded(run.config.update)
    assert config["depth"] == 2 and config["shards"] == ["a.tar", "b.tar"]
    assert config["log.wandb.project"] == "tiny" and run.display_name == "run"
    assert list(run.tags) == ["test"]
    lines = [decoded(r.history.item) for r in records if r.HasField("history")]
    train = {line["step"]: line["train/loss"] for line in lines if "train/loss" in line}
    assert train == {1: 3.0, 2: 2.0}
    assert [line["val/mAP@0.5"] for line in lines if "val/mAP@0.5" in line] == [0.25]
    summary = {}
    for record in records:
        if record.HasField("summary"):
            summary.update(decoded(record.summary.update))
    assert summary["top1"] == 0.5 and summary["out_dir"] == str(out_dir)
    assert summary["per_class.a"] == 0.75
    (exit_record,) = [r.exit for r in records if r.HasField("exit")]
    assert exit_record.exit_code == 0
    assert json.loads((out_dir / TRACKER_IDS_FILE).read_text())["wandb"] == run.run_id


def test_wandb_run_of_a_preempted_stage_exits_with_the_requeue_code(tmp_path, wandb_offline):
    out_dir = tmp_path / "run"
    cfg = StageConfig(out_dir=str(out_dir), log=LogConfig(wandb=WandbConfig(
        project="tiny", mode="offline")))
    with pytest.raises(Preempted):
        run_stage(cfg, [3.0, 2.0, 1.0], fail=Preempted(2, str(out_dir)))
    records = wandb_records(out_dir)
    (exit_record,) = [r.exit for r in records if r.HasField("exit")]
    assert exit_record.exit_code == Preempted.exit_code
    assert active_session() is None


# ---------------------------------------------------------------------------------------
# Off by default, lazy imports, missing packages


def test_importing_runtime_logging_imports_no_tracker():
    """(timm imports wandb itself whenever it is installed: ``timm.utils.summary``.)"""
    code = ("import sys, runtime.logging, runtime.trackers, runtime.training; "
            "print(sorted(m for m in ('wandb', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"


def test_trackers_are_off_by_default(tmp_path):
    cfg = StageConfig(out_dir=str(tmp_path / "run"))
    assert open_session(cfg) is None
    assert run_stage(cfg, [1.0])["top1"] == 0.5
    assert not (tmp_path / "run" / TRACKER_IDS_FILE).exists()


@pytest.mark.parametrize("package, option", [("wandb", "log.wandb.project=tiny"),
                                             ("mlflow", "log.mlflow.experiment=tiny")])
def test_a_missing_tracker_package_is_one_clear_error(package, option, tmp_path, monkeypatch):
    from pretrain.config import PretrainConfig

    monkeypatch.setitem(sys.modules, package, None)  # `import package` raises ImportError
    with pytest.raises(ConfigError) as info:  # every rank, before anything runs
        load_config(PretrainConfig, overrides=[option])
    assert TRACKERS_INSTALL in str(info.value) and f"log.{package}" in str(info.value)
    section = (WandbConfig(project="tiny") if package == "wandb"
               else MlflowConfig(experiment="tiny"))
    cfg = StageConfig(out_dir=str(tmp_path / "run"), log=LogConfig(**{package: section}))
    message = rf"log\.{package}\..*{re.escape(TRACKERS_INSTALL)}"
    with pytest.raises(TrackerMissingError, match=message):
        open_session(cfg)  # a config built in code, never validated


# ---------------------------------------------------------------------------------------
# A real stage


def test_tiny_pretraining_run_records_its_config_and_summary(tmp_path, mlflow_store):
    from data_tools.demo import DemoConfig, generate_demo
    from tests.pretrain.helpers import run_in_process, tiny_args

    uri, client = mlflow_store
    generate_demo(tmp_path / "demo", DemoConfig.tiny(), workers=1, progress=False)
    out_dir = tmp_path / "pretrain"
    summary = run_in_process(tiny_args(tmp_path / "demo" / "train", out_dir, **{
        "max_steps": 2, "log.mlflow.experiment": "pretrain",
        "log.mlflow.tracking_uri": uri}))
    run = only_run(client, "pretrain")
    assert run.info.status == "FINISHED" and run.info.run_name == "pretrain"
    params = run.data.params
    assert params["max_steps"] == "2" and params["data.shards"] == str(tmp_path / "demo" / "train")
    resolved = flatten(yaml.safe_load((out_dir / "config.yaml").read_text()))
    assert params == {key: value if isinstance(value, str) else json.dumps(value)
                      for key, value in resolved.items()}
    losses = history(client, run.info.run_id, "train/loss")
    assert sorted(losses) == [1, 2]
    logged = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert losses == {row["step"]: row["loss"] for row in logged if row["tag"] == "train"}
    assert run.data.metrics["loss"] == pytest.approx(summary["loss"])
    assert run.data.metrics["step"] == summary["step"] == 2
    assert run.data.tags["summary.out_dir"] == summary["out_dir"]
