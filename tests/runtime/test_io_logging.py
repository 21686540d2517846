"""runtime.io atomic writes / weights-only loading, runtime.logging, runtime.seed,
runtime.preemption."""
from __future__ import annotations

import json
import math
import os
import random
import re
import signal

import pytest
import torch

from runtime.io import atomic_path, atomic_save_safetensors, atomic_torch_save, load_state_dict
from runtime.logging import RunLogger, progress, read_metrics
from runtime.preemption import PreemptionSignal
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


def test_progress_in_a_batch_job_writes_plain_lines(capsys):
    """stderr is not a terminal under pytest, as in a SLURM log file: one line per log step
    with the step, the values and an ETA, no carriage returns; other ranks write nothing."""
    bar = progress(None, total=100, initial=40, desc="pretrain", enabled=True)
    bar.update(10)
    bar.set_postfix(loss="0.3712", lr="1.00e-04", refresh=False)
    bar.close()
    quiet = progress(range(3), desc="eval", enabled=False)
    assert list(quiet) == [0, 1, 2]
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert len(lines) == 2 and lines[0].startswith("pretrain: step 50/100 loss=0.3712 lr=1.00e-04")
    assert re.search(r" eta \d\d:\d\d:\d\d$", lines[0]) and lines[1].startswith("pretrain: 10 done")


def test_signal_sets_a_flag_instead_of_ending_the_process():
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionSignal() as preemption:
        assert not preemption.requested()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert preemption.received == signal.SIGUSR1 and preemption.requested()
    assert signal.getsignal(signal.SIGUSR1) == before


def test_exports_stream_into_the_file_without_an_in_memory_copy(tmp_path, monkeypatch):
    """A ViT-g export is ~4 GB: serialising it to bytes first doubled rank 0's memory."""
    import safetensors.torch

    def no_bytes(*args, **kwargs):
        raise AssertionError("serialised into memory")

    monkeypatch.setattr(safetensors.torch, "save", no_bytes)
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    atomic_save_safetensors(state, tmp_path / "a.safetensors", metadata={"k": "v"})
    assert torch.equal(load_state_dict(tmp_path / "a.safetensors")["w"], state["w"])
    targets = []
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f: (targets.append(f), real_save(obj, f)))
    atomic_torch_save(state, tmp_path / "b.pt")
    assert targets and not hasattr(targets[0], "getvalue")  # a file path, not a BytesIO
    assert torch.equal(load_state_dict(tmp_path / "b.pt")["w"], state["w"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.pt"]
