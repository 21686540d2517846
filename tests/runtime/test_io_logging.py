"""runtime.io atomic writes / weights-only loading, runtime.logging, runtime.seed."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch

from runtime.io import atomic_path, atomic_save_safetensors, atomic_torch_save, load_state_dict
from runtime.logging import RunLogger, read_metrics
from runtime.seed import rng_state, seed_everything, set_rng_state


def test_failed_write_leaves_previous_file_and_no_temp(tmp_path):
    target = tmp_path / "weights.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["weights.bin"]


def test_safetensors_and_torch_round_trip(tmp_path):
    state = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    for path in (atomic_save_safetensors(state, tmp_path / "w.safetensors"),
                 atomic_torch_save({"model": state}, tmp_path / "w.pth")):
        loaded = load_state_dict(path)
        loaded = loaded.get("model", loaded)
        assert all(torch.equal(loaded[k], state[k]) for k in state)


class _Arbitrary:
    """A module-level class: pickle can store it, weights_only loading must refuse it."""


def test_load_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"obj": _Arbitrary()}, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_state_dict(path)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_state_dict(tmp_path / "missing.pth")


def test_run_logger_writes_json_lines_and_tensorboard(tmp_path):
    with RunLogger(tmp_path, enabled=True) as logger:
        logger.log(1, loss=0.5, lr=1e-3)
        logger.log(2, tag="val", top1=0.75)
        logger.log(3, loss=math.nan)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert read_metrics(tmp_path / "metrics.jsonl", tag="val")[0]["top1"] == 0.75
    assert rows[2]["loss"] == "nan"
    json.dumps(rows)
    assert any((tmp_path / "tensorboard").iterdir())


def test_disabled_logger_writes_nothing(tmp_path):
    RunLogger(tmp_path / "x", enabled=False).log(1, loss=1.0)
    assert not (tmp_path / "x").exists()


def test_rng_state_round_trip_is_exact():
    seed_everything(3)
    state = rng_state()
    first = (random.random(), torch.rand(3))
    set_rng_state(state)
    second = (random.random(), torch.rand(3))
    assert first[0] == second[0] and torch.equal(first[1], second[1])
