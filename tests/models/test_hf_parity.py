"""Parity with HF transformers VideoMAE on tiny random configs, in both conversion directions.

Known HF differences, handled here explicitly: HF builds ``fc_norm`` and ``decoder.norm`` with
LayerNorm's default eps 1e-5 (the original and this project use 1e-6 everywhere), so the HF
models get ``eps = 1e-6`` set on those two modules; HF hard-codes the ImageNet mean / std for
its target, as this project's default ``pixel_mean`` / ``pixel_std``.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import (VideoMAEConfig, VideoMAEForPreTraining, VideoMAEForVideoClassification,
                          VideoMAEModel)

from models import (ModelConfig, VideoMAEPretrain, VideoViT, load_encoder_weights,
                    load_pretrain_weights)
from models.checkpoint import read_state_dict, save_project_checkpoint
from models.convert import main as convert_main
from models.hf import config_from_hf, export_hf, hf_to_project, project_to_hf
from runtime.errors import USER_ERROR_EXIT_CODE, InputError

ATOL = 1e-5
REPO = Path(__file__).resolve().parents[2]


def hf_config(**overrides) -> VideoMAEConfig:
    values = dict(image_size=32, patch_size=16, num_channels=3, num_frames=4, tubelet_size=2,
                  hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                  layer_norm_eps=1e-6, decoder_hidden_size=32, decoder_num_hidden_layers=2,
                  decoder_num_attention_heads=2, decoder_intermediate_size=128,
                  use_mean_pooling=False, attn_implementation="eager")
    values.update(overrides)
    return VideoMAEConfig(**values)


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (biases and norms included) so every tensor is exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.eps = 1e-6
    return model.eval()


def ours_config(hf: VideoMAEConfig, **overrides) -> ModelConfig:
    return ModelConfig(**{**config_from_hf(hf.to_dict()), **overrides})


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 32, 32, generator=gen)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, [1, 2, 5]] = True  # a random (not tube) mask with equal counts: joint attention
    mask[1, [0, 6, 7]] = True
    return x, mask


def hf_input(x):
    return x.transpose(1, 2)  # HF takes (B, T, C, H, W)


@pytest.mark.parametrize("bias_naming", ["new", "old"])
def test_encoder_hf_to_ours(bias_naming, inputs):
    x, mask = inputs
    hf = randomise(VideoMAEModel(hf_config()))
    state = hf.state_dict()
    if bias_naming == "old":  # older checkpoints: attention.attention.q_bias / v_bias
        state = {k.replace("query.bias", "q_bias").replace("value.bias", "v_bias"): v
                 for k, v in state.items()}
        assert any(k.endswith("attention.attention.q_bias") for k in state)
    ours = VideoViT(ours_config(hf.config)).eval()
    load_encoder_weights(ours, state)
    with torch.no_grad():
        for m in (None, mask):
            expected = hf(hf_input(x), bool_masked_pos=m).last_hidden_state
            torch.testing.assert_close(ours.forward_features(x, m), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_pretraining_loss_hf_to_ours(norm_pix_loss, inputs):
    x, mask = inputs
    hf = randomise(VideoMAEForPreTraining(hf_config(norm_pix_loss=norm_pix_loss)))
    ours = VideoMAEPretrain(ours_config(hf.config)).eval()
    report = load_pretrain_weights(ours, hf.state_dict())
    assert report.ok
    with torch.no_grad():
        out = hf(hf_input(x), bool_masked_pos=mask)
        loss, pred, _ = ours(x, mask)
    torch.testing.assert_close(pred, out.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(loss, out.loss, atol=ATOL, rtol=0)


def test_classification_logits_hf_to_ours(inputs):
    x, _ = inputs
    hf = randomise(VideoMAEForVideoClassification(hf_config(use_mean_pooling=True, num_labels=5)))
    ours = VideoViT(ours_config(hf.config, num_classes=5)).eval()
    load_encoder_weights(ours, hf.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(hf_input(x)).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["pretrain", "classifier", "encoder"])
def test_export_ours_to_hf(kind, inputs, tmp_path):
    x, mask = inputs
    cfg = ModelConfig(size="micro", img_size=32, num_frames=4, decoder_depth=2,
                      num_classes=5 if kind == "classifier" else 0)
    ours = randomise(VideoMAEPretrain(cfg) if kind == "pretrain" else VideoViT(cfg))
    export_hf(ours, tmp_path / "hf")
    hf_class = {"pretrain": VideoMAEForPreTraining, "classifier": VideoMAEForVideoClassification,
                "encoder": VideoMAEModel}[kind]
    hf = hf_class.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    for module in hf.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.eps = 1e-6
    with torch.no_grad():
        if kind == "pretrain":
            out = hf(hf_input(x), bool_masked_pos=mask)
            loss, pred, _ = ours(x, mask)
            torch.testing.assert_close(pred, out.logits, atol=ATOL, rtol=0)
            torch.testing.assert_close(loss, out.loss, atol=ATOL, rtol=0)
        elif kind == "classifier":
            torch.testing.assert_close(ours(x), hf(hf_input(x)).logits, atol=ATOL, rtol=0)
        else:
            torch.testing.assert_close(ours.forward_features(x), hf(hf_input(x)).last_hidden_state,
                                       atol=ATOL, rtol=0)


def test_old_bias_naming_round_trip():
    model = randomise(VideoMAEPretrain(ModelConfig(size="micro", img_size=32, num_frames=4)))
    state = model.state_dict()
    old = project_to_hf(state, "pretrain", bias_naming="old")
    assert "videomae.encoder.layer.0.attention.attention.q_bias" in old
    assert "decoder.decoder_layers.0.attention.attention.v_bias" in old
    back, kind, _ = hf_to_project(old)
    assert kind == "pretrain" and back.keys() == state.keys()
    for key in state:
        torch.testing.assert_close(back[key], state[key], rtol=0, atol=0)


def test_export_rejects_what_hf_cannot_express(tmp_path):
    model = VideoViT(ModelConfig(size="micro", img_size=32, num_frames=4, attention="divided"))
    with pytest.raises(ValueError, match="attention='divided' \\(HF has joint only\\)"):
        export_hf(model, tmp_path / "hf")


def test_old_bias_naming_loads_in_this_transformers(inputs, tmp_path):
    """transformers 5 dropped the ``q_bias`` / ``v_bias`` parameters; it renames them when
    loading (transformers#48675), so a folder written with the old naming still loads
    exactly."""
    x, _ = inputs
    cfg = ModelConfig(size="micro", img_size=32, num_frames=4, num_classes=5)
    ours = randomise(VideoViT(cfg))
    export_hf(ours, tmp_path / "hf", bias_naming="old")
    assert any(k.endswith("q_bias") for k in read_state_dict(tmp_path / "hf"))
    hf = VideoMAEForVideoClassification.from_pretrained(tmp_path / "hf",
                                                        attn_implementation="eager").eval()
    for module in hf.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.eps = 1e-6
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(hf_input(x)).logits, atol=ATOL, rtol=0)


def test_pretraining_run_checkpoint_exports_as_videomae_for_pretraining(tmp_path):
    """A pretraining run's DeepSpeed checkpoint folder (``mp_rank_00_model_states.pt`` with
    ``encoder.safetensors`` beside it, whose metadata gives the config) converts without
    ``--set``; HF's forward with the same tube mask gives our prediction and loss."""
    cfg = ModelConfig(size="micro", img_size=32, num_frames=4, decoder_depth=1,
                      num_heads=4, decoder_num_heads=2)
    ours = randomise(VideoMAEPretrain(cfg))
    step = tmp_path / "checkpoints" / "step_10"
    step.mkdir(parents=True)
    torch.save({"module": ours.state_dict()}, step / "mp_rank_00_model_states.pt")
    save_project_checkpoint(ours.encoder, step / "encoder.safetensors")
    assert convert_main([str(step), str(tmp_path / "hf"), "--to", "hf"]) == 0
    hf = VideoMAEForPreTraining.from_pretrained(tmp_path / "hf",
                                                attn_implementation="eager").eval()
    for module in hf.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.eps = 1e-6
    x = torch.randn(2, 3, 4, 32, 32, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(2, 2, 2, 2, dtype=torch.bool)  # (B, T', H', W'): a tube per sample
    mask[0, :, 0, 1] = mask[0, :, 1, 0] = mask[1, :, 1, 1] = mask[1, :, 0, 0] = True
    mask = mask.flatten(1)
    with torch.no_grad():
        loss, pred, _ = ours(x, mask)
        out = hf(hf_input(x), bool_masked_pos=mask)
    torch.testing.assert_close(pred, out.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(loss, out.loss, atol=ATOL, rtol=0)


def test_class_names_become_hf_labels(tmp_path):
    model = VideoViT(ModelConfig(size="micro", img_size=32, num_frames=4, num_classes=3))
    src = save_project_checkpoint(model, tmp_path / "model.safetensors")
    names = tmp_path / "classes.txt"
    names.write_text("walk\nrun\njump\n")
    assert convert_main([str(src), str(tmp_path / "hf"), "--to", "hf",
                         "--class-names", str(names)]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["id2label"] == {"0": "walk", "1": "run", "2": "jump"}
    assert config["label2id"] == {"walk": 0, "run": 1, "jump": 2}
    with pytest.raises(InputError, match="2 class names for a classifier of 3 classes"):
        export_hf(model, tmp_path / "hf2", class_names=["a", "b"])
    with pytest.raises(InputError, match=r"must be unique .* repeated: \['a'\]"):
        export_hf(model, tmp_path / "hf2", class_names=["a", "b", "a"])


def test_cli_refusal_is_one_line(tmp_path):
    model = VideoViT(ModelConfig(size="micro", img_size=32, num_frames=4, attention="divided"))
    src = save_project_checkpoint(model, tmp_path / "divided.safetensors")
    result = subprocess.run([sys.executable, "-m", "models.convert", str(src),
                             str(tmp_path / "hf"), "--to", "hf"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == USER_ERROR_EXIT_CODE and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [errors[0]] and "attention='divided' (HF has joint only)" in errors[0]
    assert not (tmp_path / "hf").exists()
