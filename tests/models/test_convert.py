"""Checkpoint loading / conversion: official layouts, attention types, resizing, the CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from models import (VideoMAEPretrain, VideoViT, encoder_state_dict, load_encoder_weights,
                    load_pretrain_weights)
from models.checkpoint import read_state_dict, save_project_checkpoint
from models.convert import main as convert_main
from models.pos_embed import resize_spatial, resize_temporal


def randomise(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    return model.eval()


@pytest.fixture
def pretrained(tiny_cfg):
    return randomise(VideoMAEPretrain(tiny_cfg()))


@pytest.mark.parametrize("wrap", ["model", "module_orig_mod"])
def test_official_pretraining_checkpoint_into_encoder(wrap, pretrained, tiny_cfg, clip, tmp_path):
    state = pretrained.state_dict()
    if wrap == "model":  # official VideoMAE: {"model": state, ...}
        payload = {"model": state, "epoch": torch.tensor(3)}
    else:  # DeepSpeed "module" of a torch.compile'd V2 model
        payload = {"module": {f"_orig_mod.{k}": v for k, v in state.items()}}
    path = tmp_path / "checkpoint-799.pth"
    torch.save(payload, path)
    encoder = VideoViT(tiny_cfg()).eval()
    report = load_encoder_weights(encoder, path)
    assert report.source_format == "pretrain" and report.ok
    x = clip(tiny_cfg())
    with torch.no_grad():
        torch.testing.assert_close(encoder.forward_features(x),
                                   pretrained.encoder.forward_features(x))


def test_pretraining_checkpoint_into_classifier_drops_norm_and_adds_head(pretrained, tiny_cfg):
    classifier = VideoViT(tiny_cfg(num_classes=10))
    report = load_encoder_weights(classifier, {"model": pretrained.state_dict()})
    text = str(report)
    assert "dropped norm.*" in text and "head initialised fresh" in text
    assert "decoder tensors" in text
    torch.testing.assert_close(classifier.blocks[1].attn.qkv.weight,
                               pretrained.encoder.blocks[1].attn.qkv.weight)


def test_finetuned_checkpoint_with_backbone_prefix(tiny_cfg, clip):
    source = randomise(VideoViT(tiny_cfg(num_classes=6)))
    state = {f"backbone.{k}": v for k, v in source.state_dict().items()}
    target = VideoViT(tiny_cfg(num_classes=6)).eval()
    load_encoder_weights(target, state)
    x = clip(tiny_cfg())
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x))
    other = VideoViT(tiny_cfg(num_classes=3))
    assert "dropped the checkpoint's head" in str(load_encoder_weights(other, state))


def test_strict_mismatch_report_is_readable(tiny_cfg):
    deeper = VideoViT(tiny_cfg(depth=3)).state_dict()
    with pytest.raises(ValueError) as err:
        load_encoder_weights(VideoViT(tiny_cfg()), deeper)
    message = str(err.value)
    assert "unexpected in checkpoint" in message and "blocks.2.attn.qkv.weight" in message
    wider = VideoViT(tiny_cfg(embed_dim=128)).state_dict()
    report = load_encoder_weights(VideoViT(tiny_cfg()), wider, strict=False)
    assert any(m.startswith("patch_embed.proj.weight (128, 3, 2, 16, 16) vs model (64,")
               for m in report.mismatched)
    with pytest.raises(FileNotFoundError, match="missing.pth does not exist"):
        load_encoder_weights(VideoViT(tiny_cfg()), "missing.pth")


def test_joint_to_divided_equals_space_only_until_temporal_fc_moves(tiny_cfg, clip, tube_mask):
    joint = randomise(VideoViT(tiny_cfg(num_classes=4)))
    divided = VideoViT(tiny_cfg(attention="divided", num_classes=4)).eval()
    space_only = VideoViT(tiny_cfg(attention="space_only", num_classes=4)).eval()
    report = load_encoder_weights(divided, joint.state_dict())
    load_encoder_weights(space_only, joint.state_dict())
    # per-slice blocks with divided's (t, h, w) position code: space_only itself has no time
    # code, so a zero temporal_fc makes divided equal to this, not to space_only as built
    space_only.pos_embed = divided.pos_embed
    assert any("temporal_fc zero" in note for note in report.notes)
    block = divided.blocks[0]
    torch.testing.assert_close(block.temporal_attn.qkv.weight, block.attn.qkv.weight)
    torch.testing.assert_close(block.temporal_norm1.weight, block.norm1.weight)
    x, mask = clip(tiny_cfg()), tube_mask(tiny_cfg())
    with torch.no_grad():
        for m in (None, mask):
            torch.testing.assert_close(divided(x, m), space_only(x, m))
        for blk in divided.blocks:
            blk.temporal_fc.weight.normal_(0, 0.1)
        assert not torch.allclose(divided(x), space_only(x))
        assert not torch.allclose(divided(x, mask), space_only(x, mask))


def test_joint_loads_into_mixing_and_divided_does_not_load_into_joint(tiny_cfg):
    joint = VideoViT(tiny_cfg())
    assert load_encoder_weights(VideoViT(tiny_cfg(attention="mixing")), joint.state_dict()).ok
    divided_state = VideoViT(tiny_cfg(attention="divided")).state_dict()
    with pytest.raises(ValueError, match="load it into attention='divided'"):
        load_encoder_weights(VideoViT(tiny_cfg()), divided_state)


def test_learned_separable_tables_resize_at_load(tiny_cfg, clip):
    small = randomise(VideoViT(tiny_cfg(pos_embed="separable_learned")))  # grid 2 x 2 x 2
    # grid 4 x 4 x 4
    big = VideoViT(tiny_cfg(pos_embed="separable_learned", num_frames=8, img_size=64))
    report = load_encoder_weights(big, small.state_dict())
    assert "resized pos_embed.spatial from 2x2 to 4x4" in report.notes
    assert "resized pos_embed.temporal from 2 to 4 time slices" in report.notes
    src = small.pos_embed
    torch.testing.assert_close(big.pos_embed.spatial.data,
                               resize_spatial(src.spatial.data, (2, 2), (4, 4)))
    torch.testing.assert_close(big.pos_embed.temporal.data,
                               resize_temporal(src.temporal.data, 2, 4))
    assert big.forward_features(clip(big.cfg, batch=1)).shape == (1, 64, 64)


def test_project_pretraining_file_round_trip(pretrained, tiny_cfg, clip, tube_mask, tmp_path):
    path = save_project_checkpoint(pretrained, tmp_path / "pretrain.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        assert json.loads(handle.metadata()["model_config"])["size"] == "micro"
    restored = VideoMAEPretrain(tiny_cfg()).eval()
    assert load_pretrain_weights(restored, path).ok
    x, mask = clip(tiny_cfg()), tube_mask(tiny_cfg())
    with torch.no_grad():
        torch.testing.assert_close(restored(x, mask)[0], pretrained(x, mask)[0])
    encoder = VideoViT(tiny_cfg()).eval()
    assert load_encoder_weights(encoder, encoder_state_dict(pretrained)).ok
    with pytest.raises(ValueError, match="use load_encoder_weights"):
        load_pretrain_weights(restored, encoder_state_dict(pretrained))


def test_cli_help():
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-m", "models.convert", "--help"], capture_output=True,
                            text=True, check=True, cwd=root)
    assert "RuntimeWarning" not in result.stderr
    assert "--to {project,hf}" in result.stdout and "official VideoMAE" in result.stdout


def test_cli_converts_official_checkpoint_to_divided_and_to_hf(pretrained, tmp_path, capsys):
    src = tmp_path / "official.pth"
    torch.save({"model": pretrained.state_dict()}, src)
    out = tmp_path / "divided_encoder.safetensors"
    assert convert_main([str(src), str(out), "--kind", "encoder", "--set", "img_size=32", "--set",
                         "num_frames=4", "--set", "attention=divided"]) == 0
    assert "temporal_fc zero" in capsys.readouterr().out
    state = read_state_dict(out)
    assert "blocks.1.temporal_attn.qkv.weight" in state and "decoder.head.weight" not in state
    hf_dir = tmp_path / "hf"
    assert convert_main([str(src), str(hf_dir), "--to", "hf", "--set", "img_size=32", "--set",
                         "num_frames=4", "--set", "num_heads=4", "--set",
                         "decoder_num_heads=2"]) == 0
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["architectures"] == ["VideoMAEForPreTraining"] and config["hidden_size"] == 64
    back = VideoMAEPretrain(pretrained.cfg).eval()
    assert load_pretrain_weights(back, hf_dir).ok
    for key, value in pretrained.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value, rtol=0, atol=0)


def test_cli_inflates_a_timm_checkpoint(tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    from runtime.io import atomic_save_safetensors

    vit = VisionTransformer(img_size=32, patch_size=16, embed_dim=64, depth=2, num_heads=4,
                            num_classes=5)
    src = atomic_save_safetensors(vit.state_dict(), tmp_path / "timm_vit.safetensors")
    out = tmp_path / "video.safetensors"
    assert convert_main([str(src), str(out), "--set", "num_frames=4",
                         "--set", "attention=space_only"]) == 0
    with safe_open(str(out), framework="pt") as handle:
        cfg = json.loads(handle.metadata()["model_config"])
    assert ((cfg["img_size"], cfg["pos_embed"], cfg["final_norm"], cfg["num_classes"])
            == (32, "separable_learned", "norm", 5))
    assert read_state_dict(out)["patch_embed.proj.weight"].shape == (64, 3, 2, 16, 16)


def test_tubelet_1_encoder_inflates_into_a_tubelet_2_model():
    """I3D inflation of the patch embedding: on a clip whose frames repeat in pairs, the
    tubelet-2 model's tokens equal the tubelet-1 model's tokens of every other frame."""
    import dataclasses

    from models import ModelConfig, VideoViT, load_encoder_weights

    torch.manual_seed(0)
    base = ModelConfig(size="micro", img_size=32, patch_size=8, num_frames=4, tubelet_size=1,
                       pos_embed="separable_sincos")
    source = VideoViT(base)
    target = VideoViT(dataclasses.replace(base, num_frames=8, tubelet_size=2))
    report = load_encoder_weights(target, source.state_dict())
    assert any("inflated" in note for note in report.notes)
    x = torch.randn(1, 3, 4, 32, 32)
    paired = x.repeat_interleave(2, dim=2)  # frames f0 f0 f1 f1 ...
    with torch.no_grad():
        torch.testing.assert_close(target.patch_embed(paired), source.patch_embed(x),
                                   atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="does not divide"):
        load_encoder_weights(VideoViT(dataclasses.replace(base, num_frames=6, tubelet_size=3)),
                             VideoViT(dataclasses.replace(base, tubelet_size=2)).state_dict())
