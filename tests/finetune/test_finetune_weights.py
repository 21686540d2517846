"""Loading pretrained encoders for fine-tuning: attention-type and frame-count conversion,
clear failures, and where the weights are found."""
from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

from finetune.common import build_model, resolve_weights
from models import VideoMAEPretrain, build_encoder
from runtime.checkpoint import CheckpointManager
from runtime.io import atomic_save_safetensors


@pytest.fixture
def pretrain_checkpoint(tmp_path, tiny_model_cfg):
    """An official-layout pretraining checkpoint (``{"model": state}``, joint, 8 frames)."""
    torch.manual_seed(1)
    model = VideoMAEPretrain(tiny_model_cfg())
    path = tmp_path / "checkpoint-0.pth"
    torch.save({"model": model.state_dict()}, path)
    return path, model


def test_joint_checkpoint_becomes_divided_with_zero_temporal_fc(pretrain_checkpoint,
                                                                tiny_model_cfg):
    path, source = pretrain_checkpoint
    model = build_model(tiny_model_cfg(attention="divided", num_classes=10), str(path))
    encoder = source.encoder
    for i, block in enumerate(model.blocks):
        torch.testing.assert_close(block.temporal_attn.qkv.weight,
                                   encoder.blocks[i].attn.qkv.weight)
        torch.testing.assert_close(block.attn.qkv.weight, encoder.blocks[i].attn.qkv.weight)
        assert torch.count_nonzero(block.temporal_fc.weight) == 0
    torch.testing.assert_close(model.patch_embed.proj.weight, encoder.patch_embed.proj.weight)
    # with temporal_fc at zero the divided model computes what per-slice attention with the
    # same (t, h, w) position code computes (space_only itself has no time code)
    space_only = build_model(tiny_model_cfg(attention="space_only", num_classes=10), str(path))
    space_only.pos_embed = model.pos_embed
    space_only.head.load_state_dict(model.head.state_dict())
    space_only.fc_norm.load_state_dict(model.fc_norm.state_dict())
    clip = torch.randn(2, 3, 8, 32, 32)
    torch.testing.assert_close(model.eval()(clip), space_only.eval()(clip))


def test_checkpoint_with_fewer_frames_loads_into_a_longer_clip(pretrain_checkpoint, tiny_model_cfg):
    path, source = pretrain_checkpoint
    model = build_model(tiny_model_cfg(num_frames=16, num_classes=10), str(path))
    torch.testing.assert_close(model.blocks[1].mlp.fc2.weight,
                               source.encoder.blocks[1].mlp.fc2.weight)
    assert model(torch.randn(1, 3, 16, 32, 32)).shape == (1, 10)


def test_learned_position_table_is_resized_to_the_new_frame_count(tmp_path, tiny_model_cfg):
    cfg = tiny_model_cfg(pos_embed="separable_learned")
    source = build_encoder(cfg)
    path = tmp_path / "encoder.safetensors"
    atomic_save_safetensors(source.state_dict(), path)
    model = build_model(dataclasses.replace(cfg, num_frames=16, num_classes=3), str(path))
    temporal = dict(model.named_parameters())["pos_embed.temporal"]
    assert temporal.shape[1] == 8  # 16 frames / tubelet 2, resized from 4


def test_divided_checkpoint_into_joint_model_fails_clearly(tmp_path, tiny_model_cfg):
    divided = build_encoder(tiny_model_cfg(attention="divided"))
    path = tmp_path / "divided.safetensors"
    atomic_save_safetensors(divided.state_dict(), path)
    with pytest.raises(ValueError) as info:
        build_model(tiny_model_cfg(attention="joint", num_classes=10), str(path))
    message = str(info.value)
    assert str(path) in message and "joint-attention model with 8 frames" in message
    assert "temporal_attn" in message and "attention='divided'" in message


def test_weights_are_found_in_a_pretraining_run_folder(tmp_path):
    tag_dir = tmp_path / "run" / "checkpoints" / "step_40"
    tag_dir.mkdir(parents=True)
    (tag_dir / "encoder.safetensors").write_bytes(b"")
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_40")
    assert resolve_weights(tmp_path / "run") == tag_dir / "encoder.safetensors"
    assert resolve_weights(tag_dir) == tag_dir / "encoder.safetensors"
    with pytest.raises(FileNotFoundError, match="without encoder.safetensors"):
        resolve_weights(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.pth do not exist"):
        resolve_weights(tmp_path / "missing.pth")


def test_weights_are_found_in_deepspeed_checkpoint_folders(tmp_path, tiny_model_cfg):
    """Checkpoints written by a real DeepSpeed engine: this project's layout (a fine-tuning
    run's ``checkpoints/step_N`` holds DeepSpeed's files and no encoder export) and the
    official VideoMAE ``--enable_deepspeed`` output folder (``latest`` naming
    ``checkpoint-N/mp_rank_00_model_states.pt``, weights under ``module``)."""
    from runtime.dist import init_distributed
    from runtime.engine import EngineConfig, create_engine
    from runtime.optim import OptimConfig

    init_distributed()
    cfg = tiny_model_cfg(num_classes=5)
    torch.manual_seed(1)  # not build_model's seed: loading must replace every weight
    engine = create_engine(build_encoder(cfg), EngineConfig(precision="fp32", zero_stage=0),
                           OptimConfig(), micro_batch_size=2, world_size=1, out_dir=None,
                           steps_per_epoch=2)
    engine.step(engine(torch.randn(2, 3, 8, 32, 32)).pow(2).mean())
    trained = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    run = tmp_path / "run"
    CheckpointManager(run / "checkpoints").save(engine, 1)
    official = tmp_path / "output"
    engine.ds_engine.save_checkpoint(str(official), tag="checkpoint-9", client_state={"epoch": 9})

    ours = run / "checkpoints" / "step_1" / "mp_rank_00_model_states.pt"
    assert (resolve_weights(run) == resolve_weights(run / "checkpoints")
            == resolve_weights(ours.parent) == ours)
    assert resolve_weights(official) == official / "checkpoint-9" / "mp_rank_00_model_states.pt"
    fresh = build_model(cfg, "").state_dict()
    for source in (run, official, ours.parent):
        loaded = build_model(cfg, str(source)).state_dict()
        assert loaded.keys() == trained.keys()
        for key, value in loaded.items():
            torch.testing.assert_close(value, trained[key], rtol=0, atol=0, msg=key)
        assert not torch.equal(loaded["blocks.0.attn.qkv.weight"],
                               fresh["blocks.0.attn.qkv.weight"])

    shutil.rmtree(official / "checkpoint-9")
    with pytest.raises(FileNotFoundError, match="latest names checkpoint checkpoint-9"):
        resolve_weights(official)
