"""Single-rank pretraining runs on the demo shards: learning, artefacts, exact resume after a
SIGKILL mid-checkpoint, ZeRO stages, bf16 export and non-finite losses."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from models import VideoMAEPretrain, VideoViT, load_encoder_weights
from pretrain.config import PretrainConfig
from runtime.checkpoint import COMPLETE_MARKER, CheckpointManager
from runtime.config import load_config
from runtime.engine import NonFiniteLossError
from runtime.io import load_state_dict
from runtime.logging import METRICS_FILE, read_metrics
from tests.pretrain.helpers import (DEMO_CONFIG, PYTHON, REPO, losses_by_step, run_in_process,
                                    subprocess_env, tiny_args)

STEPS = 30  # 2 epochs of 15 steps


def test_loss_decreases_and_run_folder_is_complete(reference_run):
    losses = losses_by_step(reference_run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    # The loss relative to predicting zeros (each patch's mean), which removes how much of
    # each batch is flat background: a fresh decoder predicts noise, training must beat that.
    zero = {r["step"]: r["zero_pred_loss"]
            for r in read_metrics(reference_run / METRICS_FILE, "train")}
    ratio = {s: losses[s] / zero[s] for s in losses}
    first, last = sum(ratio[s] for s in range(1, 6)) / 5, sum(ratio[s] for s in range(26, 31)) / 5
    assert last < 0.95 * first, (first, last)

    record = read_metrics(reference_run / METRICS_FILE)[-1]
    assert {"lr", "clips_per_s", "data_wait", "nonfinite_total", "epoch"} <= set(record)
    assert record["clips_per_s"] > 0 and 0 <= record["data_wait"] <= 1
    # predicting zeros = each patch's mean: per patch and channel, a normalised target (unbiased
    # std over n pixels) has mean square (n - 1) / n on a patch that is not flat, 0 on a flat one
    pixels = 2 * 8 * 8  # the reference run's tubelet x patch x patch
    assert 0.0 < record["zero_pred_loss"] <= (pixels - 1) / pixels + 1e-6
    for name in ("config.yaml", "deepspeed_config.json", "figures/loss_curve.png",
                 f"figures/reconstruction_{STEPS:08d}.png"):
        assert (reference_run / name).stat().st_size > 0, name
    assert any((reference_run / "tensorboard").iterdir())
    assert json.loads((reference_run / "deepspeed_config.json").read_text())[
        "train_micro_batch_size_per_gpu"] == 4

    manager = CheckpointManager(reference_run / "checkpoints")
    assert manager.complete_tags() == ["step_27", f"step_{STEPS}"]  # keep_last: 2
    summary = json.loads((reference_run / "ranks" / "rank_00000.json").read_text())
    assert summary["step"] == STEPS and summary["loader"]["decoded"] > 0


def test_encoder_export_loads_for_finetuning(reference_run):
    cfg = load_config(PretrainConfig, DEMO_CONFIG, [  # the geometry of tiny_args
        "model.num_frames=8", "data.num_frames=8", "model.img_size=32", "data.input_size=32",
        "data.sampling_rate=2", "model.tubelet_size=2", "data.tubelet_size=2"])
    encoder = VideoViT(cfg.model)
    export = reference_run / "checkpoints" / f"step_{STEPS}" / "encoder.safetensors"
    load_encoder_weights(encoder, export)
    state = load_file(str(export))
    assert all(v.dtype == torch.float32 for v in state.values())
    # The export equals the encoder inside the DeepSpeed checkpoint.
    model = VideoMAEPretrain(cfg.model)
    module_state = load_state_dict(export.parent / "mp_rank_00_model_states.pt")["module"]
    model.load_state_dict(module_state)
    for name, value in model.encoder.state_dict().items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=0)


def test_sigkill_mid_checkpoint_then_resume_auto_is_exact(demo_shards, reference_run, tmp_path):
    """A run SIGKILLed while writing step_6 leaves step_3 as the newest complete checkpoint;
    ``checkpoint.resume=auto`` continues from it and reproduces the uninterrupted losses."""
    kill_at_step_6 = (
        "import os, signal, sys\n"
        "import pretrain.train as train\n"
        "export = train.export_encoder\n"
        "def export_or_die(module, master, path):\n"
        "    if path.parent.name == 'step_6':\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    export(module, master, path)\n"
        "train.export_encoder = export_or_die\n"
        "from pretrain.__main__ import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    run_dir = tmp_path / "run"
    killed = subprocess.run([PYTHON, "-c", kill_at_step_6, *tiny_args(demo_shards, run_dir)],
                            cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "step_6").is_dir()
    assert not (checkpoints / "step_6" / COMPLETE_MARKER).exists()
    assert (checkpoints / "latest").read_text() == "step_3"
    assert CheckpointManager(checkpoints).resolve("auto") == "step_3"

    result = run_in_process(tiny_args(demo_shards, run_dir, max_steps=12))
    assert result["step"] == 12
    resumed, reference = losses_by_step(run_dir), losses_by_step(reference_run)
    assert sorted(resumed) == list(range(1, 13))
    for step in range(1, 13):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), step
    # The half-written step_6 was rewritten, then pruned with the others (keep_last: 2).
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_12", "step_9"]


@pytest.mark.parametrize("zero_stage, grad_checkpointing", [(1, False), (2, True)])
def test_zero_stages_match_zero0(demo_shards, reference_run, tmp_path, zero_stage,
                                 grad_checkpointing):
    """ZeRO-1/2 (the latter with activation checkpointing) reproduce the ZeRO-0 losses of the
    same seed (fp32; tolerance 1e-5 relative: only the order of reductions differs)."""
    run_in_process(tiny_args(demo_shards, tmp_path, max_steps=6, **{
        "engine.zero_stage": zero_stage, "model.grad_checkpointing": grad_checkpointing}))
    losses, reference = losses_by_step(tmp_path), losses_by_step(reference_run)
    assert [losses[s] for s in range(1, 7)] == pytest.approx([reference[s] for s in range(1, 7)],
                                                            rel=1e-5)


def test_bf16_accumulation_and_fp32_master_export(demo_shards, tmp_path):
    run_in_process(tiny_args(demo_shards, tmp_path, max_steps=2, **{
        "engine.precision": "bf16", "engine.zero_stage": 1, "engine.grad_accum_steps": 2}))
    ds_config = json.loads((tmp_path / "deepspeed_config.json").read_text())
    assert ds_config["data_types"]["grad_accum_dtype"] == "fp32"
    losses = losses_by_step(tmp_path)
    assert sorted(losses) == [1, 2] and all(torch.isfinite(torch.tensor(list(losses.values()))))
    export = load_file(str(tmp_path / "checkpoints" / "step_2" / "encoder.safetensors"))
    module = load_state_dict(tmp_path / "checkpoints" / "step_2" / "mp_rank_00_model_states.pt")[
        "module"]
    qkv = export["blocks.0.attn.qkv.weight"]
    assert qkv.dtype == torch.float32
    # fp32 masters: not bf16-representable in general, but rounding to bf16 gives the module.
    assert not torch.equal(qkv, qkv.bfloat16().float())
    torch.testing.assert_close(qkv.bfloat16(), module["encoder.blocks.0.attn.qkv.weight"])


def test_nonfinite_losses_are_skipped_then_stop_the_run(demo_shards, tmp_path, monkeypatch):
    """Micro-batches 3-4 give NaN (skipped, counted), from the 9th on every loss is NaN: the
    run stops after max_nonfinite_in_row=3 with the checkpoints written so far intact."""
    forward = VideoMAEPretrain.forward
    calls = []

    def sometimes_nan(self, *args, **kwargs):
        loss, pred, target = forward(self, *args, **kwargs)
        calls.append(1)
        if len(calls) in (3, 4) or len(calls) >= 9:
            loss = loss * float("nan")
        return loss, pred, target

    monkeypatch.setattr(VideoMAEPretrain, "forward", sometimes_nan)
    args = tiny_args(demo_shards, tmp_path, **{"engine.max_nonfinite_in_row": 3,
                                               "checkpoint.every_steps": 2})
    with pytest.raises(NonFiniteLossError, match="3 micro-batches in a row"):
        run_in_process(args)
    assert len(calls) == 11
    records = read_metrics(tmp_path / METRICS_FILE)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["nonfinite_total"] for r in records] == [0, 0, 2, 2, 2, 2]
    manager = CheckpointManager(tmp_path / "checkpoints")
    assert manager.complete_tags() == ["step_4", "step_6"]
    export = load_file(str(tmp_path / "checkpoints" / "step_6" / "encoder.safetensors"))
    assert all(torch.isfinite(v).all() for v in export.values())


def test_fresh_start_refuses_a_run_folder_with_checkpoints(demo_shards, reference_run, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(reference_run, run_dir)
    with pytest.raises(FileExistsError, match="checkpoint.resume=auto"):
        run_in_process(tiny_args(demo_shards, run_dir, **{"checkpoint.resume": ""}))

