"""Checkpoint files as the official code writes them, loaded with ``weights_only=True``:
VideoMAE / V2 ``checkpoint-N.pth`` (``args`` an ``argparse.Namespace``), DeepSpeed's
``mp_rank_00_model_states.pt`` written by a real engine, and mmaction2's VideoMAE names."""
from __future__ import annotations

import argparse
import pathlib

import pytest
import torch

from models import VideoMAEPretrain, VideoViT, load_encoder_weights
from models.pos_embed import sincos_1d_table
from runtime.errors import InputError
from tests.models.test_convert import randomise


def official_args(**extra) -> argparse.Namespace:
    """What ``run_mae_pretraining.py`` / ``run_class_finetuning.py`` keep in ``args``."""
    return argparse.Namespace(model="vit_base_patch16_224", batch_size=32, epochs=800,
                              mask_type="tube", mask_ratio=0.9, input_size=224,
                              window_size=(8, 14, 14), lr=1.5e-3, opt_betas=[0.9, 0.95],
                              data_path="/data/k400/train.csv", output_dir="output",
                              device="cuda", seed=0, dist_url="env://", **extra)


def official_payload(model: torch.nn.Module, **extra) -> dict:
    """``utils.save_model`` of VideoMAE / V2 (no DeepSpeed): model, optimizer, epoch, scaler,
    args."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sum(p.sum() for p in model.parameters()).backward()
    optimizer.step()
    scaler = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
              "growth_interval": 2000, "_growth_tracker": 0}
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 799,
            "scaler": scaler, "args": official_args(**extra)}


def assert_same_weights(target: torch.nn.Module, source: dict[str, torch.Tensor]) -> None:
    own = target.state_dict()
    shared = [k for k in own if k in source]
    assert len(shared) >= len(own) - 2  # a pretraining encoder has no fc_norm
    for key in shared:
        torch.testing.assert_close(own[key], source[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
def test_official_checkpoint_with_args_namespace(kind, tiny_cfg, clip, tmp_path):
    if kind == "pretrain":  # run_mae_pretraining.py: the whole pretraining model
        source = randomise(VideoMAEPretrain(tiny_cfg()))
        target, expected = VideoViT(tiny_cfg()), source.encoder
    else:  # run_class_finetuning.py: the classifier, plus its EMA copy
        source = randomise(VideoViT(tiny_cfg(num_classes=5)))
        target, expected = VideoViT(tiny_cfg(num_classes=5)), source
    payload = official_payload(source)
    if kind == "finetune":
        payload["model_ema"] = {k: v.clone() for k, v in payload["model"].items()}
    path = tmp_path / "checkpoint-799.pth"
    torch.save(payload, path)
    with pytest.raises(Exception, match="argparse.Namespace"):  # what main failed with
        torch.load(path, weights_only=True)
    report = load_encoder_weights(target.eval(), path)
    assert report.ok
    assert_same_weights(target, expected.state_dict())
    x = clip(tiny_cfg())
    with torch.no_grad():
        torch.testing.assert_close(target.forward_features(x), expected.forward_features(x))
    # the class is allowed for that one load only, not process-wide
    with pytest.raises(Exception, match="argparse.Namespace"):
        torch.load(path, weights_only=True)


def test_deepspeed_model_states_from_a_real_engine(tiny_cfg, clip, tmp_path):
    """Official fine-tuning with ``--enable_deepspeed``: ``model.save_checkpoint(output_dir,
    tag="checkpoint-N", client_state={"epoch": N})``; weights under ``module`` beside
    DeepSpeed's own entries, which need no class beyond tensors and containers."""
    from runtime.dist import init_distributed
    from runtime.engine import EngineConfig, create_engine
    from runtime.optim import OptimConfig

    init_distributed()
    torch.manual_seed(0)
    model = VideoViT(tiny_cfg(num_classes=5))
    engine = create_engine(model, EngineConfig(precision="fp32", zero_stage=0), OptimConfig(),
                           micro_batch_size=2, world_size=1, out_dir=None, steps_per_epoch=2)
    x = clip(tiny_cfg())
    engine.step(engine(x).pow(2).mean())
    engine.ds_engine.save_checkpoint(str(tmp_path), tag="checkpoint-9",
                                     client_state={"epoch": 9})
    path = tmp_path / "checkpoint-9" / "mp_rank_00_model_states.pt"
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    raw = torch.load(path, weights_only=True)
    assert {"module", "optimizer", "buffer_names", "ds_config", "ds_version", "global_steps",
            "dp_world_size", "epoch"} <= set(raw)
    target = VideoViT(tiny_cfg(num_classes=5)).eval()
    assert load_encoder_weights(target, path.parent).ok  # the tag folder finds the file
    trained = {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}
    assert_same_weights(target, trained)
    assert not torch.equal(trained["head.weight"], VideoViT(tiny_cfg(num_classes=5)).head.weight)


def mmaction_state(model: VideoViT, table: torch.Tensor) -> dict[str, torch.Tensor]:
    """mmaction2's ``Recognizer3D`` with the VideoMAE ``VisionTransformer`` backbone (mmcv
    ``PatchEmbed`` / ``FFN`` names, the position table saved as a buffer) and
    ``TimeSformerHead``."""
    renames = (("patch_embed.proj.", "patch_embed.projection."), (".mlp.fc1.", ".mlp.layers.0.0."),
               (".mlp.fc2.", ".mlp.layers.1."))
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("head."):
            state[f"cls_head.fc_cls.{key[len('head.'):]}"] = value
            continue
        for ours, theirs in renames:
            key = key.replace(ours, theirs)
        state[f"backbone.{key}"] = value
    state["backbone.pos_embed"] = table
    return state


def test_mmaction2_videomae_checkpoint(tiny_cfg, clip, tmp_path):
    cfg = tiny_cfg(num_classes=5)
    source = randomise(VideoViT(cfg))
    fixed = sincos_1d_table(cfg.num_tokens, source.embed_dim)
    meta = {"mmengine_version": "0.10.4", "epoch": 35, "iter": 7000, "seed": 0,
            "dataset_meta": {"classes": ["a", "b", "c", "d", "e"]}, "cfg": "model = dict()"}
    path = tmp_path / "vit-base-p16_videomae-k400-pre_16x4x1_kinetics-400.pth"
    torch.save({"meta": meta, "state_dict": mmaction_state(source, fixed)}, path)
    target = VideoViT(cfg).eval()
    assert load_encoder_weights(target, path).ok
    assert_same_weights(target, source.state_dict())
    x = clip(cfg)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x))
    # a learned table over the flattened tokens (use_learnable_pos_emb) is not dropped
    learned = mmaction_state(source, torch.randn_like(fixed))
    report = load_encoder_weights(VideoViT(cfg), learned, strict=False)
    assert report.unexpected == ["pos_embed"] and "use_learnable_pos_emb" in str(report)


def test_a_file_needing_another_class_names_it(tiny_cfg, tmp_path):
    payload = official_payload(VideoViT(tiny_cfg()), log_dir=pathlib.PurePosixPath("logs"))
    path = tmp_path / "checkpoint-1.pth"
    torch.save(payload, path)
    with pytest.raises(InputError) as err:
        load_encoder_weights(VideoViT(tiny_cfg()), path)
    message = str(err.value)
    assert "pathlib.PurePosixPath" in message and str(path) in message
    assert "not allowed: pathlib.PurePosixPath (" in message  # Namespace itself is allowed
